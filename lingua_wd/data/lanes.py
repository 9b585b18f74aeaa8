"""Lanes: the training stream as `lanes` independent, deterministic sub-streams.

Lane l of L reads its own share of every source (whole files when there are at least L files,
otherwise every k-th line of a file, k = ceil(L / n_files)), visits its files in a seeded order
each epoch, shuffles documents in seeded chunks of `shuffle` documents (the shuffle buffer),
tokenizes them with BOS/EOS, packs each source into (seq_len+1)-token windows, and picks the source
of each window at random with the mixing weights. Rank r of W owns lanes r, r+W, r+2W, ...

A lane's whole position is a small JSON-able dict, `Lane.state()`:
    {"n": windows made, "dry": [sources with nothing usable in this lane],
     "sources": {name: {"epoch", "unit", "offset", "line", "chunk", "pos", "tok", "skipped", "counted"}}}
(file, decompressed byte offset and line of the current shuffle chunk, the document's index in the
shuffled chunk, tokens of it already packed, bad entries so far, whether those of the current chunk
are in that count: they are counted when the chunk is read). The shuffle permutations, the file
order and the mixing draws are hashes of (seed, source, lane, counters), not RNG states, so a lane
rebuilt from its state makes exactly the windows the original would have made next: the packing
remainder is re-tokenized from the document instead of being stored.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np

from lingua_wd.data.sources import Bad, clean_text, open_hf, parse_line, read_lines

MAX_WARNINGS = 5  # per lane and file; later bad lines are only counted


class SourceDry(Exception):
    """A full pass over the lane's share of a source found no usable document."""


class LaneDry(Exception):
    """Every source of the lane is dry: the lane makes no windows (the loader skips it)."""


def rand64(*key: Any) -> int:
    """A uniform 64-bit integer determined by `key`: the same on every machine and Python version."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little")


def permutation(n: int, *key: Any) -> list[int]:
    """Fisher-Yates with rand64 draws: a seeded permutation that needs no RNG state."""
    p = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rand64(*key, i) % (i + 1)
        p[i], p[j] = p[j], p[i]
    return p


def lane_units(n_files: int, lanes: int, lane: int) -> list[tuple[int, int, int]]:
    """This lane's (file, stride, residue) units: lines n of the file with n % stride == residue.
    With n_files >= lanes a lane gets whole files; otherwise each file is split in `stride` line
    residues so that every lane gets at least one unit (each file read by `stride` lanes)."""
    stride = -(-lanes // n_files)
    units = [(u % n_files, stride, u // n_files) for u in range(n_files * stride)]
    return units[lane::lanes]


class Source:
    """One source in one lane: shuffled documents, tokenized, packed into windows on demand."""

    def __init__(self, spec: dict, lane: int, data: dict, tokenizer, state: dict | None, warn: Callable[[Bad], None]):
        self.name, self.lane, self.tok, self.warn = spec["name"], lane, tokenizer, warn
        self.seed, self.lanes, self.shuffle = data["seed"], data["lanes"], data["shuffle"]
        self.text_key = data["text_key"]
        self.st = dict(state) if state else self.fresh()
        self.chunk: list | None = None  # the current shuffled chunk of entries
        self.cur: np.ndarray | None = None  # tokens of the document at st["pos"]
        # a full pass without one usable document would loop forever: the source is dry in this lane
        position = [k for k in self.fresh() if k not in ("epoch", "skipped", "counted")]
        self.checking = all(self.st[k] in (0, None) for k in position)
        self.found = False

    def fresh(self) -> dict:
        raise NotImplementedError

    def take(self, n: int) -> list[np.ndarray]:
        """The next n tokens of this source's packed stream, as pieces of documents."""
        st, parts = self.st, []
        while n > 0:
            if self.cur is None:
                self.cur = self._doc()
            piece = self.cur[st["tok"] : st["tok"] + n]
            parts.append(piece)
            n -= len(piece)
            st["tok"] += len(piece)
            if st["tok"] >= len(self.cur):
                self.cur, st["pos"], st["tok"] = None, st["pos"] + 1, 0
        return parts

    def _doc(self) -> np.ndarray:
        st = self.st
        while True:
            if self.chunk is None:
                self.chunk = self._load_chunk()
            if st["pos"] >= len(self.chunk):
                self._advance(bool(self.chunk))
                st["counted"] = False
                continue
            entry = self.chunk[st["pos"]]
            if isinstance(entry, str):
                self.found = True
                return self.tok.encode_array(entry)
            st["pos"] += 1

    def _load_chunk(self) -> list[str | Bad]:
        """Read, parse and permute the current chunk. Its bad entries are counted and reported
        now, once: st["counted"] says a resumed run re-reads a chunk that was already counted."""
        st = self.st
        entries = [self._parse(e) for e in self._read_chunk()]
        if not st["counted"]:
            for bad in (e for e in entries if isinstance(e, Bad)):
                st["skipped"] += 1
                self.warn(bad)
            st["counted"] = True
        perm = permutation(len(entries), self.seed, self.name, self.lane, st["epoch"], st.get("unit", 0), st["chunk"])
        return [entries[i] for i in perm]

    def _next_epoch(self) -> None:
        if self.checking and not self.found:  # a full pass without one usable document: it never will
            raise SourceDry(self.name)
        self.st["epoch"] += 1
        self.checking, self.found = True, False

    def _read_chunk(self) -> list:
        raise NotImplementedError

    def _advance(self, chunk_had_entries: bool) -> None:
        raise NotImplementedError

    def _parse(self, entry) -> str | Bad:
        return entry

    def close(self) -> None:
        pass


