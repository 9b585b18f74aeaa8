"""Optimizer: one named AdamW group per parameter class of the width plan (scaling.plan), the per-group
schedule, the start-up table and param_groups.json (the plan's dump), and global grad-norm clipping that
is correct under FSDP2.

Two AdamW variants (App. G.1): PyTorch's (Algorithm 1: decay eta_t * lambda per step) and the
"fully decoupled" one of Loshchilov & Hutter (decay lambda * schedule(t) per step). How each applies
lambda is its row of scaling.DECAY_RULES; under the decoupled one, muP with a fixed lambda equals
independent scaling (SPEC §2). A third variant, `muon`, updates the classes of `optim.muon_classes` (the
hidden matrices by default) with Muon (lingua_wd/muon.py, exact under FSDP2) and the others with PyTorch's
AdamW, one optimizer object over both (muon.CombinedOptimizer); the plan gives the Muon classes their own
width rule (scaling.MUON_RULES) and decay row (DECAY_RULES["muon"]).
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

from lingua_wd.args import ConfigError, check, check_choice, one_of
from lingua_wd.model import ModelArgs, block_params, check_model_args
from lingua_wd.muon import ADJUST_LR, NS_DTYPES, CombinedOptimizer, Muon
from lingua_wd.scaling import (
    CLASSES,
    DECAY_RULES,
    MuonSpec,
    Plan,
    RunShape,
    ScalingArgs,
    check_scaling_args,
    fans,
    group_decay,
    muon_update_rms,
    one_hot_params,
    param_classes,
    plan,
)
from lingua_wd.schedule import ScheduleArgs, check_schedule_args, extra_warmup_factors, group_factor

logger = logging.getLogger(__name__)


@dataclass
class OptimArgs:
    lr: float = 3e-3  # peak LR eta_base, tuned at the base width (each class's LR follows scaling.*)
    weight_decay: float = 0.1  # lambda_base; per step torch decays eta_t lambda, decoupled lambda schedule(t)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon eps_base (scaling.depth scales it in the residual blocks)
    clip: float = 1.0  # global grad-norm clip (0 = off)
    fused: Optional[bool] = None  # fused AdamW kernel (None: on CUDA only)
    variant: str = one_of("torch", lambda: VARIANTS)  # AdamW torch (Alg. 1), decoupled (L&H); muon: + AdamW
    muon_classes: list[str] = one_of(["hidden"], lambda: CLASSES)  # variant=muon: classes Muon updates; rest AdamW
    muon_adjust_lr: str = one_of("match_rms_adamw", lambda: ADJUST_LR)  # Muon's update scale (MUON_RULES)
    muon_lr: float = 0.0  # eta_base of the Muon classes at the base width (0: optim.lr); follows m by MUON_RULES
    muon_momentum: float = 0.95  # Muon's momentum mu
    muon_nesterov: bool = True  # Nesterov momentum in Muon
    muon_ns_steps: int = 5  # Newton-Schulz steps of Muon's orthogonalization
    muon_ns_dtype: str = one_of("auto", lambda: NS_DTYPES)  # Newton-Schulz dtype (auto: bf16 on CUDA, fp32 on CPU)


class DecoupledAdamW(torch.optim.AdamW):
    """AdamW that applies each group's weight decay itself, by the group's decay rule (scaling.group_decay):
    the "fully decoupled" AdamW of Loshchilov & Hutter (App. G.1) unless a group names another rule.

    Each step multiplies the weights by 1 - d_t, d_t = lambda * s_t with s_t = lr / initial_lr the group's
    schedule factor, then takes PyTorch's Adam step without decay. PyTorch applies its decay before
    the Adam update too, so with lambda' = eta * lambda and a constant LR both variants coincide.
    Elementwise foreach ops only, so sharded DTensor parameters (FSDP2) decay shard by shard.
    """

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.defaults["decay_rule"] = "decoupled"
        self.register_load_state_dict_post_hook(_name_decay_rule)
        _name_decay_rule(self)

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
                    torch._foreach_mul_(params, 1.0 - group_decay(group))
                group["weight_decay"] = 0.0
            super().step()
        finally:
            for group, wd in zip(self.param_groups, saved, strict=True):
                group["weight_decay"] = wd
        return loss


def _name_decay_rule(optimizer: torch.optim.Optimizer) -> None:
    """Groups without a decay rule (built by hand, or loaded from a checkpoint that predates it) decay decoupled."""
    for group in optimizer.param_groups:
        group.setdefault("decay_rule", "decoupled")


# optim.variant -> the AdamW class of its AdamW groups (muon: of the classes Muon does not take, MUON_ADAMW_RULE)
VARIANTS = {"torch": torch.optim.AdamW, "decoupled": DecoupledAdamW, "muon": torch.optim.AdamW}
assert VARIANTS.keys() == DECAY_RULES.keys(), "every optimizer variant needs its decay rule in scaling.DECAY_RULES"


def check_optim_args(args: OptimArgs) -> None:
    check(args.lr > 0, "optim.lr", f"must be positive, got {args.lr}")
    check(args.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {args.weight_decay}")
    check(0 <= args.beta1 < 1, "optim.beta1", f"must be in [0, 1), got {args.beta1}")
    check(0 <= args.beta2 < 1, "optim.beta2", f"must be in [0, 1), got {args.beta2}")
    check(args.eps > 0, "optim.eps", f"must be positive, got {args.eps}")
    check(args.clip >= 0, "optim.clip", f"must be >= 0, got {args.clip}")
    check_choice(args.variant, "optim.variant", VARIANTS)
    for cls in args.muon_classes:
        check_choice(cls, "optim.muon_classes", CLASSES)
    check(args.variant != "muon" or bool(args.muon_classes), "optim.muon_classes", "is empty (variant=muon needs one)")
    check_choice(args.muon_adjust_lr, "optim.muon_adjust_lr", ADJUST_LR)
    check(args.muon_lr >= 0, "optim.muon_lr", f"must be >= 0 (0 = optim.lr), got {args.muon_lr}")
    check(0 <= args.muon_momentum < 1, "optim.muon_momentum", f"must be in [0, 1), got {args.muon_momentum}")
    check(args.muon_ns_steps >= 1, "optim.muon_ns_steps", f"must be >= 1, got {args.muon_ns_steps}")
    check_choice(args.muon_ns_dtype, "optim.muon_ns_dtype", NS_DTYPES)


def muon_spec(args: OptimArgs) -> Optional[MuonSpec]:
    """The plan's Muon split (scaling.MuonSpec) of optim.variant=muon, None otherwise."""
    if args.variant != "muon":
        return None
    return MuonSpec(tuple(args.muon_classes), args.muon_adjust_lr, args.muon_lr)


