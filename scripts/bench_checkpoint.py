"""Checkpoint throughput: the trainer's own save (DCP + per-rank state + xxh3_64 checksums + manifest),
verification (re-hashing every file) and load, in GB/s of checkpoint bytes, for the reference model.

    python scripts/bench_checkpoint.py --dims 2048                 # one GPU (or torchrun --nproc_per_node=8)
    python scripts/bench_checkpoint.py --cpu --dims 512 --n-layers 8 --vocab 32000   # this machine's disk
    python scripts/bench_checkpoint.py --cpu-smoke                  # tiny shapes on CPU: checks the script

Each width builds the model as the trainer does (meta -> FSDP2 -> to_empty -> init, AdamW groups of the
width plan), gives AdamW its state with one step on zero gradients, then times `checkpoint.save`,
`checkpoint.verify` and `checkpoint.load` (best of --reps) into --dir (default: a temporary directory on
the disk the OS puts /tmp on; name a directory on the disk your checkpoints go to for a real figure).
Prints a markdown table: the hashing share is verify's time, which reads and hashes every file once.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lingua_wd import checkpoint as ckpt  # noqa: E402
from lingua_wd.distributed import DistributedArgs, init_distributed, shutdown  # noqa: E402
from lingua_wd.model import ModelArgs  # noqa: E402
from lingua_wd.optim import build_optimizer  # noqa: E402
from lingua_wd.train import TrainArgs, build_model  # noqa: E402

SMOKE = {"dims": [64], "n_layers": 2, "head_dim": 32, "vocab": 512}


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dist.barrier()
    return time.perf_counter() - t0


def bench(dim: int, a: argparse.Namespace, env, root: Path) -> dict:
    margs = ModelArgs(dim=dim, n_layers=a.n_layers, head_dim=a.head_dim, vocab_size=a.vocab, max_seq_len=4096)
    args = TrainArgs(model=margs)
    args.distributed = DistributedArgs(device=env.device.type)
    model = build_model(args, env)
    opt, _ = build_optimizer(model, args.optim, args.scaling, args.schedule, 10, 1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # AdamW's two moments now exist: the checkpoint holds what a real one holds
    opt.zero_grad(set_to_none=True)
    saves, verifies, loads = [], [], []
    for step in range(1, a.reps + 1):
        saves.append(timed(lambda s=step: ckpt.save(root, s, model, opt, {"step": s}, keep=1)))
        path = ckpt.latest(root)
        verifies.append(timed(lambda p=path: ckpt.verify(p)))
        loads.append(timed(lambda p=path: ckpt.load(p, model, opt)))
    size = sum(f.stat().st_size for f in ckpt.latest(root).iterdir())
    return {"dim": dim, "gb": size / 1e9, "save": min(saves), "verify": min(verifies), "load": min(loads)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[2048], help="model widths")
    p.add_argument("--n-layers", type=int, default=20)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--reps", type=int, default=2, help="timed save/verify/load rounds (the best is reported)")
    p.add_argument("--dir", default="", help="where checkpoints are written ('' = a temporary directory)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (this machine's disk and hashing)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks the script")
    a = p.parse_args(argv)
    if a.cpu_smoke:
        vars(a).update(SMOKE)
    env = init_distributed(DistributedArgs(device="cpu" if a.cpu_smoke or a.cpu else "auto"))
    if env.device.type != "cuda" and not (a.cpu_smoke or a.cpu):
        print("bench_checkpoint.py: no CUDA device (--cpu-smoke checks the script on CPU)", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="bench_ckpt_", dir=a.dir or None) if env.is_main else ""
    holder = [tmp]
    dist.broadcast_object_list(holder)
    root = Path(holder[0])
    try:
        rows = []
        for d in a.dims:
            rows.append(bench(d, a, env, root / f"d{d}"))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the previous width's model and optimizer are gone
    finally:
        dist.barrier()
        if env.is_main:
            shutil.rmtree(root, ignore_errors=True)
    if env.is_main:
        dev = torch.cuda.get_device_name() if env.device.type == "cuda" else "CPU"
        print(f"\n{dev} x {env.world}, {a.n_layers} blocks, vocab {a.vocab}, fp32 params + AdamW state, "
              f"best of {a.reps}, written under {a.dir or tempfile.gettempdir()}\n")  # fmt: skip
        print("| d | checkpoint GB | save s | save GB/s | verify (hash) s | verify GB/s | load s | load GB/s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            gb = r["gb"]
            print(f"| {r['dim']} | {gb:.2f} | {r['save']:.2f} | {gb / r['save']:.2f} | {r['verify']:.2f} | "
                  f"{gb / r['verify']:.2f} | {r['load']:.2f} | {gb / r['load']:.2f} |")  # fmt: skip
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
