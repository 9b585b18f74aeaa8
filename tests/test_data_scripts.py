"""scripts/prepare_dclm.py (shuffle + split) and scripts/bench_data.py (loader throughput)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import zstandard

from lingua_wd.data.sources import read_docs

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shard(path: Path, docs: list[str], extra: bytes = b"") -> None:
    raw = b"".join(json.dumps({"text": d, "url": "u", "metadata": {"k": 1}}).encode() + b"\n" for d in docs) + extra
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(raw) if path.name.endswith(".zst") else raw)


def test_prepare_dclm_shuffles_and_splits_every_document_once(tmp_path):
    docs = [f"document {i} " + "word " * (i % 17) for i in range(900)]
    raw = tmp_path / "raw"
    shard(raw / "global-shard_01_of_10" / "local-shard_0_of_10" / "shard_00000000_processed.jsonl.zst", docs[:400])
    shard(raw / "global-shard_01_of_10" / "local-shard_1_of_10" / "shard_00000000_processed.jsonl.zst", docs[400:800])
    shard(raw / "extra.jsonl", docs[800:], extra=b"\n{broken\n")
    out = tmp_path / "prepared"
    prepare = load("prepare_dclm")
    info = prepare.main(
        [str(raw), "--out", str(out), "--chunks", "4", "--val-docs", "50", "--bucket-mb", "0.01", "--check"]
    )
    assert info == {"inputs": 3, "chunks": 4, "train_docs": 850, "val_docs": 50, "dropped": 1, "seed": 0}
    chunks = sorted((out / "train").iterdir())
    assert [c.name for c in chunks] == [f"chunk_{k:02d}.jsonl.zst" for k in range(4)]
    train = [list(read_docs(str(c))) for c in chunks]
    val = list(read_docs(str(out / "val" / "val.jsonl.zst")))
    assert len(val) == 50 and sorted(sum(train, []) + val) == sorted(docs)
    assert max(map(len, train)) - min(map(len, train)) <= 1
    assert [d for c in train for d in c][:50] != docs[:50], "shuffled"
    assert json.loads((out / "DONE").read_text())["train_docs"] == 850
    assert not (out / "tmp").exists()
    with pytest.raises(SystemExit, match="already prepared"):
        prepare.main([str(raw), "--out", str(out)])
    again = tmp_path / "again"
    prepare.main([str(raw), "--out", str(again), "--chunks", "4", "--val-docs", "50", "--bucket-mb", "0.01", "--check"])
    assert all((again / "train" / c.name).read_bytes() == c.read_bytes() for c in chunks), "seeded"


def test_bench_data_runs_and_writes_its_section(tmp_path):
    bench = load("bench_data")
    out = tmp_path / "bench.md"
    rows = bench.main(
        ["--workers", "0", "1", "--tokenizer", "bytes", "--seconds", "0.3", "--warmup", "0"]
        + ["--seq-len", "64", "--batch", "8", "--lanes", "8", "--out", str(out)]
    )
    assert [r["workers"] for r in rows] == [0, 1] and all(r["tokens_per_s"] > 1e4 for r in rows)
    text = out.read_text()
    assert text.startswith("## Data loader throughput") and "| bytes (258) | 1 |" in text and "Machine:" in text
