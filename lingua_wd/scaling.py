"""The width plan: the one place that knows how every parameter class's hyperparameters follow the
model's shape and the run's length (SPEC §1-§2, and beyond width: depth, batch size, horizon).

A model of width d = model.dim is trained with hyperparameters tuned at a base (proxy) width d0;
m = d / d0. Parameters fall into classes by first-match name patterns (App. G.2): the "matrix-like"
hidden and output layers are width-scaled, the "vector-like" input embedding, norm gains and biases
are not. A rule is one row per axis, each row citing its paper and equation:
- WIDTH_RULES (`scaling.width`): how the width-scaled classes' LR eta follows m;
- WD_RULES (`scaling.wd`): how the weight decay lambda follows m;
- DECAY_RULES (`optim.variant`): how the optimizer applies lambda in each step;
- MUON_RULES (`optim.muon_adjust_lr`, with `optim.variant=muon`): the LR width rule of the classes Muon
  updates (the spectral condition) and the size of its update (docs/scaling.md, "Muon").
- DEPTH_RULES (`scaling.depth`): how the residual branches, LR and AdamW eps follow m_L = L / L0
  (CompleteP, Dey et al. 2025, Table 1);
- BATCH_RULES (`scaling.batch`) and HORIZON_RULES (`scaling.horizon`): how eta and lambda follow the
  batch B / B0 and the training tokens D / D0 (Malladi et al. 2022; [003], Bergsma et al. 2025).
`plan()` composes the rows into a Plan with one ClassPlan per class (peak LR, weight decay, decay per
step as the optimizer applies it, AdamW eps, init std as a function of the shape, eta*lambda, tau_iter,
tau_epoch, equilibrium RMS) and the residual-branch multiplier; everything else reads it: the
optimizer attaches parameters to it (optim.param_groups), init asks it (init_std_fn), the model's
forward takes its residual multiplier, the transfer command loops it over targets, the probes read
each group's decay (group_decay), and <dump_dir>/param_groups.json is its dump.
Equation numbers are those of Kosson et al. (seeds/002) unless marked [003] (Wang & Aitchison,
AdamW as an EMA) or [001] (layerwise sqrt(d) rule).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, ClassVar, Optional

from torch import nn

from lingua_wd import theory
from lingua_wd.args import ConfigError, check, check_choice, one_of
from lingua_wd.muon import ADJUST_LR
from lingua_wd.schedule import EXTRA_WARMUPS

CLASSES = ("input", "hidden", "output", "gain", "bias")
WIDTH_SCALED = ("hidden", "output")  # "matrix-like": fan-in grows with m (SPEC §1)
DEFAULT_PATTERNS = ("input:tok_embeddings.*", "output:output.*", "gain:*norm.weight", "hidden:layers.*")
DECAY_CLASSES = ("input", "hidden", "output", "bias")  # App. G.3: weight decay on all but the gains
StdFn = Callable[[str, Any], float]  # (parameter name, parameter) -> init std


@dataclass
class ScalingArgs:
    width: str = one_of("sp", lambda: WIDTH_RULES)  # how the LR of hidden and output follows m (WIDTH_RULES)
    wd: str = one_of("standard", lambda: WD_RULES)  # how weight decay follows m (WD_RULES); width sp: standard
    base_dim: int = 0  # d0, the width the hyperparameters were tuned at; m = model.dim / d0 (0: m = 1)
    tau_iter: float = 0.0  # wd=timescale: AdamW EMA timescale in steps; lambda = 1/(eta tau_iter) ([003] eq 9)
    tau_epoch: float = 0.0  # wd=timescale: timescale in epochs, tau_iter = M tau_epoch when tau_iter = 0 ([003] eq 8)
    dataset_tokens: int = 0  # tokens per epoch; M = dataset_tokens / tokens per step (for tau_epoch)
    patterns: list[str] = field(default_factory=lambda: list(DEFAULT_PATTERNS))  # first-match "class:glob" rules
    frozen_lr: dict[str, float] = field(default_factory=dict)  # class -> peak LR kept at every width (App. G.2)
    frozen_wd: dict[str, float] = field(default_factory=dict)  # class -> weight decay kept at every width
    decay_classes: list[str] = field(default_factory=lambda: list(DECAY_CLASSES))  # classes with WD (not gains)
    extra_warmup: str = one_of("none", lambda: EXTRA_WARMUPS)  # extra LR factor 1/m -> 1 (eq 14, 15)
    extra_warmup_frac: float = 0.5  # exp: T_W as a fraction of the run (paper's exp50: 0.5)
    extra_warmup_classes: list[str] = field(default_factory=list)  # classes it applies to ([]: all, App. G.3.5)
    output_init: str = one_of("sp", lambda: OUTPUT_INITS)  # output std 1/sqrt(fan_in), mup: 1/sqrt(fan_in m) ~ 1/C
    depth: str = one_of("none", lambda: DEPTH_RULES)  # residual branches, LR and eps vs m_L = L/L0 (DEPTH_RULES)
    base_depth: int = 0  # L0, the depth the hyperparameters were tuned at; m_L = model.n_layers / L0 (0: m_L = 1)
    batch: str = one_of("none", lambda: BATCH_RULES)  # how eta and lambda follow B/B0 (BATCH_RULES)
    base_batch: int = 0  # B0, the data.batch_size the hyperparameters were tuned at (0: B/B0 = 1)
    horizon: str = one_of("none", lambda: HORIZON_RULES)  # how lambda follows D/D0, D = training tokens
    base_tokens: int = 0  # D0, the training tokens (steps x tokens per step) of the tuned run (0: D/D0 = 1)
    tau_law: list[float] = field(default_factory=list)  # wd=timescale: [c, k], tau_epoch = c (D/N)^k (Power Lines)

    RENAMED: ClassVar[dict[str, str]] = {"mode": "width", "wd_mode": "wd"}  # refused with the new name


# ----------------------------------------------------------------------------- the rule tables


@dataclass(frozen=True)
class WidthRule:
    lr_exp: float  # width-scaled classes: eta -> eta * m ** lr_exp
    wd_rules: tuple[str, ...]  # the WD_RULES it combines with (() = all)
    source: str  # paper and equation


@dataclass(frozen=True)
class WDRule:
    wd_exp: Optional[float]  # width-scaled classes: lambda -> lambda * m ** wd_exp (None: no weight decay)
    vector_wd: bool  # whether the vector-like classes (input, gain, bias) keep lambda
    timescale: bool  # every decayed class: lambda from the EMA timescale tau_iter instead
    source: str  # paper and equation
    lr_exp: Optional[float] = None  # replaces the width rule's LR exponent (None: keep it)


@dataclass(frozen=True)
class DecayRule:
    per_step: Callable[[float, float, float], float]  # (eta_t, lambda, peak eta) -> d_t in W <- (1 - d_t) W
    timescale_wd: Callable[[float, float], float]  # (tau_iter, peak eta) -> lambda decaying 1/tau_iter at the peak
    source: str


WIDTH_RULES: dict[str, WidthRule] = {
    "sp": WidthRule(0.0, ("standard",), "baseline: (eta, lambda) unscaled, no muP"),
    "mup": WidthRule(-1.0, (), "002 §1, App. G.2 (Everett et al.): muP as a layer-wise LR, eta_base / m"),
}
WD_RULES: dict[str, WDRule] = {
    "none": WDRule(None, False, False, "002 App. C: muP (eta/m) without weight decay"),
    "standard": WDRule(0.0, True, False, "002 eq 7: (eta/m, lambda), eta*lambda falls as 1/m"),
    "independent": WDRule(1.0, True, False, "002 eq 8, [003] eq 13: (eta/m, m lambda) keeps eta*lambda"),
    "sqrt": WDRule(0.5, False, False, "[001]: (eta/m, sqrt(m) lambda); vector-like eta_1 = Theta(1), lambda_1 = 0"),
    "sqrt_lr": WDRule(0.5, True, False, "002 App. B.1: (eta/sqrt(m), sqrt(m) lambda) keeps eq 13's a, rho0/rho_inf",
                      lr_exp=-0.5),
    "timescale": WDRule(None, True, True, "[003] eq 8-9: lambda = 1/(eta tau_iter), tau_iter = M tau_epoch"),
}  # fmt: skip
DECAY_RULES: dict[str, DecayRule] = {
    "torch": DecayRule(
        lambda lr, wd, peak: lr * wd, lambda tau, eta: 1.0 / (eta * tau), "PyTorch AdamW (Alg. 1): eta_t lambda"
    ),
    "decoupled": DecayRule(
        lambda lr, wd, peak: wd * (lr / peak),
        lambda tau, eta: 1.0 / tau,
        "Loshchilov & Hutter (App. G.1): lambda eta_t / eta_peak",
    ),
    "muon": DecayRule(  # the classes Muon updates; the others take torch's AdamW (MUON_ADAMW_RULE)
        lambda lr, wd, peak: lr * wd,
        lambda tau, eta: 1.0 / (eta * tau),
        "Muon with decoupled WD (torch.optim.Muon; Liu et al. 2025, arXiv 2502.16982): W <- W - eta_t (lambda W + s O)",
    ),
}
MUON_ADAMW_RULE = "torch"  # optim.variant=muon: the classes Muon does not take get PyTorch's AdamW (Alg. 1)
# output init: std 1/sqrt(fan_in m ** exp); mup is full muP's readout ~ 1/C, equal to sp at the base width
OUTPUT_INITS: dict[str, float] = {"sp": 0.0, "mup": 1.0}

# ----- beyond width: depth, batch size, training horizon (one row per rule; each axis a ratio to its base)

# CompleteP Table 1 (Dey et al. 2025, arXiv 2505.01618; EleutherAI/nanoGPT-mup, branch completep): the
# depth terms touch only the parameters inside the residual blocks: the pre-LN gains ("Pre-LN LR"), the
# hidden linears and their biases. The embedding, the final norm and the unembedding keep eta_base and
# eps_base. Our `gain` class holds the final norm's gain too (one vector of d): it takes the pre-LN row.
RESIDUAL_CLASSES = ("hidden", "gain", "bias")


@dataclass(frozen=True)
class DepthRule:
    """Table 1's alpha column at m_L = L / L0 (AdamW): each residual branch x m_L^-alpha, the residual
    classes' LR x m_L^(alpha - 1) and AdamW eps x m_L^-alpha; init and weight decay have no depth term.
    alpha None: depth changes nothing."""

    alpha: Optional[float]
    source: str

    def lr_exp(self, cls: str) -> float:
        return self.alpha - 1.0 if self.alpha is not None and cls in RESIDUAL_CLASSES else 0.0

    def eps_exp(self, cls: str) -> float:
        return -self.alpha if self.alpha is not None and cls in RESIDUAL_CLASSES else 0.0


@dataclass(frozen=True)
class AxisRule:
    """A rule of one more axis with ratio r (B/B0 or D/D0): every class's eta x r^lr_exp and every decayed
    class's lambda x r^wd_exp (the weight decay of each class, so each keeps its tau_epoch)."""

    lr_exp: float
    wd_exp: float
    timescale: bool  # keeps tau_epoch = B / (eta lambda D): scaling.wd=timescale fixes it already
    source: str


