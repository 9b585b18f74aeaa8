"""Documents from `.jsonl` / `.jsonl.zst` shards and Hugging Face `datasets` streams.

Nothing here raises on bad data: a malformed JSON line, a line without a string `text`, invalid
UTF-8, an empty file or a truncated / corrupt `.zst` becomes a `Bad` entry (file, line, why) that
the caller counts (`data/skipped`) and reports. A missing path or a glob that matches nothing is a
`ConfigError` naming the config key, raised at start-up.

Positions are (decompressed byte offset, physical line number) at the start of a line, so a reader
restarts exactly where another stopped. `.zst` files cannot seek: a restart decompresses from the
beginning and drops the bytes before the offset (about 1 GB/s, once per resume).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qsl

from lingua_wd.args import ConfigError

log = logging.getLogger(__name__)
SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.zstd")
ZST = (".zst", ".zstd")
HF_PREFIX = "hf:"
BLOCK = 1 << 20  # compressed bytes read at a time
DONE = -1  # offset meaning "nothing more in this file" (after an unreadable tail)


class Bad(NamedTuple):
    """A skipped input: `line` is 0-based (reported 1-based)."""

    path: str
    line: int
    why: str

    def __str__(self) -> str:
        return f"{self.path} line {self.line + 1}: {self.why}"


class Truncated(Exception):
    pass


def resolve_files(pattern: str, key: str = "data.sources", suffixes: tuple[str, ...] = SUFFIXES) -> list[str]:
    """A file, a directory (all shards below it, sorted) or a glob -> sorted list of shard files."""
    p = Path(pattern).expanduser()
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes))
    elif p.is_file():
        files = [str(p)]
    elif glob.has_magic(pattern):
        files = sorted(f for f in glob.glob(str(p), recursive=True) if f.endswith(suffixes) and os.path.isfile(f))
    else:
        raise ConfigError(f"{key}: no such file or directory {p}")
    if not files:
        raise ConfigError(f"{key}: {p} contains no {' / '.join(suffixes)} files")
    return files


def fingerprint(files: list[str]) -> str:
    """Names (relative to their common folder) and sizes: moving the folder keeps it, adding,
    removing or rewriting a shard changes it."""
    base = os.path.commonpath([os.path.dirname(f) for f in files])
    text = "\n".join(f"{os.path.relpath(f, base)}:{os.path.getsize(f)}" for f in files)
    return f"{len(files)}:{hashlib.sha1(text.encode()).hexdigest()[:16]}"


def _blocks(path: str, offset: int) -> Iterator[bytes]:
    """Decompressed bytes from `offset` on; raises Truncated when a .zst ends mid-frame."""
    with open(path, "rb") as f:
        if not path.endswith(ZST):
            f.seek(offset)
            while block := f.read(BLOCK):
                yield block
            return
        import zstandard

        dctx = zstandard.ZstdDecompressor()
        dobj, in_frame = dctx.decompressobj(), False
        while comp := f.read(BLOCK):
            while comp:
                out, in_frame = dobj.decompress(comp), True
                if offset:
                    out, offset = out[offset:], max(0, offset - len(out))
                if out:
                    yield out
                comp = b""
                if dobj.eof:  # concatenated frames (e.g. pzstd output) continue in a new one
                    comp, dobj, in_frame = dobj.unused_data, dctx.decompressobj(), False
        if in_frame:
            raise Truncated("file ends mid-frame (truncated .zst)")


def read_lines(
    path: str, offset: int = 0, line: int = 0, stride: int = 1, residue: int = 0
) -> Iterator[tuple[bytes | Bad, int, int]]:
    """Yield (raw line or Bad, next offset, next line) for the non-blank lines n of `path` with
    n % stride == residue, starting at byte `offset`, the start of line `line`. An unreadable
    tail (truncated / corrupt .zst, I/O error) and an empty file are one Bad each, given to the
    lane that owns its line number; after a Bad the next offset is DONE."""
    if offset == DONE:
        return
    pending: list[bytes] = []
    any_line = offset > 0
    try:
        for block in _blocks(path, offset):
            parts = block.split(b"\n")
            if len(parts) == 1:  # inside a long line: collect its pieces, join once
                pending.append(block)
                continue
            if pending:
                parts[0] = b"".join(pending) + parts[0]
            pending = [parts.pop()]
            for raw in parts:
                offset += len(raw) + 1
                blank = not raw or raw.isspace()
                any_line |= not blank
                if line % stride == residue and not blank:
                    yield raw, offset, line + 1
                line += 1
        raw = b"".join(pending)
        if raw and not raw.isspace():  # a last line without "\n"
            any_line = True
            if line % stride == residue:
                yield raw, offset + len(raw), line + 1
        elif not any_line and line % stride == residue:
            yield Bad(path, line, "empty file (no documents)"), DONE, line
    except GeneratorExit:
        raise
    except Exception as err:  # zstd errors, Truncated, OSError: the rest of the file is unreadable
        if line % stride == residue:
            yield (
                Bad(path, line, f"unreadable from here on, rest of file skipped ({type(err).__name__}: {err})"),
                DONE,
                line,
            )


def clean_text(text: str) -> str:
    """Lone surrogates (valid JSON escapes, invalid Unicode) become U+FFFD so every tokenizer accepts the text."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def parse_line(raw: bytes, text_key: str = "text") -> tuple[str | None, str]:
    """(text, "") for a good line, (None, why) for a bad one."""
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"invalid UTF-8 at byte {err.start}"
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as err:
        return None, f"malformed JSON ({err.msg} at char {err.pos})"
    except (ValueError, RecursionError) as err:
        return None, f"malformed JSON ({type(err).__name__})"
    text = obj.get(text_key) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        return None, f"no string {text_key!r} field"
    return clean_text(text), ""


