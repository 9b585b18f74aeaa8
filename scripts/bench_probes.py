"""Throughput cost of the alignment probes: the trainer's own step with probes off and on.

    python scripts/bench_probes.py --dims 1024 2048            # one GPU (a one-rank process group)
    torchrun --nproc_per_node=8 scripts/bench_probes.py ...    # FSDP2 over 8 GPUs

For each width: the reference model (20 blocks, head dim 128, MLP 3d, llama3 vocabulary, seq 4096),
lingua_wd.distributed.parallelize (FSDP2, bf16 params / fp32 reduce, blocks compiled in place), the
optimizer of lingua_wd.optim, random tokens, and the trainer's own `train_step` (chunked output+CE,
`--accum` micro-batches). Blocks of steps with probes off and on alternate (best of --reps); each
"on" block holds steps/every probe steps. Both run the same model: its capture hooks are registered
once and gated off outside probe forwards, as in a run with probes configured. Prints a markdown
table; `--cpu-smoke` runs tiny shapes on CPU to check the script itself (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lingua_wd.distributed import DistributedArgs, init_distributed, parallelize, shutdown  # noqa: E402
from lingua_wd.model import ModelArgs, Transformer, count_params  # noqa: E402
from lingua_wd.optim import OptimArgs, build_optimizer  # noqa: E402
from lingua_wd.probes import ProbeArgs, build_probes  # noqa: E402
from lingua_wd.scaling import ScalingArgs  # noqa: E402
from lingua_wd.schedule import ScheduleArgs  # noqa: E402
from lingua_wd.train import TrainArgs, train_step  # noqa: E402

SMOKE = dict(dims=[64], n_layers=2, head_dim=32, vocab=256, seq=64, micro_batch=2, accum=2, every=2, steps=4,
             warmup=2, reps=1, no_compile=True)  # fmt: skip


def build(dim: int, a, env) -> Transformer:
    margs = ModelArgs(dim=dim, n_layers=a.n_layers, head_dim=a.head_dim, vocab_size=a.vocab, max_seq_len=a.seq)
    with torch.device("meta"):
        model = Transformer(margs)
    dist_args = DistributedArgs(compile=not a.no_compile, activation_checkpointing=a.ac)
    parallelize(model, dist_args, env.device)
    model.to_empty(device=env.device)
    model.init_weights(seed=0)
    return model


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(n: int, step0: int, run_step) -> tuple[float, int]:
    sync()
    t = time.perf_counter()
    for i in range(n):
        run_step(step0 + i)
    sync()
    return time.perf_counter() - t, step0 + n


def sync_ms(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return 1e3 * (time.perf_counter() - t)


def profile_probe(model, batch, opt, probes, step: int) -> None:
    """Where a probe step's time goes: before_step and after_step timed, then their top kernels."""
    from torch.profiler import ProfilerActivity, profile

    def backward():
        model(batch[:, :-1], batch[:, 1:]).backward()

    for i in range(3):
        backward()
        before = sync_ms(lambda s=step + i: probes.before_step(s, batch[:, :-1]))
        opt.step()
        after = sync_ms(lambda s=step + i: probes.after_step(s, opt))
        opt.zero_grad(set_to_none=True)
        print(f"probe step: before_step {before:.1f} ms, after_step {after:.1f} ms")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    for name in ("before_step", "after_step"):
        backward()
        with profile(activities=acts) as prof:
            probes.before_step(step + 3, batch[:, :-1])
            sync()
        opt.step()
        if name == "after_step":
            with profile(activities=acts) as prof:
                probes.after_step(step + 3, opt)
                sync()
        else:
            probes.after_step(step + 3, opt)
        opt.zero_grad(set_to_none=True)
        print(name, prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60))