DEPTH_RULES: dict[str, DepthRule] = {
    "none": DepthRule(None, "baseline: residual branches x 1, no depth term (Table 1, SP / muP columns)"),
    "depth_mup": DepthRule(0.5, "CompleteP Table 1, alpha = 1/2 (depth-muP of Bordelon et al. 2023, Yang et al. 2023)"),
    "completep": DepthRule(1.0, "CompleteP Table 1, alpha = 1 (Dey et al. 2025, arXiv 2505.01618)"),
}  # fmt: skip
BATCH_RULES: dict[str, AxisRule] = {
    "none": AxisRule(0.0, 0.0, False, "baseline: (eta, lambda) kept as the batch changes"),
    "sqrt": AxisRule(0.5, 0.0, False, "Malladi et al. 2022 (square-root scaling rule for Adam): eta ~ sqrt(B/B0)"),
    "timescale": AxisRule(0.0, 1.0, True, "[003] eq 8, Bergsma et al. 2025 (Power Lines): tau_epoch = B/(eta lambda D) "
                          "kept, lambda ~ B at fixed eta, D"),
}  # fmt: skip
HORIZON_RULES: dict[str, AxisRule] = {
    "none": AxisRule(0.0, 0.0, False, "baseline: (eta, lambda) kept as the training tokens change"),
    "timescale": AxisRule(0.0, -1.0, True, "[003] §4.2, eq 8: tau_epoch kept as the data grow, lambda ~ 1/D at "
                          "fixed eta, B"),
}  # fmt: skip


