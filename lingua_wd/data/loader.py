"""The training loader: lanes (see lanes.py) owned by ranks, made in background processes, resumed exactly.

Rank r of W owns lanes r, r+W, ... and takes one window from each of its lanes in turn, so ranks
read disjoint data. The state of a rank (`state_dict()`) is every owned lane's position after the
last window handed to the trainer, plus the rank's turn among its lanes; windows prefetched by the
workers but not yet handed out are not in it. `load_states()` takes the states of all saved ranks:
with the same rank count the stream continues bit for bit; with another rank count each new rank
takes its lanes' positions from whichever old rank owned them (docs/data.md says what that keeps).
"""

from __future__ import annotations

import collections
import copy
import fcntl
import logging
import os
import pickle
import re
import subprocess
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lingua_wd.args import ConfigError, check
from lingua_wd.data.lanes import Lane, LaneDry
from lingua_wd.data.sources import HF_PREFIX, fingerprint, open_hf, parse_hf, read_docs, resolve_files
from lingua_wd.data.tokenizers import TOKENIZERS, TokenizerArgs

log = logging.getLogger(__name__)
STATE_VERSION = 1
BUNDLED = "stdlib/train"  # the bundled corpus (corpus.py), the default source
MSG_TOKENS = 1 << 16  # tokens per worker message (256 KB)
PIPE_BYTES = 1 << 20  # pipe capacity per worker: the prefetch depth
MAX_LANES = 1 << 16
MAX_SHUFFLE = 1 << 16  # a lane's shuffle buffer holds this many documents in memory
DRY_SOURCE = re.compile(r"^data: source (.+) has no usable document in lane (\d+)'s share")


class _Warnings:
    """Data warnings for the log. "Source X has no usable document in lane N" (one per lane and
    source, so up to data.lanes of them, found over many batches) are counted instead, and `flush()`
    (the trainer calls it at each log line, the loader at close) says each source's count so far in
    one line, when it changed."""

    def __init__(self):
        self.dry: dict[str, set[int]] = {}
        self.told: dict[str, int] = {}

    def add(self, text: str) -> None:
        m = DRY_SOURCE.match(text)
        if m:
            self.dry.setdefault(m.group(1), set()).add(int(m.group(2)))
        else:
            log.warning(text)

    def flush(self) -> None:
        for name, lanes in sorted(self.dry.items()):
            if self.told.get(name) == len(lanes):
                continue
            self.told[name] = len(lanes)
            shown = ", ".join(map(str, sorted(lanes)[:8])) + (", ..." if len(lanes) > 8 else "")
            log.warning(
                "data: source %s has no usable document in the share of %d lane%s so far (%s); they go on without it",
                *(name, len(lanes), "s" if len(lanes) > 1 else "", shown),
            )


WARNINGS = _Warnings()


@dataclass
class DataArgs:
    root_dir: str = "~/.cache/lingua_wd/corpus"  # relative source paths are resolved against this
    sources: dict[str, float] = field(default_factory=dict)  # path/folder/glob or hf:... -> weight; {} = bundled corpus
    val_sources: str = "stdlib/val"  # held-out file/folder/glob (or hf:...) for validation loss ("" = none)
    seq_len: int = 256  # tokens per training sequence (windows hold seq_len+1 tokens)
    batch_size: int = 16  # global batch, in sequences, per optimizer step
    micro_batch_size: int = 4  # sequences per forward/backward on one rank
    tokenizer: TokenizerArgs = field(default_factory=TokenizerArgs)  # its vocab_size becomes model.vocab_size
    seed: int = 0  # data order seed (file order, shuffle buffers, source mixing); independent of the model seed
    lanes: int = 64  # independent sub-streams; rank r of W owns lanes r, r+W, ...; >= ranks; fixed for a run
    shuffle_docs: int = 256  # documents per seeded shuffle buffer in each lane (1 = file order); fixed for a run
    workers: int = 2  # background tokenizer processes per rank (0 = tokenize in the training process)
    text_key: str = "text"  # JSON field holding a document's text


