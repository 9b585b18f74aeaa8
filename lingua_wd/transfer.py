"""Hyperparameters tuned on a proxy (width d0, depth L0, batch B0, D0 tokens) -> each class's LR, WD and
AdamW eps at a target (width, depth, batch, tokens), under every width rule and the config's depth,
batch and horizon rules.

    lingua-wd-transfer optim.lr=8e-3 optim.weight_decay=0.1 model.dim=128 transfer.widths=[2048]
    lingua-wd-transfer configs/paper/llama.yaml transfer.widths=[512,2048] transfer.plot=transfer.png
    lingua-wd-transfer model.n_layers=4 scaling.depth=completep transfer.depths=[16,32] transfer.batches=[512]

The config is a training config, read and checked as the trainer reads and checks it (every key the
plan reads: model, optim, schedule, scaling, steps, data.seq_len x data.batch_size), and so is every
target, so a target the trainer refuses (a width that head_dim does not divide, a batch that
micro-batches do not divide, a token budget that is not a whole number of steps) is refused here too.
The base (proxy) is scaling.base_dim / base_depth / base_batch / base_tokens, each defaulting to the
config's own model.dim / model.n_layers / data.batch_size / steps x tokens per step. Targets are the
product of transfer.widths, depths, batches and tokens (each defaulting to the config's value; a batch
alone keeps the tokens, so the steps follow). Without a config file the paper's run shape is the default
(App. G.3: 20,000 steps of 4096 x 256 tokens, d0 = model.dim = 128). It loops the plan (scaling.plan) over
the targets and every width rule, prints one table per target with the trainer overrides that run each
rule, writes the tables as YAML (transfer.out) and, with transfer.plot, draws the schedule with the extra
warmups (eq 14, 15) and the RMS model (eq 30) of the hidden class at the last target.
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from lingua_wd import scaling, theory
from lingua_wd.args import ConfigError, check, check_choice, one_of, run_cli
from lingua_wd.data import check_data_args
from lingua_wd.optim import check_plan_args, format_table
from lingua_wd.schedule import exp_warmup, extra_warmup_factors, schedule_factors
from lingua_wd.train import TrainArgs

PAPER_RUN = {"steps": 20000, "model": {"dim": 128}, "data": {"seq_len": 4096, "batch_size": 256}}  # App. G.3
COLUMNS = ["rule", "class", "lr", "weight_decay", "eps", "lr_mult", "wd_mult", "eps_mult", "eta_lambda", "tau_iter",
           "tau_epoch", "eq_rms", "init_std", "t_eq"]  # fmt: skip
ROW_KEYS = (
    "lr",
    "weight_decay",
    "eps",
    "lr_mult",
    "wd_mult",
    "eps_mult",
    "eta_lambda",
    "tau_iter",
    "tau_epoch",
    "eq_rms",
)


@dataclass
class TransferOptions:
    widths: list[int] = field(default_factory=list)  # target widths d ([] = d0 x 1..16, or model.dim with other axes)
    depths: list[int] = field(default_factory=list)  # target model.n_layers ([] = the config's)
    batches: list[int] = field(default_factory=list)  # target data.batch_size ([] = the config's)
    tokens: list[int] = field(default_factory=list)  # target training tokens ([] = the config's steps x tokens/step)
    rules: list[str] = one_of([], scaling.rules)  # width rules to show ([] = all)
    out: str = ""  # write the tables to this YAML file ("" = print only)
    plot: str = ""  # draw the schedules and RMS-model trajectories into this PNG ("" = none)


@dataclass
class TransferArgs(TrainArgs):
    transfer: TransferOptions = field(default_factory=TransferOptions)


@dataclass(frozen=True)
class Target:
    """One run shape: width, depth, batch (sequences) and training tokens."""

    dim: int
    n_layers: int
    batch_size: int
    tokens: int


def tokens_per_step(args: TrainArgs, batch_size: Optional[int] = None) -> int:
    return args.data.seq_len * (batch_size or args.data.batch_size)


def base_target(args: TrainArgs) -> Target:
    """The proxy the hyperparameters were tuned on: scaling.base_* or else the config's own values."""
    s = args.scaling
    return Target(s.base_dim or args.model.dim, s.base_depth or args.model.n_layers,
                  s.base_batch or args.data.batch_size, s.base_tokens or args.steps * tokens_per_step(args))  # fmt: skip


def targets(args: TransferArgs) -> list[Target]:
    """The product of the target lists, each defaulting to the config's value."""
    t, base = args.transfer, base_target(args)
    others = t.depths or t.batches or t.tokens
    widths = t.widths or ([args.model.dim] if others else [base.dim * 2**k for k in range(5)])
    return [
        Target(*combo)
        for combo in itertools.product(widths, t.depths or [args.model.n_layers], t.batches or [args.data.batch_size],
                                       t.tokens or [args.steps * tokens_per_step(args)])
    ]  # fmt: skip


