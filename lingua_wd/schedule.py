"""Learning-rate schedules as pure functions step -> factor of the peak LR, and the extra warmups.

Base schedules (SPEC §3): linear warmup from 0 then linear decay (the paper's default, App. G.3),
cosine with a final ratio, constant and warmup-stable-decay (WSD). On top of them, the paper's
extra warmup factors (App. B.2), which go from 1/m to 1 and have no effect at m = 1:
exp-increasing (eq 14) and decay-away (eq 15).

Step t is the optimizer step (0-based); the factor of step t is used by that step, so a
`LambdaLR` stepped once after every optimizer step applies it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lingua_wd.args import check, check_choice, one_of

Factor = Callable[[int], float]


@dataclass
class ScheduleArgs:
    kind: str = one_of("linear", lambda: SCHEDULES)  # base LR schedule after a linear warmup (SCHEDULES)
    warmup: float = 0.1  # warmup length as a fraction of the run (used when warmup_steps < 0)
    warmup_steps: int = -1  # warmup length in steps (-1: use warmup)
    final_ratio: float = 0.0  # LR at the end of the decay as a fraction of the peak (linear, cosine, wsd)
    decay: float = 0.2  # wsd: length of the final linear decay as a fraction of the run


def warmup_steps(args: ScheduleArgs, total: int) -> int:
    return args.warmup_steps if args.warmup_steps >= 0 else int(round(args.warmup * total))


def check_schedule_args(args: ScheduleArgs, total: int) -> None:
    check_choice(args.kind, "schedule.kind", SCHEDULES)
    check(0.0 <= args.warmup <= 1.0, "schedule.warmup", f"must be a fraction in [0, 1], got {args.warmup}")
    check(
        warmup_steps(args, total) <= total,
        "schedule.warmup_steps",
        f"{warmup_steps(args, total)} is longer than the run ({total} steps)",
    )
    check(0.0 <= args.final_ratio <= 1.0, "schedule.final_ratio", f"must be in [0, 1], got {args.final_ratio}")
    check(0.0 <= args.decay <= 1.0, "schedule.decay", f"must be a fraction in [0, 1], got {args.decay}")
    if args.kind == "wsd":
        check(
            warmup_steps(args, total) + int(round(args.decay * total)) <= total,
            "schedule.decay",
            "warmup + decay is longer than the run",
        )


def _warmup(step: int, warmup: int) -> float:
    return (step + 1) / warmup  # nonzero from the first step, 1 at the end of the warmup


def linear(step: int, total: int, warmup: int, args: ScheduleArgs) -> float:
    """Linear warmup to 1, then linear decay to final_ratio at `total` (App. G.3)."""
    if step < warmup:
        return _warmup(step, warmup)
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - (1.0 - args.final_ratio) * frac


def cosine(step: int, total: int, warmup: int, args: ScheduleArgs) -> float:
    """Linear warmup, then half a cosine from 1 down to final_ratio at `total`."""
    if step < warmup:
        return _warmup(step, warmup)
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return args.final_ratio + (1.0 - args.final_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))


def constant(step: int, total: int, warmup: int, args: ScheduleArgs) -> float:
    """Linear warmup, then the peak LR until the end."""
    return _warmup(step, warmup) if step < warmup else 1.0


def wsd(step: int, total: int, warmup: int, args: ScheduleArgs) -> float:
    """Warmup-stable-decay: warmup, constant, then a linear decay over the last `decay` of the run."""
    if step < warmup:
        return _warmup(step, warmup)
    n_decay = int(round(args.decay * total))
    start = total - n_decay
    if step < start:
        return 1.0
    frac = min(1.0, (step - start) / max(1, n_decay))
    return 1.0 - (1.0 - args.final_ratio) * frac


SCHEDULES = {"linear": linear, "cosine": cosine, "constant": constant, "wsd": wsd}


def lr_factor(args: ScheduleArgs, step: int, total: int) -> float:
    """The base schedule's factor of the peak LR at optimizer step `step` of a `total`-step run."""
    return max(0.0, SCHEDULES[args.kind](step, total, warmup_steps(args, total), args))


def schedule_factors(args: ScheduleArgs, total: int) -> np.ndarray:
    """The base factors of steps 0..total-1 as a float64 array (for the theory and plots)."""
    return np.array([lr_factor(args, t, total) for t in range(total)], dtype=np.float64)


# ----- extra warmups (App. B.2), factors multiplying the base schedule -----


def exp_warmup(steps: np.ndarray | int, total: int, m: float, frac: float) -> np.ndarray:
    """Eq 14: m ** min(0, t / T_W - 1) with T_W = frac * total: 1/m at t = 0, 1 from t = T_W on."""
    t_w = max(frac * total, 1e-12)
    return np.power(float(m), np.minimum(0.0, np.asarray(steps, dtype=np.float64) / t_w - 1.0))


def decay_away(lrs: np.ndarray, wd: float, m: float) -> np.ndarray:
    """Eq 15: (1 + (m^2 - 1) prod_{tau<t} (1 - eta_tau lambda)^2) ** -1/2 for each step t.

    `lrs` is the unmodified schedule eta_tau (absolute LRs); the factor starts at 1/m and tends to
    1 as the decay product vanishes, following the rho_0 = rho_inf case of eq 13.
    """
    a2 = (1.0 - np.asarray(lrs, dtype=np.float64) * wd) ** 2
    prod = np.concatenate([[1.0], np.cumprod(a2)[:-1]])  # exclusive: prod over tau < t
    return (1.0 + (m * m - 1.0) * prod) ** -0.5


def _no_extra(total: int, m: float, frac: float, base: np.ndarray, peak_decay: float) -> np.ndarray:
    return np.ones(total + 1)


def _exp_extra(total: int, m: float, frac: float, base: np.ndarray, peak_decay: float) -> np.ndarray:
    return exp_warmup(np.arange(total + 1), total, m, frac)


def _decay_away_extra(total: int, m: float, frac: float, base: np.ndarray, peak_decay: float) -> np.ndarray:
    check(
        m == 1.0 or peak_decay > 0,
        "scaling.extra_warmup",
        "decay_away needs weight decay (eq 15 decays with eta*lambda)",
    )
    return decay_away(np.append(base, base[-1:]), peak_decay, m)  # eta_tau * lambda = base_tau * (eta lambda)


EXTRA_WARMUPS = {"none": _no_extra, "exp": _exp_extra, "decay_away": _decay_away_extra}


def extra_warmup_factors(
    kind: str, args: ScheduleArgs, total: int, m: float, frac: float, peak_decay: float
) -> np.ndarray:
    """Extra warmup factors of steps 0..total (eq 14 or 15) multiplying the base schedule.

    peak_decay: the per-step decay eta * lambda at the peak LR that eq 15 decays with (the hidden class's).
    """
    check_choice(kind, "scaling.extra_warmup", EXTRA_WARMUPS)
    return EXTRA_WARMUPS[kind](total, m, frac, schedule_factors(args, total), peak_decay)


def group_factor(args: ScheduleArgs, total: int, extra: np.ndarray | None = None) -> Factor:
    """step -> LR factor for one parameter group: the base schedule times an optional extra warmup."""
    if extra is None:
        return lambda step: lr_factor(args, step, total)
    return lambda step: lr_factor(args, step, total) * float(extra[min(max(step, 0), len(extra) - 1)])