def check_plan_args(
    model: ModelArgs,
    optim: OptimArgs,
    schedule: ScheduleArgs,
    scaling: ScalingArgs,
    steps: int,
    tokens_per_step: int,
    batch_size: int = 0,
) -> Plan:
    """Every check of the keys the width plan reads, as the trainer runs them (and every command that
    shares those keys); returns the plan. batch_size: data.batch_size (scaling.base_batch compares with it)."""
    check_model_args(model)
    check_optim_args(optim)
    check_schedule_args(schedule, steps)
    check_scaling_args(scaling)
    p = model_plan(model, optim, scaling, steps, tokens_per_step, batch_size)
    check_residual_mult(model, p)
    return p


def model_plan(
    model: ModelArgs, optim: OptimArgs, scaling: ScalingArgs, steps: int, tokens_per_step: int, batch_size: int
) -> Plan:
    """The plan of a model of this shape trained for `steps` steps of `batch_size` sequences."""
    shape = RunShape(model.n_layers, batch_size, steps, block_params(model))
    return plan(
        scaling, model.dim, optim.lr, optim.weight_decay, optim.variant, tokens_per_step, shape, optim.eps,
        muon=muon_spec(optim),
    )  # fmt: skip


def check_residual_mult(model: ModelArgs, p: Plan) -> None:
    """model.residual_mult is the plan's (0: not filled in yet); any other value would train another model."""
    check(
        model.residual_mult == 0 or math.isclose(model.residual_mult, p.residual_mult, rel_tol=1e-12),
        "model.residual_mult",
        f"{model.residual_mult:g} differs from scaling.depth's {p.residual_mult:g} at n_layers={model.n_layers} "
        "(it is derived: leave it 0)",
    )


