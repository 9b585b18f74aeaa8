"""Muon for the hidden matrices, exact under FSDP2, and one optimizer object over Muon + AdamW.

Muon (Keller Jordan, 2024, https://kellerjordan.github.io/posts/muon/), per 2-D parameter W (out x in)
with gradient G, momentum mu, learning rate eta_t, decay lambda:
    M <- mu M + (1 - mu) G                   momentum, the EMA form of torch.optim.Muon and Jordan's code
    U <- (1 - mu) G + mu M  (Nesterov)  or  M
    O <- NS5(U)  ~ U_U V_U^T                 quintic Newton-Schulz: the orthogonal (polar) factor of U
    W <- W - eta_t lambda W                  decoupled decay (PyTorch convention: eta_t * lambda per step)
    W <- W - eta_t s(out, in) O              s: the LR adjustment of the group (ADJUST_LR)

Under FSDP2 each rank holds a row shard of every matrix (a DTensor, Shard(0) on a 1-D mesh) while
Newton-Schulz needs the whole matrix. The momentum stays sharded (it is elementwise); each matrix
gets one owner rank (largest first onto the least loaded rank); one all_to_all sends every shard of
U to its owner, the owner orthogonalizes, and a second all_to_all sends each rank its rows of O back
(docs/scaling.md, "Muon under FSDP2": design and volume). The result equals the one-process update: the owner sees
the very matrix one process would see. Plain tensors (one process, or DDP) orthogonalize in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

# Jordan's quintic: a maximal slope at 0 (a = 3.4445) so that 5 steps lift even small singular values
# near 1; the price is that they do not converge to 1 but oscillate in about [0.7, 1.2] (test_muon.py
# measures the band), which Jordan reports does not hurt training.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# The classic cubic Newton-Schulz (X <- 1.5 X - 0.5 X X^T X): converges to the exact polar factor U V^T
# for singular values in (0, sqrt(3)), slowly for small ones; used by the tests as an exactness check.
CUBIC_COEFFICIENTS = (1.5, -0.5, 0.0)
NS_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


def _lr_scale_original(fan_out: int, fan_in: int) -> float:
    # Keller Jordan's Muon (blog 2024; torch.optim.Muon adjust_lr_fn="original"): max(1, out/in)^0.5.
    # O has min(out, in) singular values ~1, so ||O||_2 ~ 1 and RMS(O) ~ 1/sqrt(max(out, in)): this factor
    # makes RMS(dW) = eta / sqrt(in) for every shape, and ||dW||_2 = eta sqrt(out/in) for out >= in,
    # the spectral condition of Yang, Simon & Bernstein 2023 (arXiv 2310.17813) up to the base LR.
    return math.sqrt(max(1.0, fan_out / fan_in))


def _lr_scale_match_rms_adamw(fan_out: int, fan_in: int) -> float:
    # Moonlight, "Muon is Scalable for LLM Training" (Liu et al. 2025, arXiv 2502.16982):
    # RMS(O) ~ 1/sqrt(max(out, in)), so 0.2 sqrt(max(out, in)) gives every update the RMS 0.2 eta,
    # about AdamW's update RMS, and AdamW's LR and weight decay carry over.
    return 0.2 * math.sqrt(max(fan_out, fan_in))


ADJUST_LR = {
    "original": _lr_scale_original,
    "match_rms_adamw": _lr_scale_match_rms_adamw,
    "none": lambda fan_out, fan_in: 1.0,
}


def ns_dtype(name: str, device: torch.device) -> torch.dtype:
    """Newton-Schulz compute dtype: "auto" is bf16 on CUDA (as the reference implementations run it) and
    fp32 elsewhere (CPU bf16 matmuls are slow and no more faithful); "bf16" on CPU reproduces torch.optim.Muon."""
    dtype = NS_DTYPES[name]
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype


def newton_schulz(
    g: Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Approximate orthogonal factor of a matrix g (m x n): X <- a X + (b A + c A^2) X, A = X X^T.

    X starts at g / ||g||_F (so every singular value is <= 1) and is transposed when tall so that A is
    the smaller Gram matrix. Returns a new tensor in `dtype` (default: g's), the shape of g. The same
    op sequence as torch.optim.Muon's, so with dtype=bf16 the result is bitwise the same.
    """
    if g.ndim != 2:
        raise ValueError(f"newton_schulz needs a 2-D matrix, got shape {tuple(g.shape)}")
    a, b, c = coefficients
    x = g.to(dtype or g.dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # out of place: g.to() may alias the caller's tensor
    for _ in range(steps):
        gram = x @ x.T  # (m, m), m = min(rows, cols)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.addmm(x, poly, x, beta=a)  # a X + (b A + c A^2) X
    return x.T if tall else x


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view: in-place ops write the DTensor), or t itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def row_splits(rows: int, world: int) -> list[int]:
    """Rows of each rank under Shard(0): torch.chunk's split (FSDP2 and DTensor), empty tail ranks included."""
    chunk = -(-rows // world)
    return [max(0, min(chunk, rows - r * chunk)) for r in range(world)]


def ns_cost(shape: tuple[int, ...]) -> int:
    """Multiply-adds of one Newton-Schulz step on an (m, n) matrix: 2 m^2 n (X X^T, then B X) + m^3 (A^2)."""
    m, n = sorted(shape[:2])
    return 2 * m * m * n + m**3


def assign_owners(shapes: list[tuple[int, ...]], world: int) -> list[int]:
    """Owner rank of each matrix: largest Newton-Schulz cost first onto the least loaded rank (LPT).

    Depends only on the shapes, so every rank computes the same assignment without communicating.
    """
    load = [0] * world
    owners = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-ns_cost(shapes[i]), i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += ns_cost(shapes[i])
    return owners


def _cat(pieces: list[Tensor], like: Tensor, dtype: torch.dtype) -> Tensor:
    if not pieces:
        return torch.empty(0, dtype=dtype, device=like.device)
    return torch.cat([p.reshape(-1).to(dtype) for p in pieces])


def _sharded_mesh(params: list[Tensor]):
    """(process group, rank, world) when the group's params are Shard(0) DTensors over >1 ranks, else None."""
    if not isinstance(params[0], DTensor):
        return None
    mesh = params[0].device_mesh
    for p in params:
        if p.device_mesh != mesh or tuple(p.placements) != (Shard(0),):
            raise NotImplementedError(
                f"Muon supports FSDP2 parameters sharded on dim 0 over one 1-D mesh; got placements {p.placements}"
            )
    if mesh.size() == 1:
        return None
    return mesh.get_group(), mesh.get_local_rank(), mesh.size()


def orthogonalize_sharded(
    shards: list[Tensor], shapes: list[tuple[int, int]], group, rank: int, world: int, ns_kwargs: dict
) -> list[Tensor]:
    """Newton-Schulz of whole matrices held as row shards across the ranks; returns this rank's rows of each.

    One all_to_all carries every shard to its matrix's owner, in the Newton-Schulz dtype (a cast is
    elementwise, so casting before the exchange equals casting after); the owner orthogonalizes its
    matrices; a second all_to_all returns each rank its rows. Collective: every rank calls it with
    the same shapes.
    """
    dtype = ns_kwargs["dtype"]
    owners = assign_owners(shapes, world)
    splits = [row_splits(s[0], world) for s in shapes]
    mine = [i for i, o in enumerate(owners) if o == rank]
    by_owner = sorted(range(len(shapes)), key=lambda i: (owners[i], i))  # send order: destination rank, then index
    for i, s in enumerate(shards):
        assert s.shape == (splits[i][rank], shapes[i][1]), f"shard {tuple(s.shape)} is not torch.chunk's row split"
    send_sizes = [sum(splits[i][rank] * shapes[i][1] for i in by_owner if owners[i] == r) for r in range(world)]
    recv_sizes = [sum(splits[i][r] * shapes[i][1] for i in mine) for r in range(world)]
    recv = torch.empty(sum(recv_sizes), dtype=dtype, device=shards[0].device)
    dist.all_to_all_single(recv, _cat([shards[i] for i in by_owner], shards[0], dtype), recv_sizes, send_sizes, group)
    pieces = recv.split([splits[i][r] * shapes[i][1] for r in range(world) for i in mine])
    out_rows = []  # for each rank r, for each owned matrix: its rows of O, in the order r expects them
    full = {}
    for k, i in enumerate(mine):
        parts = [pieces[r * len(mine) + k].view(splits[i][r], shapes[i][1]) for r in range(world)]
        full[i] = newton_schulz(torch.cat(parts), **ns_kwargs)
    for r in range(world):
        for i in mine:
            start = sum(splits[i][:r])
            out_rows.append(full[i][start : start + splits[i][r]])
    back = torch.empty(sum(send_sizes), dtype=dtype, device=shards[0].device)
    dist.all_to_all_single(back, _cat(out_rows, shards[0], dtype), send_sizes, recv_sizes, group)
    mine_back = back.split([splits[i][rank] * shapes[i][1] for i in by_owner])
    out: list[Optional[Tensor]] = [None] * len(shapes)
    for i, flat in zip(by_owner, mine_back, strict=True):
        out[i] = flat.view(splits[i][rank], shapes[i][1])
    return out  # type: ignore[return-value]


def run_closure(closure: Optional[Callable[[], Any]]) -> Any:
    """The loss of an optimizer step's closure, evaluated with gradients on (torch.optim's convention)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Muon(torch.optim.Optimizer):
    """Muon over 2-D parameters: plain tensors, or FSDP2 DTensors (Shard(0) on a 1-D mesh).

    Per-group hyperparameters: lr, weight_decay (decoupled, eta_t * lambda per step as in torch AdamW
    and torch.optim.Muon), momentum, nesterov, ns_steps, ns_coefficients, eps, adjust_lr (a key of
    ADJUST_LR), ns_dtype (a key of NS_DTYPES). Other keys a group carries ("name", "class",
    "initial_lr", ...) pass through untouched, so LambdaLR and the trainer's tables work as with AdamW.
    State: "momentum_buffer" per parameter, shaped and sharded like the parameter (so DCP saves it).
    With defaults and adjust_lr="original", ns_dtype="bf16" it equals torch.optim.Muon bitwise.
    No host syncs: under FSDP2 two all_to_all per group and step, issued from the host with sizes
    known from the shapes.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        adjust_lr: str = "original",
        ns_dtype: str = "auto",
    ):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, adjust_lr=adjust_lr, ns_dtype=ns_dtype)  # fmt: skip
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        if g["lr"] < 0 or g["weight_decay"] < 0 or not 0 <= g["momentum"] < 1 or g["ns_steps"] < 0:
            raise ValueError(f"Muon group {g.get('name', len(self.param_groups) - 1)}: lr, weight_decay >= 0, "
                             f"momentum in [0, 1), ns_steps >= 0 (got {g['lr']}, {g['weight_decay']}, "
                             f"{g['momentum']}, {g['ns_steps']})")  # fmt: skip
        if g["adjust_lr"] not in ADJUST_LR:
            raise ValueError(f"Muon adjust_lr {g['adjust_lr']!r}: choose from {', '.join(ADJUST_LR)}")
        if g["ns_dtype"] not in NS_DTYPES:
            raise ValueError(f"Muon ns_dtype {g['ns_dtype']!r}: choose from {', '.join(NS_DTYPES)}")
        for p in g["params"]:
            if p.ndim != 2:
                raise ValueError(f"Muon takes 2-D parameters only, got shape {tuple(p.shape)} (use AdamW for it)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params)
        return loss

    def _step_group(self, group: dict, params: list[Tensor]) -> None:
        mu = group["momentum"]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        bufs = [local_tensor(self.state[p]["momentum_buffer"]) for p in params]
        grads = [local_tensor(p.grad) for p in params]
        torch._foreach_lerp_(bufs, grads, 1 - mu)  # M <- mu M + (1 - mu) G
        updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs  # (1 - mu) G + mu M
        ns_kwargs = dict(steps=group["ns_steps"], coefficients=group["ns_coefficients"], eps=group["eps"],
                         dtype=ns_dtype(group["ns_dtype"], grads[0].device))  # fmt: skip
        sharded = _sharded_mesh(params)
        if sharded is None:
            orth = [newton_schulz(u, **ns_kwargs) for u in updates]
        else:
            orth = orthogonalize_sharded(updates, [tuple(p.shape) for p in params], *sharded, ns_kwargs)
        lr, wd, scale = group["lr"], group["weight_decay"], ADJUST_LR[group["adjust_lr"]]
        for p, o in zip(params, orth, strict=True):
            w = local_tensor(p)
            if wd:
                w.mul_(1 - lr * wd)
            w.add_(o, alpha=-(lr * scale(p.shape[0], p.shape[1])))  # the full matrix's (fan_out, fan_in)


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters as one: e.g. AdamW for the vector-like classes, the
    embedding and the output layer, Muon for the hidden matrices.

    `param_groups` is the concatenation of the children's groups (the same dicts), so a LambdaLR over
    this object, the start-up table and the probes see and drive every group. The children share this
    object's `state`, so `state_dict()` / `load_state_dict()` have torch's usual format and DCP's
    get_state_dict / set_state_dict (checkpoint.py) work on it unchanged. `step()` steps each child;
    `defaults` has no "fused", so guard.optimizer_step skips a non-finite step with one host sync.
    """

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)
        self._built = False
        super().__init__([g for o in self.optimizers for g in o.param_groups], defaults={})
        self._built = True
        for o in self.optimizers:
            self.state.update(o.state)
        self._link()

    def _link(self) -> None:
        """Point each child at its slice of this object's groups and at the one shared state."""
        start = 0
        for o in self.optimizers:
            n = len(o.param_groups)
            o.param_groups = self.param_groups[start : start + n]
            o.state = self.state
            start += n

    def step(self, closure=None):
        loss = run_closure(closure)
        for o in self.optimizers:
            o.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # replaces self.state and the group dicts: relink the children
        self._link()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._built:  # a group here would reach no child's step()
            raise NotImplementedError("add the group to a child optimizer, then build a new CombinedOptimizer")
        super().add_param_group(param_group)
