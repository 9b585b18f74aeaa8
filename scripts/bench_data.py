"""Loader throughput: tokens/s that one rank's TrainLoader hands to the trainer, per worker count.

    python scripts/bench_data.py --workers 1 8 14 --tokenizer bytes bpe

Runs on the bundled corpus by default (--root-dir / --sources for your shards; --tokenizer llama3
--tokenizer-path .../tokenizer.model for Meta's tokenizer). Each setting builds a fresh loader,
times its first batch (worker start-up), takes --warmup batches, then counts tokens for --seconds.
Prints a table and writes it, with the machine, as a markdown section to --out (default
dumps/bench/benchmarks_data.md, relative to the current directory). For reference, one H100 trains about 225k tokens/s at d=512.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lingua_wd.data import DataArgs, TokenizerArgs, TrainLoader, build_tokenizer, prepare_data  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except Exception:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores available{gpu}, Python {platform.python_version()}, {platform.system()}"


def bpe_as_tiktoken(path: Path) -> str:
    """The bpe vocabulary as a tiktoken file (Meta's format), encoded with the llama3 pattern: a
    stand-in that times the llama3 code path when Meta's tokenizer.model is not at hand."""
    bpe = build_tokenizer(TokenizerArgs(name="bpe"))
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's byte <-> unicode table
    chars = {chr(b): b for b in printable} | {
        chr(256 + i): b for i, b in enumerate(sorted(set(range(256)) - set(printable)))
    }
    vocab = sorted((i, t) for t, i in bpe.tok.get_vocab().items() if not t.startswith("<|"))
    lines = [f"{base64.b64encode(bytes(chars[c] for c in t)).decode()} {rank}" for rank, (_, t) in enumerate(vocab)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def measure(args: DataArgs, tokenizer, seconds: float, warmup: int) -> dict:
    loader = TrainLoader(args, tokenizer, 0, 1)
    try:
        start = time.perf_counter()
        loader.next_batch()
        first = time.perf_counter() - start
        for _ in range(warmup):
            loader.next_batch()
        tokens, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            tokens += loader.next_batch().numel()
        elapsed = time.perf_counter() - start
    finally:
        loader.close()
    return {"tokens_per_s": tokens / elapsed, "first_batch_s": first}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 8, 14], help="worker counts to time (0 = in process)")
    p.add_argument(
        "--tokenizer",
        nargs="+",
        default=["bytes", "bpe"],
        help="bytes, bpe, hf, llama3, tiktoken-bpe (see bpe_as_tiktoken)",
    )
    p.add_argument("--tokenizer-path", default="", help="tokenizer file for hf / llama3")
    p.add_argument("--root-dir", default="~/.cache/lingua_wd/corpus", help="data.root_dir")
    p.add_argument("--sources", nargs="*", default=[], help="name=weight ... (default: the bundled corpus)")
    p.add_argument("--seq-len", type=int, default=4096, help="data.seq_len")
    p.add_argument("--batch", type=int, default=64, help="sequences per batch (one rank)")
    p.add_argument("--lanes", type=int, default=64, help="data.lanes")
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per setting")
    p.add_argument("--warmup", type=int, default=3, help="batches before timing")
    p.add_argument(
        "--out",
        default="dumps/bench/benchmarks_data.md",  # not the source tree: docs/ only when named
        help="markdown file ('' = none)",
    )
    a = p.parse_args(argv)
    sources = {s.split("=")[0]: float(s.split("=")[1]) for s in a.sources}
    rows = []
    tmp = tempfile.TemporaryDirectory()
    for name in a.tokenizer:
        tok_args = TokenizerArgs(name=name, path=a.tokenizer_path if name in ("hf", "llama3", "tiktoken") else "")
        if name == "tiktoken-bpe":
            tok_args = TokenizerArgs(name="tiktoken", path=bpe_as_tiktoken(Path(tmp.name) / "tokenizer.model"))
        data = DataArgs(
            root_dir=a.root_dir,
            sources=sources,
            val_sources="",
            seq_len=a.seq_len,
            batch_size=a.batch,
            micro_batch_size=1,
            lanes=a.lanes,
            tokenizer=tok_args,
        )
        prepare_data(data)
        tokenizer = build_tokenizer(tok_args)
        for workers in a.workers:
            data.workers = workers
            r = {
                "tokenizer": name,
                "vocab": tokenizer.vocab_size,
                "workers": workers,
                **measure(data, tokenizer, a.seconds, a.warmup),
            }
            rows.append(r)
            print(
                f"{name:>8}  workers={workers:<3} {r['tokens_per_s'] / 1e6:8.2f} M tokens/s   first batch {r['first_batch_s']:.2f} s",
                flush=True,
            )
    table = [
        "| tokenizer (vocab) | workers | tokens/s | tokens/s per worker | first batch |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        per = r["tokens_per_s"] / max(r["workers"], 1)
        table.append(
            f"| {r['tokenizer']} ({r['vocab']:,}) | {r['workers']} | {r['tokens_per_s'] / 1e6:.2f} M | {per / 1e6:.2f} M | {r['first_batch_s']:.2f} s |"
        )
    corpus = ", ".join(f"{k}={v}" for k, v in sources.items()) or "the bundled corpus (Python stdlib sources)"
    section = "\n".join(
        [
            "## Data loader throughput",
            "",
            f"Machine: {machine()}. Date: {datetime.date.today()}.",
            f"Command: `python scripts/bench_data.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
            f"One rank, seq_len {a.seq_len}, {a.batch} sequences per batch, {a.lanes} lanes, data: {corpus}; "
            f"tokens/s handed to the trainer after {a.warmup} warm-up batches, timed for {a.seconds:g} s.",
            "",
            *table,
            "",
            "For scale: one H100 trains about 225k tokens/s at d=512, so a rank needs that much from its loader.",
            "tiktoken-bpe is the bpe vocabulary run through the llama3 code path (tiktoken, Meta's split pattern):",
            "a stand-in for Meta's tokenizer.model, which is not bundled.",
            "",
        ]
    )
    print("\n" + section)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(section)
        print(f"wrote {a.out}")
    return rows


if __name__ == "__main__":
    main()
