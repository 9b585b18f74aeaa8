"""Tokenizers: bytes, locally trained bpe, HF tokenizer.json, llama3 tiktoken format."""

from __future__ import annotations

import base64
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from lingua_wd.args import ConfigError
from lingua_wd.data.tokenizers import (
    LLAMA3_SPECIAL,
    MAX_RUN_CHARS,
    TiktokenTokenizer,
    TokenizerArgs,
    _split_runs,
    build_tokenizer,
    train_bpe,
)

TEXTS = [
    "",
    "hello world",
    "def f(x):\n    return x ** 2  # comment\n",
    "naïve café — ünïcödé 😀 中文",
    "the thing in the ring\t\r\n",
]


def check_round_trip(tok) -> None:
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.encode(text, bos=False, eos=False) == ids[1:-1]
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)
        arr = tok.encode_array(text)
        assert arr.dtype == np.int32 and arr.tolist() == ids
    clone = pickle.loads(pickle.dumps(tok))  # what the worker processes get
    assert clone.encode(TEXTS[3]) == tok.encode(TEXTS[3]) and clone.vocab_size == tok.vocab_size


def test_bytes():
    tok = build_tokenizer(TokenizerArgs())
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (258, 256, 257)
    assert tok.encode("hé", bos=False, eos=False) == [104, 195, 169]
    check_round_trip(tok)


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "bpe.json"
    start = time.time()
    build_tokenizer(TokenizerArgs(name="bpe", path=str(path), vocab_size=1024))
    assert time.time() - start < 60, "bpe training takes seconds"
    return path


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_bpe_is_trained_once_deterministically_and_round_trips(bpe_file, tmp_path):
    tok = build_tokenizer(TokenizerArgs(name="bpe", path=str(bpe_file), vocab_size=1024))
    assert tok.vocab_size == 1024
    assert len(tok.encode("def __init__(self):\n    return None", bos=False, eos=False)) < 20  # it learnt Python
    check_round_trip(tok)
    mtime = bpe_file.stat().st_mtime_ns
    build_tokenizer(TokenizerArgs(name="bpe", path=str(bpe_file), vocab_size=1024))
    assert bpe_file.stat().st_mtime_ns == mtime, "the cached file is reused"
    a, b = train_bpe(600, tmp_path / "a.json", 1 << 20), train_bpe(600, tmp_path / "b.json", 1 << 20)
    assert a.read_bytes() == b.read_bytes(), "ranks on other machines train the same tokenizer"


def test_hf_tokenizer_json(bpe_file, tmp_path):
    tok = build_tokenizer(TokenizerArgs(name="hf", path=str(bpe_file)))  # BOS/EOS detected
    assert (tok.bos_id, tok.eos_id) == (tok.tok.token_to_id("<|bos|>"), tok.tok.token_to_id("<|eos|>"))
    check_round_trip(tok)
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel()
    plain.train_from_iterator(["some text"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>"]))
    plain.save(str(tmp_path / "plain.json"))
    with pytest.raises(ConfigError, match=r"^data\.tokenizer\.bos: .*has no token"):
        build_tokenizer(TokenizerArgs(name="hf", path=str(tmp_path / "plain.json")))
    tok = build_tokenizer(TokenizerArgs(name="hf", path=str(tmp_path / "plain.json"), bos="<pad>", eos="<pad>"))
    assert tok.bos_id == tok.eos_id == plain.token_to_id("<pad>")


def test_config_errors():
    with pytest.raises(ConfigError, match=r"^data\.tokenizer\.name: unknown tokenizer 'sentencepiece'"):
        build_tokenizer(TokenizerArgs(name="sentencepiece"))
    with pytest.raises(ConfigError, match=r"^data\.tokenizer\.path: .*needs a file"):
        build_tokenizer(TokenizerArgs(name="llama3"))
    with pytest.raises(ConfigError, match=r"^data\.tokenizer\.path: no such file"):
        build_tokenizer(TokenizerArgs(name="hf", path="/nonexistent/tokenizer.json"))


@pytest.fixture()
def tiny_tiktoken_model(tmp_path) -> Path:
    """A tokenizer.model in Meta's format (base64 token, rank) with 256 bytes and a few merges."""
    tokens = [bytes([b]) for b in range(256)] + [b"th", b"he", b"the", b" the", b"in", b"ing", b" th"]
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


def test_tiktoken_loads_metas_format_with_llama3_special_tokens(tiny_tiktoken_model):
    tok = build_tokenizer(TokenizerArgs(name="llama3", path=str(tiny_tiktoken_model)))
    n = 256 + 7
    assert len(LLAMA3_SPECIAL) == 256
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (n + 256, n, n + 1)
    assert tok.encode(" the", bos=False, eos=False) == [259]
    check_round_trip(tok)
    # special-token text inside a document is plain text, never a control token
    ids = tok.encode("<|begin_of_text|>", bos=False, eos=False)
    assert tok.bos_id not in ids and tok.decode(ids) == "<|begin_of_text|>"


def test_tiktoken_cuts_long_runs_like_meta(tiny_tiktoken_model):
    tok = TiktokenTokenizer(str(tiny_tiktoken_model))
    text = "x" * (MAX_RUN_CHARS + 10) + " the " + " " * (MAX_RUN_CHARS * 2 + 3) + "end"
    pieces = _split_runs(text, MAX_RUN_CHARS)
    assert "".join(pieces) == text and len(pieces) == 4
    assert tok._pieces(text) == pieces
    expected = [i for p in pieces for i in tok.model.encode_ordinary(p)]
    assert tok.encode(text, bos=False, eos=False) == expected
    short_runs = "ab " * 20_000  # long, but no long run: one piece, fast path
    assert tok._pieces(short_runs) == [short_runs]


def _llama3_path() -> str | None:
    candidates = [os.environ.get("LLAMA3_TOKENIZER", ""), "~/.llama/checkpoints/Meta-Llama-3-8B/tokenizer.model"]
    return next((str(Path(c).expanduser()) for c in candidates if c and Path(c).expanduser().is_file()), None)


@pytest.mark.skipif(_llama3_path() is None, reason="no llama3 tokenizer.model (set LLAMA3_TOKENIZER)")
def test_real_llama3_tokenizer():
    tok = build_tokenizer(TokenizerArgs(name="llama3", path=_llama3_path()))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (128_256, 128_000, 128_001)
    assert tok.encode("hello world", bos=False, eos=False) == [15339, 1917]
    check_round_trip(tok)