def read_docs(path: str, text_key: str = "text", on_bad: Callable[[Bad], None] | None = None) -> Iterator[str]:
    """One pass over a shard's documents in file order; bad lines go to on_bad (default: a warning)."""
    on_bad = on_bad or (lambda bad: log.warning("data: skipping %s", bad))
    for raw, _, line in read_lines(path):
        if isinstance(raw, Bad):
            on_bad(raw)
            continue
        text, why = parse_line(raw, text_key)
        if text is None:
            on_bad(Bad(path, line - 1, why))
        else:
            yield text


# ---- Hugging Face datasets (streaming) ----


def parse_hf(key: str, root_dir: str, config_key: str) -> dict:
    """`hf:<hub dataset or local json files>[?name=<config>&split=<split>]` -> a spec dict."""
    body, _, query = key[len(HF_PREFIX) :].partition("?")
    opts = dict(parse_qsl(query))
    unknown = set(opts) - {"name", "split", "data_dir"}
    if unknown:
        raise ConfigError(f"{config_key}: unknown option(s) {sorted(unknown)} (known: name, split, data_dir)")
    spec = {
        "path": body,
        "name": opts.get("name"),
        "split": opts.get("split", "train"),
        "data_dir": opts.get("data_dir"),
    }
    local = Path(body).expanduser()
    if not local.is_absolute():
        local = Path(root_dir).expanduser() / local
    if local.exists() or glob.has_magic(body):
        spec["data_files"] = resolve_files(str(local), config_key, SUFFIXES + (".json",))
    elif body.startswith((".", "/", "~")):
        raise ConfigError(f"{config_key}: no such file or directory {local}")
    return spec


_HF_DATASETS: dict[str, object] = {}  # one load_dataset per spec and process, shared by its lanes


def open_hf(spec: dict, lane: int, lanes: int):
    """This lane's part of the stream: `split_dataset_by_node` with the lanes as nodes."""
    from datasets import load_dataset
    from datasets.distributed import split_dataset_by_node

    key = json.dumps(spec, sort_keys=True)
    if key not in _HF_DATASETS:
        if spec.get("data_files"):
            ds = load_dataset("json", data_files=spec["data_files"], split="train", streaming=True)
        else:
            kw = {k: spec[k] for k in ("name", "data_dir") if spec.get(k)}
            ds = load_dataset(spec["path"], split=spec["split"], streaming=True, **kw)
        _HF_DATASETS[key] = ds
    return split_dataset_by_node(_HF_DATASETS[key], rank=lane, world_size=lanes)  # a new object each time