def check_data_args(args: DataArgs, world_size: int) -> None:
    check(args.seq_len > 0, "data.seq_len", f"must be positive, got {args.seq_len}")
    check(args.batch_size > 0, "data.batch_size", f"must be positive, got {args.batch_size}")
    check(args.micro_batch_size > 0, "data.micro_batch_size", f"must be positive, got {args.micro_batch_size}")
    check(
        args.batch_size % (args.micro_batch_size * world_size) == 0,
        "data.batch_size",
        f"{args.batch_size} is not divisible by micro_batch_size x ranks = {args.micro_batch_size} x {world_size}",
    )
    for name, w in args.sources.items():
        check(w >= 0, f"data.sources.{name}", f"weight must be >= 0 (0 = off), got {w}")
    check(not args.sources or any(args.sources.values()), "data.sources", "every weight is 0")
    check(args.lanes >= world_size, "data.lanes", f"must be >= the number of ranks ({world_size}), got {args.lanes}")
    check(args.lanes <= MAX_LANES, "data.lanes", f"must be <= {MAX_LANES}, got {args.lanes}")
    check(
        1 <= args.shuffle_docs <= MAX_SHUFFLE,
        "data.shuffle_docs",
        f"must be between 1 and {MAX_SHUFFLE} (documents held in memory per lane), got {args.shuffle_docs}",
    )
    check(0 <= args.seed < 2**32, "data.seed", f"must be in [0, 2**32), got {args.seed}")
    check(args.workers >= 0, "data.workers", f"must be >= 0, got {args.workers}")
    check(
        args.tokenizer.name in TOKENIZERS,
        "data.tokenizer.name",
        f"unknown {args.tokenizer.name!r} (choose from {sorted(TOKENIZERS)})",
    )


def source_path(args: DataArgs, name: str) -> str:
    p = Path(name).expanduser()
    return str(p if p.is_absolute() else Path(args.root_dir).expanduser() / p)


def active_sources(args: DataArgs) -> dict[str, float]:
    """The sources with a positive weight; none given = the bundled corpus. (A YAML or CLI dict is
    merged into the default one, so the default is empty rather than the corpus.)"""
    return {k: w for k, w in args.sources.items() if w > 0} if args.sources else {BUNDLED: 1.0}


def data_spec(args: DataArgs) -> dict:
    """Everything a lane needs, as plain data (sent to the workers); resolves every source now,
    so a missing path or an empty glob is a ConfigError at start-up."""
    sources = []
    for name, weight in sorted(active_sources(args).items()):
        key = f"data.sources.{name}"
        if name.startswith(HF_PREFIX):
            sources.append(
                {"name": name, "weight": weight, "kind": "hf", "hf": parse_hf(name, args.root_dir, key), "id": name}
            )
        else:
            files = resolve_files(source_path(args, name), key)
            sources.append({"name": name, "weight": weight, "kind": "files", "files": files, "id": fingerprint(files)})
    window = args.seq_len + 1
    return {
        "lanes": args.lanes,
        "seed": args.seed,
        "window": window,
        "shuffle": args.shuffle_docs,
        "text_key": args.text_key,
        "sources": sources,
    }


class _InProcess:
    """Lanes made in the training process (workers=0)."""

    def __init__(self, data: dict, tokenizer, states: dict[int, dict], order: list[int]):
        self.lanes = {lane: Lane(lane, data, tokenizer, states[lane]) for lane in order}

    def next(self, lane: int) -> tuple[np.ndarray | None, dict]:
        """The lane's next window and its state after it; (None, state) once the lane is dry."""
        ln = self.lanes[lane]
        try:
            window = ln.next_window()
        except LaneDry:
            window = None
        for text in ln.pop_warnings():
            WARNINGS.add(text)
        return window, ln.state()

    def close(self) -> None:
        for ln in self.lanes.values():
            ln.close()


