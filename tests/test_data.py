"""The data loader: sources, lanes, exact resume, rank splits, mixing, bad input, workers, val set."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from lingua_wd.args import ConfigError
from lingua_wd.data import DataArgs, TrainLoader, prepare_data, val_batches
from lingua_wd.data.lanes import Lane, lane_units, permutation
from lingua_wd.data.loader import data_spec
from lingua_wd.data.sources import DONE, Bad, read_docs, read_lines
from lingua_wd.data.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
WORDS = "the of and to in is was for on that with as by at from his her an which or".split()
REPO = Path(__file__).resolve().parents[1]


def make_docs(prefix: str, n: int, seed: int = 0, words: list[str] = WORDS) -> list[str]:
    rng = random.Random(seed)
    return [f"<{prefix}{i:05d}> " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) for i in range(n)]


def write(path: Path, lines: list) -> Path:
    """Lines are dicts (JSON), str or raw bytes; `.zst` paths are compressed."""
    raw = b"".join(
        (json.dumps(x).encode() if isinstance(x, dict) else x if isinstance(x, bytes) else x.encode()) + b"\n"
        for x in lines
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(raw) if path.name.endswith(".zst") else raw)
    return path


def write_source(root: Path, name: str, docs: list[str], n_files: int) -> list[Path]:
    """Shards of one source: all .jsonl.zst but the last, which is plain .jsonl."""
    out = []
    for k in range(n_files):
        suffix = ".jsonl" if k == n_files - 1 else ".jsonl.zst"
        out.append(
            write(root / name / f"part_{k:02d}{suffix}", [{"text": t, "url": f"u{k}"} for t in docs[k::n_files]])
        )
    return out


def args_for(root: Path, sources: dict, **kw) -> DataArgs:
    base = dict(
        root_dir=str(root),
        sources=sources,
        val_sources="",
        seq_len=64,
        batch_size=8,
        micro_batch_size=2,
        lanes=8,
        shuffle_docs=8,
        workers=0,
    )
    return DataArgs(**{**base, **kw})


def take(loader: TrainLoader, n: int) -> list[torch.Tensor]:
    return [loader.next_batch() for _ in range(n)]


def ids_in(rows: torch.Tensor, prefix: str = "a") -> set[str]:
    return {m for row in rows for m in re.findall(rf"<{prefix}\d{{5}}>", TOK.decode(row.tolist()))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_source(root, "a", make_docs("a", 600, seed=1), n_files=6)
    return root


# ---- sources ----


def test_missing_path_and_empty_glob_are_config_errors_naming_the_key(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    cases = {"nope": "no such file", "empty": "contains no", "other": "contains no", "a/*.jsonl.zst": "contains no"}
    for name, msg in cases.items():
        with pytest.raises(ConfigError, match=rf"^data\.sources\.{re.escape(name)}: .*{msg}"):
            TrainLoader(args_for(tmp_path, {name: 1.0}), TOK, 0, 1)
    with pytest.raises(ConfigError, match=r"^data\.val_sources: "):
        val_batches(args_for(tmp_path, {"empty": 1.0}, val_sources="val"), TOK, 0, 1, 2)
    with pytest.raises(ConfigError, match=r"^data\.sources\.nope: "):
        prepare_data(args_for(tmp_path, {"nope": 1.0}))


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
def test_read_lines_restarts_exactly_at_any_position(tmp_path, suffix):
    docs = make_docs("a", 50)
    path = str(write(tmp_path / f"f{suffix}", [{"text": t} for t in docs]))
    full = list(read_lines(path))
    assert len(full) == 50
    for i in (1, 17, 49):
        _, offset, line = full[i - 1]
        assert list(read_lines(path, offset, line)) == full[i:]
    # a stride/residue split partitions the lines
    parts = [list(read_lines(path, stride=3, residue=r)) for r in range(3)]
    assert sorted(x[0] for p in parts for x in p) == sorted(x[0] for x in full)


def test_multi_frame_zst_is_read_across_frames(tmp_path):
    c = zstandard.ZstdCompressor()
    path = tmp_path / "m.jsonl.zst"
    path.write_bytes(c.compress(b'{"text": "one"}\n') + c.compress(b'{"text": "two"}\n'))
    assert list(read_docs(str(path))) == ["one", "two"]


def test_each_bad_input_is_skipped_counted_and_named(tmp_path):
    bad = []
    lines = [
        b'{"text": "good 1"}',
        b"{not json",
        b'{"url": "no text"}',
        b'{"text": 7}',
        b"",
        b'{"text": "bad \xff utf8"}',
        b"[1, 2]",
        b'{"text": "lone \\ud800 surrogate"}',
    ]
    path = write(tmp_path / "mixed.jsonl", lines)
    assert list(read_docs(str(path), on_bad=bad.append)) == ["good 1", "lone \ufffd surrogate"]
    assert [(b.line + 1, b.why.split(" (")[0].split(" at ")[0]) for b in bad] == [
        (2, "malformed JSON"),
        (3, "no string 'text' field"),
        (4, "no string 'text' field"),
        (6, "invalid UTF-8"),
        (7, "no string 'text' field"),
    ]
    good = zstandard.ZstdCompressor().compress(b"".join(b'{"text": "doc %d"}\n' % i for i in range(100)))
    cases = {
        "empty.jsonl.zst": b"",
        "blank.jsonl.zst": zstandard.ZstdCompressor().compress(b"\n\n"),
        "truncated.jsonl.zst": good[: len(good) // 2],
        "corrupt.jsonl.zst": good[:20] + bytes(range(256)) * 4,
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        bad = []
        docs = list(read_docs(str(tmp_path / name), on_bad=bad.append))
        assert len(bad) == 1 and bad[0].path.endswith(name), (name, bad)
        assert ("empty file" in bad[0].why) == (name in ("empty.jsonl.zst", "blank.jsonl.zst"))
        assert all(d.startswith("doc ") for d in docs)
    # a reader restarted after an unreadable tail does not report it twice
    last = list(read_lines(str(tmp_path / "truncated.jsonl.zst")))[-1]
    assert isinstance(last[0], Bad) and last[1] == DONE
    assert list(read_lines(str(tmp_path / "truncated.jsonl.zst"), last[1], last[2])) == []


def test_bad_input_in_the_loader_is_skipped_counted_warned_and_resumed(tmp_path, caplog):
    write(
        tmp_path / "s" / "bad.jsonl",
        [b"{oops", b'{"meta": 1}', b'{"text": "\xfe"}', b"", *[{"text": t} for t in make_docs("a", 40)]],
    )
    # exact count: one lane, file order, bad lines first
    args = args_for(tmp_path, {"s": 1.0}, lanes=1, shuffle_docs=1)
    with caplog.at_level(logging.WARNING):
        loader = TrainLoader(args, TOK, 0, 1)
        loader.next_batch()
    assert loader.skipped == 3
    warned = [r.getMessage() for r in caplog.records]
    assert any("bad.jsonl line 1: malformed JSON" in w for w in warned)
    assert any("bad.jsonl line 2: no string 'text'" in w for w in warned)
    assert any("bad.jsonl line 3: invalid UTF-8" in w for w in warned)
    state = loader.state_dict()
    resumed = TrainLoader(args, TOK, 0, 1)
    resumed.load_states([state])
    assert resumed.skipped == 3
    # every bad file kind in one source, with background workers: no crash, all counted and named
    write_source(tmp_path, "t", make_docs("a", 300), n_files=3)
    (tmp_path / "t" / "empty.jsonl.zst").write_bytes(b"")
    good = zstandard.ZstdCompressor().compress(b"".join(b'{"text": "doc %d"}\n' % i for i in range(200)))
    (tmp_path / "t" / "truncated.jsonl.zst").write_bytes(good[: len(good) // 2])
    (tmp_path / "t" / "corrupt.jsonl.zst").write_bytes(good[:20] + bytes(range(256)) * 4)
    caplog.clear()
    args = args_for(tmp_path, {"t": 1.0, "s": 0.2}, lanes=2, workers=1, shuffle_docs=64)
    with caplog.at_level(logging.WARNING):
        loader = TrainLoader(args, TOK, 0, 1)
        take(loader, 20)
        state, skipped = loader.state_dict(), loader.skipped
        expected = take(loader, 280)
        loader.close()
    warned = "\n".join(r.getMessage() for r in caplog.records)
    for name in ("empty.jsonl.zst line 1", "truncated.jsonl.zst line", "corrupt.jsonl.zst line", "bad.jsonl line"):
        assert name in warned
    assert 3 <= skipped < loader.skipped  # counted when their chunk is read; more passes, more counts
    resumed = TrainLoader(args, TOK, 0, 1)
    resumed.load_states([state])
    assert resumed.skipped == skipped
    assert all(torch.equal(a, b) for a, b in zip(expected, take(resumed, 280), strict=True))
    assert resumed.skipped == loader.skipped, "no bad line counted twice or missed across a resume"
    resumed.close()


def test_lanes_without_usable_documents_are_skipped_and_resume_exactly(tmp_path, caplog):
    write(tmp_path / "tiny.jsonl", [{"text": f"<a{i:05d}> a tiny document"} for i in range(3)])  # 3 docs, 8 lanes
    for workers in (0, 1):
        args = args_for(tmp_path, {"tiny.jsonl": 1.0}, lanes=8, workers=workers, seq_len=40, batch_size=4)
        with caplog.at_level(logging.WARNING):
            loader = TrainLoader(args, TOK, 0, 1)
            rows = torch.cat(take(loader, 3))
        assert ids_in(rows) == {"<a00000>", "<a00001>", "<a00002>"}
        loader.flush_warnings()
        assert "tiny.jsonl has no usable document in the share of 5 lanes so far (3, 4, 5, 6, 7)" in caplog.text
        state = json.loads(json.dumps(loader.state_dict()))
        assert sorted(int(k) for k, st in state["lane_states"].items() if st.get("dry")) == [3, 4, 5, 6, 7]
        expected = take(loader, 5)
        loader.close()
        resumed = TrainLoader(args, TOK, 0, 1)
        resumed.load_states([state])
        assert all(torch.equal(a, b) for a, b in zip(expected, take(resumed, 5), strict=True))
        resumed.close()
    # a dry source next to a good one: those lanes go on with the good one
    write_source(tmp_path, "b", make_docs("b", 200), 2)
    loader = TrainLoader(args_for(tmp_path, {"tiny.jsonl": 1.0, "b": 1.0}, seq_len=40), TOK, 0, 1)
    rows = torch.cat(take(loader, 30))
    assert len(ids_in(rows, "b")) > 30 and ids_in(rows, "a") == {"<a00000>", "<a00001>", "<a00002>"}
    # nothing usable anywhere: a clear error at the first batch
    (tmp_path / "empty.jsonl.zst").write_bytes(b"")
    for workers in (0, 1):
        loader = TrainLoader(args_for(tmp_path, {"empty.jsonl.zst": 1.0}, workers=workers), TOK, 0, 1)
        with pytest.raises(ConfigError, match=r"^data\.sources: rank 0's lanes .* found no usable document"):
            loader.next_batch()
        loader.close()


# ---- lanes, resume, ranks ----


@pytest.mark.parametrize("n_files,lanes", [(1, 8), (3, 8), (8, 8), (11, 8), (5, 1)])
def test_lanes_partition_every_file(tmp_path, n_files, lanes):
    paths = write_source(tmp_path, "p", make_docs("a", 97), n_files)
    seen = []
    for lane in range(lanes):
        units = lane_units(n_files, lanes, lane)
        assert units, "every lane gets data"
        for f, stride, residue in units:
            seen += [(f, raw) for raw, _, _ in read_lines(str(paths[f]), stride=stride, residue=residue)]
    every = [(f, raw) for f, p in enumerate(paths) for raw, _, _ in read_lines(str(p))]
    assert sorted(seen) == sorted(every)


def test_batches_have_the_contract_shape_and_whole_documents(corpus):
    args = args_for(corpus, {"a": 1.0})
    loader = TrainLoader(args, TOK, 0, 2)
    batch = loader.next_batch()
    assert batch.shape == (4, 65) and batch.dtype == torch.long
    assert int(batch.min()) >= 0 and int(batch.max()) < TOK.vocab_size
    rows = torch.cat(take(loader, 40))
    assert (rows == TOK.bos_id).sum() > 0 and (rows == TOK.eos_id).sum() > 0
    assert len(ids_in(rows)) > 30


@pytest.mark.parametrize("workers,resume_workers", [(0, 0), (2, 2), (3, 0)])
def test_exact_resume_mid_shard_and_mid_document(corpus, workers, resume_workers):
    args = args_for(corpus, {"a": 1.0}, workers=workers, shuffle_docs=3)
    loader = TrainLoader(args, TOK, 0, 1)
    take(loader, 13)
    state = json.loads(json.dumps(loader.state_dict()))  # JSON round trip, as in a checkpoint
    expected = take(loader, 25)
    loader.close()
    positions = [s for lane in state["lane_states"].values() for s in lane["sources"].values()]
    assert any(s["tok"] > 0 for s in positions), "some lane stopped mid-document"
    zst = [p.name.endswith(".zst") for p in sorted((corpus / "a").iterdir())]
    assert any(s["chunk"] > 0 and s["offset"] > 0 for s in positions), "some lane stopped mid-shard"
    assert sum(zst) == 5
    resumed = TrainLoader(replace(args, workers=resume_workers), TOK, 0, 1)
    resumed.load_states([state])
    got = take(resumed, 25)
    resumed.close()
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def test_the_stream_does_not_depend_on_the_worker_count(corpus):
    streams = []
    for workers in (0, 1, 3):
        loader = TrainLoader(args_for(corpus, {"a": 1.0}, workers=workers), TOK, 0, 1)
        streams.append(torch.cat(take(loader, 12)))
        loader.close()
    assert torch.equal(streams[0], streams[1]) and torch.equal(streams[0], streams[2])


def test_ranks_read_disjoint_documents_and_resume_exactly(corpus):
    args = args_for(corpus, {"a": 1.0}, batch_size=8)
    loaders = [TrainLoader(args, TOK, r, 4) for r in range(4)]
    ids = [ids_in(torch.cat(take(ld, 30))) for ld in loaders]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not ids[i] & ids[j]
    states = [json.loads(json.dumps(ld.state_dict())) for ld in loaders]
    expected = [take(ld, 5) for ld in loaders]
    for r in range(4):
        ld = TrainLoader(args, TOK, r, 4)
        ld.load_states(states)
        assert all(torch.equal(a, b) for a, b in zip(expected[r], take(ld, 5), strict=True))


@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_on_another_rank_count_repeats_and_drops_nothing(corpus, new_world):
    """Every window handed out, before and after the change, is the next window of its lane."""
    args = args_for(corpus, {"a": 1.0}, lanes=6, batch_size=6)
    seen = []
    old = [TrainLoader(args, TOK, r, 2) for r in range(2)]
    for ld in old:
        seen += [row for b in take(ld, 9) for row in b]
    states = [ld.state_dict() for ld in old]
    new = [TrainLoader(args, TOK, r, new_world) for r in range(new_world)]
    for ld in new:
        ld.load_states(states)
        seen += [row for b in take(ld, 7) for row in b]
    made = {lane: st["n"] for ld in new for lane, st in ld.lane_states.items()}
    spec = data_spec(args)
    reference = []
    for lane, n in made.items():
        ln = Lane(lane, spec, TOK)
        reference += [torch.from_numpy(ln.next_window()).long() for _ in range(n)]
    key = lambda t: t.numpy().tobytes()  # noqa: E731
    assert sorted(map(key, seen)) == sorted(map(key, reference))
    assert len(set(map(key, seen))) == len(seen)


def test_state_changes_that_break_the_order_are_config_errors(corpus, tmp_path):
    args = args_for(corpus, {"a": 1.0})
    loader = TrainLoader(args, TOK, 0, 1)
    take(loader, 2)
    state = loader.state_dict()
    for key, value in (("lanes", 4), ("seed", 1), ("shuffle_docs", 3)):
        with pytest.raises(ConfigError, match=rf"^data\.{key}: "):
            TrainLoader(replace(args, **{key: value}), TOK, 0, 1).load_states([state])
    copy_root = tmp_path / "copy"
    write_source(copy_root, "a", make_docs("a", 600, seed=1), n_files=6)
    moved = TrainLoader(replace(args, root_dir=str(copy_root)), TOK, 0, 1)
    moved.load_states([state])  # the same shards in another folder are the same source
    assert torch.equal(moved.next_batch(), loader.next_batch())
    write(copy_root / "a" / "extra.jsonl", [{"text": "new"}])
    with pytest.raises(ConfigError, match=r"^data\.sources\.a: its files changed"):
        TrainLoader(replace(args, root_dir=str(copy_root)), TOK, 0, 1).load_states([state])
    with pytest.raises(ConfigError, match=r"miss lanes"):
        TrainLoader(args, TOK, 0, 2).load_states([TrainLoader(args, TOK, 0, 2).state_dict()])


def test_mixing_proportions_hold_over_many_windows(tmp_path):
    write_source(tmp_path, "a", make_docs("a", 400, words=["aa", "aaa", "a"]), 4)
    write_source(tmp_path, "b", make_docs("b", 400, seed=2, words=["bb", "bbb", "b"]), 4)
    args = args_for(tmp_path, {"a": 3.0, "b": 1.0}, batch_size=50, seq_len=32)
    loader = TrainLoader(args, TOK, 0, 1)
    fracs = []
    for _ in range(8):
        rows = torch.cat(take(loader, 5))  # 250 windows
        is_b = [(row == ord("b")).any().item() for row in rows]
        assert all((row == ord("a")).any().item() != b for row, b in zip(rows, is_b, strict=True)), (
            "one source per window"
        )
        fracs.append(np.mean(is_b))
    sigma = (0.25 * 0.75 / 250) ** 0.5
    assert all(abs(f - 0.25) < 4 * sigma for f in fracs), fracs
    assert abs(np.mean(fracs) - 0.25) < 4 * sigma / 8**0.5


def test_shuffling_is_seeded(corpus):
    a = torch.cat(take(TrainLoader(args_for(corpus, {"a": 1.0}), TOK, 0, 1), 5))
    b = torch.cat(take(TrainLoader(args_for(corpus, {"a": 1.0}), TOK, 0, 1), 5))
    c = torch.cat(take(TrainLoader(args_for(corpus, {"a": 1.0}, seed=1), TOK, 0, 1), 5))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sorted(permutation(50, 0, "x")) == list(range(50)) and permutation(50, 0, "x") != list(range(50))


# ---- workers: clean shutdown ----


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


def test_close_stops_the_workers(corpus):
    loader = TrainLoader(args_for(corpus, {"a": 1.0}, workers=2), TOK, 0, 1)
    loader.next_batch()
    procs = list(loader._pool.procs)
    start = time.time()
    loader.close()
    assert time.time() - start < 3
    assert all(p.poll() is not None for p in procs)
    loader.next_batch()  # a closed loader restarts from its state
    loader.close()


@pytest.mark.slow  # a trainer process or several: see README, Tests
@pytest.mark.parametrize("how", ["exit", "kill"])
def test_workers_exit_with_the_training_process(corpus, how):
    script = textwrap.dedent(f"""
        import os, signal, sys
        from lingua_wd.data import DataArgs, TrainLoader
        from lingua_wd.data.tokenizers import ByteTokenizer
        args = DataArgs(root_dir={str(corpus)!r}, sources={{"a": 1.0}}, val_sources="", seq_len=64, batch_size=8, lanes=8, workers=2)
        loader = TrainLoader(args, ByteTokenizer(), 0, 1)
        loader.next_batch()
        print(*[p.pid for p in loader._pool.procs], flush=True)
        if {how!r} == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2, out.stderr
    deadline = time.time() + 10
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)
    assert "Traceback" not in out.stderr


