"""Width transfer: the one place that knows about width (SPEC §1-§2).

A model of width d = model.dim is trained with hyperparameters tuned at a base (proxy) width d0;
m = d / d0. Parameters fall into classes by first-match name patterns (App. G.2): the "matrix-like"
hidden and output layers are width-scaled, the "vector-like" input embedding, norm gains and biases
are not. RULES maps each scaling rule to how the width-scaled classes' LR eta and weight decay
lambda change with m; `class_hparams` turns (rule, class, m, eta_base, lambda_base) into the values
given to the optimizer. Equation numbers are those of Kosson et al. (seeds/002) unless marked
[003] (Wang & Aitchison, AdamW as an EMA) or [001] (layerwise sqrt(d) rule).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Optional

import torch
from torch import nn

from lingua_wd.args import ConfigError, check
from lingua_wd.model import ModelArgs

CLASSES = ("input", "hidden", "output", "gain", "bias")
WIDTH_SCALED = ("hidden", "output")  # "matrix-like": fan-in grows with m (SPEC §1)
DEFAULT_PATTERNS = ("input:tok_embeddings.*", "output:output.*", "gain:*norm.weight", "hidden:layers.*")
DECAY_CLASSES = ("input", "hidden", "output", "bias")  # App. G.3: weight decay on all but the gains


@dataclass
class ScalingArgs:
    mode: str = "sp"  # sp: no width scaling (baseline) | mup: muP LR eta_base/m for hidden and output
    wd_mode: str = "standard"  # under mup: none | standard | independent | sqrt | sqrt_lr | timescale (RULES)
    base_dim: int = 0  # d0, the width the hyperparameters were tuned at; m = model.dim / d0 (0: m = 1)
    tau_iter: float = 0.0  # timescale: AdamW EMA timescale in steps; lambda = 1/(eta tau_iter) ([003] eq 9)
    tau_epoch: float = 0.0  # timescale: timescale in epochs, tau_iter = M tau_epoch when tau_iter = 0 ([003] eq 8)
    dataset_tokens: int = 0  # tokens per epoch; M = dataset_tokens / tokens per step (for tau_epoch)
    patterns: list[str] = field(default_factory=lambda: list(DEFAULT_PATTERNS))  # first-match "class:glob" rules
    frozen_lr: dict[str, float] = field(default_factory=dict)  # class -> peak LR kept at every width (App. G.2)
    frozen_wd: dict[str, float] = field(default_factory=dict)  # class -> weight decay kept at every width
    decay_classes: list[str] = field(default_factory=lambda: list(DECAY_CLASSES))  # classes with WD (not gains)
    extra_warmup: str = "none"  # extra LR factor 1/m -> 1: none | exp (eq 14) | decay_away (eq 15)
    extra_warmup_frac: float = 0.5  # exp: T_W as a fraction of the run (paper's exp50: 0.5)
    extra_warmup_classes: list[str] = field(default_factory=list)  # classes it applies to ([]: all, App. G.3.5)
    output_init: str = "sp"  # output std: sp 1/sqrt(fan_in) | mup 1/sqrt(fan_in m) ~ 1/C (full muP)


@dataclass(frozen=True)
class Rule:
    lr_exp: float  # width-scaled classes: eta -> eta * m ** lr_exp
    wd_exp: Optional[float]  # width-scaled classes: lambda -> lambda * m ** wd_exp (None: no weight decay)
    vector_wd: bool  # whether the vector-like classes (input, gain, bias) keep lambda
    timescale: bool  # every decayed class: lambda = 1 / (eta * tau_iter) instead
    source: str  # paper and equation


# One row per mode of SPEC §2. Key "sp" is scaling.mode=sp; the others are scaling.wd_mode under mode=mup.
RULES: dict[str, Rule] = {
    "sp": Rule(0.0, 0.0, True, False, "baseline: (eta, lambda) unscaled, no muP"),
    "none": Rule(-1.0, None, False, False, "002 App. C: muP (eta/m) without weight decay"),
    "standard": Rule(-1.0, 0.0, True, False, "002 eq 7: (eta/m, lambda), eta*lambda falls as 1/m"),
    "independent": Rule(-1.0, 1.0, True, False, "002 eq 8, [003] eq 13: (eta/m, m lambda) keeps eta*lambda"),
    "sqrt": Rule(-1.0, 0.5, False, False, "[001]: (eta/m, sqrt(m) lambda); vector-like eta_1 = Theta(1), lambda_1 = 0"),
    "sqrt_lr": Rule(
        -0.5, 0.5, True, False, "002 App. B.1: (eta/sqrt(m), sqrt(m) lambda) keeps eq 13's a, rho0/rho_inf"
    ),
    "timescale": Rule(-1.0, None, True, True, "[003] eq 8-9: lambda = 1/(eta tau_iter), tau_iter = M tau_epoch"),
}
MODES = ("sp", "mup")
OUTPUT_INITS = ("sp", "mup")


def rule_name(args: ScalingArgs) -> str:
    return "sp" if args.mode == "sp" else args.wd_mode


def width_mult(args: ScalingArgs, dim: int) -> float:
    """m = d / d0 (1 when base_dim is 0)."""
    return dim / (args.base_dim or dim)


def parse_patterns(patterns: list[str]) -> list[tuple[str, str]]:
    """["class:glob", ...] -> [(glob, class), ...], checked."""
    out = []
    for i, item in enumerate(patterns):
        cls, sep, glob = str(item).partition(":")
        check(bool(sep) and bool(glob), f"scaling.patterns.{i}", f"expected 'class:glob', got {item!r}")
        check(cls in CLASSES, f"scaling.patterns.{i}", f"unknown class {cls!r} (choose from {', '.join(CLASSES)})")
        out.append((glob, cls))
    return out


def classify(name: str, patterns: list[tuple[str, str]]) -> Optional[str]:
    """The class of the first pattern matching `name` (None if none does)."""
    return next((cls for glob, cls in patterns if fnmatchcase(name, glob)), None)


def param_classes(model: nn.Module, args: ScalingArgs) -> dict[str, str]:
    """Parameter name -> class; an unmatched parameter or a pattern that matches nothing is a ConfigError."""
    patterns = parse_patterns(args.patterns)
    classes, used = {}, set()
    for name, _ in model.named_parameters():
        cls = classify(name, patterns)
        if cls is None:
            raise ConfigError(f"scaling.patterns: parameter {name!r} matches no pattern")
        used.add(next(i for i, (glob, _) in enumerate(patterns) if fnmatchcase(name, glob)))
        classes[name] = cls
    for i, (glob, cls) in enumerate(patterns):
        check(i in used, f"scaling.patterns.{i}", f"'{cls}:{glob}' matches no parameter (first match wins)")
    return classes


def check_scaling_args(args: ScalingArgs, model_args: ModelArgs) -> None:
    check(args.mode in MODES, "scaling.mode", f"unknown {args.mode!r} (choose from {', '.join(MODES)})")
    wd_modes = [k for k in RULES if k != "sp"]
    check(args.wd_mode in wd_modes, "scaling.wd_mode", f"unknown {args.wd_mode!r} (choose from {', '.join(wd_modes)})")
    check(
        args.mode == "mup" or args.wd_mode == "standard",
        "scaling.wd_mode",
        f"{args.wd_mode} needs scaling.mode=mup (sp scales nothing; optim.weight_decay=0 turns WD off)",
    )
    check(args.base_dim >= 0, "scaling.base_dim", f"must be >= 0, got {args.base_dim}")
    check(model_args.dim > 0, "model.dim", "must be positive")
    parse_patterns(args.patterns)
    for key in ("frozen_lr", "frozen_wd"):
        for cls, value in getattr(args, key).items():
            check(cls in CLASSES, f"scaling.{key}.{cls}", f"unknown class (choose from {', '.join(CLASSES)})")
            check(value >= 0 and (key == "frozen_wd" or value > 0), f"scaling.{key}.{cls}", f"bad value {value}")
    for key in ("decay_classes", "extra_warmup_classes"):
        for cls in getattr(args, key):
            check(cls in CLASSES, f"scaling.{key}", f"unknown class {cls!r} (choose from {', '.join(CLASSES)})")
    check(args.extra_warmup in ("none", "exp", "decay_away"), "scaling.extra_warmup", f"unknown {args.extra_warmup!r}")
    check(
        0 < args.extra_warmup_frac <= 1, "scaling.extra_warmup_frac", f"must be in (0, 1], got {args.extra_warmup_frac}"
    )
    check(
        args.output_init in OUTPUT_INITS, "scaling.output_init", f"unknown {args.output_init!r} (choose from sp, mup)"
    )
    if rule_name(args) == "timescale":
        check(args.tau_iter >= 0 and args.tau_epoch >= 0, "scaling.tau_iter", "timescales must be >= 0")
        check(
            args.tau_iter > 0 or (args.tau_epoch > 0 and args.dataset_tokens > 0),
            "scaling.tau_iter",
            "timescale needs tau_iter > 0, or tau_epoch > 0 with dataset_tokens > 0",
        )


def iters_per_epoch(args: ScalingArgs, tokens_per_step: int) -> Optional[float]:
    """M of [003] eq 8: optimizer steps per pass over the data (None when dataset_tokens is unknown)."""
    return args.dataset_tokens / tokens_per_step if args.dataset_tokens > 0 and tokens_per_step > 0 else None


def target_tau_iter(args: ScalingArgs, tokens_per_step: int) -> float:
    """The timescale rule's tau_iter: given directly, or tau_epoch * M ([003] eq 8)."""
    if args.tau_iter > 0:
        return args.tau_iter
    M = iters_per_epoch(args, tokens_per_step)
    if args.tau_epoch <= 0 or M is None:
        raise ConfigError("scaling.tau_iter: timescale needs tau_iter > 0, or tau_epoch > 0 with dataset_tokens > 0")
    return args.tau_epoch * M


