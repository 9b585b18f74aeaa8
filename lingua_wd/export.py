"""Export a checkpoint to a Hugging Face `LlamaForCausalLM` folder, and load models for inference.

`python -m lingua_wd.export CKPT_DIR OUT_DIR [dtype=bf16] [verify=false]` consolidates the DCP shards
of any number of ranks (no process group needed), renames Meta's parameter names to HF's, permutes
the wq / wk rows from Meta's interleaved-pair RoPE to HF's rotate_half convention, and writes
config.json, model*.safetensors, the tokenizer (tokenizer.json + tokenizer_config.json) and
lingua_wd.json (the run's config, step and rank count). The model applies no multiplier to
activations or logits (muP here is layer-wise LR plus init, SPEC §1: `scaling.output_init` only
changes the init), so nothing needs folding; `verify` reloads the folder with
`AutoModelForCausalLM` and compares its logits with ours, so a future multiplier that export does
not fold fails loudly. `load_model` opens our checkpoints and exported folders alike for
lingua_wd.eval and lingua_wd.generate. docs/interop.md is the user guide.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from lingua_wd import checkpoint as ckpt
from lingua_wd.args import ConfigError, check, parse_args, run_cli
from lingua_wd.data import DataArgs, build_tokenizer
from lingua_wd.model import ModelArgs, Transformer, rope_tables

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
META_FILE = "lingua_wd.json"  # written into every export: the run's config, step and rank count
VERIFY_TEXT = "def main():\n    return 'héllo, wörld' # 42 → ∞\n"  # the tokenizer check: ASCII, Latin-1, symbols


@dataclass
class ExportArgs:
    ckpt_dir: str = ""  # a run dir (its latest checkpoint), its checkpoints/ dir, or one checkpoints/<step> dir
    out_dir: str = ""  # the HF folder to write (created; files of the same name are replaced)
    config: str = ""  # the run's config.yaml ("" = the checkpoint's own copy, else <run dir>/config.yaml)
    dtype: str = "fp32"  # weight dtype in the export: fp32 | bf16 | fp16
    max_shard_size: str = "5GB"  # largest safetensors file; bigger models are split with an index
    verify: bool = True  # reload OUT_DIR with AutoModelForCausalLM / AutoTokenizer and compare with ours


# --- our checkpoints -------------------------------------------------------------------------------


@dataclass
class Run:
    """A checkpoint and the config it was trained with."""

    ckpt: Path  # the checkpoints/<step> directory
    step: int
    world_size: int  # ranks that wrote it (the trainer's validation set is split over this many)
    model: ModelArgs  # resolved: vocab_size and max_seq_len are filled in
    data: DataArgs
    config: dict  # the whole resolved config as saved


def resolve_checkpoint(path: str | Path, key: str = "ckpt_dir") -> Path:
    """A checkpoint dir itself, or the latest complete one under `<run>/checkpoints` or a checkpoints dir."""
    path = Path(path).expanduser()
    if (path / ckpt.MANIFEST).exists():
        if not ckpt.is_complete(path):
            raise ConfigError(f"{key}: {path} is incomplete (its {ckpt.MANIFEST} does not match its files)")
        return path
    for root in (path / "checkpoints", path):
        found = ckpt.latest(root)
        if found is not None:
            return found
    raise ConfigError(f"{key}: no complete checkpoint in {path} (expected <run>/checkpoints/<step>/)")


def find_config(ckpt_path: Path, given: str = "") -> Path:
    """The config a checkpoint was trained with: `given`, its own copy, or the run dir's config.yaml."""
    if given:
        check(Path(given).expanduser().is_file(), "config", f"no such file {given}")
        return Path(given).expanduser()
    for cand in (ckpt_path / "config.yaml", ckpt_path.parent.parent / "config.yaml", ckpt_path.parent / "config.yaml"):
        if cand.is_file():
            return cand
    raise ConfigError(f"config: no config.yaml next to {ckpt_path}; pass config=<run dir>/config.yaml")


def _section(cls: type, cfg: dict, key: str) -> Any:
    """One section of a saved config as its dataclass; keys unknown to this version are dropped with a warning,
    so runs saved by older or newer code still open."""
    names = {f.name for f in fields(cls)}
    raw = dict(cfg.get(key) or {})
    dropped = sorted(set(raw) - names)
    if dropped:
        log.warning("config: ignoring %s keys unknown to this version: %s", key, ", ".join(dropped))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), {k: v for k, v in raw.items() if k in names})
        return OmegaConf.to_object(merged)
    except Exception as err:
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None


