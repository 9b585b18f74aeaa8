"""The width plan and the alignment probes on any nn.Module and any training loop, plain or FSDP2-sharded
(docs/library.md). The project's own trainer runs on the same functions (scaling.pattern_classes,
optim.param_groups, optim.group_scheduler, model.init_parameters, probes.attach): one implementation.

    from lingua_wd import library as lw
    from lingua_wd.scaling import ScalingArgs

    scaling = ScalingArgs(width="mup", wd="independent", base_dim=64)
    classes = lw.classify(model, base=base_model)        # or patterns=["input:stem.*", "output:head.*", ...]
    plan = lw.plan(scaling, dim=256, lr=3e-3, weight_decay=0.1, steps=1000)
    lw.reinit(model, plan, classes)                       # optional: the plan's init std
    opt = torch.optim.AdamW(lw.param_groups(model, plan, classes, print_table=True))
    sched = lw.scheduler(opt, plan, steps=1000)           # optional: warmup + decay (+ the extra warmups)
    probes = lw.attach_probes(model, ["layer3.2.conv1"], classes, every=10)
    ... loss.backward()
    if probes.due(step): probes.before_step(step, x)      # snapshot W_t, probe forward model(x[:n])
    opt.step(); opt.zero_grad()
    log = {**lw.hparams(opt), **(probes.after_step(step, opt) if probes.due(step) else {})}
    sched.step()

Functions (signatures in docs/library.md, section "API"): classify(model, patterns=None, base=None),
plan(scaling, dim, lr, weight_decay, variant="torch", steps=0, ...), reinit(model, plan, classes, seed=0),
param_groups(model, plan, classes, print_table=False), table(model, plan, classes),
make_optimizer(groups, variant="torch", **optim_args), scheduler(opt, plan, schedule=None, steps=0),
attach_probes(model, layers, classes, every=10, **probe_args) -> probes.Probes, hparams(opt).

Classes (SPEC §1, App. G.2): "hidden" (fan-in and fan-out grow with the width), "input" (only fan-out
grows; embeddings, stems), "output" (only fan-in grows; readouts, routers), "gain" and "bias" (vectors).
Convolutions are linears with fan-in C_in prod(kernel).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, Optional, TextIO, Union

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lingua_wd import optim, scaling
from lingua_wd.args import check
from lingua_wd.model import init_parameters
from lingua_wd.probes import ProbeArgs, Probes, attach, check_probe_args
from lingua_wd.scaling import DEFAULT_PATTERNS, MuonSpec, Plan, RunShape, ScalingArgs, one_hot_params
from lingua_wd.schedule import ScheduleArgs, check_schedule_args

Base = Union[nn.Module, Mapping[str, Sequence[int]]]  # a model at the base width, or its parameter shapes

# (fan-out grows with the width, fan-in grows) -> class, as mup's set_base_shapes reads the shapes
# (Yang et al. 2022, Tensor Programs V, Table 3): a matrix with no width dim keeps its LR like an input
SHAPE_CLASSES = {(True, True): "hidden", (True, False): "input", (False, True): "output", (False, False): "input"}
TABLE = ["name", "class", "shape", "fan_in", "lr", "weight_decay", "init_std"]


def classify(model: nn.Module, patterns: Optional[Sequence[str]] = None, base: Optional[Base] = None) -> dict[str, str]:
    """Parameter name -> class. Without `base`: first-match "class:glob" patterns exactly as scaling.patterns
    (default: the LLaMA's), every parameter must match. With `base` (the model at another width, e.g. built
    on the meta device): the patterns first, every parameter they leave by its shape against the base's
    (shape_class). A pattern that matches nothing is an error either way."""
    if base is None:
        return scaling.pattern_classes(model, list(DEFAULT_PATTERNS if patterns is None else patterns))
    given = scaling.pattern_classes(model, list(patterns or []), partial=True)
    shapes = base_shapes(base)
    one_hot = one_hot_params(model)
    classes, widths = {}, 0
    for name, p in model.named_parameters():
        if name in given:
            classes[name] = given[name]
            continue
        check(name in shapes, "base", f"parameter {name!r} is not in the base model")
        classes[name] = shape_class(name, tuple(p.shape), tuple(shapes[name]), name in one_hot)
        widths += tuple(p.shape) != tuple(shapes[name])
    by_shape = len(classes) - len(given)
    check(widths > 0 or not by_shape, "base", "no parameter differs in shape from the base: build it at another width")
    return classes


def base_shapes(base: Base) -> dict[str, tuple[int, ...]]:
    if isinstance(base, nn.Module):
        return {n: tuple(p.shape) for n, p in base.named_parameters()}
    return {n: tuple(s) for n, s in base.items()}


def shape_class(name: str, shape: tuple[int, ...], base: tuple[int, ...], one_hot: bool = False) -> str:
    """The class of one parameter from the dims that differ from the base's (the width dims): a matrix or
    convolution weight (fan-out dim 0, fan-in dims 1..; an embedding's (one_hot) the other way round) by
    SHAPE_CLASSES; a vector by its role: "bias" if named so, else "gain"."""
    check(len(shape) == len(base), "base", f"{name}: shape {shape} has another rank than the base's {base}")
    if len(shape) < 2:
        return "bias" if name.rsplit(".", 1)[-1] == "bias" else "gain"
    wide = [a != b for a, b in zip(shape, base, strict=True)]
    out_dims, in_dims = ([1], [0]) if one_hot else ([0], range(1, len(shape)))
    return SHAPE_CLASSES[(any(wide[i] for i in out_dims), any(wide[i] for i in in_dims))]


def plan(
    args: ScalingArgs,
    dim: int,
    lr: float,
    weight_decay: float,
    variant: str = "torch",
    steps: int = 0,
    batch_size: int = 0,
    n_layers: int = 0,
    tokens_per_step: int = 0,
    eps: float = 1e-8,
    muon: Optional[MuonSpec] = None,
    n_params: int = 0,
) -> Plan:
    """scaling.plan at width `dim` (m = dim / args.base_dim) from the base (lr, weight_decay, eps); steps,
    batch_size, n_layers, tokens_per_step and n_params feed the axes beyond width (scaling.depth, batch,
    horizon) and the timescale rules (scaling.tau_epoch, tau_law) when those are set."""
    scaling.check_scaling_args(args)
    shape = RunShape(n_layers=n_layers, batch_size=batch_size, steps=steps, n_params=n_params)
    return scaling.plan(args, dim, lr, weight_decay, variant, tokens_per_step, shape, eps, muon=muon)


def reinit(model: nn.Module, plan: Plan, classes: dict[str, str], seed: int = 0) -> None:
    """Every parameter by its class's init (App. G.3): N(0, std^2), std 1/sqrt(fan_in) (an embedding's
    1/sqrt(dim), full muP's readout / sqrt(m)), gains ones, biases zeros; one generator per parameter, so
    sharded (FSDP2) and plain models get the same values (model.init_parameters)."""
    one_hot = one_hot_params(model)

    def std(name: str, p: torch.Tensor) -> float:
        return plan.classes[classes[name]].init_std(tuple(p.shape), name in one_hot)

    init_parameters(model, std, seed, lambda name: classes[name] == "gain")


def param_groups(
    model: nn.Module, plan: Plan, classes: dict[str, str], print_table: bool = False, file: Optional[TextIO] = None
) -> list[dict[str, Any]]:
    """One torch param-group dict per class ("params", "name", "class", "lr", "initial_lr", "weight_decay",
    "eps", "decay_rule"), covering every parameter exactly once (optim.param_groups). Build them after
    fully_shard: FSDP2 replaces the parameters. print_table: print table() to `file` (stdout)."""
    groups, _, prows = optim.param_groups(model, plan, classes)
    if print_table:
        print(optim.format_table(_table_rows(model, groups, prows), TABLE), file=file or sys.stdout)
    return groups


def table(model: nn.Module, plan: Plan, classes: dict[str, str]) -> list[dict[str, Any]]:
    """One row per parameter in model order: name, class, shape, fan_in, lr, weight_decay, init_std."""
    groups, _, prows = optim.param_groups(model, plan, classes)
    return _table_rows(model, groups, prows)


def _table_rows(model: nn.Module, groups: list[dict], prows: list[dict]) -> list[dict[str, Any]]:
    by_group, by_name = {g["name"]: g for g in groups}, {r["name"]: r for r in prows}
    rows = []
    for name, _ in model.named_parameters():
        r, g = by_name[name], by_group[by_name[name]["group"]]
        rows.append({"name": name, "class": r["class"], "shape": "x".join(map(str, r["shape"])),
                     "fan_in": r["fan_in"], "lr": g["lr"], "weight_decay": g["weight_decay"],
                     "init_std": r["init_std"]})  # fmt: skip
    return rows


def make_optimizer(groups: list[dict], variant: str = "torch", **optim_args: Any) -> torch.optim.Optimizer:
    """The optimizer of the plan's variant over its groups: torch (torch.optim.AdamW), decoupled
    (optim.DecoupledAdamW) or muon (Muon + AdamW); optim_args: the other optim.OptimArgs fields (beta1, ...)."""
    args = optim.OptimArgs(variant=variant, **optim_args)
    optim.check_optim_args(args)
    rules = {g["decay_rule"] for g in groups if g.get("optimizer", "adamw") == "adamw"}
    want = scaling.MUON_ADAMW_RULE if variant == "muon" else variant
    check(rules <= {want}, "variant", f"{variant!r}, but the groups were planned for {sorted(rules)}")
    first = next(p for g in groups for p in g["params"])
    return optim.make_optimizer(groups, args, first.device.type == "cuda")


def scheduler(
    opt: torch.optim.Optimizer, plan: Plan, schedule: Optional[ScheduleArgs] = None, steps: int = 0
) -> LambdaLR:
    """Per-group LambdaLR: the base schedule (default: linear warmup over 10% then linear decay, SPEC §3) times
    the plan's extra warmup 1/m -> 1 (eq 14, 15) where it applies; step it after each optimizer step."""
    schedule = schedule or ScheduleArgs()
    check(steps > 0, "steps", f"the schedule needs the run's length in optimizer steps, got {steps}")
    check_schedule_args(schedule, steps)
    return optim.group_scheduler(opt, plan, schedule, steps)


def attach_probes(
    model: nn.Module, layers: Sequence[str], classes: dict[str, str], every: int = 10, **probe_args: Any
) -> Probes:
    """probes.Probes on the linear and convolution (groups=1) layers named by `layers` (globs, or "all");
    probe_args: the other probes.ProbeArgs fields (fraction of the batch in the probe forward, positions,
    metrics, power_iters). Attach after fully_shard (and compile); call before_step(step, x) between
    backward and optimizer.step(), after_step(step, optimizer) after it and before the scheduler's step."""
    args = ProbeArgs(every=every, layers=list(layers), **probe_args)
    check_probe_args(args)
    check(every > 0 and bool(args.layers), "layers", "attach_probes needs every > 0 and at least one layer")
    return attach(args, model, classes)


def hparams(opt: torch.optim.Optimizer) -> dict[str, float]:
    """This step's `lr/<class>` and `wd/<class>` of every group (read before the scheduler's step), for a log."""
    out = {}
    for i, g in enumerate(opt.param_groups):
        name = g.get("class", str(i))
        out[f"lr/{name}"], out[f"wd/{name}"] = float(g["lr"]), float(g["weight_decay"])
    return out
