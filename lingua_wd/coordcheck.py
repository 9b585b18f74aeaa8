"""Coordinate check: `lingua-wd coordcheck [key=value ...]` (the analogue of the mup package's coord check).

Trains a few AdamW steps at several widths under each parameterization and measures, per parameter
class (input / hidden / output), on a fixed probe batch:
- act_rms: the RMS of the layers' outputs (the coordinates) after t steps,
- act_delta_rms: the RMS of their change since initialization, h_t - h_0 (mup's coord check),
- update_rms: the RMS of the last weight update W_t - W_{t-1}.
Under muP the activations and their change stay Theta(1) as the width grows (flat lines); under standard
parameterization with Adam, the hidden and output changes grow roughly like the width m, since every
entry of dW has size ~eta and Y = W X sums fan_in of them coherently. With only a few steps the weight
decay rules barely differ: they matter later in training (the paper's point, §3).
Writes coordcheck.png and coordcheck.json (with the slope of log metric against log width) to out_dir.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lingua_wd.args import ConfigError, check, run_cli
from lingua_wd.model import ModelArgs, Transformer
from lingua_wd.optim import OptimArgs, build_optimizer, check_plan_args
from lingua_wd.scaling import ScalingArgs, init_std_fn, param_classes, parse_rule
from lingua_wd.schedule import ScheduleArgs

ACT_CLASSES = ("input", "hidden", "output")  # classes whose module outputs are measured
METRICS = ("act_rms", "act_delta_rms", "update_rms")


@dataclass
class CoordCheckArgs:
    widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])  # model.dim values
    base_dim: int = 64  # d0: m = width / base_dim
    params: list[str] = field(default_factory=lambda: ["sp", "mup:standard", "mup:independent"])  # width[:wd] rules
    steps: int = 4  # AdamW steps at a constant LR
    seeds: int = 2  # repeats (init and data) averaged per point
    lr: float = 1e-2  # eta_base (muP gives eta_base / m to hidden and output)
    weight_decay: float = 0.1  # lambda_base
    n_layers: int = 2  # transformer blocks
    head_dim: int = 32  # attention head size (n_heads = width / head_dim)
    vocab_size: int = 256  # synthetic token vocabulary
    seq_len: int = 64  # tokens per sequence
    batch_size: int = 8  # sequences per step
    out_dir: str = "dumps/coordcheck"  # where coordcheck.png / .json are written


def check_coordcheck_args(args: CoordCheckArgs) -> None:
    check(len(args.widths) >= 2, "widths", "needs at least two widths")
    for w in args.widths:
        check(w > 0 and w % args.head_dim == 0, "widths", f"{w} is not a positive multiple of head_dim={args.head_dim}")
    check(args.base_dim > 0, "base_dim", f"must be positive, got {args.base_dim}")
    check(args.steps >= 1 and args.seeds >= 1, "steps", "steps and seeds must be >= 1")
    for param in args.params:
        parse_rule(param, "params")
        for width in args.widths:  # the trainer's checks of the same keys
            try:
                check_plan_args(*run_args(args, param, width), args.steps, args.batch_size * args.seq_len)
            except ConfigError as err:
                raise ConfigError(f"params: {param} at width {width}: {err}") from None


def run_args(args: CoordCheckArgs, param: str, width: int) -> tuple[ModelArgs, OptimArgs, ScheduleArgs, ScalingArgs]:
    """The trainer's config sections of one point of the check: a constant LR, no clipping."""
    model = ModelArgs(dim=width, n_layers=args.n_layers, head_dim=args.head_dim, vocab_size=args.vocab_size,
                      max_seq_len=args.seq_len)  # fmt: skip
    optim = OptimArgs(lr=args.lr, weight_decay=args.weight_decay, clip=0.0, fused=False)
    scaling = ScalingArgs(base_dim=args.base_dim, **parse_rule(param, "params"))
    return model, optim, ScheduleArgs(kind="constant", warmup=0.0), scaling


def markov_batches(vocab: int, seq_len: int, batch: int, n: int, seed: int) -> list[torch.Tensor]:
    """Token sequences of a fixed sparse bigram chain (4 successors per token): learnable signal, no files."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 4), generator=g)
    out = []
    for _ in range(n):
        toks = torch.empty(batch, seq_len + 1, dtype=torch.long)
        toks[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(seq_len):
            toks[:, t + 1] = succ[toks[:, t], torch.randint(0, 4, (batch,), generator=g)]
        out.append(toks)
    return out


def _rms(x: torch.Tensor) -> float:
    return x.float().pow(2).mean().sqrt().item()


def measure(args: CoordCheckArgs, param: str, width: int, seed: int) -> dict[str, dict[str, list[float]]]:
    """metric -> class -> value after each step 1..steps (update_rms: of that step's update)."""
    margs, optim, schedule, scaling = run_args(args, param, width)
    torch.manual_seed(seed)
    model = Transformer(margs)
    model.init_weights(init_std_fn(scaling, width), seed=seed)
    classes = param_classes(model, scaling)
    opt, sched = build_optimizer(model, optim, scaling, schedule, args.steps, args.batch_size * args.seq_len)
    modules = {n.removesuffix(".weight"): c for n, c in classes.items() if c in ACT_CLASSES}
    acts: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(_store(acts, n)) for n, m in model.named_modules() if n in modules]
    batches = markov_batches(args.vocab_size, args.seq_len, args.batch_size, args.steps + 1, seed)
    probe = batches[-1][:, :-1]
    with torch.no_grad():
        model(probe)
    act0 = dict(acts)
    out: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in METRICS}
    for step in range(args.steps):
        before = {n: p.detach().clone() for n, p in model.named_parameters() if classes[n] in ACT_CLASSES}
        tokens = batches[step]
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        with torch.no_grad():
            model(probe)
            per: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in METRICS}
            for n, c in modules.items():
                per["act_rms"][c].append(_rms(acts[n]))
                per["act_delta_rms"][c].append(_rms(acts[n] - act0[n]))
            for n, p in model.named_parameters():
                if n in before:
                    per["update_rms"][classes[n]].append(_rms(p - before[n]))
        for metric, by_cls in per.items():
            for c, vals in by_cls.items():
                out[metric][c].append(sum(vals) / len(vals))
    for h in hooks:
        h.remove()
    return out


