"""Probes under FSDP2: a 2-process gloo run (this file is also the worker, launched by torchrun)
gives the same metrics as one process, changes no loss bit, and works with bf16 mixed precision; the
library API (lingua_wd/library.py) on a sharded CNN gives one process's probe values too.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lingua_wd.distributed import shutdown
from lingua_wd.model import ModelArgs, Transformer
from lingua_wd.probes import METRICS, ProbeArgs, build_probes

VOCAB, T, BATCH, STEPS, LR, WD = 97, 16, 4, 3, 1e-2, 0.1
ARGS = ModelArgs(dim=64, n_layers=2, head_dim=32, vocab_size=VOCAB, max_seq_len=T)  # output: 97 rows, uneven shards


def global_batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, T + 1), generator=gen) for _ in range(STEPS)]


def run(model, batches, probes) -> tuple[list[float], list[dict]]:
    """The trainer's step: backward, before_step on the first micro-batch, optimizer step, after_step."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, betas=(0.9, 0.95))
    losses, metrics = [], []
    for step, batch in enumerate(batches):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        loss = F.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten())
        loss.backward()
        losses.append(loss.item())
        if probes is not None:
            probes.before_step(step, inputs)
        opt.step()
        opt.zero_grad(set_to_none=True)
        metrics.append(probes.after_step(step, opt) if probes is not None else {})
    return losses, metrics


def probe_args(fraction: float) -> ProbeArgs:
    return ProbeArgs(every=1, layers=["all"], fraction=fraction, metrics=list(METRICS), power_iters=300)


