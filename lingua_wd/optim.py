"""Optimizer: one named AdamW group per (parameter class, scaling rule), the per-group schedule,
the start-up table, and global grad-norm clipping that is correct under FSDP2.

Two AdamW variants (App. G.1): PyTorch's (Algorithm 1: decay eta_t * lambda per step) and the
"fully decoupled" one of Loshchilov & Hutter (decay lambda * schedule(t) per step). Under the
latter, muP with a fixed lambda equals independent scaling (SPEC §2).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lingua_wd.args import check
from lingua_wd.scaling import (
    CLASSES,
    ScalingArgs,
    class_hparams,
    fan_in,
    init_std_fn,
    iters_per_epoch,
    param_classes,
    rule_name,
    target_tau_iter,
    width_mult,
)
from lingua_wd.schedule import ScheduleArgs, extra_warmup_factors, group_factor

logger = logging.getLogger(__name__)


@dataclass
class OptimArgs:
    lr: float = 3e-3  # peak LR eta_base, tuned at the base width (each class's LR follows scaling.*)
    weight_decay: float = 0.1  # lambda_base; per step torch decays eta_t lambda, decoupled lambda schedule(t)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    clip: float = 1.0  # global grad-norm clip (0 = off)
    fused: Optional[bool] = None  # fused AdamW kernel (None: on CUDA only)
    variant: str = "torch"  # torch: PyTorch AdamW (Alg. 1) | decoupled: Loshchilov & Hutter, decay lambda * schedule(t)


class DecoupledAdamW(torch.optim.AdamW):
    """The "fully decoupled" AdamW of Loshchilov & Hutter (App. G.1).

    Each step multiplies the weights by 1 - lambda * s_t, with s_t = lr / initial_lr the group's
    schedule factor, then takes PyTorch's Adam step without decay. PyTorch applies its decay before
    the Adam update too, so with lambda' = eta * lambda and a constant LR both variants coincide.
    Elementwise foreach ops only, so sharded DTensor parameters (FSDP2) decay shard by shard.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        saved = [group["weight_decay"] for group in self.param_groups]
        try:
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                if group["weight_decay"] and params:
                    torch._foreach_mul_(params, 1.0 - group["weight_decay"] * group["lr"] / group["initial_lr"])
                group["weight_decay"] = 0.0
            super().step()
        finally:
            for group, wd in zip(self.param_groups, saved, strict=True):
                group["weight_decay"] = wd
        return loss


VARIANTS = {"torch": torch.optim.AdamW, "decoupled": DecoupledAdamW}


