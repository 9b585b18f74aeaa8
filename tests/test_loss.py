"""Chunked linear cross-entropy (lingua_wd/loss.py) equals the plain loss, alone, in the model, under FSDP2;
and scripts/bench.py runs end to end on CPU (its --cpu-smoke mode), HF baseline and levers included."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, env, free_port
from lingua_wd.loss import linear_cross_entropy, reference_cross_entropy
from lingua_wd.model import ModelArgs, Transformer, flops_per_token

RTOL, ATOL = 1e-5, 1e-7


def data(n=37, d=16, vocab=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, d, generator=g) / d**0.5).to(dtype).requires_grad_()
    t = torch.randint(vocab, (n,), generator=g)
    return h, w, t


def loss_and_grads(fn, h, w, t, scale=1.0):
    h.grad = w.grad = None
    loss = fn(h, w, t)
    (loss * scale).backward()
    return loss.detach(), h.grad.clone(), w.grad.clone()


def plain(h, w, t):
    return reference_cross_entropy(h @ w.t(), t)


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])  # one row, ragged last chunk, exact, larger than N
def test_matches_cross_entropy_values_and_gradients(chunk):
    h, w, t = data()
    t[[3, 20]] = -100  # ignored positions are not counted, as in F.cross_entropy
    got = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=chunk), h, w, t, scale=3.0)
    want = loss_and_grads(plain, h, w, t, scale=3.0)  # an upstream gradient != 1 must scale both grads
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    assert got[1][3].abs().max() == 0 and got[1][20].abs().max() == 0  # ignored rows get no gradient


def test_batched_hidden_and_only_hidden_requires_grad():
    h, w, t = data(n=24)
    w.requires_grad_(False)
    h3, t3 = h.detach().view(2, 12, -1).requires_grad_(), t.view(2, 12)
    loss = linear_cross_entropy(h3, w, t3, chunk_size=5)
    loss.backward()
    h3_ref = h3.detach().clone().requires_grad_()
    reference_cross_entropy(h3_ref @ w.t(), t3).backward()
    torch.testing.assert_close(h3.grad, h3_ref.grad, rtol=RTOL, atol=ATOL)


def test_no_grad_path_gives_the_same_loss_without_a_graph():
    h, w, t = data()
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t, chunk_size=6)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, plain(h, w, t).detach(), rtol=RTOL, atol=ATOL)


def test_bf16_inputs_stay_close_to_the_plain_bf16_loss():
    h, w, t = data(n=64, d=32, vocab=300, dtype=torch.bfloat16)
    got = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=16), h, w, t)
    want = loss_and_grads(plain, h, w, t)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=1e-3)
    for a, b in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.float().abs().max().item())


def test_compiled_chunks_match():
    h, w, t = data(n=32)
    t[5] = -100
    got = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=16, compiled=True), h, w, t)
    want = loss_and_grads(plain, h, w, t)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def tiny_model(**kw) -> Transformer:
    args = ModelArgs(**{"dim": 64, "n_layers": 2, "head_dim": 32, "vocab_size": 101, "max_seq_len": 16, **kw})
    m = Transformer(args)
    m.init_weights(seed=1)
    return m


@pytest.mark.parametrize("ac", [False, True])
def test_transformer_loss_equals_cross_entropy_of_the_model_logits(ac):
    m = tiny_model()
    m.activation_checkpointing = ac
    batch = torch.randint(101, (3, 17), generator=torch.Generator().manual_seed(0))
    x, y = batch[:, :-1], batch[:, 1:]
    m.loss_chunk = 7
    loss = m(x, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    ref = reference_cross_entropy(m(x), y)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=ATOL)
    for n, p in m.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=RTOL, atol=ATOL, msg=lambda s, n=n: f"{n}: {s}")


FSDP_WORKER = textwrap.dedent("""
    import json, os, sys, torch
    from lingua_wd.distributed import DistributedArgs, all_reduce_mean, init_distributed, parallelize, shutdown
    from lingua_wd.loss import reference_cross_entropy
    from lingua_wd.model import ModelArgs, Transformer

    def main():  # locals, not globals: FSDP2 state alive at interpreter exit can abort gloo (SIGABRT)
        env = init_distributed(DistributedArgs(device="cpu"))
        args = ModelArgs(dim=64, n_layers=2, head_dim=32, vocab_size=101, max_seq_len=16)  # 101 rows: uneven shards
        with torch.device("meta"):
            model = Transformer(args)
        model.loss_chunk = 7  # the loss runs inside the root's forward, where FSDP2 has unsharded output.weight
        parallelize(model, DistributedArgs(device="cpu"), env.device)
        model.to_empty(device=env.device)
        model.init_weights(seed=1)
        ref = Transformer(args)
        ref.init_weights(seed=1)
        batch = torch.randint(101, (4, 17), generator=torch.Generator().manual_seed(0))
        x, y = batch[:, :-1], batch[:, 1:]
        mine = slice(2 * env.rank, 2 * env.rank + 2)  # data parallel: each rank its half; FSDP averages the grads
        with torch.no_grad():  # first: after a no-grad forward the last block (no reshard) lists unsharded params
            eval_loss = model(x[mine], y[mine])
        loss = model(x[mine], y[mine])
        loss.backward()
        ref_loss = reference_cross_entropy(ref(x), y)
        ref_loss.backward()
        assert type(model.output.weight).__name__ == "DTensor"  # sharded again outside forward
        out = {"loss": all_reduce_mean(loss.detach()).item(), "eval_loss": all_reduce_mean(eval_loss).item(),
               "ref_loss": ref_loss.item(), "grads": {}}
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            full = p.grad.full_tensor()
            out["grads"][n] = ((full - q.grad).abs().max() / q.grad.abs().max()).item()
        if env.rank == 0:
            open(sys.argv[1], "w").write(json.dumps(out))

    main()
    shutdown()
    os._exit(0)  # torch 2.13: gloo can still abort in interpreter teardown (std::terminate, 1 run in ~50 under load)
