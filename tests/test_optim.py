"""Optimizer groups, the start-up table, the per-group schedule, decoupled AdamW, FSDP2 correctness."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lingua_wd.args import ConfigError
from lingua_wd.model import ModelArgs, Transformer
from lingua_wd.optim import DecoupledAdamW, OptimArgs, build_optimizer, check_optim_args, clip_grad_norm_
from lingua_wd.scaling import ScalingArgs, init_std_fn
from lingua_wd.schedule import ScheduleArgs, lr_factor

ROOT = Path(__file__).resolve().parents[1]
PAPER = ScalingArgs(width="mup", wd="independent", base_dim=64, frozen_lr={"input": 1.6e-2, "gain": 1.6e-2})


def tiny(dim: int = 256, seed: int = 0) -> Transformer:
    margs = ModelArgs(dim=dim, n_layers=2, head_dim=64, vocab_size=300, max_seq_len=32)
    model = Transformer(margs)
    model.init_weights(init_std_fn(ScalingArgs(), margs.dim), seed=seed)
    return model


def build(model, scaling=PAPER, optim=None, schedule=None, total=100, dump_dir=None):
    return build_optimizer(
        model, optim or OptimArgs(lr=8e-3), scaling, schedule or ScheduleArgs(), total, 1024, dump_dir
    )


def test_groups_cover_every_parameter_once_and_carry_the_contract_keys():
    model = tiny()
    opt, _ = build(model)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    names = [g["name"] for g in opt.param_groups]
    assert names == ["input/independent", "hidden/independent", "output/independent", "gain/independent"]
    for g in opt.param_groups:
        assert {"name", "class", "rule", "lr", "initial_lr", "weight_decay"} <= set(g)
    by = {g["class"]: g for g in opt.param_groups}
    assert by["hidden"]["initial_lr"] == pytest.approx(8e-3 / 4) and by["hidden"]["weight_decay"] == pytest.approx(0.4)
    assert by["output"]["initial_lr"] == pytest.approx(8e-3 / 4)
    assert by["input"]["initial_lr"] == 1.6e-2 and by["input"]["weight_decay"] == pytest.approx(0.1)
    assert by["gain"]["initial_lr"] == 1.6e-2 and by["gain"]["weight_decay"] == 0.0


def test_param_groups_json_and_logged_table(tmp_path, caplog):
    with caplog.at_level("INFO", logger="lingua_wd.optim"):
        build(tiny(), dump_dir=str(tmp_path))
    info = json.loads((tmp_path / "param_groups.json").read_text())
    assert info["width_mult"] == 4 and info["rule"] == "independent" and info["variant"] == "torch"
    hidden = next(g for g in info["groups"] if g["class"] == "hidden")
    assert hidden["n_params"] == 2 * (4 * 256 * 256 + 3 * 256 * 768)
    assert hidden["fan_in"] == [256, 768]
    assert hidden["init_std"] == pytest.approx([1 / math.sqrt(768), 1 / 16])
    assert hidden["eta_lambda"] == pytest.approx(8e-3 * 0.1)  # independent: the base width's eta*lambda
    assert hidden["tau_iter"] == pytest.approx(1 / 8e-4)
    assert hidden["eq_rms"] == pytest.approx(math.sqrt(2e-3 / (2 * 0.4)))
    gain = next(g for g in info["groups"] if g["class"] == "gain")
    assert gain["eta_lambda"] == 0 and gain["tau_iter"] is None and gain["eq_rms"] is None
    assert len(info["params"]) == len(list(tiny().parameters()))
    assert {p["name"]: p["class"] for p in info["params"]}["layers.1.ffn_norm.weight"] == "gain"
    assert "hidden/independent" in caplog.text and "eq_rms" in caplog.text


def test_no_table_without_dump_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build(tiny())
    assert not list(tmp_path.iterdir())


def test_timescale_groups_use_tau_epoch_and_tokens_per_step():
    scaling = ScalingArgs(width="mup", wd="timescale", base_dim=64, tau_epoch=2.0, dataset_tokens=1024 * 500)
    opt, _ = build(tiny(), scaling)  # M = 500 steps per epoch, tau_iter = 1000
    for g in opt.param_groups:
        if g["class"] != "gain":
            assert g["initial_lr"] * g["weight_decay"] == pytest.approx(1e-3)


def test_scheduler_drives_each_group_with_extra_warmup_on_chosen_classes():
    scaling = ScalingArgs(
        width="sp", base_dim=64, extra_warmup="exp", extra_warmup_frac=0.5, extra_warmup_classes=["hidden"]
    )
    opt, sched = build(tiny(), scaling, total=100)
    by = {g["class"]: g for g in opt.param_groups}
    for step in range(100):
        base = lr_factor(ScheduleArgs(), step, 100)
        assert by["input"]["lr"] == pytest.approx(8e-3 * base)
        assert by["hidden"]["lr"] == pytest.approx(8e-3 * base * 4 ** min(0, step / 50 - 1))  # eq 14, m = 4
        opt.step()
        sched.step()


def test_scheduler_state_round_trips_through_json():
    opt, sched = build(tiny())
    for _ in range(7):
        opt.step()
        sched.step()
    state = json.loads(json.dumps(sched.state_dict()))
    opt2, sched2 = build(tiny())
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([g["lr"] for g in opt.param_groups])


def _random_grads(models, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    for ps in zip(*(m.parameters() for m in models), strict=True):
        g = torch.randn(ps[0].shape, generator=gen) * 0.01
        for p in ps:
            p.grad = g.to(p.device)


def test_decoupled_adamw_with_eta_lambda_equals_torch_adamw_step_by_step():
    eta, lam = 3e-3, 0.1
    a, b = tiny(128), tiny(128)
    const = ScheduleArgs(kind="constant", warmup_steps=0)
    sp = ScalingArgs(decay_classes=["input", "hidden", "output", "bias", "gain"])
    opt_a, sched_a = build(a, sp, OptimArgs(lr=eta, weight_decay=lam), const)
    opt_b, sched_b = build(b, sp, OptimArgs(lr=eta, weight_decay=eta * lam, variant="decoupled"), const)
    assert isinstance(opt_b, DecoupledAdamW) and type(opt_a) is torch.optim.AdamW
    for step in range(10):
        _random_grads([a, b], step)
        opt_a.step(), opt_b.step(), sched_a.step(), sched_b.step()
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(pa, pb, rtol=0, atol=1e-7)
    assert all(g["weight_decay"] == pytest.approx(eta * lam) for g in opt_b.param_groups)  # restored after step


def test_decoupled_decay_follows_the_schedule_not_eta():
    # with a zero gradient Adam's update is 0, leaving the decay: torch eta_t*lambda, decoupled lambda*s_t
    sched_args = ScheduleArgs(warmup_steps=4)
    sp = ScalingArgs()
    for variant, wd in (("torch", 0.1), ("decoupled", 1e-3)):
        model = tiny()
        opt, sched = build(model, sp, OptimArgs(lr=1e-2, weight_decay=wd, variant=variant), sched_args, total=10)
        for step in range(6):
            w = model.layers[0].attention.wq.weight
            before = w.detach().clone()
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            opt.step()
            s = lr_factor(sched_args, step, 10)
            decay = 1e-2 * s * 0.1 if variant == "torch" else 1e-3 * s
            torch.testing.assert_close(w.detach(), before * (1 - decay), rtol=1e-6, atol=0)
            sched.step()


def test_check_optim_args():
    check_optim_args(OptimArgs(variant="decoupled"))
    with pytest.raises(ConfigError, match=r"^optim\.variant:"):
        check_optim_args(OptimArgs(variant="lion"))


def test_clip_grad_norm_is_global():
    model = tiny()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    n = sum(p.numel() for p in model.parameters())
    norm = clip_grad_norm_(model, 1.0)
    assert float(norm) == pytest.approx(math.sqrt(n), rel=1e-5)
    total = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    assert total == pytest.approx(1.0, rel=1e-5)


WORKER = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from lingua_wd.distributed import shutdown
    from lingua_wd.model import ModelArgs, Transformer
    from lingua_wd.optim import OptimArgs, build_optimizer, clip_grad_norm_
    from lingua_wd.scaling import ScalingArgs, init_std_fn
    from lingua_wd.schedule import ScheduleArgs

    def main():  # locals, not globals: FSDP2 state alive at interpreter exit can abort gloo (SIGABRT)
        variant, out, device = sys.argv[1], sys.argv[2], sys.argv[3]
        margs = ModelArgs(dim=128, n_layers=2, head_dim=32, vocab_size=64, max_seq_len=16)
        scaling = ScalingArgs(width="mup", wd="independent", base_dim=32, frozen_lr={"input": 1e-2, "gain": 1e-2},
                              extra_warmup="decay_away")
        optim = OptimArgs(lr=2e-2, weight_decay=0.05 if variant == "torch" else 1e-3, variant=variant, clip=0.5)

        def make():
            model = Transformer(margs)
            model.init_weights(init_std_fn(scaling, margs.dim), seed=3)
            return model.to(device)

        def train(model, rank, world):
            opt, sched = build_optimizer(model, optim, scaling, ScheduleArgs(warmup=0.3), 10, 8 * 16)
            norms = []
            for step in range(6):
                tokens = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(step))
                mine = tokens.chunk(world)[rank].to(device)
                logits = model(mine[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), mine[:, 1:].flatten())
                loss.backward()
                norms.append(float(clip_grad_norm_(model, optim.clip)))
                opt.step()
                sched.step()
                opt.zero_grad()
            params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
                      for n, p in model.named_parameters()}
            return params, norms

        if device == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        mesh = init_device_mesh(device, (world,))  # explicit: a CPU run on a CUDA machine must stay on CPU
        model = make()
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        sharded = train(model, rank, world)
        if rank == 0:
            init = {n: p.detach().cpu() for n, p in make().named_parameters()}
            torch.save({"init": init, "sharded": sharded, "single": train(make(), 0, 1)}, out)

    main()
    shutdown()  # barrier first: rank 1 must not tear gloo down while rank 0 still trains alone
    os._exit(0)  # torch 2.13: gloo can still abort in interpreter teardown (std::terminate, 1 run in ~50 under load)
    """
)