@dataclass(frozen=True)
class MuonRule:
    lr_exp: float  # under a width rule that scales the LR (mup): the Muon classes' eta -> eta * m ** lr_exp
    source: str  # paper and argument


# optim.muon_adjust_lr -> the LR width rule of the classes Muon updates (optim.variant=muon). muP for any
# optimizer is the spectral condition ||dW||_2 = Theta(sqrt(fan_out / fan_in)) (Yang, Simon & Bernstein 2023,
# arXiv 2310.17813, Condition 1). Muon's O has singular values ~1, so ||dW||_2 ~ eta s(fan_out, fan_in); every
# hidden matrix keeps fan_out / fan_in (1, 3 or 1/3) at every width here, so eta must only cancel s's growth in
# m. muP-Adam's eta / m on top of s would scale the LR twice (Megatron-LM #3177, #3715). Under scaling.width=sp
# the Muon classes keep eta too (no rule scales anything with width there).
MUON_RULES: dict[str, MuonRule] = {
    "original": MuonRule(0.0, "Jordan 2024 (KellerJordan/Muon#16): s = sqrt(max(1, out/in)) keeps ||dW||_2 = "
                              "eta sqrt(out/in) at every width, so eta stays"),
    "match_rms_adamw": MuonRule(-0.5, "Liu et al. 2025 (Moonlight, arXiv 2502.16982): s = 0.2 sqrt(max(out, in)) "
                                      "grows as sqrt(m), so eta / sqrt(m)"),
    "none": MuonRule(0.0, "s = 1: ||dW||_2 ~ eta at every width, so eta stays"),
}  # fmt: skip
assert MUON_RULES.keys() == ADJUST_LR.keys(), "every Muon LR adjustment needs its width rule in MUON_RULES"
# The WD rules with a Muon form: lambda = lambda_base (eta_base / eta) ** wd_exp, i.e. standard keeps lambda,
# independent keeps the per-step decay eta lambda (eq 8's invariant), timescale keeps 1 / (eta lambda) ([003]).
# sqrt ([001]: sigma_1 ~ sqrt(eta / lambda) d^0.75) and sqrt_lr (App. B.1) are derived for AdamW's update size.
MUON_WD_RULES = ("none", "standard", "independent", "timescale")


@dataclass(frozen=True)
class MuonSpec:
    """optim.variant=muon: which classes Muon updates and with which LR adjustment (optim.muon_*)."""

    classes: tuple[str, ...]
    adjust_lr: str  # a key of MUON_RULES (muon.ADJUST_LR)
    lr: float = 0.0  # eta_base of the Muon classes at the base width (0: optim.lr)


def muon_update_rms(adjust_lr: str, fan_out: int, fan_in: int) -> float:
    """RMS of one Muon update per unit LR, s(fan_out, fan_in) RMS(O): O = NS5(U) has min(fan_out, fan_in)
    singular values near 1 (in [0.68, 1.2], muon.py), so RMS(O) ~ 1 / sqrt(max(fan_out, fan_in)). Eq 30 with an
    update of RMS eta r gives rho_inf = r sqrt(eta / (2 lambda)); AdamW's r is 1 in the paper's model."""
    return ADJUST_LR[adjust_lr](fan_out, fan_in) / math.sqrt(max(fan_out, fan_in))


def rule_label(width: str, wd: str) -> str:
    """The rule's name in group names and param_groups.json: the width rule's when it takes one WD rule
    (sp), else the WD rule's (independent, ...)."""
    return width if len(WIDTH_RULES[width].wd_rules) == 1 else wd