def make_adamw(groups: list[dict], args: OptimArgs, on_cuda: bool) -> torch.optim.Optimizer:
    """AdamW of `args.variant` over ready-made groups (each with lr, initial_lr, weight_decay, eps)."""
    fused = on_cuda if args.fused is None else args.fused
    return VARIANTS[args.variant](groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps, fused=fused)


def make_muon(groups: list[dict], args: OptimArgs) -> Muon:
    """Muon (muon.py) over ready-made groups of 2-D parameters, with optim.muon_* as its defaults."""
    return Muon(groups, lr=args.lr, momentum=args.muon_momentum, nesterov=args.muon_nesterov,
                ns_steps=args.muon_ns_steps, adjust_lr=args.muon_adjust_lr, ns_dtype=args.muon_ns_dtype)  # fmt: skip


def make_optimizer(groups: list[dict], args: OptimArgs, on_cuda: bool) -> torch.optim.Optimizer:
    """The optimizer of `args.variant` over the plan's groups: AdamW over all, or (variant muon) AdamW over the
    AdamW groups and Muon over the groups marked "optimizer": "muon", as one object whose param_groups are
    the AdamW groups, then the Muon groups."""
    adamw = [g for g in groups if g.get("optimizer", "adamw") == "adamw"]
    muon = [g for g in groups if g.get("optimizer") == "muon"]
    parts = ([make_adamw(adamw, args, on_cuda)] if adamw else []) + ([make_muon(muon, args)] if muon else [])
    return parts[0] if len(parts) == 1 else CombinedOptimizer(parts)


def param_groups(
    model: nn.Module, p: Plan, classes: dict[str, str], one_hot: Optional[set[str]] = None
) -> tuple[list[dict], list[dict], list[dict]]:
    """The plan's classes with the model's parameters attached: (optimizer groups, one table row per
    group, one row per parameter). Each group carries "name", "class", "rule", "lr", "initial_lr" (peak),
    "weight_decay", "eps" and "decay_rule" (how the optimizer applies it: scaling.DECAY_RULES); a group of a
    class Muon updates also "optimizer": "muon" and its "adjust_lr". one_hot: the embedding weights, whose
    fans are (rows, columns) (None: scaling.one_hot_params of the model)."""
    named = dict(model.named_parameters())
    one_hot = one_hot_params(model) if one_hot is None else one_hot
    groups, rows, prows = [], [], []
    for cls, cp in p.classes.items():
        names = [n for n, c in classes.items() if c == cls]
        if not names:
            continue
        muon = cp.optimizer == "muon"
        name = f"{cls}/{p.rule}" + ("/muon" if muon else "")
        group = {"params": [named[n] for n in names], "name": name, "class": cls, "rule": p.rule, "lr": cp.lr,
                 "initial_lr": cp.lr, "weight_decay": cp.weight_decay, "eps": cp.eps, "decay_rule": cp.decay_rule}  # fmt: skip
        if muon:
            _check_muon_shapes(cls, {n: named[n] for n in names})
            group.update(optimizer="muon", adjust_lr=cp.adjust_lr)
        groups.append(group)
        mine = [{"name": n, "class": cls, "group": name, "shape": list(named[n].shape),
                 "fan_in": fans(cls, named[n].shape, n in one_hot)[0],
                 "init_std": cp.init_std(named[n].shape, n in one_hot)} for n in names]  # fmt: skip
        if muon:  # per parameter: the update RMS r of eq 30 depends on the shape (scaling.muon_update_rms)
            for r in mine:
                r["update_rms"] = muon_update_rms(cp.adjust_lr, r["shape"][0], r["shape"][1])
        prows += mine
        rows.append({"name": name, "class": cls, "rule": p.rule, "n_params": sum(named[n].numel() for n in names),
                     "n_tensors": len(names), "fan_in": sorted({r["fan_in"] for r in mine}),
                     "init_std": sorted({round(r["init_std"], 8) for r in mine}), **cp.row()})  # fmt: skip
    covered = [id(p) for g in groups for p in g["params"]]
    assert len(covered) == len(set(covered)) == len(named), "param groups must cover every parameter exactly once"
    assert set(covered) == {id(p) for p in named.values()}, "param groups must cover every parameter exactly once"
    return groups, rows, prows


