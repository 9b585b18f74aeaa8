"""Hyperparameters tuned at width d0 -> each class's LR and WD at other widths, under every rule.

    lingua-wd-transfer optim.lr=8e-3 optim.weight_decay=0.1 model.dim=128 transfer.widths=[2048]
    lingua-wd-transfer configs/paper/llama.yaml transfer.widths=[512,2048] transfer.plot=transfer.png

The config is a training config, read and checked as the trainer reads and checks it (every key the
width plan reads: model, optim, schedule, scaling, steps, data.seq_len x data.batch_size), so a width
the trainer refuses is refused here too. Without a config file the paper's run shape is the default
(App. G.3: 20,000 steps of 4096 x 256 tokens, d0 = model.dim = 128). It loops the width plan
(scaling.plan) over the target widths and every rule, prints one table per width with the trainer
overrides that run each rule, writes the tables as YAML (transfer.out) and, with transfer.plot, draws
the schedule with the extra warmups (eq 14, 15) and the RMS model (eq 30) of the hidden class.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from lingua_wd import scaling, theory
from lingua_wd.args import ConfigError, check_choice, one_of, run_cli
from lingua_wd.optim import check_plan_args, format_table
from lingua_wd.schedule import exp_warmup, extra_warmup_factors, schedule_factors
from lingua_wd.train import TrainArgs

PAPER_RUN = {"steps": 20000, "model": {"dim": 128}, "data": {"seq_len": 4096, "batch_size": 256}}  # App. G.3
COLUMNS = ["rule", "class", "lr", "weight_decay", "eta_lambda", "tau_iter", "tau_epoch", "eq_rms", "init_std", "t_eq"]


@dataclass
class TransferOptions:
    widths: list[int] = field(default_factory=list)  # target widths d ([] = d0 x 1, 2, 4, 8, 16)
    rules: list[str] = one_of([], scaling.rules)  # rules to show ([] = all)
    out: str = ""  # write the tables to this YAML file ("" = print only)
    plot: str = ""  # draw the schedules and RMS-model trajectories into this PNG ("" = none)


@dataclass
class TransferArgs(TrainArgs):
    transfer: TransferOptions = field(default_factory=TransferOptions)


def tokens_per_step(args: TrainArgs) -> int:
    return args.data.seq_len * args.data.batch_size


def base_tau_iter(args: TrainArgs) -> float:
    """The timescale rule's tau_iter: configured, or else the one of eta_base, lambda_base (0 without decay)."""
    s, o = args.scaling, args.optim
    if s.tau_iter > 0 or (s.tau_epoch > 0 and s.dataset_tokens > 0):
        return scaling.target_tau_iter(s, tokens_per_step(args))
    tau = theory.decay_timescale(scaling.DECAY_RULES[o.variant].per_step(o.lr, o.weight_decay, o.lr))
    return tau if math.isfinite(tau) else 0.0


def rule_plan(args: TrainArgs, label: str, dim: int, tau: float) -> scaling.Plan:
    """The width plan of one rule at one width, checked as the trainer checks it."""
    settings = {**scaling.rules()[label], "base_dim": args.scaling.base_dim or args.model.dim}
    if scaling.WD_RULES[settings["wd"]].timescale and args.scaling.tau_iter <= 0:
        settings = {**settings, "tau_iter": tau}  # keep the configured, or else the base width's, timescale
    model = replace(args.model, dim=dim)
    return check_plan_args(model, args.optim, args.schedule, replace(args.scaling, **settings), args.steps,
                           tokens_per_step(args))  # fmt: skip


def class_row(cp: scaling.ClassPlan, dim: int) -> dict:
    """One class at one width: LR, WD and the theory's predictions for its layers of fan-in `dim`."""
    rho0 = cp.init_std((dim, dim)) if cp.init.fan else None
    row = {k: cp.row()[k] for k in ("lr", "weight_decay", "eta_lambda", "tau_iter", "tau_epoch", "eq_rms")}
    return {"class": cp.cls, **row, "init_std": rho0, "t_eq": cp.time_to_equilibrium(rho0) if rho0 else None}


def overrides(args: TrainArgs, label: str, dim: int, d0: int, tau: float) -> str:
    """The trainer overrides that run this rule at this width (the trainer applies the rule itself)."""
    settings = scaling.rules()[label]
    rule = f"scaling.width={settings['width']} scaling.wd={settings['wd']}"
    if scaling.WD_RULES[settings["wd"]].timescale and args.scaling.tau_iter <= 0 and args.scaling.tau_epoch <= 0:
        rule += f" scaling.tau_iter={tau:.6g}"
    o = args.optim
    return f"model.dim={dim} scaling.base_dim={d0} {rule} optim.lr={o.lr:g} optim.weight_decay={o.weight_decay:g}"