def _stop(procs: list[subprocess.Popen], timeout: float = 2.0) -> None:
    """Close the pipes (a worker exits at its next write) and reap; kill what does not exit."""
    for p in procs:
        for f in (p.stdin, p.stdout):
            try:
                f.close()
            except (OSError, ValueError):
                pass
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class _Workers:
    """Background processes; worker w makes the windows of lanes order[w::n], in the order the
    loader takes them, so the stream does not depend on the number of workers."""

    def __init__(self, data: dict, tokenizer, states: dict[int, dict], order: list[int], n: int):
        n = min(n, len(order))
        pkg_root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p)
        env = dict(
            os.environ, PYTHONPATH=path, TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1", OMP_NUM_THREADS="1"
        )
        cmd = [sys.executable, "-m", "lingua_wd.data.worker"]
        self.procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env) for _ in range(n)]
        self._finalizer = weakref.finalize(self, _stop, list(self.procs))  # also runs at interpreter exit
        per_msg = max(1, MSG_TOKENS // data["window"])
        for w, p in enumerate(self.procs):
            try:
                fcntl.fcntl(p.stdout.fileno(), 1031, PIPE_BYTES)  # F_SETPIPE_SZ: a deeper prefetch
            except OSError:
                pass
            try:
                p.stdin.write(pickle.dumps((data, tokenizer, {lane: states[lane] for lane in order[w::n]}, per_msg)))
                p.stdin.close()
            except BrokenPipeError:
                self._died(w)
        self.owner = {lane: i % n for i, lane in enumerate(order)}
        self.buf: dict[int, collections.deque] = {lane: collections.deque() for lane in order}

    def _died(self, w: int):
        p = self.procs[w]
        self.close()
        raise RuntimeError(f"data worker {w} (pid {p.pid}) exited with code {p.poll()}; its error is printed above")

    def next(self, lane: int) -> tuple[np.ndarray | None, dict]:
        buf = self.buf[lane]
        while not buf:
            self._receive(self.owner[lane])
        return buf.popleft()

    def _receive(self, w: int) -> None:
        try:
            msg = pickle.load(self.procs[w].stdout)
        except (EOFError, OSError, pickle.UnpicklingError):
            self._died(w)
        if msg[0] == "error":
            self.close()
            if msg[1]:
                raise ConfigError(msg[2])
            raise RuntimeError(f"data worker {w} failed:\n{msg[2]}")
        _, lane, windows, states, warnings, dry = msg
        for text in warnings:
            WARNINGS.add(text)
        if windows is not None:
            self.buf[lane].extend(zip(windows, states, strict=True))
        if dry is not None:
            self.buf[lane].append((None, dry))

    def close(self) -> None:
        self._finalizer()


class TrainLoader:
    """This rank's share of each global batch: `next_batch()` -> (batch_size / world, seq_len + 1) tokens."""

    def __init__(self, args: DataArgs, tokenizer, rank: int, world: int):
        check(args.lanes >= world, "data.lanes", f"must be >= the number of ranks ({world}), got {args.lanes}")
        check(args.batch_size % world == 0, "data.batch_size", f"{args.batch_size} is not divisible by {world} ranks")
        self.args, self.tokenizer, self.rank, self.world = args, tokenizer, rank, world
        self.data = data_spec(args)
        self.lanes = list(range(rank, args.lanes, world))
        self.lane_states: dict[int, dict] = {lane: {"n": 0, "sources": {}} for lane in self.lanes}
        self.cursor = 0  # index in self.lanes of the lane that gives the next window
        self.dry: set[int] = set()  # lanes with no usable data (known to this process)
        self.local_batch = args.batch_size // world
        self._pool: _InProcess | _Workers | None = None

    def _start(self) -> _InProcess | _Workers:
        if self.args.workers == 0:
            return _InProcess(self.data, self.tokenizer, self.lane_states, self.lanes)
        return _Workers(self.data, self.tokenizer, self.lane_states, self.lanes, self.args.workers)

    def next_batch(self) -> torch.Tensor:
        if self._pool is None:
            self._pool = self._start()
        rows, states, cursor = [], {}, self.cursor
        while len(rows) < self.local_batch:
            if len(self.dry) == len(self.lanes):
                WARNINGS.flush()
                raise ConfigError(
                    f"data.sources: rank {self.rank}'s lanes {self.lanes[:4]}... found no usable document in a full "
                    "pass over their share of the data (empty or unreadable sources?)"
                )
            lane = self.lanes[cursor]
            cursor = (cursor + 1) % len(self.lanes)
            if lane in self.dry:  # a dry lane is skipped (see lanes.LaneDry): the others take its turn
                continue
            window, states[lane] = self._pool.next(lane)
            if window is None:
                self.dry.add(lane)
            else:
                rows.append(window)
        self.lane_states.update(states)  # the state is that of the last batch handed out
        self.cursor = cursor
        return torch.from_numpy(np.stack(rows)).long()

    @property
    def skipped(self) -> int:
        """Bad inputs skipped so far by this rank's lanes (logged as data/skipped)."""
        return sum(src["skipped"] for st in self.lane_states.values() for src in st["sources"].values())

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world": self.world,
            "lanes": self.args.lanes,
            "seed": self.args.seed,
            "shuffle_docs": self.args.shuffle_docs,
            "sources": {s["name"]: s["id"] for s in self.data["sources"]},
            "cursor": self.cursor,
            "lane_states": {str(lane): copy.deepcopy(self.lane_states[lane]) for lane in self.lanes},
        }

    def load_states(self, states: list[dict[str, Any]]) -> None:
        """Resume from the states of all saved ranks (index = saved rank)."""
        first = states[0]
        if first.get("version") != STATE_VERSION:
            raise ConfigError(f"data: checkpoint data state version {first.get('version')} != {STATE_VERSION}")
        for key, mine in (
            ("lanes", self.args.lanes),
            ("seed", self.args.seed),
            ("shuffle_docs", self.args.shuffle_docs),
        ):
            check(
                first[key] == mine,
                f"data.{key}",
                f"the checkpoint was written with {first[key]}, this run has {mine}; it is part of the data order, keep it",
            )
        for s in self.data["sources"]:
            saved = first["sources"].get(s["name"])
            check(
                saved in (None, s["id"]),
                f"data.sources.{s['name']}",
                f"its files changed since the checkpoint ({saved} -> {s['id']}); put new data under a new source name",
            )
            if saved is None:
                log.info("data: source %s is new: it starts from its beginning", s["name"])
        merged = {int(k): v for st in states for k, v in st["lane_states"].items()}
        missing = sorted(set(range(self.args.lanes)) - set(merged))
        if missing:
            raise ConfigError(f"data: the saved states miss lanes {missing[:8]}...; pass the states of all saved ranks")
        same = (
            len(states) == self.world
            and states[self.rank]["world"] == self.world
            and states[self.rank]["rank"] == self.rank
        )
        if not same:
            log.info("data: resuming %d-rank data state on %d ranks (lanes redistributed)", first["world"], self.world)
        self.close()
        self.dry = set()  # a lane saved dry says so again at its first turn
        self.lane_states = {lane: merged[lane] for lane in self.lanes}
        self.cursor = states[self.rank]["cursor"] if same else 0

    def flush_warnings(self) -> None:
        WARNINGS.flush()

    def close(self) -> None:
        WARNINGS.flush()
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def _val_docs(args: DataArgs) -> Iterator[str]:
    if args.val_sources.startswith(HF_PREFIX):
        spec = parse_hf(args.val_sources, args.root_dir, "data.val_sources")
        for ex in open_hf(spec, 0, 1):
            if isinstance(ex.get(args.text_key), str):
                yield ex[args.text_key]
        return
    for path in resolve_files(source_path(args, args.val_sources), "data.val_sources"):
        yield from read_docs(path, args.text_key)


