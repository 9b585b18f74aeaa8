"""Guards that keep long runs alive and honest: non-finite steps, loss spikes, resume compatibility,
and fault injection for the tests that prove it (docs/reliability.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from lingua_wd.args import check

# config keys whose change since the checkpoint breaks an exact continuation (prefix match), and the
# exceptions among them that do not change the numbers (the token stream is independent of workers)
HARMLESS_KEYS = ("data.workers",)
EXACTNESS_KEYS = (
    "model.",
    "data.",
    "optim.",
    "schedule.",
    "scaling.",
    "seed",
    "steps",
    "distributed.param_dtype",
    "distributed.reduce_dtype",
    "distributed.device",
    "world_size",
)
# everything else (logging, probes, eval, checkpoint cadence, compile, ...) may change freely


@dataclass
class GuardArgs:
    max_nonfinite: int = 10  # stop after this many skipped steps with a non-finite loss or grad norm (0 = never)
    spike_factor: float = 2.0  # a loss above this x its running mean is a loss_spike: an event, no checkpoint
    force_resume: bool = False  # resume even if exactness-relevant config keys changed since the checkpoint
    inject_nan_steps: list[int] = field(default_factory=list)  # testing: make the loss NaN at these steps
    crash_in_checkpoint: int = -1  # testing: die (exit 137) halfway through writing the checkpoint of this step
    step_sleep_s: float = 0.0  # testing: sleep this long after every step (a long run that leaves the CPU free)


def check_guard_args(args: GuardArgs) -> None:
    check(args.max_nonfinite >= 0, "guard.max_nonfinite", f"must be >= 0, got {args.max_nonfinite}")
    check(args.spike_factor > 1, "guard.spike_factor", f"must be > 1, got {args.spike_factor}")
    check(args.step_sleep_s >= 0, "guard.step_sleep_s", f"must be >= 0, got {args.step_sleep_s}")


def optimizer_step(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> torch.Tensor:
    """Step unless the gradient norm is non-finite; returns 1.0 (device tensor) for a skipped step.

    Fused AdamW takes the flag on the device (`found_inf`, as GradScaler uses it) and skips the whole
    update, moments and step count included, with no host sync. Other optimizers need one sync.
    """
    bad = (~torch.isfinite(grad_norm)).float()
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = bad
        optimizer.step()
    elif not bad.item():
        optimizer.step()
    return bad


def inject_nan(loss: torch.Tensor, args: GuardArgs, step: int) -> torch.Tensor:
    return loss * float("nan") if step in args.inject_nan_steps else loss


class SpikeDetector:
    """Per step, on the host at log time: loss spikes and the divergence streak.

    A spike is a loss above factor x an EMA of the previous healthy losses, checked from the second
    step on (warmup=1). A step is unhealthy when it is a spike or had a non-finite loss or gradient
    norm (checked from the first step); a run of unhealthy steps is the divergence streak
    (`streak_start`: its first step, None when the last step was healthy). The EMA does not take in
    unhealthy losses, so a diverged run stays in its streak instead of becoming the new normal. No
    checkpoint is written during a streak (train.py).
    """

    def __init__(self, factor: float, beta: float = 0.95, warmup: int = 1):
        self.factor, self.beta, self.warmup = factor, beta, warmup
        self.ema: Optional[float] = None
        self.seen = 0
        self.streak_start: Optional[int] = None

    def update(self, step: int, loss: float, skipped: bool = False) -> Optional[dict[str, Any]]:
        """Take one step's global loss; returns a loss_spike event record for a spike."""
        if skipped or not math.isfinite(loss):
            self.streak_start = step if self.streak_start is None else self.streak_start
            return None
        if self.ema is not None and self.seen >= self.warmup and loss > self.factor * self.ema:
            self.streak_start = step if self.streak_start is None else self.streak_start
            return {"step": step, "event": "loss_spike", "loss": loss, "running_mean": self.ema}
        self.streak_start = None
        self.ema = loss if self.ema is None else self.beta * self.ema + (1 - self.beta) * loss
        self.seen += 1
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "seen": self.seen, "streak_start": self.streak_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema, self.seen = state["ema"], state["seen"]
        self.streak_start = state.get("streak_start")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix == "data." and k == "sources"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """Exactness-relevant keys whose value differs between the checkpoint's config and this run's."""
    a, b = _flatten(saved), _flatten(current)
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    breaking = [k for k in changed if k.startswith(EXACTNESS_KEYS) and k not in HARMLESS_KEYS]
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in breaking]