def test_workers_ignore_the_trainers_signals(corpus):
    loader = TrainLoader(args_for(corpus, {"a": 1.0}, workers=1), TOK, 0, 1)
    first = take(loader, 2)
    for p in loader._pool.procs:
        p.send_signal(signal.SIGTERM)
        p.send_signal(signal.SIGUSR1)
    time.sleep(0.3)
    take(loader, 20)  # still serving
    loader.close()
    assert first[0].shape == (8, 65)


# ---- HF datasets streaming, val set ----


def test_hf_datasets_streaming_source_is_split_and_resumes_exactly(tmp_path):
    pytest.importorskip("datasets")
    docs = make_docs("h", 400, seed=3)
    for k in range(4):
        write(tmp_path / "hf" / f"part_{k}.jsonl", [{"text": t} for t in docs[k::4]])
    args = args_for(tmp_path, {"hf:hf": 1.0}, lanes=4, batch_size=4, shuffle_docs=8)
    loaders = [TrainLoader(args, TOK, r, 2) for r in range(2)]
    ids = [ids_in(torch.cat(take(ld, 10)), "h") for ld in loaders]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    states = [json.loads(json.dumps(ld.state_dict())) for ld in loaders]
    expected = take(loaders[1], 10)
    resumed = TrainLoader(args, TOK, 1, 2)
    resumed.load_states(states)
    assert all(torch.equal(a, b) for a, b in zip(expected, take(resumed, 10), strict=True))


