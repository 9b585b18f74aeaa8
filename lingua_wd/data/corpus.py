"""The bundled corpus: real human-written text available offline on every machine.

The Python standard library's own sources (code, docstrings and comments written by people; the
library first, its test suite after, up to `max_bytes`, valid UTF-8 only) are packed into
`.jsonl.zst` shards on first use: `<root>/stdlib/train/shard_XX.jsonl.zst` (64 shards, one per
default lane) and `<root>/stdlib/val/val.jsonl.zst` (every 20th file held out). The file list is
sorted, so every machine with the same Python version builds the same corpus. Building takes about
a second; it is atomic (built aside, renamed), so concurrent ranks are safe.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)
DEFAULT_ROOT = Path("~/.cache/lingua_wd/corpus").expanduser()
VERSION = 2  # bump when the layout changes: an older corpus is rebuilt
EXCLUDE_DIRS = {"site-packages", "dist-packages", "__pycache__"}
TEST_DIRS = {"test", "tests"}


def show_progress() -> bool:
    """Progress bars on rank 0 (RANK unset or 0) in a terminal only: never in logs, never in metrics.jsonl."""
    return os.environ.get("RANK", "0") == "0" and sys.stderr.isatty()


def progress(items: Iterable, total: int, desc: str, unit: str = "it") -> Iterable:
    """`items` with a tqdm bar on stderr where show_progress() allows, else `items` unchanged."""
    if not show_progress():
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


def stdlib_files(max_bytes: int) -> list[Path]:
    """The stdlib's .py files, library before tests, sorted, until max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDE_DIRS]
        found += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    found.sort(key=lambda p: (bool(TEST_DIRS & set(p.relative_to(root).parts)), str(p)))
    files, total = [], 0
    for path in found:
        if total >= max_bytes:
            break
        files.append(path)
        total += path.stat().st_size
    return files


def _write_shard(path: Path, docs: list[dict]) -> None:
    import zstandard

    with open(path, "wb") as f, zstandard.ZstdCompressor(level=3).stream_writer(f) as w:
        for d in docs:
            w.write((json.dumps(d) + "\n").encode())


def _done(out: Path) -> dict | None:
    try:
        return json.loads((out / "DONE").read_text())
    except (OSError, ValueError):
        return None


def ensure_stdlib_corpus(root: str | os.PathLike = DEFAULT_ROOT, max_bytes: int = 32 << 20, n_shards: int = 64) -> Path:
    """Build the corpus under root/stdlib unless the current version is already there."""
    out = Path(root).expanduser() / "stdlib"
    if (_done(out) or {}).get("version") == VERSION:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the bundled corpus from the Python standard library into %s", out)
    t0 = time.perf_counter()
    train, val = [], []
    files = stdlib_files(max_bytes)
    for i, path in enumerate(progress(files, len(files), "corpus: reading the stdlib", "file")):
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        doc = {"text": text, "url": f"python-stdlib/{path.relative_to(sysconfig.get_paths()['stdlib'])}"}
        (val if i % 20 == 19 else train).append(doc)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        stage = Path(tmp) / "stdlib"
        (stage / "train").mkdir(parents=True)
        (stage / "val").mkdir()
        for k in progress(range(n_shards), n_shards, "corpus: writing shards", "shard"):
            _write_shard(stage / "train" / f"shard_{k:02d}.jsonl.zst", train[k::n_shards])
        _write_shard(stage / "val" / "val.jsonl.zst", val)
        info = {"version": VERSION, "train_docs": len(train), "val_docs": len(val)}
        (stage / "DONE").write_text(json.dumps(info))
        if (_done(out) or {}).get("version") == VERSION:  # another process finished first: keep its corpus
            return out
        if out.exists():  # an older version: move it aside (into tmp, deleted with it)
            try:
                out.rename(Path(tmp) / "old")
            except OSError:
                pass
        try:
            stage.rename(out)
        except OSError:  # another process built it first
            if (_done(out) or {}).get("version") != VERSION:
                raise
    log.info("built the bundled corpus: %d train and %d val documents in %.1f s", len(train), len(val),
             time.perf_counter() - t0)  # fmt: skip
    return out


def corpus_texts(
    split: str = "train", max_bytes: int = 1 << 62, root: str | os.PathLike = DEFAULT_ROOT
) -> Iterator[str]:
    """The documents of one split of the bundled corpus, in shard order, up to max_bytes."""
    from lingua_wd.data.sources import read_docs

    total = 0
    for shard in sorted((ensure_stdlib_corpus(root) / split).glob("*.jsonl.zst")):
        for text in read_docs(str(shard)):
            yield text
            total += len(text)
            if total >= max_bytes:
                return
