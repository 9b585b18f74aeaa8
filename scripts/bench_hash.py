"""Checkpoint checksum cost: xxh3_64 (as lingua_wd.checkpoint.file_hash computes it) vs crc32 and vs
writing and reading the same bytes with torch.save / torch.load.

    python scripts/bench_hash.py [--gib 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lingua_wd.checkpoint import file_hash  # noqa: E402


def best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def crc32_file(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0, help="size of the test file (fp32 tensor)")
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.pt"
        tensor = torch.randn(int(opts.gib * 2**28))
        t0 = time.perf_counter()
        torch.save(tensor, path)
        os.sync()
        write = time.perf_counter() - t0
        gb = path.stat().st_size / 1e9
        xxh = best(lambda: file_hash(path))  # the file was just written: in the page cache, as after a save
        crc = best(lambda: crc32_file(path))
        load = best(lambda: torch.load(path), repeat=1)
    print(f"file {gb:.2f} GB")
    print(f"torch.save + sync  {write:6.2f} s  {gb / write:6.2f} GB/s")
    print(f"torch.load         {load:6.2f} s  {gb / load:6.2f} GB/s")
    print(f"xxh3_64 (mmap)     {xxh:6.2f} s  {gb / xxh:6.2f} GB/s")
    print(f"crc32 (zlib)       {crc:6.2f} s  {gb / crc:6.2f} GB/s")


if __name__ == "__main__":
    main()