def transfer(args: TransferArgs) -> dict:
    """{"base": ..., "widths": {d: {"m", "rules": {rule: {"source", "overrides", "classes": {cls: row}}}}}}."""
    d0 = args.scaling.base_dim or args.model.dim
    check_plan_args(args.model, args.optim, args.schedule, args.scaling, args.steps, tokens_per_step(args))
    for label in args.transfer.rules:
        check_choice(label, "transfer.rules", scaling.rules())
    present = {cls for _, cls in scaling.parse_patterns(args.scaling.patterns)}
    tau = base_tau_iter(args)
    o = args.optim
    out = {
        "base": {"dim": d0, "lr": o.lr, "weight_decay": o.weight_decay, "variant": o.variant, "steps": args.steps,
                 "tokens_per_step": tokens_per_step(args),
                 "iters_per_epoch": scaling.iters_per_epoch(args.scaling, tokens_per_step(args)),
                 "timescale_tau_iter": tau or None},
        "widths": {},
    }  # fmt: skip
    for dim in args.transfer.widths or [d0 * 2**k for k in range(5)]:
        per_rule = {}
        for label in args.transfer.rules or scaling.rules():
            if scaling.WD_RULES[scaling.rules()[label]["wd"]].timescale and tau <= 0:
                continue  # no timescale to keep without weight decay at the base width
            try:
                p = rule_plan(args, label, dim, tau)
            except ConfigError as err:
                raise ConfigError(f"transfer.widths: {dim}: {err}") from None
            rows = {cls: class_row(cp, dim) for cls, cp in p.classes.items() if cls in present}
            per_rule[label] = {"source": p.source, "overrides": overrides(args, label, dim, d0, tau), "classes": rows}
        out["widths"][dim] = {"m": scaling.width_mult(replace(args.scaling, base_dim=d0), dim), "rules": per_rule}
    return out


def print_report(result: dict, file=None) -> None:
    file = file or sys.stdout
    b = result["base"]
    print(
        f"tuned at d0={b['dim']}: eta={b['lr']:g}, lambda={b['weight_decay']:g} ({b['variant']} AdamW), "
        f"{b['steps']} steps of {b['tokens_per_step']} tokens",
        file=file,
    )
    if b["timescale_tau_iter"]:
        print(f"timescale rule keeps tau_iter = {b['timescale_tau_iter']:.4g} steps", file=file)
    for dim, w in result["widths"].items():
        rows = [{"rule": k, **r} for k, v in w["rules"].items() for r in v["classes"].values()]
        print(f"\nd={dim} (m={w['m']:g})", file=file)
        print(format_table(rows, COLUMNS), file=file)
        for key, v in w["rules"].items():
            print(f"  {key:<12} {v['overrides']}   # {v['source']}", file=file)


def plot(args: TransferArgs, result: dict, path: str) -> None:
    """Schedules with the extra warmups and the RMS model of the hidden class at the widest width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dim = max(result["widths"])
    m = result["widths"][dim]["m"]
    T = args.steps
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
    d0 = result["base"]["dim"]
    base_row = class_row(rule_plan(args, "sp", d0, 0.0).classes["hidden"], d0)
    curves = [
        ("base width", base_row),
        *((k, v["classes"]["hidden"]) for k, v in result["widths"][dim]["rules"].items()),
    ]
    seen: dict[tuple, str] = {}  # rules with the same curves (e.g. independent and timescale) are named, not hidden
    for i, (key, row) in enumerate(curves):
        lrs = row["lr"] * base
        rho = theory.rms_model(lrs, row["eta_lambda"] / row["lr"], row["init_std"])
        rel = theory.relative_updates(lrs, rho)
        same = seen.setdefault((tuple(np.round(rho, 12)), tuple(np.round(rel, 12))), key)
        label = key if same == key else f"{key} (= {same})"
        # own marker, staggered along the curve, earlier curves wider underneath: coinciding curves stay visible
        style = {"marker": "os^Dv<>ph"[i % 9], "ms": 5, "markevery": (i * T // (10 * len(curves)), T // 10)}
        style |= (
            {"color": "k", "ls": "--"} if key == "base width" else {"lw": 1 + 2.0 * (len(curves) - i) / len(curves)}
        )
        axes[1].plot(np.arange(T + 1), rho, label=label, **style)
        axes[2].plot(t, rel, label=label, **style)
    axes[1].set(
        yscale="log", xlabel="step", ylabel="weight RMS rho_t", title=f"hidden class, RMS model (eq 30), d={dim}"
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


USAGE = "usage: lingua-wd-transfer [[config=]FILE.yaml] [key=value ...] [transfer.widths=[...]] [transfer.out=FILE]"


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_cli(argv, TransferArgs, _main, USAGE, __doc__, base=[PAPER_RUN])


if __name__ == "__main__":
    sys.exit(main())
