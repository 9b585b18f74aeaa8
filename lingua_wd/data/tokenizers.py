"""Tokenizers: bytes (built in), bpe (trained here on the bundled corpus), hf (any tokenizer.json),
tiktoken / llama3 (Meta's tokenizer.model).

Every tokenizer has `vocab_size`, `bos_id`, `eos_id`, `encode(text, bos, eos) -> list[int]`,
`decode(ids) -> str` (BOS and EOS ids are dropped) and `encode_array(text) -> int32 array with BOS
and EOS`, the loader's fast path. Each pickles as its file path, so worker processes rebuild it
cheaply. The model's vocabulary size is `tokenizer.vocab_size`.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lingua_wd.args import ConfigError

log = logging.getLogger(__name__)

CACHE_DIR = Path("~/.cache/lingua_wd").expanduser()


@dataclass
class TokenizerArgs:
    name: str = "bytes"  # bytes | bpe (trained here) | hf (tokenizer.json) | tiktoken = llama3 (tokenizer.model)
    path: str = ""  # the tokenizer file (hf, tiktoken, llama3); for bpe its cache ("" = ~/.cache/lingua_wd/tokenizers/)
    vocab_size: int = 8192  # bpe only: vocabulary size to train, BOS/EOS included
    bos: str = ""  # hf only: BOS token text ("" = detect <|begin_of_text|>, <s>, <bos>, <|bos|>, <|endoftext|>)
    eos: str = ""  # hf only: EOS token text ("" = detect <|end_of_text|>, </s>, <eos>, <|eos|>, <|endoftext|>)


def _with_bos_eos(ids: list[int], bos: int, eos: int) -> np.ndarray:
    out = np.empty(len(ids) + 2, dtype=np.int32)
    out[0], out[1:-1], out[-1] = bos, ids, eos
    return out


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255, then BOS = 256 and EOS = 257."""

    bos_id, eos_id, vocab_size = 256, 257, 258

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8", errors="replace"))
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_array(self, text: str) -> np.ndarray:
        raw = text.encode("utf-8", errors="replace")
        out = np.empty(len(raw) + 2, dtype=np.int32)
        out[1:-1] = np.frombuffer(raw, dtype=np.uint8)
        out[0], out[-1] = self.bos_id, self.eos_id
        return out

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """Any Hugging Face `tokenizer.json`, through the `tokenizers` library (no transformers)."""

    BOS = ("<|begin_of_text|>", "<s>", "<bos>", "<|bos|>", "<|endoftext|>")
    EOS = ("<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|endoftext|>")

    def __init__(self, path: str, bos: str = "", eos: str = ""):
        from tokenizers import Tokenizer

        self.path, self._bos, self._eos = path, bos, eos
        self.tok = Tokenizer.from_file(path)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special(bos, self.BOS, "data.tokenizer.bos")
        self.eos_id = self._special(eos, self.EOS, "data.tokenizer.eos")

    def _special(self, given: str, candidates: tuple[str, ...], key: str) -> int:
        for text in [given] if given else candidates:
            idx = self.tok.token_to_id(text)
            if idx is not None:
                return idx
        wanted = repr(given) if given else f"any of {', '.join(candidates)}"
        raise ConfigError(f"{key}: {self.path} has no token {wanted}; set {key} to its BOS/EOS token text")

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_array(self, text: str) -> np.ndarray:
        if hasattr(self.tok, "encode_batch_fast"):  # tokenizers >= 0.21: no offsets, about 30% faster
            ids = self.tok.encode_batch_fast([text], add_special_tokens=False)[0].ids
        else:
            ids = self.tok.encode(text, add_special_tokens=False).ids
        return _with_bos_eos(ids, self.bos_id, self.eos_id)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i not in (self.bos_id, self.eos_id)], skip_special_tokens=False)

    def __reduce__(self):
        return HFTokenizer, (self.path, self._bos, self._eos)


# Meta's llama3 tokenizer (meta-llama/llama3 llama/tokenizer.py): the cl100k-style split pattern,
# 256 special tokens appended after the base ranks, and long inputs cut the way Meta cuts them.
LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]
MAX_ENCODE_CHARS = 400_000  # tiktoken is slow (and used to crash) on very long inputs
MAX_RUN_CHARS = 25_000  # ... and on very long runs of whitespace or of non-whitespace
_LONG_RUN = re.compile(rf"(?<!\s)\s{{{MAX_RUN_CHARS + 1}}}|(?<!\S)\S{{{MAX_RUN_CHARS + 1}}}")


def load_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """A tiktoken BPE file: one `base64(token) rank` line per token (Meta's tokenizer.model)."""
    ranks = {}
    for n, line in enumerate(Path(path).read_bytes().splitlines()):
        if line.strip():
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:
                raise ConfigError(f"data.tokenizer.path: {path} line {n + 1} is not `base64token rank`") from None
    return ranks