def bench(dim: int, a, env) -> dict:
    model = build(dim, a, env)
    total = a.warmup + 2 * a.reps * a.steps + 10
    tokens_per_step = a.micro_batch * a.accum * env.world * a.seq
    opt, sched = build_optimizer(model, OptimArgs(), ScalingArgs(), ScheduleArgs(), total, tokens_per_step)
    probe_args = ProbeArgs(every=a.every, layers=a.layers, fraction=a.fraction, positions=a.positions)
    probes = build_probes(probe_args, model, ScalingArgs())
    gen = torch.Generator(device=env.device).manual_seed(env.rank)
    rows = a.micro_batch * a.accum
    batches = [torch.randint(0, a.vocab, (rows, a.seq + 1), device=env.device, generator=gen) for _ in range(4)]
    targs = TrainArgs()

    def step_fn(with_probes):
        def run(step):
            train_step(model, batches[step % 4], opt, sched, targs, a.accum, step, probes if with_probes else None)

        return run

    step = 0
    _, step = timed(a.warmup, step, step_fn(True))  # compile, cold-start power iteration
    best = {False: math.inf, True: math.inf}
    peak = {}
    cuda = env.device.type == "cuda"
    for _ in range(a.reps):
        for on in (False, True):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            step = math.ceil(step / a.every) * a.every  # each block starts on a probe step: steps/every probes
            dt, step = timed(a.steps, step, step_fn(on))
            best[on] = min(best[on], dt)
            peak[on] = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    if a.profile:
        profile_probe(model, batches[0], opt, probes, math.ceil(step / a.every) * a.every)
    tok = a.steps * tokens_per_step
    n_probe = math.ceil(a.steps / a.every)
    row = {
        "dim": dim,
        "seqs": a.micro_batch * a.accum,
        "params": count_params(model),
        "layers": len(probes.modules),
        "tok_s_off": tok / best[False],
        "tok_s_on": tok / best[True],
        "overhead": best[True] / best[False] - 1,
        "probe_ms": 1e3 * (best[True] - best[False]) / n_probe,
        "step_ms": 1e3 * best[False] / a.steps,
        "mem_off": peak[False],
        "mem_on": peak[True],
    }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--n-layers", type=int, default=20)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=2, help="sequences per rank per step")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per step (gradient accumulation)")
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--layers", nargs="+", default=["all"], help="probes.layers")
    ap.add_argument("--fraction", type=float, default=ProbeArgs.fraction, help="probes.fraction")
    ap.add_argument("--positions", type=int, default=ProbeArgs.positions, help="probes.positions (0 = all)")
    ap.add_argument("--steps", type=int, default=30, help="steps per timed block (a multiple of --every)")
    ap.add_argument("--warmup", type=int, default=12)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--ac", action="store_true", help="activation checkpointing")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also time and profile before_step / after_step")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, no compile: checks the script")
    a = ap.parse_args()
    if a.cpu_smoke:
        vars(a).update(SMOKE)
    env = init_distributed(DistributedArgs())
    if env.device.type != "cuda" and not a.cpu_smoke:
        sys.exit("bench_probes.py: this benchmark needs a GPU (--cpu-smoke checks the script on CPU)")
    rows = []
    for d in a.dims:
        rows.append(bench(d, a, env))
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
    if env.is_main:
        gpu = torch.cuda.get_device_name() if env.device.type == "cuda" else "CPU (smoke run: figures mean nothing)"
        print(f"\n{gpu} x {env.world}, seq {a.seq}, micro-batch {a.micro_batch}, {'fp32' if a.cpu_smoke else 'bf16'}, compile {not a.no_compile}, "
              f"AC {a.ac}, probes on {a.layers} every {a.every} steps, {a.positions or 'all'} positions\n")  # fmt: skip
        print("| d | params | seqs/rank/step | probed linears | step ms (off) | tokens/s off | tokens/s on | overhead "
              "| ms per probe step | peak GiB off / on |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['dim']} | {r['params'] / 1e6:,.0f}M | {r['seqs']} | {r['layers']} | {r['step_ms']:.0f} | {r['tok_s_off']:,.0f} "
                  f"| {r['tok_s_on']:,.0f} | {100 * r['overhead']:+.2f}% | {r['probe_ms']:.0f} "
                  f"| {r['mem_off']:.1f} / {r['mem_on']:.1f} |")  # fmt: skip
    shutdown()


if __name__ == "__main__":
    main()
