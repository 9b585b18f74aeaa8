"""Coordinate check: `lingua-wd coordcheck [key=value ...]` (the analogue of the mup package's coord check).

Trains a few AdamW steps at several widths (axis=width: each of `params`) or depths (axis=depth: each of
`depth_rules`, at width base_dim) and measures, per parameter class (input / hidden / output), on a fixed
probe batch:
- act_rms: the RMS of the layers' outputs (the coordinates) after t steps,
- act_delta_rms: the RMS of their change since initialization, h_t - h_0 (mup's coord check),
- update_rms: the RMS of the last weight update W_t - W_{t-1};
and the same of the residual stream after the last block (class `residual`, the input of the final norm:
CompleteP's Figure 7), whose update_rms is the change of the stream in the last step.
Under muP the activations and their change stay Theta(1) as the width grows (flat lines); under standard
parameterization with Adam, the hidden and output changes grow roughly like the width m, since every
entry of dW has size ~eta and Y = W X sums fan_in of them coherently. Along depth, each block adds its
branch to the residual stream: without a depth rule the stream and its change grow with the depth L;
under CompleteP (branches x (L/L0)^-1) the change stays flat (the stream's own RMS falls like 1/sqrt(L)
early on: at init it sums L independent branches of size 1/L). With only a few steps the weight decay rules barely
differ: they matter later in training (the paper's point, §3).
Writes coordcheck.png and coordcheck.json (with the slope of log metric against log width or depth).
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

from lingua_wd.args import ConfigError, check, check_choice, one_of, run_cli
from lingua_wd.model import ModelArgs, Transformer
from lingua_wd.optim import OptimArgs, build_optimizer, check_plan_args
from lingua_wd.scaling import DEPTH_RULES, ScalingArgs, init_std_fn, param_classes, parse_rule, residual_mult
from lingua_wd.schedule import ScheduleArgs

ACT_CLASSES = ("input", "hidden", "output")  # classes whose module outputs are measured
RESIDUAL = "residual"  # the residual stream after the last block (the final norm's input)
METRICS = ("act_rms", "act_delta_rms", "update_rms")
AXES = {"width": "model.dim", "depth": "model.n_layers"}  # axis -> the key it varies


@dataclass
class CoordCheckArgs:
    axis: str = one_of("width", lambda: AXES)  # width: widths x params; depth: depths x depth_rules at base_dim
    widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])  # model.dim values
    base_dim: int = 64  # d0: m = width / base_dim (axis=depth: the width)
    params: list[str] = field(default_factory=lambda: ["sp", "mup:standard", "mup:independent"])  # width[:wd] rules
    depths: list[int] = field(default_factory=lambda: [2, 4, 8, 16])  # model.n_layers values (axis=depth)
    base_depth: int = 2  # L0: m_L = depth / base_depth (axis=depth)
    depth_rules: list[str] = field(default_factory=lambda: ["none", "depth_mup", "completep"])  # scaling.depth rows
    steps: int = 4  # AdamW steps at a constant LR
    seeds: int = 2  # repeats (init and data) averaged per point
    lr: float = 1e-2  # eta_base (muP gives eta_base / m to hidden and output)
    weight_decay: float = 0.1  # lambda_base
    n_layers: int = 2  # transformer blocks (axis=width)
    head_dim: int = 32  # attention head size (n_heads = width / head_dim)
    vocab_size: int = 256  # synthetic token vocabulary
    seq_len: int = 64  # tokens per sequence
    batch_size: int = 8  # sequences per step
    out_dir: str = "dumps/coordcheck"  # where coordcheck.png / .json are written


def check_coordcheck_args(args: CoordCheckArgs) -> None:
    check_choice(args.axis, "axis", AXES)
    key = f"{args.axis}s"
    check(len(xs(args)) >= 2, key, f"needs at least two {key}")
    check(all(x > 0 for x in xs(args)), key, f"must be positive, got {xs(args)}")
    key, widths = ("widths", args.widths) if args.axis == "width" else ("base_dim", [args.base_dim])
    for w in widths:
        check(w % args.head_dim == 0, key, f"{w} is not a positive multiple of head_dim={args.head_dim}")
    check(args.base_dim > 0, "base_dim", f"must be positive, got {args.base_dim}")
    check(args.base_depth > 0, "base_depth", f"must be positive, got {args.base_depth}")
    check(args.steps >= 1 and args.seeds >= 1, "steps", "steps and seeds must be >= 1")
    check(len(args.params) > 0, "params", "needs at least one width[:wd] rule")
    for param in args.params:
        parse_rule(param, "params")
    for rule in args.depth_rules:
        check_choice(rule, "depth_rules", DEPTH_RULES)
    for rule in series(args):
        for x in xs(args):  # the trainer's checks of the same keys
            try:
                check_plan_args(*run_args(args, rule, x), args.steps, args.batch_size * args.seq_len, args.batch_size)
            except ConfigError as err:
                raise ConfigError(f"{args.axis}: {rule} at {x}: {err}") from None


def xs(args: CoordCheckArgs) -> list[int]:
    """The values along the axis: widths or depths."""
    return args.widths if args.axis == "width" else args.depths


def series(args: CoordCheckArgs) -> list[str]:
    """One line (plot row) per rule: the width rules, or the depth rules (under the first width rule)."""
    return args.params if args.axis == "width" else args.depth_rules


def run_args(args: CoordCheckArgs, rule: str, x: int) -> tuple[ModelArgs, OptimArgs, ScheduleArgs, ScalingArgs]:
    """The trainer's config sections of one point of the check: a constant LR, no clipping."""
    width, depth = (x, args.n_layers) if args.axis == "width" else (args.base_dim, x)
    param, depth_rule = (rule, "none") if args.axis == "width" else (args.params[0], rule)
    scaling = ScalingArgs(base_dim=args.base_dim, **parse_rule(param, "params"), depth=depth_rule,
                          base_depth=args.base_depth)  # fmt: skip
    model = ModelArgs(dim=width, n_layers=depth, head_dim=args.head_dim, vocab_size=args.vocab_size,
                      max_seq_len=args.seq_len, residual_mult=residual_mult(scaling, depth))  # fmt: skip
    optim = OptimArgs(lr=args.lr, weight_decay=args.weight_decay, clip=0.0, fused=False)
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