def val_batches(args: DataArgs, tokenizer, rank: int, world: int, n_batches: int) -> list[torch.Tensor]:
    """This rank's share of the validation set, in micro-batches.

    The set is a fixed list of sequences: the val documents in file order, packed into windows, the
    first n_batches x data.batch_size of them (eval_batches global batches), whatever the number of
    ranks. Window j goes to rank j % world; batch_size is a multiple of micro_batch_size x world, so
    every rank gets the same number of whole micro-batches and the mean over ranks of each rank's
    mean is the mean over the set: the val loss does not depend on the rank count (to float
    rounding). If the val data runs out, fewer whole global batches are used (with a warning)."""
    if not args.val_sources or n_batches <= 0:
        return []
    mb, window, need = args.micro_batch_size, args.seq_len + 1, n_batches * args.batch_size
    windows: list[np.ndarray] = []
    pending, have = [], 0
    for text in _val_docs(args):
        pending.append(
            tokenizer.encode_array(text)
            if hasattr(tokenizer, "encode_array")
            else np.asarray(tokenizer.encode(text), np.int32)
        )
        have += len(pending[-1])
        if have >= window:
            flat = np.concatenate(pending)
            k = min(len(flat) // window, need - len(windows))
            windows += list(flat[: k * window].reshape(k, window))
            pending, have = [flat[k * window :]], len(flat) - k * window
        if len(windows) >= need:
            break
    n = len(windows) // args.batch_size
    if n < n_batches:
        log.warning(
            "data: val_sources hold %d of the %d batches of %d sequences asked (eval_batches)",
            n,
            n_batches,
            args.batch_size,
        )
    mine = windows[: n * args.batch_size][rank::world]
    return [torch.from_numpy(np.stack(mine[i * mb : (i + 1) * mb])).long() for i in range(len(mine) // mb)]