def rules() -> dict[str, dict[str, str]]:
    """Every rule by its label, as the `scaling.*` values that select it: {"sp": {"width": "sp", "wd":
    "standard"}, "none": {"width": "mup", "wd": "none"}, ...}."""
    return {
        rule_label(w, d): {"width": w, "wd": d} for w, row in WIDTH_RULES.items() for d in (row.wd_rules or WD_RULES)
    }


def parse_rule(spec: str, key: str) -> dict[str, str]:
    """`width[:wd]` (`sp`, `mup:independent`) as `scaling.*` values; the WD rule may be left out only where
    the width rule takes one."""
    width, _, wd = spec.partition(":")
    check_choice(width, key, WIDTH_RULES)
    allowed = WIDTH_RULES[width].wd_rules or tuple(WD_RULES)
    check(wd in allowed or (not wd and len(allowed) == 1), key, f"{spec!r}: give {width}:<wd> with wd one of {allowed}")
    return {"width": width, "wd": wd or allowed[0]}


# ----------------------------------------------------------------------------- parameter classes


def width_mult(args: ScalingArgs, dim: int) -> float:
    """m = d / d0 (1 when base_dim is 0)."""
    return dim / (args.base_dim or dim)


@dataclass(frozen=True)
class RunShape:
    """The run's values the axes beyond width compare with their bases (0: not given; an axis whose base is
    set then fails loudly rather than take a ratio of 1)."""

    n_layers: int = 0  # L = model.n_layers
    batch_size: int = 0  # B = data.batch_size (sequences per step)
    steps: int = 0  # optimizer steps; the training tokens D = steps x tokens per step
    n_params: int = 0  # N of the fitted law tau_epoch = c (D/N)^k: the blocks' parameters (model.block_params)


def _ratio(value: float, base: float, key: str) -> float:
    if not base:
        return 1.0
    if not value:
        raise ValueError(f"{key} is set, but the plan was not given the run's value to compare it with")
    return value / base


def depth_mult(args: ScalingArgs, n_layers: int) -> float:
    """m_L = L / L0 (1 when base_depth is 0)."""
    return _ratio(n_layers, args.base_depth, "scaling.base_depth")


def batch_mult(args: ScalingArgs, batch_size: int) -> float:
    """B / B0 (1 when base_batch is 0)."""
    return _ratio(batch_size, args.base_batch, "scaling.base_batch")


def horizon_mult(args: ScalingArgs, tokens: int) -> float:
    """D / D0, D the training tokens (1 when base_tokens is 0)."""
    return _ratio(tokens, args.base_tokens, "scaling.base_tokens")


def residual_mult(args: ScalingArgs, n_layers: int) -> float:
    """CompleteP Table 1: each residual branch is multiplied by m_L^-alpha (1 at the base depth and without a
    depth rule; Transformer's forward takes it as model.residual_mult)."""
    alpha = DEPTH_RULES[args.depth].alpha
    return 1.0 if alpha is None else depth_mult(args, n_layers) ** -alpha


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
    return pattern_classes(model, args.patterns)


def pattern_classes(model: nn.Module, patterns: Sequence[str], partial: bool = False) -> dict[str, str]:
    """Parameter name -> class of the first "class:glob" pattern matching it (App. G.2). A pattern that
    matches nothing is a ConfigError, so is an unmatched parameter unless `partial` (then it is left out)."""
    parsed = parse_patterns(list(patterns))
    classes, used = {}, set()
    for name, _ in model.named_parameters():
        cls = classify(name, parsed)
        if cls is None:
            check(partial, "scaling.patterns", f"parameter {name!r} matches no pattern")
            continue
        used.add(next(i for i, (glob, _) in enumerate(parsed) if fnmatchcase(name, glob)))
        classes[name] = cls
    for i, (glob, cls) in enumerate(parsed):
        check(i in used, f"scaling.patterns.{i}", f"'{cls}:{glob}' matches no parameter (first match wins)")
    return classes


ONE_HOT_MODULES = (nn.Embedding, nn.EmbeddingBag)  # weight (num_embeddings, dim): the fan-in is dim 0


def one_hot_params(model: nn.Module) -> set[str]:
    """Names of the weights whose input is one-hot (embeddings): their fans are (rows, columns), not a
    linear's (columns, rows) (fans)."""
    return {f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, ONE_HOT_MODULES)}


def fans(cls: str, shape: Sequence[int], one_hot: Optional[bool] = None) -> tuple[int, int]:
    """(fan_in, fan_out): a linear's or convolution's in_features x kernel size (C_in prod(kernel)) and
    out_features; an embedding's (one_hot: its weight is (num_embeddings, dim)) one-hot input size (the
    vocabulary) and its width; (1, 1) for vectors. one_hot None: the input class is the embedding (LLaMA)."""
    if len(shape) < 2:
        return 1, 1
    if cls == "input" if one_hot is None else one_hot:
        return int(shape[0]), int(shape[1])
    return int(math.prod(shape[1:])), int(shape[0])


