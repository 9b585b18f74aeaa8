"""Fault injection in subprocesses: crashes mid-checkpoint, NaNs, truncated checkpoints, bad shards,
changed configs on resume, unwritable dump dirs, random kills; and a fuzzed config parser."""

import json

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import losses, read_metrics, run_train, small_tmpfs, start_train
from lingua_wd.args import ConfigError, parse_args
from lingua_wd.checkpoint import list_checkpoints
from lingua_wd.train import TrainArgs, resolve_and_check

FAST = ["log_freq=1", "eval_freq=0"]


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_crash_while_writing_checkpoint_keeps_last_good(tmp_path, tiny):
    common = [*tiny, *FAST, "steps=12", "checkpoint.every=3"]
    ref = tmp_path / "ref"
    ref_run = start_train([f"dump_dir={ref}", *common])
    dump = tmp_path / "crash"
    proc = run_train([f"dump_dir={dump}", *common, "guard.crash_in_checkpoint=6"], check=False)
    assert proc.returncode == 137
    root = dump / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == [f"{3:010d}"]  # the half-written one is not complete
    assert (root / f".tmp-{6:010d}").exists()
    run_train([f"dump_dir={dump}", *common])
    ref_run.wait()
    assert losses(dump) == losses(ref)


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_nonfinite_steps_are_skipped_then_stop(tmp_path, tiny):
    dump = tmp_path / "nan"
    nan_run = start_train([f"dump_dir={dump}", *tiny, *FAST, "steps=10", "guard.inject_nan_steps=[4,5]"])
    stop = tmp_path / "stop"
    proc = run_train(
        [
            f"dump_dir={stop}",
            *tiny,
            *FAST,
            "steps=20",
            "checkpoint.every=2",
            "guard.inject_nan_steps=[5,6,7]",
            "guard.max_nonfinite=3",
        ],
        check=False,
    )
    nan_run.wait()
    recs = {r["step"]: r for r in read_metrics(dump) if "loss" in r}
    assert recs[10]["nonfinite_steps"] == 2
    assert recs[5]["loss"] == "nan" and isinstance(recs[7]["loss"], float)  # steps 5, 6 (1-based) were NaN
    assert recs[10]["loss"] < recs[1]["loss"]  # the skipped updates did not poison the weights
    assert proc.returncode == 3
    assert "guard.max_nonfinite=3" in proc.stderr
    # steps 6-8 (1-based) are the streak: the checkpoint of step 6 is deferred, never written
    assert [p.name for p in list_checkpoints(stop / "checkpoints")][-1] == f"{4:010d}"
    assert "the last good checkpoint is step 4" in proc.stderr
    assert not (stop / "DONE").exists()