def _store(acts: dict[str, torch.Tensor], name: str):
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        acts[name] = output.detach()

    return hook


def run(args: CoordCheckArgs) -> dict:
    """results[param][metric][class] = list over widths of the value after the last step (seed mean)."""
    check_coordcheck_args(args)
    results: dict = {}
    for param in args.params:
        res: dict = {m: defaultdict(lambda: defaultdict(list)) for m in METRICS}
        for width in args.widths:
            runs = [measure(args, param, width, seed) for seed in range(args.seeds)]
            for metric in METRICS:
                for c in runs[0][metric]:
                    for t in range(args.steps):
                        res[metric][c][t].append(sum(r[metric][c][t] for r in runs) / len(runs))
            print(f"[coordcheck] {param:16s} width {width:5d}: hidden act_delta_rms "
                  f"{res['act_delta_rms']['hidden'][args.steps - 1][-1]:.3g}", flush=True)  # fmt: skip
        results[param] = {m: {c: {str(t + 1): v for t, v in ts.items()} for c, ts in res[m].items()} for m in METRICS}
    return results


def slope(widths: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(width): 0 = width-independent, 1 = grows like m."""
    x = [math.log(w) for w in widths]
    y = [math.log(max(v, 1e-30)) for v in values]
    xm, ym = sum(x) / len(x), sum(y) / len(y)
    return sum((a - xm) * (b - ym) for a, b in zip(x, y, strict=True)) / sum((a - xm) ** 2 for a in x)


def slopes(args: CoordCheckArgs, results: dict) -> dict:
    last = str(args.steps)
    return {
        p: {m: {c: slope(args.widths, ts[last]) for c, ts in r[m].items()} for m in METRICS} for p, r in results.items()
    }


FIRST_STEP = {  # open markers, larger underneath: coinciding step-1 lines all show
    "input": {"marker": "s", "ms": 9, "mfc": "none"},
    "hidden": {"marker": "^", "ms": 7, "mfc": "none"},
    "output": {"marker": "v", "ms": 5, "mfc": "none"},
}


def plot(args: CoordCheckArgs, results: dict, path: Path) -> None:
    """A row per parameterization, a column per metric; a line per class (solid: last step, dotted with open
    markers of decreasing size: step 1, so classes that coincide there, as Adam's first updates do, stay
    visible); one legend for the figure."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    colors = {"input": "tab:blue", "hidden": "tab:orange", "output": "tab:green"}
    rows, cols = len(args.params), len(METRICS)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False, sharex=True)
    for i, param in enumerate(args.params):
        for j, metric in enumerate(METRICS):
            ax = axes[i][j]
            for c, ts in results[param][metric].items():
                ax.plot(args.widths, ts[str(args.steps)], "o-", color=colors[c], label=f"{c} (t={args.steps})")
                if args.steps > 1:
                    ax.plot(args.widths, ts["1"], ":", color=colors[c], alpha=0.8, label=f"{c} (t=1)", **FIRST_STEP[c])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(args.widths, [str(w) for w in args.widths])
            ax.set_title(f"{param}: {metric}", fontsize=10)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3, which="both")
            if i == rows - 1:
                ax.set_xlabel("width (model.dim)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(
        f"coordinate check: AdamW lr={args.lr:g}, wd={args.weight_decay:g}, base_dim={args.base_dim}", fontsize=10
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _main(args: CoordCheckArgs) -> int:
    results = run(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = slopes(args, results)
    (out / "coordcheck.json").write_text(json.dumps({"args": args.__dict__, "results": results, "slopes": s}, indent=1))
    plot(args, results, out / "coordcheck.png")
    print("[coordcheck] slope of log(metric) vs log(width) at the last step (0 = width-independent):")
    for p, by_m in s.items():
        cells = "  ".join(f"{m}[{c}]={v:+.2f}" for m in ("act_delta_rms", "act_rms") for c, v in by_m[m].items())
        print(f"  {p:16s} {cells}")
    print(f"[coordcheck] wrote {out / 'coordcheck.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(argv, CoordCheckArgs, _main, "usage: lingua-wd coordcheck [key=value ...]", __doc__)


if __name__ == "__main__":
    sys.exit(main())