def measure(args: CoordCheckArgs, rule: str, x: int, seed: int) -> dict[str, dict[str, list[float]]]:
    """metric -> class -> value after each step 1..steps (update_rms: of that step's update)."""
    margs, optim, schedule, scaling = run_args(args, rule, x)
    torch.manual_seed(seed)
    model = Transformer(margs)
    model.init_weights(init_std_fn(scaling, margs.dim), seed=seed)
    classes = param_classes(model, scaling)
    tokens_per_step = args.batch_size * args.seq_len
    opt, sched = build_optimizer(model, optim, scaling, schedule, args.steps, tokens_per_step, None, args.batch_size)
    modules = {n.removesuffix(".weight"): c for n, c in classes.items() if c in ACT_CLASSES}
    acts: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(_store(acts, n)) for n, m in model.named_modules() if n in modules]
    hooks.append(model.norm.register_forward_pre_hook(_store_input(acts, RESIDUAL)))
    batches = markov_batches(args.vocab_size, args.seq_len, args.batch_size, args.steps + 1, seed)
    probe = batches[-1][:, :-1]
    with torch.no_grad():
        model(probe)
    act0, last = dict(acts), acts[RESIDUAL]
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
            for n, c in [*modules.items(), (RESIDUAL, RESIDUAL)]:
                per["act_rms"][c].append(_rms(acts[n]))
                per["act_delta_rms"][c].append(_rms(acts[n] - act0[n]))
            for n, p in model.named_parameters():
                if n in before:
                    per["update_rms"][classes[n]].append(_rms(p - before[n]))
            per["update_rms"][RESIDUAL].append(_rms(acts[RESIDUAL] - last))  # this step's change of the stream
            last = acts[RESIDUAL]
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


def _store_input(acts: dict[str, torch.Tensor], name: str):
    def hook(module: nn.Module, inputs: tuple) -> None:
        acts[name] = inputs[0].detach()

    return hook