def target_steps(args: TrainArgs, target: Target) -> int:
    tps = tokens_per_step(args, target.batch_size)
    check(
        target.tokens > 0 and target.tokens % tps == 0,
        "transfer.tokens",
        f"{target.tokens} tokens are not a whole number of steps of {target.batch_size} x {args.data.seq_len} tokens",
    )
    return target.tokens // tps


def base_tau_iter(args: TrainArgs) -> float:
    """The timescale rule's tau_iter: configured, or else the one of eta_base, lambda_base (0 without decay)."""
    s, o = args.scaling, args.optim
    if s.tau_iter > 0 or (s.tau_epoch > 0 and s.dataset_tokens > 0):
        return scaling.target_tau_iter(s, tokens_per_step(args))
    tau = theory.decay_timescale(scaling.DECAY_RULES[o.variant].per_step(o.lr, o.weight_decay, o.lr))
    return tau if math.isfinite(tau) else 0.0


def rule_scaling(args: TrainArgs, label: str, tau: float) -> scaling.ScalingArgs:
    """The config's scaling section under one width rule, with every base made explicit."""
    b = base_target(args)
    settings: dict[str, Any] = {**scaling.rules()[label], "base_dim": b.dim, "base_depth": b.n_layers,
                                "base_batch": b.batch_size, "base_tokens": b.tokens}  # fmt: skip
    if scaling.WD_RULES[settings["wd"]].timescale and args.scaling.tau_iter <= 0 and not args.scaling.tau_law:
        settings["tau_iter"] = tau  # keep the configured, or else the base run's, timescale
    return replace(args.scaling, **settings)


def rule_plan(args: TrainArgs, label: str, target: Target, tau: float) -> scaling.Plan:
    """The plan of one width rule at one target, checked as the trainer checks it."""
    model = replace(args.model, dim=target.dim, n_layers=target.n_layers, residual_mult=0.0)
    steps = target_steps(args, target)
    check_data_args(replace(args.data, batch_size=target.batch_size), 1)
    return check_plan_args(model, args.optim, args.schedule, rule_scaling(args, label, tau), steps,
                           tokens_per_step(args, target.batch_size), target.batch_size)  # fmt: skip


def class_row(cp: scaling.ClassPlan, dim: int) -> dict:
    """One class at one target: LR, WD, eps, multipliers and the theory's predictions for fan-in `dim` (a class
    Muon updates is shown as `<class>/muon`, with the RMS of its update per unit LR, update_rms)."""
    rho0 = cp.init_std((dim, dim)) if cp.init.fan else None
    row = {k: cp.row()[k] for k in ROW_KEYS}
    muon = {"update_rms": cp.update_rms} if cp.optimizer == "muon" else {}
    name = cp.cls + ("/muon" if muon else "")
    return {"class": name, **row, "init_std": rho0, "t_eq": cp.time_to_equilibrium(rho0) if rho0 else None, **muon}


def overrides(args: TrainArgs, label: str, target: Target, tau: float) -> str:
    """The trainer overrides that run this rule at this target (the trainer applies the rules itself)."""
    settings, b, s = scaling.rules()[label], base_target(args), args.scaling
    out = [f"model.dim={target.dim}"]
    if target.n_layers != args.model.n_layers:
        out.append(f"model.n_layers={target.n_layers}")
    if target.batch_size != args.data.batch_size:
        out.append(f"data.batch_size={target.batch_size}")
    if target_steps(args, target) != args.steps:
        out.append(f"steps={target_steps(args, target)}")
    out += [f"scaling.base_dim={b.dim}", f"scaling.width={settings['width']}", f"scaling.wd={settings['wd']}"]
    if scaling.WD_RULES[settings["wd"]].timescale and s.tau_iter <= 0 and s.tau_epoch <= 0 and not s.tau_law:
        out.append(f"scaling.tau_iter={tau:.6g}")
    for rule, key, value in (("depth", "base_depth", b.n_layers), ("batch", "base_batch", b.batch_size),
                             ("horizon", "base_tokens", b.tokens)):  # fmt: skip
        if getattr(s, rule) != "none":
            out += [f"scaling.{rule}={getattr(s, rule)}", f"scaling.{key}={value}"]
    o = args.optim
    return " ".join([*out, f"optim.lr={o.lr:g}", f"optim.weight_decay={o.weight_decay:g}"])