def class_hparams(
    args: ScalingArgs, cls: str, m: float, lr: float, wd: float, tau_iter: float = 0.0, decoupled: bool = False
) -> tuple[float, float]:
    """(peak LR, weight decay) of class `cls` at width multiplier m from the base (eta, lambda).

    A frozen class keeps its absolute LR at every width and is treated as not width-scaled (App. G.2).
    `decoupled`: the optimizer decays lambda * schedule(t) per step (Loshchilov & Hutter), so the
    timescale rule sets lambda = 1/tau_iter instead of 1/(eta tau_iter).
    """
    rule = RULES[rule_name(args)]
    scaled = cls in WIDTH_SCALED and cls not in args.frozen_lr
    eta = args.frozen_lr.get(cls, lr * m**rule.lr_exp if scaled else lr)
    if cls not in args.decay_classes:
        lam = 0.0
    elif cls in args.frozen_wd:
        lam = args.frozen_wd[cls]
    elif rule.timescale:
        lam = 1.0 / tau_iter if decoupled else 1.0 / (eta * tau_iter)
    elif not scaled:
        lam = wd if rule.vector_wd else 0.0
    else:
        lam = 0.0 if rule.wd_exp is None else wd * m**rule.wd_exp
    return eta, lam


def init_std_fn(args: ScalingArgs, model_args: ModelArgs) -> Callable[[str, torch.Tensor], float]:
    """(name, param) -> init std for Transformer.init_weights (App. G.3; full-muP output optional).

    Linears 1/sqrt(fan_in), embedding 1/sqrt(d), gains and biases 0 (gains are set to ones by the model).
    """
    patterns = parse_patterns(args.patterns)
    m = width_mult(args, model_args.dim)

    def std(name: str, param: torch.Tensor) -> float:
        cls = classify(name, patterns)
        if cls == "input":
            return 1.0 / math.sqrt(model_args.dim)
        if cls in ("gain", "bias") or param.dim() < 2:
            return 0.0
        s = 1.0 / math.sqrt(param.shape[1])
        return s / math.sqrt(m) if cls == "output" and args.output_init == "mup" else s

    return std


def fan_in(cls: str, param: torch.Tensor) -> int:
    """A linear's in_features; the embedding's one-hot input size (the vocabulary); 1 for vectors."""
    if param.dim() < 2:
        return 1
    return int(param.shape[0]) if cls == "input" else int(param.shape[1])