def run(args: CoordCheckArgs) -> dict:
    """results[rule][metric][class][step] = list over widths (depths) of the value after that step (seed mean)."""
    check_coordcheck_args(args)
    results: dict = {}
    for rule in series(args):
        res: dict = {m: defaultdict(lambda: defaultdict(list)) for m in METRICS}
        for x in xs(args):
            runs = [measure(args, rule, x, seed) for seed in range(args.seeds)]
            for metric in METRICS:
                for c in runs[0][metric]:
                    for t in range(args.steps):
                        res[metric][c][t].append(sum(r[metric][c][t] for r in runs) / len(runs))
            shown = "hidden" if args.axis == "width" else RESIDUAL
            print(f"[coordcheck] {rule:16s} {args.axis} {x:5d}: {shown} act_delta_rms "
                  f"{res['act_delta_rms'][shown][args.steps - 1][-1]:.3g}", flush=True)  # fmt: skip
        results[rule] = {m: {c: {str(t + 1): v for t, v in ts.items()} for c, ts in res[m].items()} for m in METRICS}
    return results


def slope(xs_: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(x): 0 = independent of the width (depth), 1 = grows like it."""
    x = [math.log(w) for w in xs_]
    y = [math.log(max(v, 1e-30)) for v in values]
    xm, ym = sum(x) / len(x), sum(y) / len(y)
    return sum((a - xm) * (b - ym) for a, b in zip(x, y, strict=True)) / sum((a - xm) ** 2 for a in x)


def slopes(args: CoordCheckArgs, results: dict) -> dict:
    last = str(args.steps)
    return {
        p: {m: {c: slope(xs(args), ts[last]) for c, ts in r[m].items()} for m in METRICS} for p, r in results.items()
    }


FIRST_STEP = {  # open markers, larger underneath: coinciding step-1 lines all show
    "input": {"marker": "s", "ms": 9, "mfc": "none"},
    "hidden": {"marker": "^", "ms": 7, "mfc": "none"},
    "output": {"marker": "v", "ms": 5, "mfc": "none"},
}


def plot(args: CoordCheckArgs, results: dict, path: Path) -> None:
    """A row per rule, a column per metric; a line per class (solid: last step, dotted with open markers of
    decreasing size: step 1, so classes that coincide there, as Adam's first updates do, stay visible); one
    legend for the figure."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    colors = {"input": "tab:blue", "hidden": "tab:orange", "output": "tab:green", RESIDUAL: "tab:red"}
    rules = series(args)
    rows, cols = len(rules), len(METRICS)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False, sharex=True)
    for i, rule in enumerate(rules):
        for j, metric in enumerate(METRICS):
            ax = axes[i][j]
            for c, ts in results[rule][metric].items():
                ax.plot(xs(args), ts[str(args.steps)], "o-", color=colors[c], label=f"{c} (t={args.steps})")
                if args.steps > 1:
                    ax.plot(xs(args), ts["1"], ":", color=colors[c], alpha=0.8, label=f"{c} (t=1)",
                            **FIRST_STEP.get(c, {"marker": "o", "ms": 4, "mfc": "none"}))  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(xs(args), [str(w) for w in xs(args)])
            ax.set_title(f"{args.axis} {rule}: {metric}", fontsize=10)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3, which="both")
            if i == rows - 1:
                ax.set_xlabel(f"{args.axis} ({AXES[args.axis]})")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    base = f"base_dim={args.base_dim}" if args.axis == "width" else f"width {args.base_dim}, {args.params[0]}, "
    base += f"base_depth={args.base_depth}" if args.axis == "depth" else ""
    fig.suptitle(f"coordinate check: AdamW lr={args.lr:g}, wd={args.weight_decay:g}, {base}", fontsize=10)
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
    print(f"[coordcheck] slope of log(metric) vs log({args.axis}) at the last step (0 = {args.axis}-independent):")
    for p, by_m in s.items():
        cells = "  ".join(f"{m}[{c}]={v:+.2f}" for m in METRICS for c, v in by_m[m].items())
        print(f"  {p:16s} {cells}")
    print(f"[coordcheck] wrote {out / 'coordcheck.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(argv, CoordCheckArgs, _main, "usage: lingua-wd coordcheck [key=value ...]", __doc__)


if __name__ == "__main__":
    sys.exit(main())
