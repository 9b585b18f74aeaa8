"""LLaMA as in the paper's Appendix G.3: RMSNorm, RoPE, SwiGLU MLP of exactly ffn_mult * dim,
fixed head_dim (n_heads = dim / head_dim), untied output, SDPA attention.

Parameter names follow Meta's llama code (and the paper's figures), e.g.
`layers.13.feed_forward.w1`, so configs and probes name layers as the paper does. Each residual
branch is multiplied by model.residual_mult (CompleteP's m_L^-alpha under a depth rule, filled in
from scaling.depth at start-up; 1 otherwise, and then no multiply at all).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lingua_wd.args import check
from lingua_wd.loss import linear_cross_entropy
from lingua_wd.scaling import ScalingArgs, StdFn, init_std_fn


@dataclass
class ModelArgs:
    dim: int = 256  # model width d (a multiple of head_dim)
    n_layers: int = 2  # number of transformer blocks
    head_dim: int = 128  # fixed attention head size; n_heads = dim / head_dim
    n_kv_heads: Optional[int] = None  # key/value heads for GQA (None: = n_heads)
    ffn_mult: int = 3  # SwiGLU hidden size is exactly ffn_mult * dim
    vocab_size: int = 0  # 0: taken from the tokenizer
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    max_seq_len: int = 0  # RoPE table length (0: data.seq_len)
    residual_mult: float = 0.0  # each residual branch x this (0: scaling.depth's (L/L0)^-alpha, set at start-up)

    @property
    def n_heads(self) -> int:
        return self.dim // self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


def check_model_args(args: ModelArgs) -> None:
    check(args.dim > 0, "model.dim", f"must be positive, got {args.dim}")
    check(
        args.head_dim > 0 and args.head_dim % 2 == 0,
        "model.head_dim",
        f"must be a positive even number, got {args.head_dim}",
    )
    check(args.dim % args.head_dim == 0, "model.dim", f"{args.dim} is not divisible by model.head_dim={args.head_dim}")
    check(args.n_layers > 0, "model.n_layers", f"must be positive, got {args.n_layers}")
    check(args.ffn_mult > 0, "model.ffn_mult", f"must be positive, got {args.ffn_mult}")
    check(args.vocab_size >= 0, "model.vocab_size", f"must be >= 0, got {args.vocab_size}")
    check(args.norm_eps > 0, "model.norm_eps", f"must be positive, got {args.norm_eps}")
    check(args.rope_theta > 0, "model.rope_theta", f"must be positive, got {args.rope_theta}")
    check(
        args.residual_mult >= 0,
        "model.residual_mult",
        f"must be >= 0 (0: from scaling.depth), got {args.residual_mult}",
    )
    if args.n_kv_heads is not None:
        check(
            args.n_kv_heads > 0 and args.n_heads % args.n_kv_heads == 0,
            "model.n_kv_heads",
            f"{args.n_kv_heads} must divide n_heads={args.n_heads}",
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # the gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_tables(head_dim: int, seq_len: int, theta: float, device=None) -> torch.Tensor:
    """(T, head_dim/2, 2) cos/sin of Meta's RoPE (interleaved pairs, as llama's complex form)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float64), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def apply_rope(x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of x: (B, T, H, D) by the angles of tables."""
    B, T, H, D = x.shape
    xr = x.float().reshape(B, T, H, D // 2, 2)
    cos = tables[:T, None, :, 0]  # (T, 1, D/2)
    sin = tables[:T, None, :, 1]
    out = torch.stack([xr[..., 0] * cos - xr[..., 1] * sin, xr[..., 0] * sin + xr[..., 1] * cos], dim=-1)
    return out.reshape(B, T, H, D).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), rope)
        k = apply_rope(self.wk(x).view(B, T, self.kv_heads, self.head_dim), rope)
        v = self.wv(x).view(B, T, self.kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_mult * args.dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.residual_mult = args.residual_mult or 1.0  # CompleteP Table 1: X + m_L^-alpha MHA(LN(X)), same for MLP

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        h = x + self.branch(self.attention(self.attention_norm(x), rope))
        return h + self.branch(self.feed_forward(self.ffn_norm(h)))

    def branch(self, y: torch.Tensor) -> torch.Tensor:
        """A residual branch's output times the multiplier (no op at 1: the same numbers, bit for bit)."""
        return y if self.residual_mult == 1.0 else self.residual_mult * y


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        assert args.vocab_size > 0 and args.max_seq_len > 0, "resolve vocab_size and max_seq_len first"
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.activation_checkpointing = False  # set by distributed.parallelize
        self.compile_loss = False  # set by distributed.parallelize (CUDA + compile)
        self.loss_chunk: Optional[int] = None  # tokens per chunk of the fused output + loss (None: loss.CHUNK_SIZE)
        self.register_buffer("rope", rope_tables(args.head_dim, args.max_seq_len, args.rope_theta), persistent=False)

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V); with targets (B, T) -> the mean cross-entropy (fp32).

        The loss never materializes the full (B*T, V) fp32 logits (lingua_wd/loss.py): it runs here,
        inside the root module's forward, where FSDP2 has unsharded `output.weight`.
        """
        h = self.tok_embeddings(tokens)  # (B, T, d)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, self.rope, use_reentrant=False)
            else:
                h = layer(h, self.rope)
        h = self.norm(h)
        if targets is None:
            return self.output(h)
        return linear_cross_entropy(h, self.output.weight, targets, self.loss_chunk, compiled=self.compile_loss)

    @torch.no_grad()
    def init_weights(self, std_fn: Optional[StdFn] = None, seed: int = 0) -> None:
        """(Re)initialize every parameter deterministically; works after meta -> to_empty.

        std_fn: (name, param) -> std, the width plan's init (scaling.init_std_fn); gains are set to ones
        (init_parameters, which library.reinit shares).
        """
        std_fn = std_fn or init_std_fn(ScalingArgs(), self.args.dim)  # the sp plan's init (App. G.3)
        self.rope = rope_tables(
            self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, device=self.rope.device
        )
        init_parameters(self, std_fn, seed, lambda name: name.endswith("norm.weight"))


@torch.no_grad()
def init_parameters(model: nn.Module, std_fn: StdFn, seed: int, is_gain: Callable[[str], bool]) -> None:
    """Every parameter of any module: ones where is_gain(name), else N(0, std_fn(name, p)^2) (std 0: zeros).

    Each parameter gets its own generator seeded from (seed, its index), on the parameter's device,
    so the result does not depend on sharding: under FSDP2 the full tensor is drawn on every rank
    and each rank keeps its rows (same values on CPU runs, and on GPU runs, of any world size).
    """
    for i, (name, p) in enumerate(model.named_parameters()):
        dev = p.device
        if is_gain(name):
            full = torch.ones(p.shape, device=dev)
        else:
            gen = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + i)
            full = torch.randn(p.shape, generator=gen, device=dev) * std_fn(name, p)
        _copy_full_(p, full)


def _copy_full_(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into p; for an FSDP2 DTensor (Shard(0) over a 1-D mesh) keep this rank's rows."""
    if hasattr(p, "device_mesh"):
        mesh = p.device_mesh
        chunks = torch.chunk(full, mesh.size(), dim=0)  # FSDP2 shards dim 0 like torch.chunk
        rank = mesh.get_local_rank()
        full = chunks[rank] if rank < len(chunks) else full[:0]
        p = p.to_local()
    p.copy_(full.to(p.device, p.dtype))


def block_params(args: ModelArgs) -> int:
    """Parameters of the transformer blocks (no embedding, no output layer, no final norm): the N of the
    fitted timescale law tau_epoch = c (D/N)^k (scaling.tau_law), from the shape alone."""
    q_and_o = 2 * args.dim * args.n_heads * args.head_dim
    k_and_v = 2 * args.dim * args.kv_heads * args.head_dim
    return args.n_layers * (q_and_o + k_and_v + 3 * args.ffn_mult * args.dim * args.dim + 2 * args.dim)


def count_params(model: nn.Module, blocks_and_output: bool = False) -> int:
    """All parameters, or (for MFU) those of the blocks plus the output layer (global counts)."""
    keep = ("layers.", "output.") if blocks_and_output else ("",)
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(keep))


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """6 * (block + output params) + 12 * L * d * T (attention scores), as the issue defines MFU."""
    a = model.args
    return 6.0 * count_params(model, blocks_and_output=True) + 12.0 * a.n_layers * a.dim * seq_len