class FileSource(Source):
    """Local .jsonl / .jsonl.zst shards: positions are (unit, byte offset, line) of the chunk start."""

    def __init__(self, spec: dict, lane: int, data: dict, tokenizer, state: dict | None, warn):
        self.files = spec["files"]
        super().__init__(spec, lane, data, tokenizer, state, warn)
        self.units = lane_units(len(self.files), self.lanes, lane)
        self.reader = None  # an open read_lines generator positioned at self.next_start
        self.path = ""  # the file it reads
        self.next_start = (0, 0)

    def fresh(self) -> dict:
        position = {"epoch": 0, "unit": 0, "offset": 0, "line": 0, "chunk": 0, "pos": 0, "tok": 0}
        return {**position, "skipped": 0, "counted": False}

    def _read_chunk(self) -> list:
        st = self.st
        if self.reader is None:
            order = permutation(len(self.units), self.seed, self.name, self.lane, st["epoch"])
            f, stride, residue = self.units[order[st["unit"]]]
            self.path = self.files[f]
            self.reader = read_lines(self.path, st["offset"], st["line"], stride, residue)
        entries, self.next_start = [], (st["offset"], st["line"])
        for raw, offset, line in self.reader:
            entries.append(raw if isinstance(raw, Bad) else (raw, self.path, line - 1))
            self.next_start = (offset, line)
            if len(entries) == self.shuffle:
                break
        return entries

    def _advance(self, chunk_had_entries: bool) -> None:
        st = self.st
        if chunk_had_entries:  # the next chunk of the same unit starts where this one ended
            st["offset"], st["line"] = self.next_start
            st["chunk"] += 1
        else:  # the unit is exhausted: next unit, or next epoch
            self.close()
            st.update(unit=st["unit"] + 1, offset=0, line=0, chunk=0)
            if st["unit"] == len(self.units):
                st["unit"] = 0
                self._next_epoch()
        st["pos"], st["tok"], self.chunk = 0, 0, None

    def _parse(self, entry) -> str | Bad:
        if isinstance(entry, Bad):
            return entry
        raw, path, line = entry
        text, why = parse_line(raw, self.text_key)
        return Bad(path, line, why) if text is None else text

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None