def check_optim_args(args: OptimArgs) -> None:
    check(args.lr > 0, "optim.lr", f"must be positive, got {args.lr}")
    check(args.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {args.weight_decay}")
    check(0 <= args.beta1 < 1, "optim.beta1", f"must be in [0, 1), got {args.beta1}")
    check(0 <= args.beta2 < 1, "optim.beta2", f"must be in [0, 1), got {args.beta2}")
    check(args.eps > 0, "optim.eps", f"must be positive, got {args.eps}")
    check(args.clip >= 0, "optim.clip", f"must be >= 0, got {args.clip}")
    check(args.variant in VARIANTS, "optim.variant", f"unknown {args.variant!r} (choose from {', '.join(VARIANTS)})")


def decay_rate(lr: float, wd: float, variant: str) -> float:
    """Per-step decay at the peak LR: eta * lambda (torch, Alg. 1) or lambda (decoupled); 1/tau_iter."""
    return lr * wd if variant == "torch" else wd


def make_adamw(groups: list[dict], args: OptimArgs, on_cuda: bool) -> torch.optim.Optimizer:
    """AdamW of `args.variant` over ready-made groups (each with lr, initial_lr, weight_decay)."""
    fused = on_cuda if args.fused is None else args.fused
    return VARIANTS[args.variant](groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps, fused=fused)


def _inv(x: float) -> Optional[float]:
    return 1.0 / x if x > 0 else None


def param_groups(
    model: nn.Module, optim: OptimArgs, scaling: ScalingArgs, tokens_per_step: int
) -> tuple[list[dict], list[dict], list[dict]]:
    """(optimizer groups, one table row per group, one row per parameter); one group per class under the rule."""
    classes = param_classes(model, scaling)
    m = width_mult(scaling, model.args.dim)
    rule = rule_name(scaling)
    tau = target_tau_iter(scaling, tokens_per_step) if rule == "timescale" else 0.0
    M = iters_per_epoch(scaling, tokens_per_step)
    std = init_std_fn(scaling, model.args)
    named = dict(model.named_parameters())
    groups, rows, prows = [], [], []
    for cls in CLASSES:
        names = [n for n, c in classes.items() if c == cls]
        if not names:
            continue
        lr, wd = class_hparams(scaling, cls, m, optim.lr, optim.weight_decay, tau, optim.variant == "decoupled")
        name = f"{cls}/{rule}"
        groups.append({"params": [named[n] for n in names], "name": name, "class": cls, "rule": rule,
                       "lr": lr, "initial_lr": lr, "weight_decay": wd})  # fmt: skip
        for n in names:
            p = named[n]
            prows.append({"name": n, "class": cls, "group": name, "shape": list(p.shape), "fan_in": fan_in(cls, p),
                          "init_std": std(n, p)})  # fmt: skip
        rate = decay_rate(lr, wd, optim.variant)
        mine = [r for r in prows if r["group"] == name]
        rows.append({
            "name": name, "class": cls, "rule": rule, "n_params": sum(named[n].numel() for n in names),
            "n_tensors": len(names), "fan_in": sorted({r["fan_in"] for r in mine}),
            "init_std": sorted({round(r["init_std"], 8) for r in mine}), "lr": lr, "weight_decay": wd,
            "lr_mult": lr / optim.lr, "wd_mult": wd / optim.weight_decay if optim.weight_decay > 0 else None,
            "eta_lambda": rate, "tau_iter": _inv(rate),
            "tau_epoch": _inv(rate) / M if rate > 0 and M else None,
            "eq_rms": lr / math.sqrt(2 * rate) if rate > 0 else None,  # sqrt(eta / (2 lambda)), eq 33
        })  # fmt: skip
    covered = [id(p) for g in groups for p in g["params"]]
    assert len(covered) == len(set(covered)) == len(named), "param groups must cover every parameter exactly once"
    assert set(covered) == {id(p) for p in named.values()}, "param groups must cover every parameter exactly once"
    return groups, rows, prows


def build_optimizer(
    model: nn.Module,
    optim: OptimArgs,
    scaling: ScalingArgs,
    schedule: ScheduleArgs,
    total_steps: int,
    tokens_per_step: int,
    dump_dir: str | None = None,
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW with one named group per class (scaling rule applied) and a LambdaLR with one factor per group.

    Each group carries "name", "class", "rule", "lr" (scheduled), "initial_lr" (peak) and "weight_decay".
    With dump_dir (rank 0), logs the start-up table and writes <dump_dir>/param_groups.json.
    """
    groups, rows, prows = param_groups(model, optim, scaling, tokens_per_step)
    on_cuda = next(model.parameters()).device.type == "cuda"
    opt = make_adamw(groups, optim, on_cuda)
    m = width_mult(scaling, model.args.dim)
    tau = target_tau_iter(scaling, tokens_per_step) if rule_name(scaling) == "timescale" else 0.0
    ref_lr, ref_wd = class_hparams(
        scaling, "hidden", m, optim.lr, optim.weight_decay, tau, optim.variant == "decoupled"
    )
    extra = None
    if scaling.extra_warmup != "none":  # eq 15 decays with the hidden class's per-step decay
        peak_decay = decay_rate(ref_lr, ref_wd, optim.variant)
        extra = extra_warmup_factors(
            scaling.extra_warmup, schedule, total_steps, m, scaling.extra_warmup_frac, peak_decay
        )
    warm = set(scaling.extra_warmup_classes or CLASSES)
    factors = [group_factor(schedule, total_steps, extra if g["class"] in warm else None) for g in groups]
    for row, g in zip(rows, groups, strict=True):
        row["extra_warmup"] = scaling.extra_warmup if extra is not None and g["class"] in warm else "none"
    sched = LambdaLR(opt, factors)
    if dump_dir is not None:
        header = {"width_mult": m, "dim": model.args.dim, "base_dim": scaling.base_dim or model.args.dim,
                  "rule": rule_name(scaling), "variant": optim.variant, "tau_iter_target": tau or None}  # fmt: skip
        write_param_groups(Path(dump_dir) / "param_groups.json", header, rows, prows)
        logger.info("parameter groups (%s)\n%s", ", ".join(f"{k}={v}" for k, v in header.items()), format_table(rows))
    return opt, sched


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, list):
        return ",".join(_fmt(v) for v in x)
    return f"{x:.3g}" if isinstance(x, float) else str(x)


TABLE_COLUMNS = ["name", "n_params", "fan_in", "init_std", "lr", "weight_decay", "lr_mult", "wd_mult",
                 "eta_lambda", "tau_iter", "tau_epoch", "eq_rms", "extra_warmup"]  # fmt: skip


def format_table(rows: list[dict], columns: list[str] = TABLE_COLUMNS) -> str:
    """Plain-text table, one row per dict."""
    cells = [columns] + [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def write_param_groups(path: Path, header: dict, rows: list[dict], prows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**header, "groups": rows, "params": prows}, indent=1))
    os.replace(tmp, path)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global L2 grad norm over all (possibly sharded) parameters, clipped in place when max_norm > 0.

    Under FSDP2 grads are DTensors: `torch.nn.utils.get_total_norm` reduces the per-shard partial
    norms across ranks, so every rank sees the norm of the full gradient. Returns it without a host sync.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    if max_norm > 0:  # takes the parameters (it scales their .grad), not the grads themselves
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm
