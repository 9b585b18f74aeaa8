"""Training-step throughput of lingua_wd vs a compiled HF transformers loop, and the performance levers (issue 7).

    python scripts/bench.py --baseline hf                       # d = 512, 1024, 2048 (micro-batch 8, 4, 2 and 4)
    python scripts/bench.py --skip-main --levers                # each lever on/off at d=1024, micro-batch 4
    python scripts/bench.py --cpu-smoke --baseline hf --levers  # tiny shapes on CPU: proves the script runs
    python scripts/bench.py --dims 512 --micro-batch 8 --profile # + where each step's GPU time goes

Each row builds a fresh model exactly as the trainer does (meta -> FSDP2 with bf16 params / fp32 reduce,
per-block compile -> to_empty -> init_weights; AdamW from lingua_wd.optim.build_optimizer), runs warm-up
steps (compilation included), then times steps with CUDA events (no host sync inside a step) and reports
the median. A row that runs out of memory reads "OOM". The markdown table (device, versions, command, date)
is rewritten after every row (default dumps/bench/benchmarks_perf.md: outputs stay out of the source tree
unless --out names a path there), so a run killed by a time limit keeps what it measured. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import re
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lingua_wd import loss as loss_mod  # noqa: E402
from lingua_wd.distributed import DistributedArgs, all_reduce_max, init_distributed, parallelize, shutdown  # noqa: E402
from lingua_wd.guard import optimizer_step  # noqa: E402
from lingua_wd.loss import reference_cross_entropy  # noqa: E402
from lingua_wd.model import ModelArgs, Transformer  # noqa: E402
from lingua_wd.optim import OptimArgs, build_optimizer, clip_grad_norm_  # noqa: E402
from lingua_wd.scaling import ScalingArgs  # noqa: E402
from lingua_wd.schedule import ScheduleArgs  # noqa: E402
from lingua_wd.train import TrainArgs, train_step  # noqa: E402

PEAK_TFLOPS = 989.0  # H100/H200 dense bf16, as the MFU
CLIP = 1.0


@dataclass(frozen=True)
class Shape:
    n_layers: int = 20
    head_dim: int = 128
    ffn_mult: int = 3
    vocab: int = 128_256
    seq: int = 4096


SMOKE = Shape(n_layers=2, head_dim=32, vocab=1000, seq=64)


@dataclass(frozen=True)
class Config:
    """One measured row: an implementation at one width / micro-batch with each lever's setting."""

    impl: str  # ours | hf
    dim: int
    micro_batch: int
    compile: bool = True  # ours: per-block torch.compile; hf: torch.compile(model)
    fused: bool = True  # fused AdamW (False: foreach)
    ce: str = "chunked"  # ours: chunked (compiled) | chunked-eager | plain (full fp32 logits)
    sdpa: str = "default"  # default | flash | cudnn | efficient | math (torch.nn.attention.sdpa_kernel)
    reshard: bool = True  # FSDP2 reshard_after_forward
    ac: bool = False  # activation checkpointing of every block
    lever: str = ""  # the lever this row changes ("" = the main table)


def flops_per_token(dim: int, s: Shape) -> float:
    """6 (block params + d V) + 12 L d T, the issue's MFU; a block: 4 d^2 attention, 3 ffn_mult d^2 MLP, 2 d norms."""
    block = 4 * dim * dim + 3 * s.ffn_mult * dim * dim + 2 * dim
    return 6.0 * (s.n_layers * block + dim * s.vocab) + 12.0 * s.n_layers * dim * s.seq


# ---- our model and step ---------------------------------------------------------------------------------------


def build_ours(cfg: Config, s: Shape, device: torch.device, total_steps: int):
    margs = ModelArgs(dim=cfg.dim, n_layers=s.n_layers, head_dim=s.head_dim, ffn_mult=s.ffn_mult,
                      vocab_size=s.vocab, max_seq_len=s.seq)  # fmt: skip
    with torch.device("meta"):
        model = Transformer(margs)
    dargs = DistributedArgs(compile=cfg.compile, activation_checkpointing=cfg.ac, reshard_after_forward=cfg.reshard)
    parallelize(model, dargs, device)
    model.compile_loss = cfg.ce == "chunked" and device.type == "cuda"
    model.to_empty(device=device)
    model.init_weights(seed=0)
    tokens_per_step = cfg.micro_batch * s.seq
    optim = OptimArgs(fused=cfg.fused)
    opt, sched = build_optimizer(model, optim, ScalingArgs(), ScheduleArgs(), total_steps, tokens_per_step)
    return model, opt, sched