class HFSource(Source):
    """A Hugging Face `datasets` stream split over the lanes with split_dataset_by_node; the
    position of a chunk start is the dataset's own state_dict()."""

    def __init__(self, spec: dict, lane: int, data: dict, tokenizer, state: dict | None, warn):
        self.spec = spec["hf"]
        super().__init__(spec, lane, data, tokenizer, state, warn)
        self.ds, self.it, self.next_start = None, None, None

    def fresh(self) -> dict:
        return {"epoch": 0, "hf": None, "chunk": 0, "pos": 0, "tok": 0, "skipped": 0, "counted": False}

    def _read_chunk(self) -> list:
        st = self.st
        if self.it is None:
            self.ds = open_hf(self.spec, self.lane, self.lanes)
            self.ds.set_epoch(st["epoch"])
            if st["hf"] is not None:
                self.ds.load_state_dict(copy.deepcopy(st["hf"]))
            self.it = iter(self.ds)
        entries, where = [], f"{self.spec['path']} (lane {self.lane})"
        try:
            for ex in self.it:
                text = ex.get(self.text_key)
                n = st["chunk"] * self.shuffle + len(entries)
                entries.append(
                    clean_text(text) if isinstance(text, str) else Bad(where, n, f"no string {self.text_key!r} field")
                )
                if len(entries) == self.shuffle:
                    break
        except Exception as err:  # a broken file ends this pass
            entries.append(
                Bad(where, st["chunk"] * self.shuffle + len(entries), f"unreadable ({type(err).__name__}: {err})")
            )
            self.it = iter(())
        self.next_start = copy.deepcopy(self.ds.state_dict())
        return entries

    def _advance(self, chunk_had_entries: bool) -> None:
        st = self.st
        if chunk_had_entries:
            st["hf"], st["chunk"] = self.next_start, st["chunk"] + 1
        else:
            st.update(hf=None, chunk=0)
            self.it = None
            self._next_epoch()
        st["pos"], st["tok"], self.chunk = 0, 0, None


SOURCE_KINDS = {"files": FileSource, "hf": HFSource}


class Lane:
    """One lane: its sources, mixed window by window with the weights."""

    def __init__(self, lane: int, data: dict, tokenizer, state: dict | None = None):
        self.id, self.data, self.window = lane, data, data["window"]
        state = state or {"n": 0, "sources": {}}
        self.n = state["n"]
        self.dry = set(state.get("dry", ()))  # sources with no usable document in this lane's share
        self.warnings: list[str] = []
        self._warned: dict[str, int] = {}
        specs = sorted(data["sources"], key=lambda s: s["name"])
        self.names = [s["name"] for s in specs]
        # sources switched off (weight 0, or removed) keep their place in the state
        self.kept = {k: v for k, v in state["sources"].items() if k not in self.names}
        self.weights = [s["weight"] for s in specs]
        self.sources = {
            s["name"]: SOURCE_KINDS[s["kind"]](s, lane, data, tokenizer, state["sources"].get(s["name"]), self._warn)
            for s in specs
        }

    def _warn(self, bad: Bad) -> None:
        n = self._warned[bad.path] = self._warned.get(bad.path, 0) + 1
        if n <= MAX_WARNINGS:
            self.warnings.append(f"data: skipping {bad}")
        if n == MAX_WARNINGS:
            self.warnings.append(f"data: further bad lines of {bad.path} in lane {self.id} are counted, not reported")

    def next_window(self) -> np.ndarray:
        """The next (seq_len+1,) int32 window: one source, chosen with probability weight / sum over
        the sources that are not dry in this lane. Raises LaneDry when all are."""
        u = rand64(self.data["seed"], "mix", self.id, self.n) / 2.0**64
        while True:
            live = [(n, w) for n, w in zip(self.names, self.weights, strict=True) if n not in self.dry]
            if not live:
                raise LaneDry(self.id)
            cum = np.cumsum([w for _, w in live]) / sum(w for _, w in live)
            name = live[min(bisect.bisect_right(list(cum), u), len(live) - 1)][0]
            try:
                window = np.concatenate(self.sources[name].take(self.window))
            except SourceDry:
                self.dry.add(name)
                self.warnings.append(
                    f"data: source {name} has no usable document in lane {self.id}'s share of it; the lane goes on without it"
                )
                continue
            self.n += 1
            return window

    def state(self) -> dict:
        sources = {**self.kept, **{name: dict(src.st) for name, src in self.sources.items()}}
        return {"n": self.n, "sources": sources, "dry": sorted(self.dry)}

    def pop_warnings(self) -> list[str]:
        out, self.warnings = self.warnings, []
        return out

    def close(self) -> None:
        for src in self.sources.values():
            src.close()
