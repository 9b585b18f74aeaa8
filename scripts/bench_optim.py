"""Cost of one optimizer step: Muon on the hidden matrices against AdamW on the same parameters.

    python scripts/bench_optim.py                           # one GPU: d = 1024, 2048 at the reference shapes
    torchrun --nproc_per_node=8 scripts/bench_optim.py      # FSDP2 over 8 GPUs (Muon's two all_to_all included)
    python scripts/bench_optim.py --cpu                     # CPU at a moderate size (docs/benchmarks.md)
    python scripts/bench_optim.py --cpu-smoke               # tiny shapes: checks the script (figures mean nothing)

The model has the reference block shapes (20 blocks, head dim 128, MLP 3d) and is sharded with
lingua_wd.distributed.parallelize (FSDP2; a plain launch is a one-rank group). Only the hidden
matrices (13 d^2 per block) are stepped, with random gradients: AdamW as optim.py builds it (fused
on CUDA, the for-loop kernel on CPU) and lingua_wd.muon.Muon (Newton-Schulz in bf16 on CUDA, fp32
on CPU). Each optimizer gets --warmup untimed steps, then the best of --reps blocks of --steps timed
steps (device synchronized around each block). Prints a markdown table, one row per width.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lingua_wd.distributed import DistributedArgs, init_distributed, parallelize, shutdown  # noqa: E402
from lingua_wd.model import ModelArgs, Transformer  # noqa: E402
from lingua_wd.muon import Muon, local_tensor  # noqa: E402
from lingua_wd.scaling import ScalingArgs, param_classes  # noqa: E402

PRESETS = {
    "gpu": dict(dims=[1024, 2048], n_layers=20, head_dim=128, warmup=3, steps=10, reps=3),
    "cpu": dict(dims=[256, 512], n_layers=2, head_dim=128, warmup=1, steps=3, reps=2),
    "cpu_smoke": dict(dims=[64], n_layers=2, head_dim=32, warmup=1, steps=1, reps=1),
}


def hidden_params(dim: int, a, env) -> list[torch.Tensor]:
    """The hidden matrices of a reference-shaped model (FSDP2-sharded), each with a random gradient."""
    margs = ModelArgs(dim=dim, n_layers=a.n_layers, head_dim=a.head_dim, vocab_size=256, max_seq_len=16)
    with torch.device("meta"):
        model = Transformer(margs)
    parallelize(model, DistributedArgs(device=env.device.type), env.device)
    model.to_empty(device=env.device)
    model.init_weights(seed=0)
    classes = param_classes(model, ScalingArgs())
    params = [p for n, p in model.named_parameters() if classes[n] == "hidden"]
    gen = torch.Generator(device=env.device).manual_seed(env.rank)
    with torch.no_grad():
        for p in params:
            p.grad = torch.zeros_like(p)
            local_tensor(p.grad).normal_(generator=gen).mul_(1e-3)
    return params


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_ms(opt: torch.optim.Optimizer, a) -> float:
    """Best per-step milliseconds over --reps blocks of --steps steps, after --warmup steps."""
    for _ in range(a.warmup):
        opt.step()
    best = math.inf
    for _ in range(a.reps):
        sync()
        t = time.perf_counter()
        for _ in range(a.steps):
            opt.step()
        sync()
        best = min(best, (time.perf_counter() - t) / a.steps)
    return 1e3 * best


def bench(dim: int, a, env) -> dict:
    params = hidden_params(dim, a, env)
    cuda = env.device.type == "cuda"
    adamw = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=cuda)
    adamw_ms = step_ms(adamw, a)
    del adamw
    muon = Muon(params, lr=1e-4, weight_decay=0.1, adjust_lr="match_rms_adamw")
    muon_ms = step_ms(muon, a)
    return {"dim": dim, "muon_params": sum(p.numel() for p in params), "matrices": len(params),
            "adamw_ms": adamw_ms, "muon_ms": muon_ms, "ratio": muon_ms / adamw_ms}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", help="model widths (default: 1024 2048; --cpu 256 512)")
    ap.add_argument("--n-layers", type=int, help="blocks (default 20; --cpu 2: the ratio does not depend on it)")
    ap.add_argument("--head-dim", type=int, help="attention head size (default 128)")
    ap.add_argument("--warmup", type=int, help="untimed steps per optimizer")
    ap.add_argument("--steps", type=int, help="timed steps per block")
    ap.add_argument("--reps", type=int, help="timed blocks per optimizer (the best is kept)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--cpu", action="store_true", help="CPU at a moderate size (the figures of the docs)")
    mode.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks the script")
    a = ap.parse_args(argv)
    preset = PRESETS["cpu_smoke" if a.cpu_smoke else "cpu" if a.cpu else "gpu"]
    for k, v in preset.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.threads:
        torch.set_num_threads(a.threads)
    on_cpu = a.cpu or a.cpu_smoke
    env = init_distributed(DistributedArgs(device="cpu" if on_cpu else "auto"))
    if env.device.type != "cuda" and not on_cpu:
        sys.exit("bench_optim.py: the default run needs a GPU (--cpu or --cpu-smoke run on CPU)")
    rows = []
    for d in a.dims:
        rows.append(bench(d, a, env))
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
    if env.is_main:
        where = (
            torch.cuda.get_device_name()
            if env.device.type == "cuda"
            else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        )
        note = " (smoke run: figures mean nothing)" if a.cpu_smoke else ""
        print(f"\n{where} x {env.world}{note}; torch {torch.__version__}; {datetime.date.today()}; "
              f"{a.n_layers} blocks, head dim {a.head_dim}, MLP 3d; best of {a.reps} x {a.steps} steps\n")  # fmt: skip
        print("| d | params in Muon | matrices | AdamW step ms | Muon step ms | Muon / AdamW |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['dim']} | {r['muon_params'] / 1e6:,.1f}M | {r['matrices']} | {r['adamw_ms']:.1f} "
                  f"| {r['muon_ms']:.1f} | {r['ratio']:.1f}x |")  # fmt: skip
    shutdown()
    return rows


if __name__ == "__main__":
    main()