TRAIN_ARGS = TrainArgs()  # the trainer's defaults: clip 1.0, guards on, probes off


def ours_step(model, opt, sched, batch: torch.Tensor, ce: str) -> torch.Tensor:
    """The trainer's own train_step (one micro-batch); the "plain CE" lever replaces only the loss."""
    if ce != "plain":
        return train_step(model, batch, opt, sched, TRAIN_ARGS, 1, 0)[0]
    x, y = batch[:, :-1], batch[:, 1:]
    loss = reference_cross_entropy(model(x), y)
    loss.backward()
    optimizer_step(opt, clip_grad_norm_(model, TRAIN_ARGS.optim.clip))
    opt.zero_grad(set_to_none=True)
    sched.step()
    return loss.detach()


# ---- the HF transformers baseline ---------------------------------------------------------------------------


def build_hf(cfg: Config, s: Shape, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=s.vocab, hidden_size=cfg.dim, intermediate_size=s.ffn_mult * cfg.dim,
                         num_hidden_layers=s.n_layers, num_attention_heads=cfg.dim // s.head_dim,
                         num_key_value_heads=cfg.dim // s.head_dim, head_dim=s.head_dim, max_position_embeddings=s.seq,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False)  # fmt: skip
    with torch.device(device):
        model = LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=cfg.fused)  # fmt: skip
    fwd = torch.compile(model) if cfg.compile else model
    return model, fwd, opt


def hf_step(model, fwd, opt, batch: torch.Tensor) -> torch.Tensor:
    """A plain HF loop: bf16 autocast forward with labels (HF shifts them), backward, clip, fused AdamW."""
    x = batch[:, :-1]
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        loss = fwd(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


# ---- timing ------------------------------------------------------------------------------------------------------

# kernel (CUDA) or op (CPU smoke) name -> where the step's time goes; first match wins, the rest is "other"
CATEGORIES = {
    "attention": r"flash|fmha|sdpa|attention|attn",
    "matmul": r"gemm|cutlass|xmma|nvjet|wgmma|cublas|aten::(mm|bmm|addmm|matmul|linear)$",
    "compiled (triton)": r"^triton_",
    "optimizer+clip": r"adam|multi_tensor_apply|foreach|aten::_fused",
    "copies+comm": r"chunk_cat|split_with_sizes|memcpy|memset|copy|nccl|all_gather|reduce_scatter|catarray",
    "elementwise (eager)": r"elementwise|vectorized|reduce_kernel|unrolled|aten::",
}


def kernel_category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, pat in CATEGORIES.items() if re.search(pat, low)), "other")


def sdpa_context(backend: str):
    if backend == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
    return sdpa_kernel(getattr(SDPBackend, names[backend]))


