"""Alignment probes (SPEC §5): in-loop alignment ratios, relative updates, representation change and
top singular values of chosen linear layers Y = W X, exact under FSDP2 and cheap enough to leave on.
A convolution is the linear map W (C_out, C_in prod(kernel)) on its unfolded input patches
(torch.nn.functional.unfold): the same metrics, with X the patches (layer_rows); groups=1 only.

The trainer calls two hooks around the optimizer step of a probe step t (see `Probes`):
- `before_step`: snapshot this rank's rows of W_t (fp32), then run ONE extra no-grad forward of the
  probe slice (rank 0's first sequences or samples, broadcast: `model(inputs)`). Forward pre-hooks,
  registered once on the probed modules and gated by a plain bool, keep X at `positions` evenly
  strided tokens of each sequence (patch positions of each image). Blocks compiled in place (`block.compile()`) run that forward compiled: dynamo
  guards on the bool and on grad mode, so the probe forward is one more graph per block, compiled
  at the first probe and reused after; the training graphs trace the gated-off hooks as no-ops.
- `after_step`: dW = W_{t+1} - W_t (total change, decay included) on the local rows; ||W_t||, ||dW||,
  ||W_t X||, ||dW X|| and sigma_max are sums of per-shard partial sums (W is sharded by rows, X is
  replicated): batched by weight shape, one all-reduce of a packed vector per probe step (plus one
  small all-reduce per power iteration), no weight is ever all-gathered, one host sync.

Products run in X's dtype (what the forward used: bf16 under FSDP2 mixed precision), squared norms
are always accumulated in fp32.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lingua_wd import theory
from lingua_wd.args import check, check_choice, one_of
from lingua_wd.scaling import ScalingArgs, group_decay, group_update_rms, param_classes


@dataclass(frozen=True)
class Norms:
    """One probed layer after the reduction: the norms (square roots of the all-reduced sums; None where
    not computed or not defined), its weight's shape K x C and its optimizer group's LR and per-step decay."""

    w: Optional[float]  # ||W_t||
    y: Optional[float]  # ||W_t X||
    dw: Optional[float]  # ||dW||, dW = W_{t+1} - W_t
    dwx: Optional[float]  # ||dW X||
    x: Optional[float]  # ||X||
    sigma: Optional[float]  # sigma_max(W_t) (power iteration)
    dwg: Optional[float]  # ||dW_g||, dW_g = W_{t+1} - (1 - d) W_t: the update without the decay
    dwgx: Optional[float]  # ||dW_g X||
    dw_sigma: Optional[float]  # ||dW||_2 = sigma_max(dW) (power iteration)
    K: int
    C: int
    eta: Optional[float]  # the group's LR at this step
    decay: Optional[float]  # the group's decay per step d (scaling.group_decay)
    update_rms: float = 1.0  # r: RMS of one update per unit LR in eq 30 (1: AdamW; Muon: scaling.group_update_rms)


@dataclass(frozen=True)
class Metric:
    needs: frozenset[str]  # what after_step computes for it: x (inputs), dw, grad (dW_g), sigma, dw_sigma, decay
    value: Callable[[Norms], Optional[float]]  # None (or not finite): left out of the record
    doc: str  # definition and reference (SPEC §5)
    default: bool = True  # in probes.metrics by default


def _weight_align(n: Norms) -> Optional[float]:
    return _div(n.y, _mul(n.w, n.x))


def _update_align(n: Norms) -> Optional[float]:
    return _div(n.dwx, _mul(n.dw, n.x))


def _decayed(f: Callable[[Norms], float]) -> Callable[[Norms], Optional[float]]:
    return lambda n: f(n) if n.decay else None  # the equilibria exist only with decay


# metric -> what it needs and how it is computed (SPEC §5); K x C is the weight's shape, eta and d its group's
METRICS: dict[str, Metric] = {
    "rel_update": Metric(frozenset({"dw"}), lambda n: _div(n.dw, n.w), "||dW|| / ||W_t||"),
    "weight_align": Metric(
        frozenset({"x"}), _weight_align, "alpha_W = ||W_t X|| / (||W_t|| ||X||), about 1/sqrt(C) at init"
    ),
    "update_align": Metric(frozenset({"x", "dw"}), _update_align, "alpha_dW = ||dW X|| / (||dW|| ||X||) (eq 2)"),
    "align_ratio": Metric(
        frozenset({"x", "dw"}),
        lambda n: _div(_update_align(n), _weight_align(n)),
        "alpha_dW / alpha_W (muP assumes Theta(sqrt(C)), eq 5)",
    ),
    "rrc": Metric(
        frozenset({"x", "dw"}),
        lambda n: _div(n.dwx, n.y),
        "relative representation change ||dW X|| / ||W_t X|| = align_ratio * rel_update (eq 4)",
    ),
    "weight_rms": Metric(frozenset(), lambda n: _div(n.w, math.sqrt(n.K * n.C)), "||W_t|| / sqrt(K C)"),
    "eq_weight_rms": Metric(
        frozenset({"decay"}),
        _decayed(lambda n: n.update_rms * theory.decay_equilibrium_rms(n.eta, n.decay, exact=True)),
        "equilibrium RMS of the simple model, r eta / sqrt(1 - a^2) ~ r sqrt(eta / (2 lambda)) (eq 33; r = 1 for "
        "AdamW, Muon's update RMS per unit LR for a Muon group)",
    ),
    "eq_rel_update": Metric(
        frozenset({"decay"}),
        _decayed(lambda n: theory.decay_relative_update(n.decay)),
        "equilibrium relative update sqrt(1 - a^2) ~ sqrt(2 eta lambda) (eq 36)",
    ),
    "sigma_max": Metric(
        frozenset({"sigma"}), lambda n: n.sigma, "top singular value of W_t by warm-started power iteration ([001])"
    ),
    "grad_rel_update": Metric(
        frozenset({"grad"}),
        lambda n: _div(n.dwg, n.w),
        "gradient-only part dW_g = W_{t+1} - a W_t (decay removed): ||dW_g|| / ||W_t||",
        default=False,
    ),
    "grad_update_align": Metric(
        frozenset({"grad", "x"}), lambda n: _div(n.dwgx, _mul(n.dwg, n.x)), "||dW_g X|| / (||dW_g|| ||X||)", False
    ),
    "grad_rrc": Metric(frozenset({"grad", "x"}), lambda n: _div(n.dwgx, n.y), "||dW_g X|| / ||W_t X||", False),
    "update_srank": Metric(
        frozenset({"dw", "dw_sigma"}),
        lambda n: _div(_mul(n.dw, n.dw), _mul(n.dw_sigma, n.dw_sigma)),
        "stable rank of the update ||dW||^2 / ||dW||_2^2 (||dW||_2 by Lanczos on dW): 1 for a rank-one update, "
        "about min(K, C) for Muon's orthogonalized one",
        False,
    ),
}
DEFAULT_METRICS = [m for m, spec in METRICS.items() if spec.default]


def needs(metrics: list[str]) -> frozenset[str]:
    """What after_step must compute for these metrics (the union of their table entries' needs)."""
    return frozenset().union(*(METRICS[m].needs for m in metrics))


def probe_key(layer: str, metric: str) -> str:
    """The metrics.jsonl key of one layer's metric: probe/<layer>/<metric>."""
    return f"probe/{layer}/{metric}"


def median_key(cls: str, metric: str) -> str:
    """The key of a class median: probe/median/<class>/<metric>."""
    return probe_key(f"median/{cls}", metric)


def parse_probe_key(key: str) -> Optional[tuple[str, str]]:
    """(layer, metric) of a probe key (layer `median/<class>` for a median), None for any other key."""
    if not key.startswith("probe/") or key.count("/") < 2:
        return None
    layer, metric = key[len("probe/") :].rsplit("/", 1)
    return layer, metric


SUMS = ("w", "y", "dw", "dwx", "sigma", "dwg", "dwgx", "dw_sigma")  # per-layer partial sums of squares, all-reduced
CHUNK = 1 << 25  # elements per temporary in the chunked products and norms (bounds extra memory)
COLD_ITERS = 30  # power iterations at a layer's first probe (random start); later probes warm-start
LANCZOS_BREAKDOWN = 1e-4  # a Lanczos residual below this x the largest diagonal entry so far: no new direction
DW_KEY = "dw:"  # state_dict prefix of the dW power iteration's vectors (W's have the bare layer name)


@dataclass
class ProbeArgs:
    every: int = 10  # probe every N optimizer steps (step % every == 0; 0 = off)
    layers: list[str] = field(default_factory=list)  # name globs of linears/convs (layers.*.attention.wq), all; [] off
    fraction: float = 1 / 64  # share of one micro-batch giving the probe inputs X (>= 1 sequence)
    positions: int = 1024  # tokens per probe sequence whose X is kept, evenly strided to the last (0 = all)
    metrics: list[str] = one_of(DEFAULT_METRICS, lambda: METRICS)  # what to log (probes.METRICS); grad_*: no decay
    power_iters: int = 2  # power-iteration steps per probe for sigma_max, warm-started from the last probe
    lanczos_steps: int = 16  # Lanczos steps per probe for update_srank's ||dW||_2, from the last probe's top vector


def check_probe_args(args: ProbeArgs) -> None:
    check(args.every >= 0, "probes.every", f"must be >= 0, got {args.every}")
    check(0 < args.fraction <= 1, "probes.fraction", f"must be in (0, 1], got {args.fraction}")
    check(args.positions >= 0, "probes.positions", f"must be >= 0 (0 = every token), got {args.positions}")
    check(args.power_iters >= 1, "probes.power_iters", f"must be >= 1, got {args.power_iters}")
    check(args.lanczos_steps >= 1, "probes.lanczos_steps", f"must be >= 1, got {args.lanczos_steps}")
    for name in args.metrics:
        check_choice(name, "probes.metrics", METRICS)
    check(len(args.metrics) > 0, "probes.metrics", "is empty (set probes.layers=[] to turn probes off)")


PROBED = (nn.Linear, nn.Conv1d, nn.Conv2d)  # the layers Y = W X the probes take (a conv: on its patches)


def match_layers(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the linear and convolution modules matching any glob ("all" = every one), in model order."""
    linears = [name for name, m in model.named_modules() if isinstance(m, PROBED)]
    globs = ["*" if p == "all" else str(p) for p in patterns]
    for pat, glob in zip(patterns, globs, strict=True):
        hits = [n for n in linears if fnmatchcase(n, glob)]
        check(bool(hits), "probes.layers", f"{pat!r} matches no linear layer (e.g. {', '.join(linears[:3])}, ...)")
    names = [n for n in linears if any(fnmatchcase(n, g) for g in globs)]
    for n in names:
        groups = getattr(model.get_submodule(n), "groups", 1)
        check(groups == 1, "probes.layers", f"{n} is a convolution with groups={groups}; the probes take groups=1 only")
    return names


def build_probes(args: ProbeArgs, model: nn.Module, scaling_args: Optional[ScalingArgs] = None) -> Optional[Probes]:
    """The trainer's probes of `args` on `model` (after fully_shard / compile), or None when they are off."""
    check_probe_args(args)
    if args.every == 0 or not args.layers:
        return None
    return attach(args, model, param_classes(model, scaling_args or ScalingArgs()))


def attach(args: ProbeArgs, model: nn.Module, classes: dict[str, str]) -> Probes:
    """Probes on the layers of args.layers, each with the class of its weight in `classes` (parameter name ->
    class) for the per-class medians; the trainer's path (build_probes) and the library's (attach_probes)."""
    names = match_layers(model, args.layers)
    return Probes(args, model, {n: classes[f"{n}.weight"] for n in names})


def stride_positions(seq_len: int, positions: int) -> tuple[int, int]:
    """(start, stride) of `positions` tokens evenly strided over a sequence, the last token included.

    The forward still sees the whole sequence (X at a token depends on all earlier ones); only the
    products after the step are made on the kept tokens. Token 0 is left out unless every token is kept.
    """
    if positions == 0 or positions >= seq_len:
        return 0, 1
    stride = seq_len // positions
    return seq_len - 1 - (positions - 1) * stride, stride


class Probes:
    """Called by the trainer inside a probe step (all ranks, same step):

        if probes.due(step): probes.before_step(step, inputs)   # after backward + clipping
        optimizer.step()
        if probes.due(step): metrics.update(probes.after_step(step, optimizer))  # before scheduler.step()

    Probing changes nothing in training: no RNG is drawn, the batch, the grads and the weights are
    only read (the FSDP2 modules are resharded after the probe forward, as they were).
    """

    def __init__(self, args: ProbeArgs, model: nn.Module, classes: dict[str, str]):
        self.args, self.model, self.classes = args, model, classes
        self.modules = {name: model.get_submodule(name) for name in classes}
        self.index = {name: i for i, name in enumerate(classes)}
        wanted = needs(args.metrics)
        self.need_x, self.need_dw, self.need_grad = "x" in wanted, "dw" in wanted, "grad" in wanted
        self.need_sigma, self.need_dw_sigma = "sigma" in wanted, "dw_sigma" in wanted
        self._v: dict[str, torch.Tensor] = {}  # power-iteration vectors of W (R^C, replicated), kept across probes
        self._v_dw: dict[str, torch.Tensor] = {}  # the same for dW
        # the X capture: gated pre-hooks, registered once so compiled blocks never see the hook dicts change
        self._capturing = False
        hooked = self.modules.values() if self.need_x else []
        self._handles = [m.register_forward_pre_hook(self._keep_input) for m in hooked]
        self._reset()

    def _keep_input(self, module: nn.Module, args: tuple) -> None:
        # Traced by dynamo inside compiled blocks: it guards on the bool, so the training graphs
        # hold a no-op; a module attribute (not a dict keyed by module) keeps one graph for all blocks.
        if self._capturing:
            module._probe_x = layer_rows(module, args[0].detach(), self.args.positions)

    def remove(self) -> None:
        """Unregister the capture hooks (the model then runs exactly as without probes)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _reset(self) -> None:
        # W_t's local rows, stacked by shape (one batched op per shape instead of one per layer)
        self._groups: list[tuple[list[str], torch.Tensor]] = []
        self._x: dict[str, torch.Tensor] = {}  # layer -> X (N, C) on the kept tokens of the probe slice
        self._step: Optional[int] = None

    def due(self, step: int) -> bool:
        return self.args.every > 0 and step % self.args.every == 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The warm-start vectors of the power iterations, so sigma_max and update_srank continue exactly on resume."""
        return {**{n: v.cpu() for n, v in self._v.items()}, **{DW_KEY + n: v.cpu() for n, v in self._v_dw.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = next(iter(self.modules.values())).weight.device
        self._v = {n: v.to(device) for n, v in state.items() if n in self.modules}
        dw = {n.removeprefix(DW_KEY): v for n, v in state.items() if n.startswith(DW_KEY)}
        self._v_dw = {n: v.to(device) for n, v in dw.items() if n in self.modules}

    @torch.no_grad()
    def before_step(self, step: int, inputs: torch.Tensor) -> None:
        """Snapshot W_t and capture X on the probe slice of `inputs` (this rank's batch: (mb, T) tokens, or
        any tensor the model takes, sliced on its first dim); the probe forward is `model(slice)`."""
        self._reset()
        self._step = step
        _reshard(self.model)  # module.weight must be the sharded parameter the optimizer updates
        self._snapshot()
        if self.need_x:
            self._capture(probe_slice(inputs, self.args.fraction, _device(self.model)))

    def _snapshot(self) -> None:
        """Copy this rank's rows of each W_t (fp32) into one (layers, K_local, C) buffer per shape."""
        local = {n: _matrix(_local(m.weight)).detach() for n, m in self.modules.items()}
        by_shape: dict[tuple[int, ...], list[str]] = {}
        for n, w in local.items():
            by_shape.setdefault(tuple(w.shape), []).append(n)
        dev = _device(self.model)
        for shape, names in by_shape.items():
            buf = torch.empty((len(names), *shape), dtype=torch.float32, device=dev)
            torch._foreach_copy_(list(buf.unbind(0)), [local[n] for n in names])
            self._groups.append((names, buf))

    def _capture(self, tokens: torch.Tensor) -> None:
        # batch norms in training mode would fold the probe slice into their running statistics: put them back
        stats = [(b, b.clone()) for m in self.model.modules() if isinstance(m, _BatchNorm) for b in m.buffers(False)]
        self._capturing = True
        try:
            self.model(tokens)
        finally:
            self._capturing = False
            _reshard(self.model)  # an FSDP2 root keeps its params gathered after forward otherwise
            for b, saved in stats:
                b.copy_(saved)
        for n, m in self.modules.items():
            x = vars(m).pop("_probe_x", None)  # None: the module did not run in the forward
            if x is not None:
                self._x[n] = x

    @torch.no_grad()
    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """`probe/<layer>/<metric>` and `probe/median/<class>/<metric>`, the same floats on every rank."""
        assert self._step == step, f"after_step({step}) without before_step({step})"
        params = {n: m.weight for n, m in self.modules.items()}
        group = _shard_group(list(params.values()))
        decays = _decays(optimizer, params)
        w1 = {n: _matrix(_local(p)).detach() for n, p in params.items()}
        order = [n for names, _ in self._groups for n in names]
        xs = [self._stack_x(names, buf.shape[-1]) for names, buf in self._groups]  # once per group, reused
        cols: dict[str, list[torch.Tensor]] = {"w": [_sq_norms(buf) for _, buf in self._groups]}
        if self.need_x:
            cols["y"] = [_products(x, buf) for x, (_, buf) in zip(xs, self._groups, strict=True)]
        if self.need_sigma:
            cols["sigma"] = self._power_iteration(group, self._v, 1_000_003)
        if self.need_grad:  # dW_g = W_{t+1} - (1 - d) W_t: the update with the decay removed
            dwg = [_grad_part(names, buf, x, w1, decays) for x, (names, buf) in zip(xs, self._groups, strict=True)]
            cols["dwg"], cols["dwgx"] = [d for d, _ in dwg], [x for _, x in dwg]
        if self.need_dw:
            for names, buf in self._groups:  # in place: the buffer now holds W_t - W_{t+1} = -dW
                torch._foreach_sub_(list(buf.unbind(0)), [w1[n] for n in names])
            cols["dw"] = [_sq_norms(buf) for _, buf in self._groups]
            cols["dwx"] = [_products(x, buf) for x, (_, buf) in zip(xs, self._groups, strict=True)]
            if self.need_dw_sigma:  # on -dW: the same singular values
                cols["dw_sigma"] = self._lanczos(group, self._v_dw, 2_000_003)
        rows = self._reduce(order, {k: torch.cat(v) for k, v in cols.items()}, group, decays)
        wanted = [m for m in METRICS if m in self.args.metrics]
        out = {}
        for n in self.modules:
            shape = params[n].shape  # the global shape (a DTensor's too); a conv's as the matrix (K, C)
            norms = layer_norms(rows[n], (shape[0], math.prod(shape[1:])), decays.get(n))
            for metric in wanted:
                v = METRICS[metric].value(norms)
                if v is not None and math.isfinite(v):  # a denominator of 0 leaves the metric out
                    out[probe_key(n, metric)] = v
        out.update(class_medians(out, self.classes))
        self._reset()
        return out

    def _stack_x(self, names: list[str], c: int) -> Optional[torch.Tensor]:
        """(layers, N, C) kept inputs of one shape group; zeros for a layer that did not run in the
        probe forward (its X-based metrics are left out in _reduce). None when nothing was captured."""
        if not self._x:
            return None
        ref = next(iter(self._x.values()))
        zero = ref.new_zeros(ref.shape[0], c)
        return torch.stack([self._x.get(n, zero) for n in names])

    def _starts(self, store: dict[str, torch.Tensor], seed: int) -> list[torch.Tensor]:
        """Per shape group, the (layers, C) unit start vectors kept in `store` from the last probe (a fixed
        private generator draws a layer's first one: no global RNG is drawn)."""
        vs = []
        for names, buf in self._groups:
            for n in names:
                if n not in store:
                    gen = torch.Generator().manual_seed(seed + self.index[n])
                    store[n] = torch.randn(buf.shape[-1], generator=gen).to(buf.device)
            vs.append(_normalize(torch.stack([store[n] for n in names]), None))
        return vs

    def _gram(self, vs: list[torch.Tensor], group: Any) -> list[torch.Tensor]:
        """A^T A v for the (layers, C) vectors v of each shape group, A the snapshot buffers (W_t, or -dW after
        the subtraction). A is sharded by rows: A^T A v = sum over ranks of A_local^T (A_local v), one all-reduce
        of all layers' vectors, so the result is replicated."""
        zs = [torch.bmm(buf.transpose(1, 2), torch.bmm(buf, v.unsqueeze(-1))).squeeze(-1)
              for (_, buf), v in zip(self._groups, vs, strict=True)]  # fmt: skip
        if group is not None:
            flat = torch.cat([z.reshape(-1) for z in zs])
            dist.all_reduce(flat, group=group)
            zs = [f.view_as(z) for f, z in zip(flat.split([z.numel() for z in zs]), zs, strict=True)]
        return zs

    def _finish(self, store: dict[str, torch.Tensor], vs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Keep the vectors for the next probe; partial ||A_local v||^2 per layer (||A v||^2 once reduced)."""
        for (names, _), v in zip(self._groups, vs, strict=True):
            store.update(zip(names, v.unbind(0), strict=True))
        return [
            torch.bmm(buf, v.unsqueeze(-1)).square().sum((1, 2)) for (_, buf), v in zip(self._groups, vs, strict=True)
        ]

    def _power_iteration(self, group: Any, store: dict[str, torch.Tensor], seed: int) -> list[torch.Tensor]:
        """sigma_max(W_t): power iteration on W^T W from the last probe's vector (W drifts slowly between
        probes, so a few steps track it; COLD_ITERS at the first)."""
        cold = any(n not in store for n in self.modules)
        vs = self._starts(store, seed)
        for _ in range(max(self.args.power_iters, COLD_ITERS) if cold else self.args.power_iters):
            vs = [_normalize(z, v) for z, v in zip(self._gram(vs, group), vs, strict=True)]
        return self._finish(store, vs)

    def _lanczos(self, group: Any, store: dict[str, torch.Tensor], seed: int) -> list[torch.Tensor]:
        """||dW||_2: `lanczos_steps` Lanczos steps on dW^T dW (full reorthogonalization), started from the last
        probe's top Ritz vector. dW changes from probe to probe and Muon's has a nearly flat spectrum, where
        the power iteration's estimate converges as O(1/k) and Lanczos's much faster (Kuczynski & Wozniakowski
        1992); one all-reduce per step as in the power iteration. Returns partial ||A y||^2, y the top Ritz
        vector, whose Rayleigh quotient is the top Ritz value, a lower bound of sigma_max^2."""
        start = self._starts(store, seed)
        steps = min(self.args.lanczos_steps, min(buf.shape[-1] for _, buf in self._groups))
        basis = [[v] for v in start]  # per shape group: the Lanczos vectors, (layers, C) each
        diag: list[list[torch.Tensor]] = [[] for _ in start]
        off: list[list[torch.Tensor]] = [[] for _ in start]
        alive = [torch.ones(v.shape[0], dtype=torch.bool, device=v.device) for v in start]
        for j in range(steps):
            for g, z in enumerate(self._gram([b[-1] for b in basis], group)):
                q = torch.stack(basis[g], 1)  # (layers, j + 1, C)
                diag[g].append((z * basis[g][-1]).sum(1))
                for _ in range(2):  # classical Gram-Schmidt twice against every earlier vector
                    z = z - torch.bmm(torch.bmm(z.unsqueeze(1), q.transpose(1, 2)), q).squeeze(1)
                if j < steps - 1:
                    beta = torch.linalg.vector_norm(z, dim=1)
                    # breakdown: the Krylov space is exhausted (dW's rank < steps, e.g. a rank-one update or
                    # fewer rows than steps); the residual is rounding noise, whose normalization would break the
                    # three-term recurrence T encodes. The layer stops there (zero vectors, zero couplings).
                    scale = torch.stack(diag[g], 1).abs().amax(1)
                    alive[g] = alive[g] & (beta > LANCZOS_BREAKDOWN * scale)
                    off[g].append(torch.where(alive[g], beta, 0.0))
                    basis[g].append(torch.where(alive[g].unsqueeze(1), z / beta.clamp_min(1e-30).unsqueeze(1), 0.0))
        ys = []
        for g, v0 in enumerate(start):
            t = torch.diag_embed(torch.stack(diag[g], 1)).double()  # (layers, steps, steps) tridiagonal
            if off[g]:
                b = torch.stack(off[g], 1).double()
                t = t + torch.diag_embed(b, 1) + torch.diag_embed(b, -1)
            top = torch.linalg.eigh(t)[1][:, :, -1:].to(v0.dtype)  # (layers, steps, 1): the largest Ritz value's
            y = torch.bmm(top.transpose(1, 2), torch.stack(basis[g], 1)).squeeze(1)
            ys.append(_normalize(y, v0))
        return self._finish(store, ys)

    def _reduce(self, order: list[str], cols: dict[str, torch.Tensor], group: Any, decays: dict) -> dict:
        """All-reduce the per-shard partial sums (one collective), add the replicated ||X||^2, one host sync."""
        keys = list(cols)
        packed = torch.cat([cols[k] for k in keys])
        if group is not None:
            dist.all_reduce(packed, group=group)
        have = [n for n in order if n in self._x]
        x_norms = torch._foreach_norm([self._x[n] for n in have], 2, dtype=torch.float32) if have else []
        flat = torch.cat([packed, torch.stack(x_norms).square()] if have else [packed]).tolist()
        x_sq = dict(zip(have, flat[packed.numel() :], strict=True))
        L, rows = len(order), {}
        for i, n in enumerate(order):
            row: dict[str, Optional[float]] = dict.fromkeys(SUMS)
            row.update({k: flat[j * L + i] for j, k in enumerate(keys)})
            row["x"] = x_sq.get(n)
            if n not in self._x:  # no X: the X-based sums are not defined
                row["y"] = row["dwx"] = row["dwgx"] = None
            if n not in decays:
                row["dwg"] = row["dwgx"] = None
            rows[n] = row
        return rows


def layer_norms(sums: dict[str, Optional[float]], shape: tuple[int, ...], decay: Optional[tuple]) -> Norms:
    """A layer's reduced squared norms as norms, with its shape and its group's (eta, d, r)."""
    r = {k: (math.sqrt(v) if v is not None else None) for k, v in sums.items()}
    eta, d, rms = decay if decay is not None else (None, None, 1.0)
    return Norms(**{k: r[k] for k in (*SUMS, "x")}, K=shape[0], C=shape[1], eta=eta, decay=d, update_rms=rms)


def class_medians(metrics: dict[str, float], classes: dict[str, str]) -> dict[str, float]:
    """`probe/median/<class>/<metric>`: median over the probed layers of each parameter class."""
    by: dict[tuple[str, str], list[float]] = {}
    for key, v in metrics.items():
        layer, metric = parse_probe_key(key)
        by.setdefault((classes[layer], metric), []).append(v)
    return {median_key(c, m): statistics.median(vs) for (c, m), vs in by.items()}


def probe_slice(inputs: torch.Tensor, fraction: float, device: torch.device) -> torch.Tensor:
    """Rank 0's first ceil(fraction * mb) sequences (at least one), the same on every rank.

    A copy: the broadcast writes into it, never into the trainer's batch.
    """
    n = max(1, math.ceil(fraction * inputs.shape[0]))
    tokens = inputs[:n].to(device, copy=True).contiguous()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tokens, src=0)
    return tokens


def _decays(optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor]) -> dict[str, tuple[float, float, float]]:
    """Layer -> (eta, d, r) of its optimizer group: the current LR, the decay per step W <- (1 - d) W the
    group applies (scaling.group_decay) and its update RMS per unit LR (scaling.group_update_rms). eta and d
    are this step's, so after_step must run before scheduler.step()."""
    owner = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return {
        n: (float(owner[id(p)]["lr"]), group_decay(owner[id(p)]), group_update_rms(owner[id(p)], p.shape))
        for n, p in params.items()
        if id(p) in owner
    }


def layer_rows(module: nn.Module, x: torch.Tensor, positions: int) -> torch.Tensor:
    """The rows X (N, C) that `module` multiplies by its weight W (K, C) on input x: a linear's inputs (..., C),
    a convolution's unfolded input patches (C = C_in prod(kernel)); on sequences (B, T, ..., C) or patch
    positions (B, L, C), `positions` evenly strided per sample (stride_positions), like the tokens of a sequence."""
    if isinstance(module, nn.Linear):
        rows = x.flatten(1, -2) if x.ndim >= 3 else x.reshape(-1, 1, x.shape[-1])  # (B, T, C)
    else:
        rows = conv_patches(module, x)  # (B, L, C_in prod(kernel))
    start, stride = stride_positions(rows.shape[1], positions)
    return rows[:, start::stride].clone().reshape(-1, rows.shape[-1])  # a copy: never a view of the forward's x


def conv_patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C_in, *spatial) -> (B, L, C_in prod(kernel)): the receptive fields of a Conv1d/Conv2d (groups=1) as
    unfold lays them out, so that conv(x) = patches @ W.reshape(C_out, -1).T (+ bias), with its stride,
    padding (any mode, "same" too: padded here as the conv pads) and dilation. A Conv1d is a Conv2d of height 1."""
    pad = conv.padding
    if conv.padding_mode != "zeros" or isinstance(pad, str):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x, pad = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode), 0
    kernel, dilation, stride = conv.kernel_size, conv.dilation, conv.stride
    if isinstance(conv, nn.Conv1d):
        x = x.unsqueeze(2)  # (B, C, 1, L)
        kernel, dilation, stride = (1, *kernel), (1, *dilation), (1, *stride)
        pad = (0, pad if isinstance(pad, int) else pad[0])
    cols = F.unfold(x, kernel, dilation=dilation, padding=pad, stride=stride)  # (B, C_in prod(kernel), L)
    return cols.transpose(1, 2)


def _matrix(w: torch.Tensor) -> torch.Tensor:
    """A weight as the matrix W (K, C) of Y = W X: a convolution's (C_out, C_in, *kernel) flattened (a view)."""
    return w if w.ndim == 2 else w.reshape(w.shape[0], -1)


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a (possibly FSDP2-sharded DTensor) weight."""
    return p.to_local() if hasattr(p, "to_local") else p


def _shard_group(params: list[torch.Tensor]) -> Any:
    """The process group over which the weights' rows are sharded (None: every rank holds whole weights)."""
    groups = set()
    for p in params:
        if not hasattr(p, "device_mesh"):
            continue
        dims = [i for i, pl in enumerate(p.placements) if pl.is_shard()]
        assert len(dims) == 1 and p.placements[dims[0]].dim == 0, f"probes need weights sharded by rows: {p.placements}"
        if p.device_mesh.size(dims[0]) > 1:
            groups.add(p.device_mesh.get_group(dims[0]))
    assert len(groups) <= 1, "probed weights are sharded over different process groups"
    return groups.pop() if groups else None


def _reshard(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "reshard") and hasattr(m, "_get_fsdp_state"):  # FSDP2 FSDPModule
            m.reshard()


def _device(model: nn.Module) -> torch.device:
    return _local(next(model.parameters())).device


def _layer_chunks(layers: int, per_layer: int) -> list[slice]:
    """Slices of a layer stack whose temporaries (`per_layer` elements per layer) stay near CHUNK."""
    n = max(1, CHUNK // max(1, per_layer))
    return [slice(s, min(s + n, layers)) for s in range(0, layers, n)]


def _grad_part(names: list[str], buf: torch.Tensor, xs: Optional[torch.Tensor], w1: dict, decays: dict) -> tuple:
    """(||dW_g||^2, ||dW_g X||^2) per layer, dW_g = W_{t+1} - (1 - d) W_t, in chunks of layers."""
    a = torch.tensor([1.0 - decays[n][1] if n in decays else 0.0 for n in names], device=buf.device)
    dwg, dwgx = [], []
    for s in _layer_chunks(len(names), buf[0].numel()):
        g = torch.stack([w1[n] for n in names[s]]).float()
        g.addcmul_(buf[s], a[s].view(-1, 1, 1), value=-1.0)
        dwg.append(_sq_norms(g))
        dwgx.append(_products(xs[s] if xs is not None else None, g))
    return torch.cat(dwg), torch.cat(dwgx)


def _products(xs: Optional[torch.Tensor], ws: torch.Tensor) -> torch.Tensor:
    """Partial ||W_l X_l||^2 per layer of the stack ws (zeros without captured inputs)."""
    if xs is None:
        return torch.zeros(ws.shape[0], dtype=torch.float32, device=ws.device)
    return _bmm_sq_norms(xs, ws)


def _bmm_sq_norms(xs: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """||X_l W_l^T||^2 for each layer l: X_l (N, C) of the stack xs, W_l (K, C) of the stack ws, fp32 results.

    Products in X's dtype (bf16 under mixed precision), squares summed in fp32; batched over layers
    and chunked over layers and rows of W, so no product temporary is much larger than CHUNK elements.
    """
    (_, n_tok, c), k = xs.shape, ws.shape[1]
    rows = max(1, min(k, CHUNK // max(1, n_tok)))
    out = []
    for s in _layer_chunks(xs.shape[0], rows * (n_tok + c)):
        x = xs[s]  # (l, N, C)
        total = torch.zeros(x.shape[0], dtype=torch.float32, device=ws.device)
        for r in range(0, k, rows):
            prod = torch.bmm(x, ws[s, r : r + rows].to(x.dtype).transpose(1, 2))  # (l, N, rows)
            total += torch.linalg.vector_norm(prod, dim=(1, 2), dtype=torch.float32).square()
        out.append(total)
    return torch.cat(out)


def _sq_norms(buf: torch.Tensor) -> torch.Tensor:
    """Per-layer squared norms of a (layers, K, C) fp32 buffer."""
    return torch.linalg.vector_norm(buf, dim=(1, 2)).square()


def _normalize(z: torch.Tensor, fallback: Optional[torch.Tensor]) -> torch.Tensor:
    """Rows of z scaled to unit norm; a zero row keeps the fallback (a zero weight stays harmless)."""
    n = torch.linalg.vector_norm(z, dim=1, keepdim=True)
    unit = z / n.clamp_min(1e-30)
    return unit if fallback is None else torch.where(n > 0, unit, fallback)


def _div(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _mul(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a * b if a is not None and b is not None else None