def skipped_rule(args: TrainArgs, label: str, tau: float) -> bool:
    """The timescale width rule needs a timescale (weight decay at the base run), and is not combined with a
    batch or horizon rule that keeps tau_epoch itself (check_axis_args refuses the pair)."""
    if not scaling.WD_RULES[scaling.rules()[label]["wd"]].timescale:
        return False
    axis_timescale = (
        scaling.BATCH_RULES[args.scaling.batch].timescale or scaling.HORIZON_RULES[args.scaling.horizon].timescale
    )
    return tau <= 0 or axis_timescale


def transfer(args: TransferArgs) -> dict:
    """{"base": ..., "targets": [{dim, n_layers, batch_size, steps, tokens, multipliers, "rules": {rule:
    {"source", "overrides", "classes": {cls: row}}}}]}."""
    tps = tokens_per_step(args)
    check_data_args(args.data, 1)
    check_plan_args(args.model, args.optim, args.schedule, args.scaling, args.steps, tps, args.data.batch_size)
    for label in args.transfer.rules:
        check_choice(label, "transfer.rules", scaling.rules())
    for key in ("widths", "depths", "batches", "tokens"):
        values = getattr(args.transfer, key)
        check(all(v > 0 for v in values), f"transfer.{key}", f"must be positive, got {values}")
    present = {cls for _, cls in scaling.parse_patterns(args.scaling.patterns)}
    tau, b, o, s = base_tau_iter(args), base_target(args), args.optim, args.scaling
    out: dict[str, Any] = {
        "base": {"dim": b.dim, "n_layers": b.n_layers, "batch_size": b.batch_size, "tokens": b.tokens,
                 "lr": o.lr, "weight_decay": o.weight_decay, "eps": o.eps, "variant": o.variant,
                 "depth": s.depth, "batch": s.batch, "horizon": s.horizon, "steps": args.steps, "tokens_per_step": tps,
                 "iters_per_epoch": scaling.iters_per_epoch(s, tps),
                 "timescale_tau_iter": None if skipped_rule(args, "timescale", tau) else tau},
        "targets": [],
    }  # fmt: skip
    if o.variant == "muon":
        out["base"]["muon"] = {"classes": list(o.muon_classes), "adjust_lr": o.muon_adjust_lr, "lr": o.muon_lr or o.lr,
                               "width_rule": scaling.MUON_RULES[o.muon_adjust_lr].source}  # fmt: skip
    for target in targets(args):
        per_rule, p = {}, None
        for label in args.transfer.rules or scaling.rules():
            if skipped_rule(args, label, tau):
                continue
            wd_rule = scaling.rules()[label]["wd"]
            if o.variant == "muon" and wd_rule not in scaling.MUON_WD_RULES and not args.transfer.rules:
                continue  # no Muon form (scaling.MUON_WD_RULES); asked for by name, the plan's error says so
            try:
                p = rule_plan(args, label, target, tau)
            except ConfigError as err:
                raise ConfigError(f"transfer: target {describe(target)}: {err}") from None
            rows = {cls: class_row(cp, target.dim) for cls, cp in p.classes.items() if cls in present}
            per_rule[label] = {"source": p.source, "overrides": overrides(args, label, target, tau), "classes": rows}
        if p is None:
            raise ConfigError(
                "transfer.rules: none of them applies to this config (the timescale rule needs weight decay)"
            )
        a = p.axes
        out["targets"].append({
            **target.__dict__, "steps": target_steps(args, target), "width_mult": p.width_mult,
            "depth_mult": a.depth_mult, "batch_mult": a.batch_mult, "horizon_mult": a.horizon_mult,
            "residual_mult": a.residual_mult, "rules": per_rule,
        })  # fmt: skip
    return out


def describe(t: dict | Target) -> str:
    t = t if isinstance(t, dict) else t.__dict__
    return f"d={t['dim']} L={t['n_layers']} B={t['batch_size']} D={t['tokens']:.4g}"


def print_report(result: dict, file=None) -> None:
    file = file or sys.stdout
    b = result["base"]
    opt = f"{b['variant']} AdamW" if "muon" not in b else "Muon + AdamW"
    print(
        f"tuned at d0={b['dim']}, L0={b['n_layers']}, B0={b['batch_size']}, D0={b['tokens']:.4g} tokens: "
        f"eta={b['lr']:g}, lambda={b['weight_decay']:g}, eps={b['eps']:g} ({opt}); "
        f"rules: depth {b['depth']}, batch {b['batch']}, horizon {b['horizon']}",
        file=file,
    )
    if "muon" in b:
        mu = b["muon"]
        print(f"Muon on {', '.join(mu['classes'])} (eta_base={mu['lr']:g}, adjust_lr={mu['adjust_lr']}): under muP "
              f"{mu['width_rule']}", file=file)  # fmt: skip
    if b["timescale_tau_iter"]:
        print(f"timescale rule keeps tau_iter = {b['timescale_tau_iter']:.4g} steps", file=file)
    for t in result["targets"]:
        rows = [{"rule": k, **r} for k, v in t["rules"].items() for r in v["classes"].values()]
        print(
            f"\n{describe(t)}, {t['steps']} steps (m={t['width_mult']:g}, m_L={t['depth_mult']:g}, "
            f"B/B0={t['batch_mult']:g}, D/D0={t['horizon_mult']:g}; residual branches x{t['residual_mult']:g})",
            file=file,
        )
        print(format_table(rows, COLUMNS), file=file)
        for key, v in t["rules"].items():
            print(f"  {key:<12} {v['overrides']}   # {v['source']}", file=file)