def open_run(path: str | Path, config: str = "", key: str = "ckpt_dir") -> Run:
    """The checkpoint at (or latest under) `path` with its resolved model and data config."""
    ckpt_path = resolve_checkpoint(path, key)
    cfg = OmegaConf.to_container(OmegaConf.load(find_config(ckpt_path, config)), resolve=True)
    model, data = _section(ModelArgs, cfg, "model"), _section(DataArgs, cfg, "data")
    check(model.vocab_size > 0 and model.max_seq_len > 0, "config", "model.vocab_size / max_seq_len are not resolved")
    manifest = json.loads((ckpt_path / ckpt.MANIFEST).read_text())
    return Run(ckpt_path, int(manifest["step"]), int(manifest["world_size"]), model, data, cfg)


def consolidate(ckpt_path: Path) -> dict[str, torch.Tensor]:
    """The full model state dict of a DCP checkpoint written by any number of ranks, in this process
    alone: every `model.*` tensor is allocated at its global size and DCP reads all shards into it."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(ckpt_path))
    meta = reader.read_metadata().state_dict_metadata
    sd = {
        k.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if k.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }
    if not sd:
        raise ConfigError(f"ckpt_dir: {ckpt_path} holds no model tensors")
    state = {"model": sd}
    with warnings.catch_warnings():  # "torch.distributed is disabled ... assuming a single process": intended
        warnings.simplefilter("ignore", UserWarning)
        load(state, storage_reader=reader, no_dist=True)  # nested keys flatten to model.<name>, as saved
    return state["model"]


def build_transformer(
    args: ModelArgs, sd: dict[str, torch.Tensor], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """Our model holding `sd` in eval mode (on CPU in fp32 the tensors are used in place, not copied).
    Only the parameters take `dtype`: the RoPE table stays fp32, as under FSDP mixed precision."""
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(sd, strict=True, assign=True)
    model.rope = torch.empty(0)  # the meta buffer (not in the state dict) is rebuilt in fp32 below
    model.to(device=device, dtype=dtype)
    model.rope = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta, device=device)
    return model.eval()


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
    """Our state dict -> LlamaForCausalLM's (names and the RoPE row order)."""
    out = {}
    for name, t in sd.items():
        if name in TOP_NAMES:
            out[TOP_NAMES[name]] = t
            continue
        _, i, rest = name.split(".", 2)
        if rest in ("attention.wq.weight", "attention.wk.weight"):
            t = rope_permute(t, _heads(args, rest))
        out[f"model.layers.{i}.{BLOCK_NAMES[rest]}"] = t
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's state dict -> ours (the inverse of to_hf_state_dict)."""
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
        out[f"layers.{i}.{meta}"] = t
    return out


def hf_config(args: ModelArgs, bos_id: Optional[int] = None, eos_id: Optional[int] = None, dtype: str = "fp32"):
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
        dtype=DTYPES[dtype],
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


# --- export ----------------------------------------------------------------------------------------


def check_export_args(args: ExportArgs) -> None:
    check(bool(args.ckpt_dir), "ckpt_dir", "must be set (a run dir or a checkpoint dir)")
    check(bool(args.out_dir), "out_dir", "must be set")
    check(args.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}, got {args.dtype!r}")