def time_steps(step: Callable[[], torch.Tensor], warmup: int, steps: int, device: torch.device) -> dict:
    """Median step ms, peak GB and host syncs per step over the timed steps.

    CUDA events bracket each step and are read after one final sync; torch's sync debug mode counts the
    synchronizing CUDA calls (e.g. .item()) inside the timed steps, which should be none.
    """
    for _ in range(warmup):
        step()
    if device.type != "cuda":
        ms = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            ms.append(1e3 * (time.perf_counter() - t0))
        return {"step_ms": statistics.median(ms), "peak_gb": None, "syncs": None}
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for start, end in events:
                start.record()
                step()
                end.record()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    ms = [start.elapsed_time(end) for start, end in events]
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    sources = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)  # the Python line that synced
    return {"step_ms": statistics.median(ms), "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            "syncs": len(syncs) / steps, "sync_sources": dict(sources)}  # fmt: skip


def profile_steps(step: Callable[[], torch.Tensor], device: torch.device, steps: int = 2) -> dict[str, float]:
    """ms per step by category of the kernels that ran (CUDA) or of the ops (CPU smoke), from torch.profiler.

    `GPU idle` is the step time left uncovered by kernels: launch gaps, the CPU running ahead too little
    (a CPU-bound step). Kernels on different streams (FSDP2's all-gathers) can overlap, so idle is a lower bound.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    wall_ms = 1e3 * (time.perf_counter() - t0) / steps
    out: dict[str, float] = dict.fromkeys([*CATEGORIES, "other"], 0.0)
    for e in prof.key_averages():
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA:
            out[kernel_category(e.key)] += e.self_device_time_total / 1e3 / steps
        elif not cuda and e.key.startswith("aten::"):
            out[kernel_category(e.key)] += e.self_cpu_time_total / 1e3 / steps
    out["GPU idle" if cuda else "not in aten ops"] = max(0.0, wall_ms - sum(out.values()))
    out["profiled step ms"] = wall_ms
    return out


def measure(cfg: Config, s: Shape, device: torch.device, warmup: int, steps: int, profile: bool = False) -> dict:
    """One row: build, warm up, time (and profile). Everything it allocates dies with this frame."""
    gen = torch.Generator(device=device).manual_seed(0)
    batch = torch.randint(s.vocab, (cfg.micro_batch, s.seq + 1), device=device, generator=gen)
    with sdpa_context(cfg.sdpa):
        if cfg.impl == "ours":
            model, opt, sched = build_ours(cfg, s, device, total_steps=1000)
            step = lambda: ours_step(model, opt, sched, batch, cfg.ce)  # noqa: E731
        else:
            model, fwd, opt = build_hf(cfg, s, device)
            step = lambda: hf_step(model, fwd, opt, batch)  # noqa: E731
        timing = time_steps(step, warmup, steps, device)
        if profile:
            timing["breakdown"] = profile_steps(step, device)
    tps = cfg.micro_batch * s.seq / (timing["step_ms"] / 1e3)
    mfu = tps * flops_per_token(cfg.dim, s) / (PEAK_TFLOPS * 1e12) if device.type == "cuda" else None
    return {"tokens_per_s": tps, "mfu": mfu, **timing}


def free_memory(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_row(cfg: Config, s: Shape, device: torch.device, warmup: int, steps: int, profile: bool = False) -> dict:
    """measure() with out-of-memory (and any other failure) reported in the row instead of raised."""
    status = "ok"
    try:
        result = measure(cfg, s, device, warmup, steps, profile)
    except Exception as err:  # noqa: BLE001 -- one failed row must not lose the others
        text = str(err)
        if isinstance(err, torch.OutOfMemoryError) or "out of memory" in text.lower():
            status = "OOM"
        else:
            status = f"error: {type(err).__name__}: {text.strip().splitlines()[0][:100] if text.strip() else ''}"
            traceback.print_exc()
        result = {}
    free_memory(device)
    return {"cfg": cfg, "status": status, **result}


# ---- the table ---------------------------------------------------------------------------------------------------


def settings(cfg: Config) -> str:
    if cfg.impl == "hf":
        return ("compiled" if cfg.compile else "eager") + (", fused AdamW" if cfg.fused else ", foreach AdamW")
    parts = ["compile" if cfg.compile else "no compile", "fused" if cfg.fused else "foreach", f"CE {cfg.ce}",
             f"sdpa {cfg.sdpa}", "reshard" if cfg.reshard else "no reshard"]  # fmt: skip
    return ", ".join(parts + (["AC"] if cfg.ac else []))


def ratio_base(row: dict, rows: list[dict]) -> Optional[dict]:
    """The row this one is compared with: HF at the same width (main table) or the lever table's base."""
    cfg = row["cfg"]
    if cfg.impl == "hf":
        return None
    if cfg.lever:
        want = lambda r: r["cfg"].lever == "base"  # noqa: E731
    else:
        want = lambda r: r["cfg"].impl == "hf" and r["cfg"].dim == cfg.dim and not r["cfg"].lever  # noqa: E731
    return next((r for r in rows if want(r) and r is not row), None)


def fmt_row(row: dict, rows: list[dict]) -> str:
    cfg = row["cfg"]
    head = [cfg.lever or ("ours" if cfg.impl == "ours" else "HF"), str(cfg.dim), str(cfg.micro_batch), settings(cfg)]
    if row["status"] != "ok":
        return "| " + " | ".join(head + [row["status"]] + ["-"] * 5) + " |"
    base = ratio_base(row, rows)
    ratio = f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base and base["status"] == "ok" else "-"
    mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
    peak = f"{row['peak_gb']:.1f}" if row["peak_gb"] is not None else "-"
    syncs = f"{row['syncs']:g}" if row["syncs"] is not None else "-"
    vals = [f"{row['tokens_per_s'] / 1e3:.1f}k", mfu, f"{row['step_ms']:.1f}", peak, syncs, ratio]
    return "| " + " | ".join(head + vals) + " |"


HEADER = {
    "main": "| run | d | micro-batch | settings | tokens/s | MFU | step ms | peak GB | syncs/step | ours/HF |",
    "levers": "| lever | d | micro-batch | settings | tokens/s | MFU | step ms | peak GB | syncs/step | vs base |",
}
RULE = "|" + " --- |" * 10


def environment(device: torch.device, world: int) -> str:
    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = "not installed"
    if device.type == "cuda":
        dev = f"{torch.cuda.get_device_name(device)} x{world}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    else:
        dev = "CPU (smoke test: tiny shapes, no compile, timings meaningless)"
    return f"{dev}; torch {torch.__version__}; transformers {tf}"


def write_markdown(path: Path, rows: list[dict], s: Shape, meta: dict) -> None:
    lines = [
        "## Training-step throughput: lingua_wd vs HF transformers (scripts/bench.py)",
        "",
        f"- device: {meta['env']}",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- shapes: {s.n_layers} layers, head dim {s.head_dim}, MLP {s.ffn_mult}d, vocab {s.vocab:,}, seq {s.seq}, "
        "untied embeddings, bf16 compute, probes off",
        f"- timing: {meta['warmup']} warm-up steps (compilation) then the median of {meta['steps']} steps timed with "
        "CUDA events; peak GB = max allocated during the timed steps; syncs/step = synchronizing CUDA calls per "
        "timed step (torch.cuda.set_sync_debug_mode)",
        f"- MFU = tokens/s x FLOPs/token / {PEAK_TFLOPS:.0f} TFLOP/s, FLOPs/token = 6 (block params + d V) + 12 L d T",
    ]
    if meta["world"] > 1:
        lines.append(f"- {meta['world']} GPUs (torchrun, FSDP2): micro-batch, tokens/s, MFU and peak GB are per GPU")
    for section in ("main", "levers"):
        mine = [r for r in rows if bool(r["cfg"].lever) == (section == "levers")]
        if mine:
            lines += ["", HEADER[section], RULE] + [fmt_row(r, rows) for r in mine]
    lines += breakdown_lines(rows)
    sources = {
        f"{r['cfg'].lever or r['cfg'].impl} d={r['cfg'].dim}": r["sync_sources"] for r in rows if r.get("sync_sources")
    }
    if sources:
        lines += ["", "Host syncs in the timed steps (Python line that synchronized: count over all timed steps):", ""]
        lines += [f"- {row}: " + ", ".join(f"`{k}` x{v}" for k, v in src.items()) for row, src in sources.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def breakdown_lines(rows: list[dict]) -> list[str]:
    """The --profile table: ms per step in each category, and its share of the profiled step."""
    prof = [r for r in rows if r.get("breakdown")]
    if not prof:
        return []
    cols = list(prof[0]["breakdown"])
    lines = ["", "Where a step's time goes (`--profile`: torch.profiler over 2 steps, kernel time by name; ms per step "
             "and share of the profiled step):", "", "| run | d | micro-batch | " + " | ".join(cols) + " |",
             "|" + " --- |" * (3 + len(cols))]  # fmt: skip
    for r in prof:
        b, cfg = r["breakdown"], r["cfg"]
        total = b["profiled step ms"] or 1.0
        cells = [f"{b[c]:.1f}" if c == "profiled step ms" else f"{b[c]:.1f} ({100 * b[c] / total:.0f}%)" for c in cols]
        lines.append(f"| {cfg.lever or cfg.impl} | {cfg.dim} | {cfg.micro_batch} | " + " | ".join(cells) + " |")
    return lines


# ---- what to run -------------------------------------------------------------------------------------------------


def main_configs(dims: list[int], mbs: list[list[int]], baseline: str, ours: Config) -> list[Config]:
    """Per width: ours then HF at the first micro-batch (the issue's anchor); then ours at the other micro-batches,
    so a run cut short by a time limit has lost the least important rows."""
    out = []
    for dim, mb_list in zip(dims, mbs, strict=True):
        out.append(replace(ours, dim=dim, micro_batch=mb_list[0]))
        if baseline == "hf":
            out.append(Config("hf", dim, mb_list[0]))
    for dim, mb_list in zip(dims, mbs, strict=True):
        out += [replace(ours, dim=dim, micro_batch=mb) for mb in mb_list[1:]]
    return out


def lever_configs(dim: int, mb: int, ours: Config, cuda: bool) -> list[Config]:
    base = replace(ours, dim=dim, micro_batch=mb, lever="base")
    sdpa = [("sdpa flash", "flash"), ("sdpa cuDNN", "cudnn")] if cuda else [("sdpa math", "math")]
    return [
        base,
        replace(base, lever="no block compile", compile=False),
        replace(base, lever="foreach AdamW", fused=False),
        replace(base, lever="CE chunked eager", ce="chunked-eager"),
        replace(base, lever="CE plain", ce="plain"),
        *[replace(base, lever=name, sdpa=backend) for name, backend in sdpa],
        replace(base, lever="reshard_after_forward flipped", reshard=not base.reshard),
        replace(base, lever="activation checkpointing flipped", ac=not base.ac),
    ]


def parse_ours(text: str) -> Config:
    """--ours "compile=1,ce=chunked,reshard=0": the main table's settings for our trainer."""
    cfg = Config("ours", 0, 0)
    types = {f.name: f.type for f in fields(Config)}
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        if key not in ("compile", "fused", "ce", "sdpa", "reshard", "ac"):
            raise SystemExit(f"--ours: unknown key {key!r}")
        cfg = replace(cfg, **{key: value in ("1", "true", "on") if types[key] in (bool, "bool") else value})
    return cfg


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", default="512,1024,2048", help="widths of the main table")
    p.add_argument("--micro-batch", default="8,4,2/4", help="per width, '/'-separated micro-batches (HF: the first)")
    p.add_argument("--baseline", choices=("hf", "none"), default="none", help="also time the HF transformers loop")
    p.add_argument("--levers", action="store_true", help="also time each lever on/off at --lever-dim")
    p.add_argument("--skip-main", action="store_true", help="only the levers table")
    p.add_argument("--lever-dim", type=int, default=1024, help="width of the levers table")
    p.add_argument("--lever-micro-batch", type=int, default=4, help="micro-batch of the levers table")
    p.add_argument("--ours", default="", help="our settings, e.g. 'reshard=0,ce=plain' (default: all levers on)")
    p.add_argument("--chunk-size", type=int, default=loss_mod.CHUNK_SIZE, help="tokens per chunk of the chunked CE")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument(
        "--out",
        default="dumps/bench/benchmarks_perf.md",
        help="markdown table written after every row (not the source tree)",
    )
    p.add_argument("--budget-s", type=float, default=0, help="skip the rows left after this many seconds (0: none)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, no compile: checks the script")
    p.add_argument("--profile", action="store_true", help="also profile 2 steps per row: time by kernel category")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    smoke = args.cpu_smoke
    s = SMOKE if smoke else Shape()
    dims = [int(d) for d in args.dims.split(",") if d]
    mbs = [[int(m) for m in group.split("/")] for group in args.micro_batch.split(",") if group]
    if len(mbs) != len(dims):
        raise SystemExit(f"--micro-batch: {len(mbs)} entries for {len(dims)} widths")
    ours = parse_ours(args.ours)
    if smoke:
        dims, mbs, ours = [64, 128], [[2], [2, 4]], replace(ours, compile=False)
        args.lever_dim, args.lever_micro_batch = 64, 2
    env = init_distributed(DistributedArgs(device="cpu" if smoke else "auto"))
    device = env.device
    if device.type != "cuda" and not smoke:
        raise SystemExit("no CUDA device: use --cpu-smoke")
    loss_mod.CHUNK_SIZE = args.chunk_size if not smoke else 48  # smoke: several chunks and a ragged last one
    if env.world > 1 and args.baseline == "hf":  # the HF loop here is single-GPU (no DDP/FSDP)
        args.baseline = "none"
        if env.is_main:
            print("--baseline hf is single-GPU only: skipped under torchrun", flush=True)
    configs = [] if args.skip_main else main_configs(dims, mbs, args.baseline, ours)
    if args.levers:
        configs += lever_configs(args.lever_dim, args.lever_micro_batch, ours, device.type == "cuda")
    if smoke:
        configs = [replace(c, compile=False) for c in configs]
    meta = {"env": environment(device, env.world), "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
            "warmup": args.warmup, "steps": args.steps, "world": env.world}  # fmt: skip
    say = print if env.is_main else lambda *a, **k: None
    say(meta["env"], flush=True)
    rows: list[dict] = []
    t0 = time.perf_counter()
    for cfg in configs:
        t = time.perf_counter()
        elapsed = all_reduce_max(torch.tensor(t - t0, device=device)).item()  # ranks agree on skipping
        if args.budget_s and elapsed > args.budget_s:
            rows.append({"cfg": cfg, "status": "skipped (time budget)"})
        else:
            rows.append(run_row(cfg, s, device, args.warmup, args.steps, args.profile))
        say(f"{fmt_row(rows[-1], rows)}  [{time.perf_counter() - t:.0f}s]", flush=True)
        if env.is_main:
            write_markdown(Path(args.out), rows, s, meta)
    say(f"wrote {args.out} ({len(rows)} rows, {time.perf_counter() - t0:.0f}s)", flush=True)
    shutdown()
    return 0 if not smoke or all(r["status"] == "ok" for r in rows) else 1  # smoke: every row must run


if __name__ == "__main__":
    sys.exit(main())
