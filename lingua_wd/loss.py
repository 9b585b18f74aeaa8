"""Cross-entropy of the output layer without materializing the (tokens x 128k) logits.

The plain loss `F.cross_entropy((h @ W.T).float(), y)` materializes the logits (bf16), their fp32 copy and,
in backward, their fp32 gradient: at 32k tokens x 128,256 vocab that is 8.4 + 16.8 + 16.8 GB, against
2.1 GB for the whole d=512 model with its AdamW state. Here the tokens are split into chunks; each chunk computes its logits, log-sum-exp, loss and the
gradients wrt its hidden rows and (accumulated) wrt W, then frees its logits. The gradients are computed
in the forward pass, so backward only scales them by the incoming gradient (no logits are recomputed).
Peak extra memory: one chunk's logits (chunk_size x V) plus grad W (V x d) and grad h (N x d).

Under FSDP2, call `linear_cross_entropy` inside the root module's forward: there `output.weight` is the
unsharded (bf16) tensor and its gradient flows to FSDP's reduce-scatter like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F

CHUNK_SIZE = 4096  # tokens per chunk: 4096 x 128,256 fp32 logits = 2.1 GB
IGNORE_INDEX = -100  # as F.cross_entropy

_compiled: dict[str, Callable] = {}


def _chunk_loss_and_grad(
    h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, scale: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk: (sum of losses, d loss / d logits in h's dtype (C, V), d loss / d h (C, d)).

    h (C, d), w (V, d), t (C,), scale = 1 / (number of counted tokens). Logits are computed in the
    inputs' dtype and upcast to fp32, as F.cross_entropy(logits.float()) does in the trainer.
    """
    logits = (h @ w.t()).float()  # (C, V)
    valid = t != ignore_index
    tc = torch.where(valid, t, 0)[:, None]  # (C, 1) safe index for ignored rows
    lse = torch.logsumexp(logits, dim=-1)  # (C,)
    loss = ((lse - logits.gather(1, tc)[:, 0]) * valid).sum()
    # d loss / d logits = (softmax - onehot) * scale, zero on ignored rows; in place to keep one (C, V) buffer
    g = logits.sub_(lse[:, None]).exp_()
    g.scatter_add_(1, tc, torch.full_like(tc, -1, dtype=g.dtype))
    g = g.mul_((valid * scale)[:, None]).to(h.dtype)
    return loss, g, g @ w


def _chunk_fn(compiled: bool) -> Callable:
    if not compiled:
        return _chunk_loss_and_grad
    if "fn" not in _compiled:  # fuses log-sum-exp, softmax and the casts between the two matmuls
        _compiled["fn"] = torch.compile(_chunk_loss_and_grad, dynamic=False, fullgraph=True)
    return _compiled["fn"]


def _chunk_loss(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Sum of losses of one chunk, no gradients (evaluation)."""
    logits = (h @ w.t()).float()
    valid = t != ignore_index
    target_logit = logits.gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
    return ((torch.logsumexp(logits, dim=-1) - target_logit) * valid).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """mean over counted tokens of CE(h @ W.T, t); gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h, w, t, chunk_size: int, ignore_index: int, compiled: bool):
        scale = 1.0 / (t != ignore_index).sum().clamp(min=1).float()  # a device tensor: no host sync
        fn = _chunk_fn(compiled)
        total = torch.zeros((), device=h.device, dtype=torch.float32)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(w)  # in W's dtype, like the unchunked matmul's gradient
        for s in range(0, h.shape[0], chunk_size):
            hc = h[s : s + chunk_size]
            loss, g, gh = fn(hc, w, t[s : s + chunk_size], scale, ignore_index)
            total += loss
            grad_h[s : s + chunk_size] = gh
            if ctx.needs_input_grad[1]:
                grad_w.addmm_(g.t(), hc)  # (V, C) @ (C, d); bf16 W: cuBLAS accumulates each chunk in fp32
        ctx.save_for_backward(grad_h, grad_w)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: Optional[int] = None,
    ignore_index: int = IGNORE_INDEX,
    compiled: bool = False,
) -> torch.Tensor:
    """Mean F.cross_entropy((hidden @ weight.T).float(), targets) without the full logits.

    hidden (..., d) e.g. the final-norm output (B, T, d); weight (V, d) the output layer's weight;
    targets (...) int64, entries equal to ignore_index are not counted. Returns an fp32 scalar.
    chunk_size: tokens per chunk (None: CHUNK_SIZE). compiled=True torch.compiles the per-chunk work
    (for CUDA; one graph per chunk shape, so N % chunk_size != 0 costs a second graph).
    """
    chunk_size = chunk_size or CHUNK_SIZE
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, t, chunk_size, ignore_index, compiled)
    total = sum(_chunk_loss(h[s : s + chunk_size], weight, t[s : s + chunk_size], ignore_index)
                for s in range(0, h.shape[0], chunk_size))  # fmt: skip
    return total / (t != ignore_index).sum().clamp(min=1).float()


def reference_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """The plain loss the chunked one replaces (the trainer's today): mean CE of the fp32 logits (..., V)."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index)