def test_val_batches_are_a_fixed_set_split_over_ranks(corpus):
    args = args_for(corpus, {"a": 1.0}, val_sources="a/part_05.jsonl")
    one = val_batches(args, TOK, 0, 1, 4)  # 4 global batches of 8 sequences: 16 micro-batches of 2
    assert len(one) == 16 and one[0].shape == (2, 65)
    assert all(torch.equal(a, b) for a, b in zip(one, val_batches(args, TOK, 0, 1, 4), strict=True))
    two = [val_batches(args, TOK, r, 2, 4) for r in range(2)]
    assert [len(b) for b in two] == [8, 8]
    key = lambda t: t.numpy().tobytes()  # noqa: E731
    assert sorted(key(r) for b in one for r in b) == sorted(key(r) for bs in two for b in bs for r in b)
    few = val_batches(args, TOK, 0, 1, 10_000)
    assert 16 < len(few) < 10_000 * 4 and len(few) % 4 == 0  # whole global batches only


def test_default_config_trains_on_the_bundled_corpus():
    args = DataArgs(workers=0)
    prepare_data(args)
    loader = TrainLoader(args, TOK, 0, 1)
    batch = loader.next_batch()
    assert batch.shape == (16, 257)
    assert "def " in TOK.decode(torch.cat(take(loader, 4)).flatten().tolist())
    assert len(val_batches(args, TOK, 0, 1, 2)) == 2 * 16 // 4  # 2 global batches of 16 in micro-batches of 4