def check_scaling_args(args: ScalingArgs) -> None:
    check_choice(args.width, "scaling.width", WIDTH_RULES)
    check_choice(args.wd, "scaling.wd", WD_RULES)
    allowed = WIDTH_RULES[args.width].wd_rules
    check(
        not allowed or args.wd in allowed,
        "scaling.wd",
        f"{args.wd} needs scaling.width=mup (width {args.width} takes only {', '.join(allowed)}; "
        "optim.weight_decay=0 turns WD off)",
    )
    check(args.base_dim >= 0, "scaling.base_dim", f"must be >= 0, got {args.base_dim}")
    parse_patterns(args.patterns)
    for key in ("frozen_lr", "frozen_wd"):
        for cls, value in getattr(args, key).items():
            check(cls in CLASSES, f"scaling.{key}.{cls}", f"unknown class (choose from {', '.join(CLASSES)})")
            check(value >= 0 and (key == "frozen_wd" or value > 0), f"scaling.{key}.{cls}", f"bad value {value}")
    for key in ("decay_classes", "extra_warmup_classes"):
        for cls in getattr(args, key):
            check(cls in CLASSES, f"scaling.{key}", f"unknown class {cls!r} (choose from {', '.join(CLASSES)})")
    check_choice(args.extra_warmup, "scaling.extra_warmup", EXTRA_WARMUPS)
    check(
        0 < args.extra_warmup_frac <= 1, "scaling.extra_warmup_frac", f"must be in (0, 1], got {args.extra_warmup_frac}"
    )
    check_choice(args.output_init, "scaling.output_init", OUTPUT_INITS)
    if WD_RULES[args.wd].timescale:
        check(args.tau_iter >= 0 and args.tau_epoch >= 0, "scaling.tau_iter", "timescales must be >= 0")
        check(
            args.tau_iter > 0 or (args.tau_epoch > 0 and args.dataset_tokens > 0) or bool(args.tau_law),
            "scaling.tau_iter",
            "timescale needs tau_iter > 0, or tau_epoch > 0 with dataset_tokens > 0, or tau_law",
        )
    check_axis_args(args)


def check_axis_args(args: ScalingArgs) -> None:
    """The keys of the axes beyond width: depth, batch, horizon and the fitted timescale law."""
    for key, table in (("depth", DEPTH_RULES), ("batch", BATCH_RULES), ("horizon", HORIZON_RULES)):
        check_choice(getattr(args, key), f"scaling.{key}", table)
    for key in ("base_depth", "base_batch", "base_tokens"):
        check(getattr(args, key) >= 0, f"scaling.{key}", f"must be >= 0, got {getattr(args, key)}")
    for key, table in (("batch", BATCH_RULES), ("horizon", HORIZON_RULES)):
        check(
            not (table[getattr(args, key)].timescale and WD_RULES[args.wd].timescale),
            f"scaling.{key}",
            f"{getattr(args, key)} keeps tau_epoch, which scaling.wd=timescale fixes already (its lambda follows "
            "B and D through M = dataset_tokens / tokens per step): drop one of them",
        )
    if args.tau_law:
        check(
            len(args.tau_law) == 2 and args.tau_law[0] > 0,
            "scaling.tau_law",
            f"expected [c, k] with c > 0 (tau_epoch = c (D/N)^k), got {list(args.tau_law)}",
        )
        check(
            WD_RULES[args.wd].timescale, "scaling.tau_law", "the fitted law sets the timescale of scaling.wd=timescale"
        )
        check(
            args.tau_iter <= 0 and args.tau_epoch <= 0,
            "scaling.tau_law",
            "give the timescale once: tau_law, or tau_epoch, or tau_iter",
        )


def iters_per_epoch(args: ScalingArgs, tokens_per_step: int, steps: int = 0) -> Optional[float]:
    """M of [003] eq 8 (None when dataset_tokens or the tokens per step are unknown). Under the fitted law
    without dataset_tokens the run is one epoch (Power Lines' single-epoch tau): M = steps."""
    if args.dataset_tokens > 0 and tokens_per_step > 0:
        return theory.iters_per_epoch(args.dataset_tokens, tokens_per_step)
    if args.tau_law and steps > 0:
        return float(steps)
    return None


def law_tau_epoch(args: ScalingArgs, tokens: float, n_params: int) -> float:
    """Bergsma et al. 2025 (Power Lines): the optimal tau_epoch = c (D/N)^k at D tokens and N parameters, with
    the user's fitted c, k (N: the blocks' parameters, model.block_params)."""
    c, k = args.tau_law
    return c * (tokens / n_params) ** k


def target_tau_iter(args: ScalingArgs, tokens_per_step: int, shape: Optional[RunShape] = None) -> float:
    """The timescale rule's tau_iter: given directly, or tau_epoch * M ([003] eq 8), tau_epoch given or from
    the fitted law at D = M x tokens per step (dataset_tokens, else the run's training tokens)."""
    if args.tau_iter > 0:
        return args.tau_iter
    shape = shape or RunShape()
    M = iters_per_epoch(args, tokens_per_step, shape.steps)
    tau_epoch = args.tau_epoch
    if args.tau_law and M is not None:
        if not shape.n_params:
            raise ValueError("scaling.tau_law is set, but the plan was not given the model's parameter count")
        tau_epoch = law_tau_epoch(args, M * tokens_per_step, shape.n_params)
    if tau_epoch <= 0 or M is None:
        raise ConfigError(
            "scaling.tau_iter: timescale needs tau_iter > 0, or tau_epoch > 0 with dataset_tokens > 0, or tau_law"
        )
    return tau_epoch * M


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Init:
    """App. G.3: std 1/sqrt(fan) of the fan named (linears: in; the embedding: out, i.e. 1/sqrt(d)), divided
    by sqrt(div) (full muP's readout: div = m); no fan: 0 (gains are set to ones by the model, biases to 0).
    "out" is the one-hot input's rule: a dense input layer (a linear or a convolution stem, one_hot False)
    takes 1/sqrt(fan_in) like every other matrix (muP's input weights: variance 1/fan_in, fan_in fixed)."""

    fan: str  # "in" | "out" | ""
    div: float = 1.0

    def std(self, cls: str, shape: Sequence[int], one_hot: Optional[bool] = None) -> float:
        if not self.fan or len(shape) < 2:
            return 0.0
        one_hot = cls == "input" if one_hot is None else one_hot
        fan_in, fan_out = fans(cls, shape, one_hot)
        return 1.0 / math.sqrt(fan_out if self.fan == "out" and one_hot else fan_in) / math.sqrt(self.div)