def sharded_model(mp_dtype=None) -> Transformer:
    """fully_shard each block and the root, the root keeping its params gathered after forward
    (reshard_after_forward=False: the probe must reshard it, or the next step would use stale weights)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = Transformer(ARGS)
    mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32) if mp_dtype else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    model.init_weights(seed=0)
    return model


def worker(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per = BATCH // world
    mine = [b[rank * per : (rank + 1) * per] for b in global_batches()]
    losses_off, _ = run(sharded_model(), mine, None)
    model = sharded_model()
    rng = torch.get_rng_state()
    losses_on, metrics = run(model, mine, build_probes(probe_args(0.5), model))  # 1 of 2 local rows
    same_rng = torch.equal(rng, torch.get_rng_state())
    bf16 = sharded_model(torch.bfloat16)
    _, metrics_bf16 = run(bf16, mine[:1], build_probes(probe_args(0.5), bf16))
    everyone = [None] * world
    dist.all_gather_object(everyone, metrics)
    if rank == 0:
        result = {"losses_off": losses_off, "losses_on": losses_on, "same_rng": same_rng, "metrics": metrics,
                  "ranks_agree": all(m == metrics for m in everyone), "metrics_bf16": metrics_bf16}  # fmt: skip
        Path(out).write_text(json.dumps(result))
    shutdown()  # barrier, then destroy: torch 2.13 gloo processes can abort at exit without it


@pytest.fixture(scope="module")
def fsdp_result(tmp_path_factory) -> dict:
    from conftest import ROOT, env, free_port

    out = tmp_path_factory.mktemp("fsdp") / "probes.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           __file__, str(out)]  # fmt: skip
    environ = dict(env(), PYTHONPATH=str(ROOT))  # the worker imports lingua_wd from this checkout
    proc = subprocess.run(cmd, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)
    log = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if not line.startswith("[W"))
    assert proc.returncode == 0, log[-6000:]
    return json.loads(out.read_text())


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_two_process_fsdp_matches_one_process(fsdp_result):
    model = Transformer(ARGS)
    model.init_weights(seed=0)
    _, ref = run(model, global_batches(), build_probes(probe_args(0.25), model))  # 1 of 4 rows = rank 0's first
    assert fsdp_result["ranks_agree"]  # every rank returns the same floats
    for step, (got, want) in enumerate(zip(fsdp_result["metrics"], ref, strict=True)):
        assert got.keys() == want.keys() and len(got) > 100
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-9), (step, k)


def test_probing_does_not_change_fsdp_training(fsdp_result):
    assert fsdp_result["losses_on"] == fsdp_result["losses_off"]  # bitwise, on this rank's data
    assert fsdp_result["same_rng"]


def test_bf16_mixed_precision_metrics_close_to_fp32(fsdp_result):
    """bf16 compute (FSDP2 MixedPrecisionPolicy), norms in fp32: step 0 within bf16 rounding of fp32."""
    got, want = fsdp_result["metrics_bf16"][0], fsdp_result["metrics"][0]
    assert got.keys() == want.keys()
    for k, v in want.items():
        if k.endswith(("weight_align", "weight_rms", "sigma_max", "eq_weight_rms")):
            assert got[k] == pytest.approx(v, rel=1e-2), k
    # the update itself depends on bf16 gradients; its alignment still agrees to a few percent
    assert got["probe/median/hidden/rrc"] == pytest.approx(want["probe/median/hidden/rrc"], rel=0.05)


@pytest.mark.gpu
def test_gpu_bf16_compiled_trainer(tmp_path, tiny):
    """The real trainer on CUDA (FSDP2 bf16 params, blocks compiled in place): every linear probed
    every other step, losses bitwise equal to a run without probes, metrics sane."""
    from conftest import losses, read_metrics, run_train

    common = ["config=configs/debug.yaml", *tiny, "steps=10", "log_freq=1", "checkpoint.every=0",
              "distributed.compile=true", "distributed.deterministic=true"]  # fmt: skip
    run_train([*common, f"dump_dir={tmp_path / 'off'}"])
    run_train([*common, f"dump_dir={tmp_path / 'on'}", "probes.layers=[all]", "probes.every=2"])
    assert losses(tmp_path / "on") == losses(tmp_path / "off")
    recs = [r for r in read_metrics(tmp_path / "on") if "probe/output/rrc" in r]
    assert [r["step"] for r in recs] == [1, 3, 5, 7, 9]
    for r in recs:
        for k, v in r.items():
            assert not k.startswith("probe/") or (math.isfinite(v) and v >= 0), k
        for layer in ("layers.0.attention.wq", "layers.1.feed_forward.w2", "output"):
            p = f"probe/{layer}/"
            assert r[p + "rrc"] == pytest.approx(r[p + "align_ratio"] * r[p + "rel_update"], rel=1e-9)
    for layer in ("layers.0.attention.wq", "layers.1.feed_forward.w1", "output"):  # C = 64 at init
        assert recs[0][f"probe/{layer}/weight_align"] == pytest.approx(1 / 8, rel=0.2), layer


# ----------------------------------------------------------------------------- the library on a sharded CNN

CNN_BATCH, CNN_WIDTH, CNN_BASE = 8, 16, 8


def cnn_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(CNN_BATCH, 3, 8, 8, generator=gen), torch.randint(0, 10, (CNN_BATCH,), generator=gen))
            for _ in range(STEPS)]  # fmt: skip


def run_cnn(model, batches, fraction: float) -> list[dict]:
    """A user's loop with the API, as docs/library.md orders it: fully_shard (done), classify against a base
    on the meta device, reinit, param_groups, plain AdamW, attach_probes."""
    from test_library import CNN

    from lingua_wd import library as lw
    from lingua_wd.scaling import ScalingArgs

    with torch.device("meta"):
        base = CNN(CNN_BASE, norm="group")  # group norm: no statistics across the ranks' samples
    classes = lw.classify(model, base=base)
    plan = lw.plan(ScalingArgs(width="mup", wd="independent", base_dim=CNN_BASE), CNN_WIDTH, lr=LR, weight_decay=WD)
    lw.reinit(model, plan, classes, seed=0)
    opt = torch.optim.AdamW(lw.param_groups(model, plan, classes))
    probes = lw.attach_probes(model, ["all"], classes, every=1, fraction=fraction, positions=0,
                              metrics=list(METRICS), power_iters=300)  # fmt: skip
    metrics = []
    for step, (x, y) in enumerate(batches, 1):
        F.cross_entropy(model(x), y).backward()
        probes.before_step(step, x)
        opt.step()
        opt.zero_grad(set_to_none=True)
        metrics.append(probes.after_step(step, opt))
    return metrics


def cnn_worker(out: str) -> None:
    from test_library import CNN
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per = CNN_BATCH // world
    model = CNN(CNN_WIDTH, norm="group")
    for layer in (model.conv, model.proj, model.seq):
        fully_shard(layer)
    fully_shard(model)
    mine = [(x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]) for x, y in cnn_batches()]
    metrics = run_cnn(model, mine, 0.5)  # rank 0's first 2 samples
    sharded = all(hasattr(p, "device_mesh") for p in model.parameters())
    everyone = [None] * world
    dist.all_gather_object(everyone, metrics)
    if rank == 0:
        result = {"metrics": metrics, "ranks_agree": all(m == metrics for m in everyone), "sharded": sharded}
        Path(out).write_text(json.dumps(result))
    shutdown()  # barrier, then destroy: torch 2.13 gloo processes can abort at exit without it


def test_library_on_a_two_process_fsdp_cnn_matches_one_process(tmp_path):
    from test_library import CNN

    from conftest import ROOT, env, free_port

    out = tmp_path / "cnn.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           __file__, str(out), "cnn"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(env(), PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    log = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if not line.startswith("[W"))
    assert proc.returncode == 0, log[-6000:]
    got = json.loads(out.read_text())
    assert got["ranks_agree"] and got["sharded"]
    ref = run_cnn(CNN(CNN_WIDTH, norm="group"), cnn_batches(), 0.25)  # 2 of 8 samples = rank 0's first 2
    for step, (g, want) in enumerate(zip(got["metrics"], ref, strict=True)):
        assert g.keys() == want.keys() and any(k.startswith("probe/seq/") for k in g) and len(g) > 60
        for k, v in want.items():
            assert g[k] == pytest.approx(v, rel=1e-4, abs=1e-9), (step, k)


if __name__ == "__main__":
    (cnn_worker if sys.argv[2:] == ["cnn"] else worker)(sys.argv[1])
    os._exit(0)  # torch 2.13: gloo can still abort in interpreter teardown (std::terminate, 1 run in ~50 under load)
