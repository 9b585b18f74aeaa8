"""Shuffle downloaded DCLM shards and split them into N training chunks plus a validation file.

    python scripts/prepare_dclm.py /data/dclm/raw --out /data/dclm/prepared --chunks 64 --val-docs 10000

Inputs: files, folders (searched recursively) or globs of `.jsonl` / `.jsonl.zst` shards, e.g. DCLM's
`global-shard_01_of_10/local-shard_0_of_10/shard_00000000_processed.jsonl.zst`. Outputs:
    OUT/train/chunk_XX.jsonl.zst   --chunks shuffled chunks (make it data.lanes, 64: one file per lane)
    OUT/val/val.jsonl.zst          the first --val-docs documents of the shuffle
    OUT/DONE                       counts, as JSON (written last: its presence means complete)
Then train with `data.root_dir=OUT data.sources={train: 1.0} data.val_sources=val`.

The shuffle is an external-memory two-pass shuffle, no external tool: pass 1 sends each line to one
of B temporary bucket files at random, pass 2 shuffles each bucket in memory and deals its lines
round-robin to the chunks. Memory is about one bucket (--bucket-mb of text); temporary disk about
the compressed input size. Lines are copied unchanged (every DCLM field kept); with --check the
lines that the loader would skip (bad JSON, no text, bad UTF-8) are dropped here instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

import zstandard
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lingua_wd.data.sources import SUFFIXES, Bad, parse_line, read_lines, resolve_files  # noqa: E402

ZSTD_RATIO = 4  # assumed decompressed / compressed size, to size the buckets


def input_files(inputs: list[str]) -> list[str]:
    return sorted({f for pattern in inputs for f in resolve_files(pattern, "inputs", SUFFIXES)})


def scatter(files: list[str], tmp: Path, n_buckets: int, seed: int, check: bool) -> tuple[int, int]:
    """Pass 1: every line to a random bucket. Returns (lines kept, lines dropped)."""
    rng = random.Random(f"scatter-{seed}")
    handles = [open(tmp / f"bucket_{b:05d}.jsonl.zst", "wb") for b in range(n_buckets)]
    writers = [zstandard.ZstdCompressor(level=1).stream_writer(h) for h in handles]  # a compressor each
    kept = dropped = 0
    with tqdm(total=sum(os.path.getsize(f) for f in files), unit="B", unit_scale=True, desc="pass 1/2 scatter") as bar:
        for path in files:
            for raw, _, line in read_lines(path):
                if isinstance(raw, Bad) or (check and parse_line(raw)[0] is None):
                    dropped += 1
                    tqdm.write(f"dropping {raw if isinstance(raw, Bad) else Bad(path, line - 1, parse_line(raw)[1])}")
                    continue
                writers[rng.randrange(n_buckets)].write(raw + b"\n")
                kept += 1
            bar.update(os.path.getsize(path))
            bar.set_postfix(docs=kept)
    for w in writers:
        w.close()
    return kept, dropped


def gather(
    tmp: Path, out: Path, n_buckets: int, n_chunks: int, val_docs: int, seed: int, total: int
) -> tuple[int, int]:
    """Pass 2: shuffle each bucket, the first val_docs lines to val, the rest dealt to the chunks."""
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "val").mkdir(parents=True, exist_ok=True)
    paths = [out / "val" / "val.jsonl.zst"] + [out / "train" / f"chunk_{k:02d}.jsonl.zst" for k in range(n_chunks)]
    handles = [open(p, "wb") for p in paths]
    writers = [zstandard.ZstdCompressor(level=3).stream_writer(h) for h in handles]
    n_val = n_train = 0
    with tqdm(total=total, unit="doc", desc="pass 2/2 shuffle+split") as bar:
        for b in range(n_buckets):
            bucket = tmp / f"bucket_{b:05d}.jsonl.zst"
            lines = [raw for raw, _, _ in read_lines(str(bucket)) if not isinstance(raw, Bad)]  # a bucket may be empty
            bucket.unlink()
            random.Random(f"gather-{seed}-{b}").shuffle(lines)
            for raw in lines:
                if n_val < val_docs:
                    writers[0].write(raw + b"\n")
                    n_val += 1
                else:
                    writers[1 + n_train % n_chunks].write(raw + b"\n")
                    n_train += 1
            bar.update(len(lines))
    for w in writers:
        w.close()
    return n_train, n_val


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="shard files, folders or globs (.jsonl / .jsonl.zst)")
    p.add_argument("--out", required=True, help="output folder (train/, val/, DONE)")
    p.add_argument("--chunks", type=int, default=64, help="number of training chunks (= data.lanes is best)")
    p.add_argument("--val-docs", type=int, default=10_000, help="documents held out for validation")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--bucket-mb", type=float, default=1024, help="text per shuffle bucket (the memory needed)")
    p.add_argument("--tmp", default="", help="temporary folder (default OUT/tmp)")
    p.add_argument("--check", action="store_true", help="drop lines the loader would skip (parses every line)")
    p.add_argument("--force", action="store_true", help="overwrite a complete OUT")
    a = p.parse_args(argv)
    out = Path(a.out).expanduser()
    if (out / "DONE").exists() and not a.force:
        sys.exit(f"{out} is already prepared (DONE exists); use --force to redo it")
    files = input_files(a.inputs)
    size = sum(os.path.getsize(f) * (ZSTD_RATIO if f.endswith((".zst", ".zstd")) else 1) for f in files)
    n_buckets = max(1, math.ceil(size / (a.bucket_mb * 2**20)))
    tmp = Path(a.tmp).expanduser() if a.tmp else out / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"{len(files)} input files, about {size / 1e9:.1f} GB of text, {n_buckets} buckets in {tmp}")
    kept, dropped = scatter(files, tmp, n_buckets, a.seed, a.check)
    n_train, n_val = gather(tmp, out, n_buckets, a.chunks, a.val_docs, a.seed, kept)
    shutil.rmtree(tmp, ignore_errors=True)
    info = {
        "inputs": len(files),
        "chunks": a.chunks,
        "train_docs": n_train,
        "val_docs": n_val,
        "dropped": dropped,
        "seed": a.seed,
    }
    (out / "DONE").write_text(json.dumps(info))
    print(
        f"done: {json.dumps(info)}\ntrain with: data.root_dir={out} 'data.sources={{train: 1.0}}' data.val_sources=val"
    )
    return info


if __name__ == "__main__":
    main()