def class_init(args: ScalingArgs, cls: str, m: float) -> Init:
    if cls in ("gain", "bias"):
        return Init("")
    if cls == "input":
        return Init("out")
    return Init("in", m ** OUTPUT_INITS[args.output_init] if cls == "output" else 1.0)


@dataclass(frozen=True)
class ClassPlan:
    """One parameter class at the target shape: what the optimizer, init, transfer and probes use."""

    cls: str
    lr: float  # peak LR eta
    weight_decay: float  # lambda as the optimizer takes it
    decay: float  # decay per step at the peak LR as the optimizer applies it (eta lambda, or lambda if decoupled)
    lr_mult: float  # eta / eta_base
    wd_mult: Optional[float]  # lambda / lambda_base (None when lambda_base = 0)
    iters_per_epoch: Optional[float]  # M ([003] eq 8)
    init: Init
    extra_warmup: str  # the extra warmup of this class's LR (schedule.EXTRA_WARMUPS)
    decay_rule: str = "torch"  # the DECAY_RULES row its optimizer group applies
    optimizer: str = "adamw"  # "muon" for the classes Muon updates (optim.variant=muon)
    adjust_lr: str = ""  # Muon only: its LR adjustment (MUON_RULES)
    update_rms: float = 1.0  # RMS of one update per unit LR on a d x d matrix: 1 in eq 30 (AdamW), Muon's r
    eps: float = 1e-8  # AdamW epsilon (CompleteP Table 1: eps_base m_L^-alpha in the residual blocks)
    eps_mult: float = 1.0  # eps / eps_base

    @property
    def tau_iter(self) -> Optional[float]:
        """[003] eq 6: the EMA timescale 1 / (per-step decay), None without decay."""
        return _finite(theory.decay_timescale(self.decay))

    @property
    def tau_epoch(self) -> Optional[float]:
        """[003] eq 8: tau_iter / M."""
        return self.tau_iter / self.iters_per_epoch if self.tau_iter and self.iters_per_epoch else None

    @property
    def eq_rms(self) -> Optional[float]:
        """Eq 33: the equilibrium weight RMS ~ r sqrt(eta / (2 lambda)) of the per-step decay (r: update_rms)."""
        return _finite(self.update_rms * theory.decay_equilibrium_rms(self.lr, self.decay))

    def init_std(self, shape: Sequence[int], one_hot: Optional[bool] = None) -> float:
        return self.init.std(self.cls, shape, one_hot)

    def time_to_equilibrium(self, rho0: float) -> Optional[float]:
        """Eq 34: steps from an RMS of rho0 into the equilibrium band at the peak LR (None without decay)."""
        if not rho0 or self.decay <= 0:
            return None
        return theory.decay_time_to_equilibrium(self.lr, self.decay, rho0 / self.update_rms)  # eq 30 in units of r

    def row(self) -> dict[str, Any]:
        """The columns of param_groups.json, the start-up table and the transfer table."""
        row = {"lr": self.lr, "weight_decay": self.weight_decay, "eps": self.eps, "lr_mult": self.lr_mult,
               "wd_mult": self.wd_mult, "eps_mult": self.eps_mult, "eta_lambda": self.decay, "tau_iter": self.tau_iter,
               "tau_epoch": self.tau_epoch, "eq_rms": self.eq_rms, "extra_warmup": self.extra_warmup}  # fmt: skip
        if self.optimizer == "muon":  # AdamW classes keep exactly their columns
            row.update(optimizer="muon", adjust_lr=self.adjust_lr, update_rms=self.update_rms)
        return row


@dataclass(frozen=True)
class Axes:
    """The run against its base along the axes beyond width, with their rules (the Plan's header)."""

    depth: str = "none"  # scaling.depth (DEPTH_RULES)
    n_layers: int = 0  # L
    base_depth: int = 0  # L0
    depth_mult: float = 1.0  # m_L = L / L0
    residual_mult: float = 1.0  # every residual branch x m_L^-alpha (the model's forward)
    batch: str = "none"  # scaling.batch (BATCH_RULES)
    batch_size: int = 0  # B
    base_batch: int = 0  # B0
    batch_mult: float = 1.0  # B / B0
    horizon: str = "none"  # scaling.horizon (HORIZON_RULES)
    tokens: int = 0  # D = steps x tokens per step
    base_tokens: int = 0  # D0
    horizon_mult: float = 1.0  # D / D0


def run_axes(args: ScalingArgs, shape: RunShape, tokens_per_step: int) -> Axes:
    """The run's depth, batch and training tokens against scaling.base_* (a base of 0: the run's own value)."""
    L, B, D = shape.n_layers, shape.batch_size, shape.steps * tokens_per_step
    return Axes(
        depth=args.depth, n_layers=L, base_depth=args.base_depth or L, depth_mult=depth_mult(args, L),
        residual_mult=residual_mult(args, L), batch=args.batch, batch_size=B, base_batch=args.base_batch or B,
        batch_mult=batch_mult(args, B), horizon=args.horizon, tokens=D, base_tokens=args.base_tokens or D,
        horizon_mult=horizon_mult(args, D),
    )  # fmt: skip