def test_loss_spike_is_logged_as_event():
    from lingua_wd.guard import SpikeDetector

    det = SpikeDetector(factor=2.0, warmup=5)
    events = [det.update(s, v) for s, v in enumerate([3.0] * 10 + [7.0, 3.0])]
    assert [e["step"] for e in events if e] == [10]


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_truncated_latest_checkpoint_resumes_from_previous(tmp_path, tiny):
    common = [*tiny, *FAST, "steps=8", "checkpoint.every=2", "checkpoint.keep=3"]
    ref = tmp_path / "ref"
    ref_run = start_train([f"dump_dir={ref}", *common])
    dump = tmp_path / "trunc"
    run_train([f"dump_dir={dump}", *common])
    (dump / "DONE").unlink()
    shard = next((dump / "checkpoints" / f"{8:010d}").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = run_train([f"dump_dir={dump}", *common])
    warned = [x for x in proc.stderr.splitlines() if "is not usable" in x]
    assert len(warned) == 1 and f"{shard.name}: size mismatch" in warned[0] and "at step 6" in proc.stderr
    ref_run.wait()
    assert losses(dump) == losses(ref)


def test_corrupted_data_shard_is_skipped_and_counted(tmp_path, tiny):
    data = tmp_path / "data"
    data.mkdir()
    good = "".join(json.dumps({"text": f"document number {i} " * 20}) + "\n" for i in range(200))
    bad = good[:3000] + "{not json\n" + '{"url": "x"}\n' + good[3000:]
    (data / "a.jsonl").write_text(bad)
    blob = zstandard.ZstdCompressor().compress(good.encode())
    (data / "b.jsonl.zst").write_bytes(blob[: len(blob) // 2])  # truncated compressed shard
    dump = tmp_path / "run"
    run_train([f"dump_dir={dump}", *tiny, *FAST, "steps=30", f"data.sources={{{data}: 1.0}}", "data.val_sources=''"])
    last = [r for r in read_metrics(dump) if "loss" in r][-1]
    assert last["data/skipped"] >= 2
    assert (dump / "DONE").exists()


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_resume_refuses_exactness_breaking_changes(tmp_path, tiny):
    common = [*tiny, *FAST, "steps=6", "checkpoint.every=2"]
    dump = tmp_path / "run"
    run_train([f"dump_dir={dump}", *common, "guard.crash_in_checkpoint=4"], check=False)
    proc = run_train([f"dump_dir={dump}", *common, "optim.lr=1e-3", "guard.crash_in_checkpoint=4"], check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("config error: optim.lr: changed since checkpoint")
    assert line.index("give it a new dump_dir") < line.index("guard.force_resume=true")  # a new run first
    # harmless changes resume
    run_train([f"dump_dir={dump}", *common, "log_freq=2", "probes.every=3", "guard.crash_in_checkpoint=4"], check=False)
    forced = run_train([f"dump_dir={dump}", *common, "optim.lr=1e-3", "guard.force_resume=true"])
    assert "forced" in forced.stderr and (dump / "DONE").exists()


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_unwritable_dump_dir_is_a_clear_error(tmp_path, tiny):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_train([f"dump_dir={blocker}/run", *tiny], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("config error: dump_dir: cannot write to")
    proc = run_train([f"dump_dir={tmp_path}/run", f"checkpoint.dir={blocker}/ckpt", *tiny], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("config error: checkpoint.dir: cannot write to")


KEYS = [
    "steps",
    "model.dim",
    "model.n_layers",
    "model.head_dim",
    "optim.lr",
    "optim.beta2",
    "data.batch_size",
    "data.micro_batch_size",
    "schedule.warmup",
    "schedule.warmup_steps",
    "scaling.width",
    "scaling.wd",
    "scaling.base_dim",
    "probes.every",
    "probes.layers",
    "model.n_kv_heads",
    "data.seq_len",
    "nokey",
    "model",
]
VALUES = st.one_of(
    st.integers(-5, 5000),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.booleans(),
    st.sampled_from(["[1,2]", "{a: 1}", "null", "mup", "independent", "[layers.0.*]", "'", "${x}"]),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4))
def test_config_fuzz_only_ends_in_clean_errors(items):
    argv = [f"{k}={v}" for k, v in items]
    try:
        args = parse_args(TrainArgs, argv)
        resolve_and_check(args, 1)
    except ConfigError as err:
        msg = str(err)
        assert msg and "\n" not in msg and "Traceback" not in msg


@pytest.fixture
def small_disk(tmp_path):
    """A 2.5 MB tmpfs: room for one checkpoint of the tiny model (~1.7 MB), not for two."""
    yield from small_tmpfs(tmp_path, "2560k")


def test_disk_full_during_checkpoint_keeps_the_previous_one(small_disk, tiny):
    dump = small_disk / "run"
    proc = run_train(
        [f"dump_dir={dump}", *tiny, *FAST, "steps=8", "checkpoint.every=4", "checkpoint.keep=2"], check=False
    )
    assert proc.returncode == 4, proc.stderr[-2000:]
    line = next(x for x in proc.stderr.splitlines() if "could not be written" in x)
    assert "checkpoint 8 could not be written: no space left on device: need ~" in line and ", have " in line
    assert "previous one is kept" in line
    root = dump / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == [f"{4:010d}"]
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())  # the partial write was removed
    assert not (dump / "DONE").exists()


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_probes_resume_exactly(tmp_path, tiny):
    """The power-iteration vectors live in the checkpoint: sigma_max continues as if never stopped."""
    common = [
        *tiny,
        *FAST,
        "steps=12",
        "checkpoint.every=4",
        "probes.every=2",
        "probes.layers=[layers.1.feed_forward.w1]",
    ]
    ref = tmp_path / "ref"
    ref_run = start_train([f"dump_dir={ref}", *common])
    dump = tmp_path / "crash"
    assert run_train([f"dump_dir={dump}", *common, "guard.crash_in_checkpoint=8"], check=False).returncode == 137
    run_train([f"dump_dir={dump}", *common])
    ref_run.wait()

    def probes(d):
        return {(r["step"], k): v for r in read_metrics(d) for k, v in r.items() if k.startswith("probe/")}

    got, want = probes(dump), probes(ref)
    assert any(k.endswith("sigma_max") for _, k in want) and got == want
