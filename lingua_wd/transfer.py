"""Hyperparameters tuned at width d0 -> each class's LR and WD at other widths, under every rule.

    python -m lingua_wd.transfer optim.lr=8e-3 optim.weight_decay=0.1 model.dim=128 --widths 2048
    lingua-wd-transfer config=configs/paper/llama.yaml --widths 512 2048 --plot transfer.png

Reads the model / optim / schedule / scaling sections, `steps` and data.seq_len / data.batch_size
of a training config (other sections are ignored), prints one table per width, writes YAML, and
with --plot draws the schedule with the extra warmups (eq 14, 15) and the RMS model (eq 30).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lingua_wd import theory
from lingua_wd.args import ConfigError, check
from lingua_wd.model import ModelArgs
from lingua_wd.optim import OptimArgs, check_optim_args, decay_rate, format_table
from lingua_wd.scaling import (
    CLASSES,
    RULES,
    ScalingArgs,
    check_scaling_args,
    class_hparams,
    iters_per_epoch,
    parse_patterns,
    rule_name,
)
from lingua_wd.schedule import ScheduleArgs, check_schedule_args, exp_warmup, extra_warmup_factors, schedule_factors


@dataclass
class TransferData:
    seq_len: int = 4096  # tokens per sequence (paper: 4096)
    batch_size: int = 256  # sequences per optimizer step (paper: 256, 2^20 tokens)


@dataclass
class TransferArgs:
    steps: int = 20000  # optimizer steps of the run (paper: 20,000)
    model: ModelArgs = field(default_factory=lambda: ModelArgs(dim=128))
    data: TransferData = field(default_factory=TransferData)
    optim: OptimArgs = field(default_factory=OptimArgs)
    schedule: ScheduleArgs = field(default_factory=ScheduleArgs)
    scaling: ScalingArgs = field(default_factory=ScalingArgs)


SECTIONS = ("steps", "model", "optim", "schedule", "scaling")
COLUMNS = ["mode", "class", "lr", "weight_decay", "eta_lambda", "tau_iter", "tau_epoch", "eq_rms", "init_std", "t_eq"]


def load_args(config: str | None, dotlist: list[str]) -> TransferArgs:
    """The sections of a training config (and key=value overrides) that transfer needs."""
    try:
        raw = OmegaConf.merge(OmegaConf.load(config) if config else OmegaConf.create(), OmegaConf.from_dotlist(dotlist))
        keep = {k: raw[k] for k in SECTIONS if k in raw}
        data = raw.get("data") or {}
        keep["data"] = {k: data[k] for k in ("seq_len", "batch_size") if k in data}
        args = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TransferArgs), keep))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(f"{key}: {str(getattr(err, 'msg', None) or err).splitlines()[0]}") from None
    except OSError as err:
        raise ConfigError(f"config: {err}") from None
    check(args.steps > 0, "steps", "must be positive")
    check_optim_args(args.optim)
    check_schedule_args(args.schedule, args.steps)
    return args


def mode_scaling(base: ScalingArgs, key: str, tau_iter: float) -> ScalingArgs:
    """The scaling args of RULES row `key` ("sp" is mode=sp, the others wd_mode under mode=mup)."""
    if key == "sp":
        return replace(base, mode="sp", wd_mode="standard")
    out = replace(base, mode="mup", wd_mode=key)
    return replace(out, tau_iter=tau_iter) if key == "timescale" and tau_iter > 0 else out


def init_std(cls: str, dim: int, m: float, output_init: str) -> float | None:
    """App. G.3 init at width `dim` for the fan-in-`dim` layers (w2's fan-in is 3 dim: 1/sqrt(3) smaller)."""
    if cls in ("input", "hidden"):
        return 1.0 / math.sqrt(dim)
    if cls == "output":
        return 1.0 / math.sqrt(dim * (m if output_init == "mup" else 1.0))
    return None


def base_tau_iter(args: TransferArgs) -> float:
    """The timescale rule's tau_iter: configured, or else the one of the hidden class at the base width."""
    s = args.scaling
    if s.tau_iter > 0 or (s.tau_epoch > 0 and s.dataset_tokens > 0):
        return s.tau_iter or s.tau_epoch * iters_per_epoch(s, tokens_per_step(args))
    return (
        1.0 / decay_rate(args.optim.lr, args.optim.weight_decay, args.optim.variant) if args.optim.weight_decay else 0.0
    )


def tokens_per_step(args: TransferArgs) -> int:
    return args.data.seq_len * args.data.batch_size


def class_row(args: TransferArgs, scaling: ScalingArgs, cls: str, dim: int, m: float, tau: float) -> dict:
    """One class at one width under one rule: LR, WD and the theory's predictions."""
    o = args.optim
    lr, wd = class_hparams(scaling, cls, m, o.lr, o.weight_decay, tau, o.variant == "decoupled")
    rate = decay_rate(lr, wd, o.variant)  # per-step decay at the peak: 1 / tau_iter
    M = iters_per_epoch(scaling, tokens_per_step(args))
    lam = rate / lr  # the torch-AdamW lambda with the same per-step decay (for the RMS model)
    rho0 = init_std(cls, dim, m, scaling.output_init)
    return {
        "class": cls,
        "lr": lr,
        "weight_decay": wd,
        "eta_lambda": rate,
        "tau_iter": 1.0 / rate if rate > 0 else math.inf,
        "tau_epoch": (1.0 / rate / M if rate > 0 else math.inf) if M else None,
        "eq_rms": theory.equilibrium_rms(lr, lam),
        "init_std": rho0,
        "t_eq": theory.time_to_equilibrium(lr, lam, rho0) if rho0 and lam > 0 else None,
    }


def overrides(args: TransferArgs, key: str, dim: int, d0: int, tau: float) -> str:
    """The trainer overrides that run this rule at this width (the trainer applies the rule itself)."""
    mode = "scaling.mode=sp" if key == "sp" else f"scaling.mode=mup scaling.wd_mode={key}"
    if key == "timescale" and args.scaling.tau_iter <= 0 and args.scaling.tau_epoch <= 0:
        mode += f" scaling.tau_iter={tau:.6g}"
    return f"model.dim={dim} scaling.base_dim={d0} {mode} optim.lr={args.optim.lr:g} optim.weight_decay={args.optim.weight_decay:g}"


def transfer(args: TransferArgs, widths: list[int], modes: list[str]) -> dict:
    """{"base": ..., "widths": {d: {"m", "modes": {mode: {"source", "overrides", "classes": {cls: row}}}}}}."""
    d0 = args.scaling.base_dim or args.model.dim
    present = {cls for _, cls in parse_patterns(args.scaling.patterns)}
    classes = [cls for cls in CLASSES if cls in present]
    tau = base_tau_iter(args)
    M = iters_per_epoch(args.scaling, tokens_per_step(args))
    out = {
        "base": {"dim": d0, "lr": args.optim.lr, "weight_decay": args.optim.weight_decay, "variant": args.optim.variant,
                 "steps": args.steps, "tokens_per_step": tokens_per_step(args), "iters_per_epoch": M,
                 "timescale_tau_iter": tau or None},
        "widths": {},
    }  # fmt: skip
    for dim in widths:
        m = dim / d0
        per_mode = {}
        for key in modes:
            scaling = mode_scaling(args.scaling, key, tau)
            if key == "timescale" and tau <= 0:
                continue  # no timescale to keep without weight decay at the base width
            check_scaling_args(scaling, replace(args.model, dim=dim))
            rows = {cls: class_row(args, scaling, cls, dim, m, tau) for cls in classes}
            per_mode[key] = {"source": RULES[rule_name(scaling)].source, "overrides": overrides(args, key, dim, d0, tau),
                             "classes": rows}  # fmt: skip
        out["widths"][dim] = {"m": m, "modes": per_mode}
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
        rows = [{"mode": k, **r} for k, v in w["modes"].items() for r in v["classes"].values()]
        print(f"\nd={dim} (m={w['m']:g})", file=file)
        print(format_table(rows, COLUMNS), file=file)
        for key, v in w["modes"].items():
            print(f"  {key:<12} {v['overrides']}   # {v['source']}", file=file)


def _yaml_safe(x):
    if isinstance(x, dict):
        return {k: _yaml_safe(v) for k, v in x.items()}
    if isinstance(x, float) and math.isinf(x):
        return None  # no decay: infinite timescale / equilibrium
    return x


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
    o = args.optim
    rate = decay_rate(o.lr, o.weight_decay, o.variant)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    ax.plot(t, base, label=f"{args.schedule.kind} (base)")
    ax.plot(t, base * exp_warmup(t, T, m, args.scaling.extra_warmup_frac), label="x exp warmup (eq 14)")
    if rate > 0:
        away = extra_warmup_factors("decay_away", args.schedule, T, m, 0.0, rate)[:T]
        ax.plot(t, base * away, label="x decay-away (eq 15)")
    ax.set(xlabel="step", ylabel="LR factor", title=f"schedules at m={m:g}")
    ax.legend()
    for key, v in [("base width", None), *result["widths"][dim]["modes"].items()]:
        row = (
            v["classes"]["hidden"]
            if v
            else class_row(args, mode_scaling(args.scaling, "sp", 0), "hidden", result["base"]["dim"], 1.0, 0)
        )
        lrs = row["lr"] * base
        rho = theory.rms_model(lrs, row["eta_lambda"] / row["lr"], row["init_std"])
        style = {"color": "k", "ls": "--"} if v is None else {}
        axes[1].plot(np.arange(T + 1), rho, label=key, **style)
        axes[2].plot(t, theory.relative_updates(lrs, rho), label=key, **style)
    axes[1].set(
        yscale="log", xlabel="step", ylabel="weight RMS rho_t", title=f"hidden class, RMS model (eq 30), d={dim}"
    )
    axes[2].set(yscale="log", xlabel="step", ylabel="eta_t / rho_t", title="relative update (eq 35)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lingua-wd-transfer",
        description="LR and WD of every parameter class at target widths under each scaling rule (SPEC §2).",
        epilog="Positional items: config=FILE.yaml and key=value overrides, as for apps/train.py; d0 is "
        "scaling.base_dim (or model.dim). Without a config the paper's setup (App. G.3) is the default.",
    )
    parser.add_argument("items", nargs="*", help="config=FILE.yaml and key=value overrides")
    parser.add_argument("--widths", type=int, nargs="+", help="target widths d (default: d0 x 1, 2, 4, 8, 16)")
    parser.add_argument("--modes", nargs="+", default=list(RULES), choices=list(RULES), help="rules to show")
    parser.add_argument("--out", default="transfer.yaml", help="YAML output ('' to skip)")
    parser.add_argument("--plot", default="", help="PNG of the schedules and RMS-model trajectories")
    ns = parser.parse_args(argv)
    configs = [a.split("=", 1)[1] for a in ns.items if a.startswith("config=")]
    try:
        check(all("=" in a for a in ns.items), "config", "positional items must be config=FILE or key=value")
        args = load_args(configs[-1] if configs else None, [a for a in ns.items if not a.startswith("config=")])
        d0 = args.scaling.base_dim or args.model.dim
        widths = ns.widths or [d0 * 2**k for k in range(5)]
        result = transfer(args, widths, ns.modes)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    print_report(result)
    if ns.out:
        Path(ns.out).write_text(yaml.safe_dump(_yaml_safe(result), sort_keys=False))
        print(f"\nwrote {ns.out}")
    if ns.plot:
        plot(args, result, ns.plot)
        print(f"wrote {ns.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
