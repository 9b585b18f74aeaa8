"""Hugging Face interop formats: our (Meta) parameter names -> transformers' LlamaForCausalLM names and
RoPE row order, the LlamaConfig computing the same function as our model, and the tokenizer export.

Pure mappings: lingua_wd.export writes and verifies an exported folder with them, lingua_wd.inference
reads exported folders back. The model applies no multiplier to logits (muP here is a layer-wise LR plus
init, SPEC §1); the one multiplier it has, model.residual_mult on every residual branch (scaling.depth),
is folded into each branch's last linear (wo, w2), which it multiplies. docs/interop.md is the user guide.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch

from lingua_wd.args import check
from lingua_wd.data import DataArgs, build_tokenizer
from lingua_wd.model import ModelArgs

META_FILE = "lingua_wd.json"  # written into every export: the run's config, step and rank count

# --- Meta -> HF ------------------------------------------------------------------------------------


def rope_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq / wk from Meta's interleaved RoPE pairs (2i, 2i+1) to HF's rotate_half pairs
    (i, i + D/2), per head; as transformers' convert_llama_weights_to_hf `permute`."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def rope_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of rope_permute (HF -> Meta)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# Meta name (per block: the part after `layers.{i}.`) -> HF name; wq / wk are also RoPE-permuted.
BRANCH_OUTPUTS = ("attention.wo.weight", "feed_forward.w2.weight")  # r * wo(y) = (r wo)(y): residual_mult folds here
BLOCK_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _heads(args: ModelArgs, meta_name: str) -> int:
    return args.n_heads if meta_name.endswith("wq.weight") else args.kv_heads


def to_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our state dict -> LlamaForCausalLM's (names, the RoPE row order, the residual multiplier folded)."""
    out = {}
    for name, t in sd.items():
        if name in TOP_NAMES:
            out[TOP_NAMES[name]] = t
            continue
        _, i, rest = name.split(".", 2)
        if rest in ("attention.wq.weight", "attention.wk.weight"):
            t = rope_permute(t, _heads(args, rest))
        if rest in BRANCH_OUTPUTS and args.residual_mult not in (0.0, 1.0):
            t = t * args.residual_mult
        out[f"model.layers.{i}.{BLOCK_NAMES[rest]}"] = t
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's state dict -> ours (the inverse of to_hf_state_dict for a model of these args)."""
    top = {v: k for k, v in TOP_NAMES.items()}
    block = {v: k for k, v in BLOCK_NAMES.items()}
    out = {}
    for name, t in sd.items():
        if name in top:
            out[top[name]] = t
            continue
        _, _, i, rest = name.split(".", 3)
        meta = block[rest]
        if meta in ("attention.wq.weight", "attention.wk.weight"):
            t = rope_unpermute(t, _heads(args, meta))
        if meta in BRANCH_OUTPUTS and args.residual_mult not in (0.0, 1.0):
            t = t / args.residual_mult
        out[f"layers.{i}.{meta}"] = t
    return out


def hf_config(
    args: ModelArgs, bos_id: Optional[int] = None, eos_id: Optional[int] = None, dtype: torch.dtype = torch.float32
):
    """The LlamaConfig computing the same function as Transformer(args)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_mult * args.dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        hidden_act="silu",
        max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        dtype=dtype,
    )


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}  # transformers >= 5
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def model_args_from_hf(config) -> ModelArgs:
    """ModelArgs of a (plain, no-bias, untied, default-RoPE) LlamaConfig: the inverse of hf_config."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    check(config.hidden_size == heads * head_dim, "config.json", "hidden_size != num_attention_heads * head_dim")
    check(
        config.intermediate_size % config.hidden_size == 0,
        "config.json",
        "intermediate_size is not a multiple of hidden_size",
    )
    check(not getattr(config, "tie_word_embeddings", False), "config.json", "tied embeddings are not supported")
    return ModelArgs(
        dim=config.hidden_size,
        n_layers=config.num_hidden_layers,
        head_dim=head_dim,
        n_kv_heads=None if kv in (None, heads) else kv,
        ffn_mult=config.intermediate_size // config.hidden_size,
        vocab_size=config.vocab_size,
        norm_eps=config.rms_norm_eps,
        rope_theta=_rope_theta(config),
        max_seq_len=config.max_position_embeddings,
    )


# --- tokenizer -------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of the `tokenizers` ByteLevel pieces."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for i, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + i)  # the other bytes map past Latin-1, in byte order
    return table


def _bytes_tokenizer(args, ours):
    """Our byte tokenizer as a BPE without merges over the 256 byte pieces (id = byte value), BOS 256, EOS 257."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|bos|>", "<|eos|>")])
    return tok


def _json_tokenizer(args, ours):
    """hf / bpe: the tokenizer.json the run used, unchanged but for the BOS post-processor."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(ours.path)


def _tiktoken_tokenizer(args, ours):
    """tiktoken / llama3: Meta's ranks as a byte-level BPE (merges recovered from the ranks, as
    transformers' TikTokenConverter does) with the llama3 split pattern and special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    from lingua_wd.data.tokenizers import LLAMA3_PATTERN, LLAMA3_SPECIAL, load_tiktoken_ranks

    ranks = load_tiktoken_ranks(ours.path)
    table = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(table[x] for x in b)

    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    tok = Tokenizer(
        models.BPE({text(t): r for t, r in ranks.items()}, [(text(m[3]), text(m[4])) for m in merges], fuse_unk=False)
    )
    tok.model.ignore_merges = True  # tiktoken takes a whole pre-token that is itself in the vocab
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL])
    return tok


# data.tokenizer.name -> a `tokenizers.Tokenizer` encoding exactly as ours does
TOKENIZER_EXPORTS: dict[str, Callable] = {
    "bytes": _bytes_tokenizer,
    "bpe": _json_tokenizer,
    "hf": _json_tokenizer,
    "tiktoken": _tiktoken_tokenizer,
    "llama3": _tiktoken_tokenizer,
}


def export_tokenizer(data: DataArgs, out_dir: Path, max_len: int) -> tuple[int, int]:
    """Write tokenizer.json + tokenizer_config.json (a PreTrainedTokenizerFast) that encode text as
    training did: BOS first (every training document starts with BOS), no EOS. Returns (bos, eos) ids."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    ours = build_tokenizer(data.tokenizer)
    tok = TOKENIZER_EXPORTS[data.tokenizer.name](data.tokenizer, ours)
    bos, eos = tok.id_to_token(ours.bos_id), tok.id_to_token(ours.eos_id)
    check(bos is not None and eos is not None, "data.tokenizer", "BOS / EOS ids are not in the exported vocabulary")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ours.bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, model_max_length=max_len, clean_up_tokenization_spaces=False
    )
    fast.save_pretrained(str(out_dir))
    _portable_tokenizer_config(out_dir / "tokenizer_config.json")
    return ours.bos_id, ours.eos_id


def _portable_tokenizer_config(path: Path) -> None:
    """transformers >= 5 names the class TokenizersBackend; PreTrainedTokenizerFast loads in 4.x and 5.x alike."""
    cfg = json.loads(path.read_text())
    cfg.pop("backend", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