def _check_muon_shapes(cls: str, params: dict[str, torch.Tensor]) -> None:
    for n, t in params.items():
        check(t.ndim == 2, "optim.muon_classes", f"{cls}: {n} has shape {tuple(t.shape)}; Muon takes 2-D weights only")


def build_optimizer(
    model: nn.Module,
    optim: OptimArgs,
    scaling: ScalingArgs,
    schedule: ScheduleArgs,
    total_steps: int,
    tokens_per_step: int,
    dump_dir: str | None = None,
    batch_size: int = 0,
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW (or Muon + AdamW) with one named group per class of the width plan and a LambdaLR with one
    factor per group.

    With dump_dir (rank 0), logs the start-up table and writes <dump_dir>/param_groups.json. batch_size:
    data.batch_size (scaling.base_batch compares with it). The model must have the plan's residual
    multiplier (model.residual_mult), so that the forward and the optimizer follow one depth rule.
    """
    p = model_plan(model.args, optim, scaling, total_steps, tokens_per_step, batch_size)
    if not math.isclose(model.args.residual_mult or 1.0, p.residual_mult, rel_tol=1e-12):
        raise ConfigError(
            f"model.residual_mult: the model's residual branches are x{model.args.residual_mult or 1.0:g}, the plan's "
            f"(scaling.depth={scaling.depth} at n_layers={model.args.n_layers}) x{p.residual_mult:g}"
        )
    groups, rows, prows = param_groups(model, p, param_classes(model, scaling))
    opt = make_optimizer(groups, optim, next(model.parameters()).device.type == "cuda")
    sched = group_scheduler(opt, p, schedule, total_steps)
    if dump_dir is not None:
        header = p.header()
        write_param_groups(Path(dump_dir) / "param_groups.json", header, rows, prows)
        logger.info("parameter groups (%s)\n%s", ", ".join(f"{k}={v}" for k, v in header.items()), format_table(rows))
    return opt, sched


def group_scheduler(opt: torch.optim.Optimizer, p: Plan, schedule: ScheduleArgs, total_steps: int) -> LambdaLR:
    """A LambdaLR with one factor per group of the plan (read from each group's "class"): the base schedule,
    times the extra warmup 1/m -> 1 (eq 14, 15) in the classes it applies to. Step it after every
    optimizer step; it multiplies each group's initial_lr (the class's peak LR)."""
    kinds = {cp.extra_warmup for cp in p.classes.values()} - {"none"}
    extra = None
    if kinds:  # one kind: scaling.extra_warmup
        extra = extra_warmup_factors(
            kinds.pop(), schedule, total_steps, p.width_mult, p.extra_warmup_frac, p.warmup_decay
        )
    warm = [p.classes[g["class"]].extra_warmup != "none" for g in opt.param_groups]
    return LambdaLR(opt, [group_factor(schedule, total_steps, extra if w else None) for w in warm])


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, list):
        return ",".join(_fmt(v) for v in x)
    return f"{x:.3g}" if isinstance(x, float) else str(x)


TABLE_COLUMNS = ["name", "n_params", "fan_in", "init_std", "lr", "weight_decay", "eps", "lr_mult", "wd_mult",
                 "eps_mult", "eta_lambda", "tau_iter", "tau_epoch", "eq_rms", "extra_warmup"]  # fmt: skip


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