def test_lines_longer_than_a_read_block(tmp_path, monkeypatch):
    import lingua_wd.data.sources as sources

    monkeypatch.setattr(sources, "BLOCK", 64)  # compressed bytes per read: every line spans many blocks
    docs = ["x" * 5000 + f" {i}" for i in range(5)] + ["short"]
    for name in ("long.jsonl", "long.jsonl.zst"):
        path = write(tmp_path / name, [{"text": d} for d in docs])
        assert list(read_docs(str(path))) == docs
        full = list(read_lines(str(path)))
        assert list(read_lines(str(path), full[2][1], full[2][2])) == full[3:]


# ----------------------------------------------------------------------------- progress of the start-up work

PROGRESS_CODE = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(message)s")
from lingua_wd.data.corpus import ensure_stdlib_corpus
from lingua_wd.data.tokenizers import train_bpe
ensure_stdlib_corpus(sys.argv[1], max_bytes=2 << 20, n_shards=4)
train_bpe(600, Path(sys.argv[1]) / "bpe.json", max_bytes=1 << 20)
"""


def _run_in(root: Path, terminal: bool, rank: str = "0") -> str:
    """The corpus build and a BPE training in a subprocess whose stderr is a sized pseudo-terminal or a pipe."""
    import fcntl
    import pty
    import struct
    import termios

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "RANK": rank}
    cmd = [sys.executable, "-c", PROGRESS_CODE, str(root)]
    if not terminal:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=True).stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # tqdm sizes its bar to it
    proc = subprocess.Popen(cmd, env=env, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=120) == 0
    return out.decode(errors="replace")


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_corpus_build_and_bpe_training_show_progress_on_rank_0_in_a_terminal(tmp_path):
    """A user in a terminal sees bars (tqdm for the corpus, the tokenizers library's for BPE); a log file or
    another rank gets the start and end lines only."""
    shown = _run_in(tmp_path / "tty", terminal=True)
    assert "corpus: reading the stdlib:" in shown and "file/s" in shown and "corpus: writing shards:" in shown
    assert "Compute merges" in shown and "trained the BPE tokenizer in" in shown
    logged = _run_in(tmp_path / "pipe", terminal=False)
    assert "building the bundled corpus" in logged and "built the bundled corpus: " in logged
    assert "corpus: reading" not in logged and "Compute merges" not in logged and "\r" not in logged
    other = _run_in(tmp_path / "rank1", terminal=True, rank="1")
    assert "corpus: reading" not in other and "Compute merges" not in other and "built the bundled corpus" in other