""")


def test_fsdp2_two_ranks_sharded_output_weight(tmp_path):
    script, result = tmp_path / "worker.py", tmp_path / "result.json"
    script.write_text(FSDP_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(script), str(result)]  # fmt: skip
    e = env()
    e["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(result.read_text())
    assert out["loss"] == pytest.approx(out["ref_loss"], rel=1e-5)
    assert out["eval_loss"] == pytest.approx(out["ref_loss"], rel=1e-5)
    assert len(out["grads"]) == 21
    bad = {n: err for n, err in out["grads"].items() if not err < 1e-5}
    assert not bad, bad


@pytest.mark.gpu
def test_cuda_bf16_compiled_matches_plain_with_less_memory():
    dev = torch.device("cuda")
    n, d, vocab = 8192, 512, 128_256
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(n, d, device=dev, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(vocab, d, device=dev, generator=g) / d**0.5).bfloat16().requires_grad_()
    t = torch.randint(vocab, (n,), device=dev, generator=g)
    peaks, results = [], []
    for fn in (plain, lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=2048, compiled=True)):
        fn(h, w, t).backward()  # warm-up (compilation)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        results.append(loss_and_grads(fn, h, w, t))
        peaks.append(torch.cuda.max_memory_allocated() - base)
    (l0, gh0, gw0), (l1, gh1, gw1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gh1.float(), gh0.float(), rtol=5e-2, atol=5e-2 * gh0.float().abs().max().item())
    torch.testing.assert_close(gw1.float(), gw0.float(), rtol=5e-2, atol=5e-2 * gw0.float().abs().max().item())
    assert peaks[1] < peaks[0] / 3, peaks


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_bench_flops_per_token_is_the_models():
    bench = load_bench()
    s = bench.Shape(n_layers=3, head_dim=32, vocab=1000, seq=64)
    m = Transformer(ModelArgs(dim=96, n_layers=3, head_dim=32, vocab_size=1000, max_seq_len=64))
    assert bench.flops_per_token(96, s) == flops_per_token(m, 64)


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_bench_cpu_smoke_runs_every_row(tmp_path):
    out = tmp_path / "bench.md"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--cpu-smoke", "--baseline", "hf", "--levers",
           "--warmup", "1", "--steps", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = out.read_text()
    cells = [line.split("|") for line in table.splitlines() if line.startswith("| ")]
    names = [c[1].strip() for c in cells if c[2].strip().isdigit()]  # measured rows (d is a number)
    assert names.count("ours") == 3 and names.count("HF") == 2  # d=64 mb 2; d=128 mb 2 and 4; HF at each width
    assert {"base", "CE plain", "CE chunked eager", "no block compile", "foreach AdamW"} <= set(names)
    assert "OOM" not in table and "error" not in table
    assert "torch " in table and "command: `python" in table


def test_bench_profile_breakdown_adds_up(tmp_path):
    """--profile: per row, the categories and the uncovered remainder add up to the profiled step."""
    out = tmp_path / "bench.md"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--cpu-smoke", "--profile", "--warmup", "1",
           "--steps", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    table = text[text.index("Where a step's time goes") :].splitlines()
    header = [c.strip() for c in table[2].split("|")[1:-1]]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table[4:] if line.startswith("| ours")]
    assert len(rows) == 3
    for row in rows:
        cells = dict(zip(header, row, strict=True))
        parts = [
            float(v.split()[0]) for k, v in cells.items() if k not in ("run", "d", "micro-batch", "profiled step ms")
        ]
        assert sum(parts) == pytest.approx(float(cells["profiled step ms"]), abs=0.1 * len(parts))
        assert float(cells["matmul"].split()[0]) > 0 and float(cells["attention"].split()[0]) > 0


def test_bench_kernel_categories():
    """Real H100 kernel names (cuBLAS, nvjet, flash / cuDNN attention, fused AdamW, FSDP2 copies, inductor)."""
    bench = load_bench()  # alone too: its dataclasses need the module in sys.modules
    cases = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_kernel__5x_cublas": "matmul",  # noqa: E501
        "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN": "matmul",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128, 64>>": "attention",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0": "attention",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>": "optimizer+clip",
        "void at::native::(anonymous namespace)::chunk_cat_cuda_kernel<c10::BFloat16, c10::BFloat16>": "copies+comm",
        "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "copies+comm",
        "triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0": "compiled (triton)",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "elementwise (eager)",
    }
    for name, cat in cases.items():
        assert bench.kernel_category(name) == cat, name