def run_worker(tmp_path: Path, variant: str, nproc: int, device: str) -> dict:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "params.pt"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1"
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    proc = subprocess.run(
        [*cmd, variant, str(out), device], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


def check_worker_result(res: dict) -> None:
    (sharded, norms_sharded), (single, norms_single) = res["sharded"], res["single"]
    assert norms_sharded == pytest.approx(norms_single, rel=1e-4)  # the global norm, reduced over shards
    assert max(norms_single) > 0.5  # so clipping at 0.5 was active
    assert sharded.keys() == single.keys()
    for name, p in single.items():
        torch.testing.assert_close(sharded[name], p, rtol=1e-4, atol=1e-5, msg=name)
    for name, p in res["init"].items():  # every group trained (gains too) and decayed
        assert (single[name] - p).abs().max() > 1e-4, name


@pytest.mark.parametrize("variant", ["torch", "decoupled"])
def test_fsdp2_two_ranks_match_one_process(tmp_path, variant):
    check_worker_result(run_worker(tmp_path, variant, 2, "cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["torch", "decoupled"])
def test_gpu_fused_adamw_on_fsdp2_dtensors(tmp_path, variant):
    # one rank on CUDA: DTensor params, the fused kernel (on by default on CUDA) and nccl
    check_worker_result(run_worker(tmp_path, variant, 1, "cuda"))


@pytest.mark.gpu
def test_gpu_fused_decoupled_equals_fused_torch_adamw():
    eta, lam = 3e-3, 0.1
    a, b = tiny(128).cuda(), tiny(128).cuda()
    const = ScheduleArgs(kind="constant", warmup_steps=0)
    opt_a, _ = build(a, ScalingArgs(), OptimArgs(lr=eta, weight_decay=lam), const)
    opt_b, _ = build(b, ScalingArgs(), OptimArgs(lr=eta, weight_decay=eta * lam, variant="decoupled"), const)
    assert opt_a.defaults["fused"] and opt_b.defaults["fused"]
    for step in range(10):
        _random_grads([a, b], step)
        opt_a.step(), opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)