def plot(args: TransferArgs, result: dict, path: str) -> None:
    """Schedules with the extra warmups and the RMS model of the hidden class at the last target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = result["targets"][-1]
    m, T = target["width_mult"], target["steps"]
    t = np.arange(T)
    base = schedule_factors(args.schedule, T)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    ax.plot(t, base, label=f"{args.schedule.kind} (base)")
    ax.plot(t, base * exp_warmup(t, T, m, args.scaling.extra_warmup_frac), label="x exp warmup (eq 14)")
    rate = scaling.DECAY_RULES[args.optim.variant].per_step(args.optim.lr, args.optim.weight_decay, args.optim.lr)
    if rate > 0:
        away = extra_warmup_factors("decay_away", args.schedule, T, m, 0.0, rate)[:T]
        ax.plot(t, base * away, label="x decay-away (eq 15)")
    ax.set(xlabel="step", ylabel="LR factor", title=f"schedules at m={m:g}")
    ax.legend()
    b = base_target(args)
    base_row = class_row(rule_plan(args, "sp", b, 0.0).classes["hidden"], b.dim)
    curves = [("base run", base_row), *((k, v["classes"]["hidden"]) for k, v in target["rules"].items())]
    seen: dict[tuple, str] = {}  # rules with the same curves (e.g. independent and timescale) are named, not hidden
    for i, (key, row) in enumerate(curves):
        # the base run on its own schedule; r: Muon's update RMS per unit LR (eq 30 in units of r)
        n = args.steps if key == "base run" else T
        lrs, r = row["lr"] * schedule_factors(args.schedule, n), row.get("update_rms", 1.0)
        rho = r * theory.rms_model(lrs, row["eta_lambda"] / row["lr"], row["init_std"] / r)
        rel = theory.relative_updates(lrs, rho, b=r)
        same = seen.setdefault((tuple(np.round(rho, 12)), tuple(np.round(rel, 12))), key)
        label = key if same == key else f"{key} (= {same})"
        # own marker, staggered along the curve, earlier curves wider underneath: coinciding curves stay visible
        style = {"marker": "os^Dv<>ph"[i % 9], "ms": 5, "markevery": (i * n // (10 * len(curves)), max(1, n // 10))}
        style |= {"color": "k", "ls": "--"} if key == "base run" else {"lw": 1 + 2.0 * (len(curves) - i) / len(curves)}
        axes[1].plot(np.arange(n + 1), rho, label=label, **style)
        axes[2].plot(np.arange(n), rel, label=label, **style)
    axes[1].set(
        yscale="log",
        xlabel="step",
        ylabel="weight RMS rho_t",
        title=f"hidden class, RMS model (eq 30), {describe(target)}",
    )
    axes[2].set(yscale="log", xlabel="step", ylabel="eta_t / rho_t", title="relative update (eq 35)")
    axes[1].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _yaml_safe(x: object) -> object:
    if isinstance(x, dict):
        return {k: _yaml_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_yaml_safe(v) for v in x]
    return None if isinstance(x, float) and math.isinf(x) else x


def _main(args: TransferArgs) -> Optional[int]:
    result = transfer(args)
    print_report(result)
    if args.transfer.out:
        Path(args.transfer.out).write_text(yaml.safe_dump(_yaml_safe(result), sort_keys=False))
        print(f"\nwrote {args.transfer.out}")
    if args.transfer.plot:
        plot(args, result, args.transfer.plot)
        print(f"wrote {args.transfer.plot}")
    return 0


USAGE = (
    "usage: lingua-wd-transfer [[config=]FILE.yaml] [key=value ...] [transfer.widths=[...]] [transfer.depths=[...]]\n"
    "       [transfer.batches=[...]] [transfer.tokens=[...]] [transfer.out=FILE.yaml] [transfer.plot=FILE.png]"
)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_cli(argv, TransferArgs, _main, USAGE, __doc__, base=[PAPER_RUN])


if __name__ == "__main__":
    sys.exit(main())