@dataclass(frozen=True)
class AxisFactors:
    """One class's multipliers of (eta, lambda, eps) from the axes beyond width."""

    lr: float = 1.0
    wd: float = 1.0
    eps: float = 1.0


def axis_factors(args: ScalingArgs, cls: str, axes: Axes) -> AxisFactors:
    """The rows of scaling.depth, scaling.batch and scaling.horizon composed for one class, each a ratio to
    its base raised to the row's exponent; all 1 at the base run (so nothing changes, bit for bit)."""
    depth, batch, horizon = DEPTH_RULES[args.depth], BATCH_RULES[args.batch], HORIZON_RULES[args.horizon]
    mL, mB, mD = axes.depth_mult, axes.batch_mult, axes.horizon_mult
    return AxisFactors(
        lr=mL ** depth.lr_exp(cls) * mB**batch.lr_exp * mD**horizon.lr_exp,
        wd=mB**batch.wd_exp * mD**horizon.wd_exp,
        eps=mL ** depth.eps_exp(cls),
    )


@dataclass(frozen=True)
class Plan:
    rule: str  # rule_label: the name in group names and param_groups.json
    source: str  # the rule's paper and equation
    width_mult: float  # m
    dim: int
    base_dim: int
    variant: str  # the DECAY_RULES row applying the weight decay (optim.variant)
    tau_iter_target: Optional[float]  # the timescale rule's tau_iter (None under other rules)
    classes: dict[str, ClassPlan]  # every class of CLASSES
    muon: Optional[MuonSpec] = None  # optim.variant=muon: the classes Muon updates
    axes: Axes = field(default_factory=Axes)  # depth, batch, horizon against their bases
    extra_warmup_frac: float = 0.5  # scaling.extra_warmup_frac (the exp warmup's T_W / T, eq 14)

    @property
    def residual_mult(self) -> float:
        return self.axes.residual_mult

    @property
    def warmup_decay(self) -> float:
        """The per-step decay eq 15's decay-away warmup decays with: the hidden class's."""
        return self.classes["hidden"].decay

    def header(self) -> dict[str, Any]:
        out = {"width_mult": self.width_mult, "dim": self.dim, "base_dim": self.base_dim, "rule": self.rule,
               "variant": self.variant, "tau_iter_target": self.tau_iter_target, **self.axes.__dict__}  # fmt: skip
        if self.muon is not None:
            out.update(muon_classes=list(self.muon.classes), muon_adjust_lr=self.muon.adjust_lr)
        return out


def plan(
    args: ScalingArgs,
    dim: int,
    lr: float,
    weight_decay: float,
    variant: str = "torch",
    tokens_per_step: int = 0,
    shape: Optional[RunShape] = None,
    eps: float = 1e-8,
    muon: Optional[MuonSpec] = None,
) -> Plan:
    """Every class's hyperparameters at width `dim` (and shape's depth, batch, steps) from the base
    (eta, lambda, eps) tuned at scaling.base_dim (base_depth, base_batch, base_tokens).

    tokens_per_step: data.seq_len * data.batch_size, for M = dataset_tokens / tokens per step ([003] eq 8).
    muon: with variant "muon", the classes Muon updates (the others get MUON_ADAMW_RULE's AdamW).
    """
    shape = shape or RunShape()
    m = width_mult(args, dim)
    axes = run_axes(args, shape, tokens_per_step)
    tau = target_tau_iter(args, tokens_per_step, shape) if WD_RULES[args.wd].timescale else 0.0
    M = iters_per_epoch(args, tokens_per_step, shape.steps)
    warm = set(args.extra_warmup_classes or CLASSES)
    muon = check_muon_spec(args, variant, muon)
    rows = {}
    for cls in CLASSES:
        f = axis_factors(args, cls, axes)
        on_muon = muon is not None and cls in muon.classes
        rule_name = "muon" if on_muon else (MUON_ADAMW_RULE if variant == "muon" else variant)
        decay = DECAY_RULES[rule_name]
        if on_muon:  # Muon's own width rule (MUON_RULES)
            eta, lam = _muon_hparams(args, cls, m, lr, weight_decay, tau, muon, f)
        else:
            eta, lam = _class_hparams(args, cls, m, lr, weight_decay, tau, decay, f)
        extra = _muon_fields(muon, dim) if on_muon else {}
        rows[cls] = ClassPlan(
            cls=cls,
            lr=eta,
            weight_decay=lam,
            decay=decay.per_step(eta, lam, eta),
            lr_mult=eta / lr,
            wd_mult=lam / weight_decay if weight_decay > 0 else None,
            iters_per_epoch=M,
            init=class_init(args, cls, m),
            extra_warmup=args.extra_warmup if cls in warm else "none",
            decay_rule=rule_name,
            eps=eps * f.eps,
            eps_mult=f.eps,
            **extra,
        )
    label = rule_label(args.width, args.wd)
    source = WIDTH_RULES[args.width].source if label == args.width else WD_RULES[args.wd].source
    return Plan(label, source, m, dim, args.base_dim or dim, variant, tau or None, rows, muon=muon, axes=axes,
                extra_warmup_frac=args.extra_warmup_frac)  # fmt: skip