def _split_runs(s: str, max_len: int) -> list[str]:
    """Meta's _split_whitespaces_or_nonwhitespaces: cut runs of one kind longer than max_len."""
    out, run, is_space, start = [], 0, s[:1].isspace(), 0
    for i, ch in enumerate(s):
        now = ch.isspace()
        if now != is_space:
            run, is_space = 1, now
        else:
            run += 1
            if run > max_len:
                out.append(s[start:i])
                start, run = i, 1
    out.append(s[start:])
    return out


class TiktokenTokenizer:
    """Meta's llama3 `tokenizer.model`: 128,000 BPE ranks + 256 special tokens = 128,256 ids."""

    def __init__(self, path: str):
        import tiktoken

        self.path = path
        ranks = load_tiktoken_ranks(path)
        special = {tok: len(ranks) + i for i, tok in enumerate(LLAMA3_SPECIAL)}
        self.model = tiktoken.Encoding(
            name=Path(path).name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special
        )
        self.vocab_size = self.model.n_vocab
        self.bos_id, self.eos_id = special["<|begin_of_text|>"], special["<|end_of_text|>"]

    def _pieces(self, text: str) -> list[str]:
        if len(text) <= MAX_RUN_CHARS:
            return [text]
        cuts = [text[i : i + MAX_ENCODE_CHARS] for i in range(0, len(text), MAX_ENCODE_CHARS)]
        # the per-character split is slow, so only run it where a long run exists (same result)
        return [p for c in cuts for p in (_split_runs(c, MAX_RUN_CHARS) if _LONG_RUN.search(c) else [c])]

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        ids = [i for piece in self._pieces(text) for i in self.model.encode_ordinary(piece)]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_array(self, text: str) -> np.ndarray:
        return _with_bos_eos(self.encode(text, bos=False, eos=False), self.bos_id, self.eos_id)

    def decode(self, ids: list[int]) -> str:
        return self.model.decode([i for i in ids if i not in (self.bos_id, self.eos_id)])

    def __reduce__(self):
        return TiktokenTokenizer, (self.path,)


BPE_SPECIAL = ["<|bos|>", "<|eos|>"]


def bpe_path(args: TokenizerArgs) -> Path:
    return (
        Path(args.path).expanduser() if args.path else CACHE_DIR / "tokenizers" / f"stdlib-bpe-{args.vocab_size}.json"
    )


def train_bpe(vocab_size: int, out: Path, max_bytes: int = 8 << 20) -> Path:
    """Train a byte-level BPE on the bundled corpus's train split (seconds; deterministic) and
    publish it at `out`. The first writer wins (hard link), so concurrent ranks share one file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lingua_wd.data.corpus import corpus_texts, show_progress

    log.info("training a byte-level BPE tokenizer (vocab %d) on %d MB of the bundled corpus -> %s",
             vocab_size, max_bytes >> 20, out)  # fmt: skip
    t0 = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=BPE_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress(),  # the tokenizers library's own bars, on rank 0 in a terminal
    )
    tok.train_from_iterator(corpus_texts("train", max_bytes), trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    tok.save(str(tmp))
    try:
        os.link(tmp, out)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    log.info("trained the BPE tokenizer in %.1f s", time.perf_counter() - t0)
    return out


def _build_bpe(args: TokenizerArgs) -> HFTokenizer:
    if args.vocab_size < 512:
        raise ConfigError(f"data.tokenizer.vocab_size: must be >= 512 for bpe, got {args.vocab_size}")
    path = bpe_path(args)
    if not path.is_file():
        train_bpe(args.vocab_size, path)
    return HFTokenizer(str(path), *BPE_SPECIAL)


def _file(args: TokenizerArgs) -> str:
    if not args.path:
        raise ConfigError(f"data.tokenizer.path: tokenizer {args.name!r} needs a file path")
    path = Path(args.path).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.tokenizer.path: no such file {path}")
    return str(path)


TOKENIZERS = {
    "bytes": lambda a: ByteTokenizer(),
    "bpe": _build_bpe,
    "hf": lambda a: HFTokenizer(_file(a), a.bos, a.eos),
    "tiktoken": lambda a: TiktokenTokenizer(_file(a)),
    "llama3": lambda a: TiktokenTokenizer(_file(a)),
}


def build_tokenizer(args: TokenizerArgs):
    """The tokenizer named by `data.tokenizer.name` (see TOKENIZERS)."""
    if args.name not in TOKENIZERS:
        raise ConfigError(f"data.tokenizer.name: unknown tokenizer {args.name!r} (choose from {sorted(TOKENIZERS)})")
    return TOKENIZERS[args.name](args)