def export(args: ExportArgs) -> Path:
    """Write the HF folder; returns its path."""
    from transformers import LlamaForCausalLM

    check_export_args(args)
    run = open_run(args.ckpt_dir, args.config)
    out = Path(args.out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    log.info("exporting %s (step %d, %d ranks) to %s", run.ckpt, run.step, run.world_size, out)
    sd = consolidate(run.ckpt)
    bos, eos = export_tokenizer(run.data, out, run.model.max_seq_len)
    config = hf_config(run.model, bos, eos, args.dtype)
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    hf_sd = {k: v.to(DTYPES[args.dtype]) for k, v in to_hf_state_dict(sd, run.model).items()}
    hf.load_state_dict(hf_sd, strict=True, assign=True)  # strict: every HF weight is ours, no extra
    hf.save_pretrained(str(out), max_shard_size=args.max_shard_size)
    _add_legacy_rope_theta(out / "config.json", run.model.rope_theta)
    meta = {"source": str(run.ckpt.resolve()), "step": run.step, "world_size": run.world_size, "config": run.config}
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    if args.verify:
        ref = {k: v.to(DTYPES[args.dtype]).float() for k, v in sd.items()}  # what the export holds
        diff = verify_export(out, build_transformer(run.model, ref), build_tokenizer(run.data.tokenizer))
        log.info("verified: AutoModelForCausalLM logits match ours (max abs diff %.2e), tokenizer matches", diff)
    log.info("wrote %s", out)
    return out


def _add_legacy_rope_theta(path: Path, theta: float) -> None:
    """transformers >= 5 writes RoPE's base inside rope_parameters; older readers look for rope_theta."""
    cfg = json.loads(path.read_text())
    cfg.setdefault("rope_theta", theta)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def verify_export(out_dir: Path, ours: Transformer, tokenizer, tol: float = 1e-4) -> float:
    """Reload the folder as a new user would and compare with our model: logits on random tokens
    (max abs diff, fp32, scaled by the logits' size) and the tokenizer's ids on VERIFY_TEXT."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, ours.args.vocab_size, (2, min(64, ours.args.max_seq_len)), generator=gen)
    a, b = ours(tokens), hf(tokens).logits
    diff = (a - b).abs().max().item()
    if diff > tol * max(1.0, a.abs().max().item()):
        raise RuntimeError(f"export: HF logits differ from ours by {diff:.3e} (is there an unfolded multiplier?)")
    hf_ids = AutoTokenizer.from_pretrained(str(out_dir))(VERIFY_TEXT, verbose=False)["input_ids"]
    if hf_ids != tokenizer.encode(VERIFY_TEXT, bos=True, eos=False):
        raise RuntimeError("export: the exported tokenizer does not encode text as the run's tokenizer does")
    return diff


# --- loading for eval / generate -------------------------------------------------------------------


class HFTokenizerAdapter:
    """An exported folder's AutoTokenizer behind our tokenizer interface (encode(text, bos, eos), decode)."""

    def __init__(self, tok):
        self.tok = tok
        self.bos_id, self.eos_id = tok.bos_token_id, tok.eos_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        ids = self.tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i not in (self.bos_id, self.eos_id)])


@dataclass
class Loaded:
    """A model ready for inference, ours or an exported one."""

    forward: Callable[[torch.Tensor], torch.Tensor]  # tokens (B, T) -> logits (B, T, V)
    tokenizer: Any  # our tokenizer interface
    max_seq_len: int  # longest context the model was trained on (RoPE table)
    data: Optional[DataArgs]  # the run's data config (None for an exported folder without lingua_wd.json)
    config: dict  # the run's whole resolved config ({} when unknown)
    step: int
    world_size: int
    source: str  # "checkpoint" | "hf"


def is_hf_folder(path: str | Path) -> bool:
    return (Path(path).expanduser() / "config.json").is_file()


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: str = "fp32", config: str = "") -> Loaded:
    """Our run / checkpoint dir (with its config) or an exported HF folder, in eval mode on `device`."""
    check(dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if is_hf_folder(path):
        return _load_hf(Path(path).expanduser(), device, DTYPES[dtype])
    run = open_run(path, config, key="path")
    model = build_transformer(run.model, consolidate(run.ckpt), device, DTYPES[dtype])
    tok = build_tokenizer(run.data.tokenizer)
    return Loaded(model, tok, run.model.max_seq_len, run.data, run.config, run.step, run.world_size, "checkpoint")


def _load_hf(path: Path, device, dtype: torch.dtype) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    tok = HFTokenizerAdapter(AutoTokenizer.from_pretrained(str(path)))
    meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else {}
    data = _section(DataArgs, meta["config"], "data") if "config" in meta else None
    return Loaded(
        lambda t: model(t).logits,
        tok,
        model.config.max_position_embeddings,
        data,
        meta.get("config", {}),
        int(meta.get("step", 0)),
        int(meta.get("world_size", 1)),
        "hf",
    )


def positional(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """Leading arguments without `=` become `name=value` for the given names (CLI sugar)."""
    out, i = [], 0
    for a in argv:
        if "=" not in a and i < len(names):
            out.append(f"{names[i]}={a}")
            i += 1
        else:
            out.append(a)
    return out


def _main(argv: list[str]) -> None:
    args = parse_args(ExportArgs, positional(argv, ("ckpt_dir", "out_dir")))
    check_export_args(args)
    export(args)


def main(argv: Optional[list[str]] = None) -> int:
    return run_cli(sys.argv[1:] if argv is None else argv, __doc__, _main)


if __name__ == "__main__":
    sys.exit(main())