def _class_hparams(
    args: ScalingArgs, cls: str, m: float, lr: float, wd: float, tau: float, decay: DecayRule, f: AxisFactors
) -> tuple[float, float]:
    """(peak LR, weight decay) of one class by the rows of scaling.width and scaling.wd, times the factors of
    the other axes (f). A frozen class keeps its absolute LR (WD) at every width and is treated as not
    width-scaled (App. G.2); the other axes still apply. A timescale rule's lambda follows the final LR."""
    rule = WD_RULES[args.wd]
    lr_exp = WIDTH_RULES[args.width].lr_exp if rule.lr_exp is None else rule.lr_exp
    scaled = cls in WIDTH_SCALED and cls not in args.frozen_lr
    eta = args.frozen_lr.get(cls, lr * m**lr_exp if scaled else lr) * f.lr
    if cls not in args.decay_classes:
        lam = 0.0
    elif cls in args.frozen_wd:
        lam = args.frozen_wd[cls] * f.wd
    elif rule.timescale:
        lam = decay.timescale_wd(tau, eta)
    elif not scaled:
        lam = (wd if rule.vector_wd else 0.0) * f.wd
    else:
        lam = (0.0 if rule.wd_exp is None else wd * m**rule.wd_exp) * f.wd
    return eta, lam


def check_muon_spec(args: ScalingArgs, variant: str, muon: Optional[MuonSpec]) -> Optional[MuonSpec]:
    """The Muon split of variant "muon" (None for the AdamW variants), checked against the scaling rules."""
    if variant != "muon":
        return None
    if muon is None:
        raise ValueError("plan(variant='muon') needs a MuonSpec (optim.muon_spec)")
    for cls in muon.classes:
        check(cls in CLASSES, "optim.muon_classes", f"unknown class {cls!r} (choose from {', '.join(CLASSES)})")
    check_choice(muon.adjust_lr, "optim.muon_adjust_lr", MUON_RULES)
    check(
        not muon.classes or args.wd in MUON_WD_RULES,
        "scaling.wd",
        f"{args.wd} has no Muon form (it is derived for AdamW's update size); with optim.variant=muon use one of "
        f"{', '.join(MUON_WD_RULES)}",
    )
    return muon


def _muon_hparams(
    args: ScalingArgs, cls: str, m: float, lr: float, wd: float, tau: float, muon: MuonSpec, f: AxisFactors
) -> tuple[float, float]:
    """(peak LR, weight decay) of a class Muon updates: under muP (a width rule that scales the LR) the
    spectral condition's exponent of MUON_RULES, and lambda = lambda_base (eta_base / eta_width) ** wd_exp, which
    keeps what each WD rule keeps across width (standard: lambda, independent: eta lambda); then the other
    axes' factors f as for AdamW's classes; frozen classes as in _class_hparams."""
    rule, base = WD_RULES[args.wd], muon.lr or lr
    lr_exp = MUON_RULES[muon.adjust_lr].lr_exp if WIDTH_RULES[args.width].lr_exp else 0.0
    scaled = cls not in args.frozen_lr
    eta_w = args.frozen_lr.get(cls, base * m**lr_exp)
    eta = eta_w * f.lr
    if cls not in args.decay_classes:
        lam = 0.0
    elif cls in args.frozen_wd:
        lam = args.frozen_wd[cls] * f.wd
    elif rule.timescale:
        lam = DECAY_RULES["muon"].timescale_wd(tau, eta)
    elif not scaled:
        lam = (wd if rule.vector_wd else 0.0) * f.wd
    else:
        lam = (0.0 if rule.wd_exp is None else wd * (base / eta_w) ** rule.wd_exp) * f.wd
    return eta, lam


def _muon_fields(muon: MuonSpec, dim: int) -> dict[str, Any]:
    return {"optimizer": "muon", "adjust_lr": muon.adjust_lr, "update_rms": muon_update_rms(muon.adjust_lr, dim, dim)}


def _finite(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None


def init_std_fn(args: ScalingArgs, dim: int) -> StdFn:
    """(name, param) -> init std by the init rule of the parameter's class (for Transformer.init_weights);
    a name that no pattern matches gets the linears' rule."""
    patterns, m = parse_patterns(args.patterns), width_mult(args, dim)
    inits = {cls: class_init(args, cls, m) for cls in CLASSES}

    def std(name: str, param: Any) -> float:
        cls = classify(name, patterns) or "hidden"
        return inits[cls].std(cls, param.shape)

    return std


def group_update_rms(group: dict[str, Any], shape: Sequence[int]) -> float:
    """RMS of one step's update per unit LR that eq 30 takes for a parameter of `shape` in this optimizer group:
    Muon's s RMS(O) for a Muon group (it carries adjust_lr), else 1 (AdamW, the paper's model)."""
    adjust = group.get("adjust_lr")
    return 1.0 if adjust is None else muon_update_rms(adjust, int(shape[0]), int(math.prod(shape[1:])))


def group_decay(group: dict[str, Any]) -> float:
    """The decay per step W <- (1 - d) W an optimizer group applies at its current LR, by its decay rule
    (groups without one, e.g. a plain torch.optim.AdamW's, decay as PyTorch's AdamW does)."""
    rule = DECAY_RULES[group.get("decay_rule", "torch")]
    lr = float(group["lr"])
    return rule.per_step(lr, float(group.get("weight_decay", 0.0)), float(group.get("initial_lr") or lr))
