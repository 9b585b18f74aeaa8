"""The eight findings of issue 12, each reproduced against the real trainer (subprocesses, real
signals, real files) and now held: corrupt checkpoints, divergence, exact logs, one writer, signals,
checkpoint I/O, bad values, rank-count-free results. docs/reliability.md names each test."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, TRAIN, env, free_port, launch, losses, run_train, small_tmpfs, start_train, train_cmd
from lingua_wd import rundir
from lingua_wd.checkpoint import MANIFEST, list_checkpoints
from lingua_wd.metrics import WALL_CLOCK_KEYS
from lingua_wd.rundir import RunDir

FAST = ["log_freq=3", "eval_freq=5", "data.seq_len=16"]  # log_freq divides neither checkpoint.every nor eval_freq


def lines(dump: Path) -> list[str]:
    """metrics.jsonl line by line, without the wall-clock fields (the only ones allowed to differ)."""
    out = []
    for line in (dump / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.append(json.dumps({k: v for k, v in rec.items() if k not in WALL_CLOCK_KEYS}))
    return out


def done(dump: Path) -> dict:
    return json.loads((dump / "DONE").read_text())


def flip(path: Path, n: int = 16) -> None:
    """Flip n bytes in the middle of a file (same size: only a checksum can tell)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, min(mid + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def wait_for(cond, proc=None, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out"
        assert proc is None or proc.poll() is None, f"exited {proc.returncode}: {proc.stderr.read()[-3000:]}"
        time.sleep(0.02)


def logged_step(dump: Path) -> int:
    try:
        return max(losses(dump), default=0)
    except (FileNotFoundError, ValueError):
        return 0


def no_traceback(text: str) -> bool:
    return "Traceback" not in text


# ----------------------------------------------------------------------------- 1. silent corruption

CORRUPT = [*FAST, "steps=8", "checkpoint.every=2", "checkpoint.keep=3"]


@pytest.fixture(scope="module")
def corrupt_ref(tmp_path_factory):
    from conftest import TINY

    ref = tmp_path_factory.mktemp("ref") / "run"
    run_train([f"dump_dir={ref}", *TINY, *CORRUPT])
    return ref


def finished_copy(ref: Path, dest: Path) -> Path:
    """A copy of a finished run, made unfinished (no DONE): its next start resumes the newest checkpoint."""
    shutil.copytree(ref, dest)
    (dest / "DONE").unlink()
    return dest


@pytest.mark.slow  # a trainer process or several: see README, Tests
@pytest.mark.parametrize("victim", ["__0_0.distcp", ".metadata", "rank0.pt"])
def test_bit_flip_in_newest_checkpoint_falls_back_to_previous(tmp_path, tiny, corrupt_ref, victim):
    dump = finished_copy(corrupt_ref, tmp_path / "run")
    flip(dump / "checkpoints" / f"{8:010d}" / victim)
    proc = run_train([f"dump_dir={dump}", *tiny, *CORRUPT])
    warned = [x for x in proc.stderr.splitlines() if "is not usable" in x]
    assert len(warned) == 1 and f"{victim}: checksum mismatch" in warned[0] and "trying the previous" in warned[0]
    assert f"resumed from {dump / 'checkpoints' / f'{6:010d}'}" in proc.stderr and no_traceback(proc.stderr)
    assert lines(dump) == lines(corrupt_ref) and done(dump) == done(corrupt_ref)


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_no_loadable_checkpoint_is_one_line_and_exit_5(tmp_path, tiny, corrupt_ref):
    dump = finished_copy(corrupt_ref, tmp_path / "run")
    for step in (4, 6, 8):
        flip(dump / "checkpoints" / f"{step:010d}" / "__0_0.distcp")
    proc = run_train([f"dump_dir={dump}", *tiny, *CORRUPT], check=False)
    assert proc.returncode == rundir.EXIT_NO_CHECKPOINT, proc.stderr[-2000:]
    errors = [x for x in proc.stderr.splitlines() if " E " in x]
    assert len(errors) == 1 and "no loadable checkpoint in" in errors[0] and no_traceback(proc.stderr)
    assert RunDir(dump).read_exit()["code"] == rundir.EXIT_NO_CHECKPOINT


# ----------------------------------------------------------------------------- 2. a diverged model called good


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_diverging_run_never_checkpoints_its_weights(tmp_path, tiny):
    dump, good = tmp_path / "lr1e3", tmp_path / "nan"
    healthy_start = start_train(
        [f"dump_dir={good}", *tiny, "log_freq=1", "steps=20", "checkpoint.every=2", "guard.inject_nan_steps=[5,6,7,8]",
         "guard.max_nonfinite=4"],
    )  # fmt: skip
    proc = run_train(
        [f"dump_dir={dump}", *tiny, "optim.lr=1e3", "steps=40", "log_freq=1", "checkpoint.every=2"], check=False
    )
    assert proc.returncode == rundir.EXIT_DIVERGED
    assert "deferred: the loss is diverging since step 2" in proc.stderr  # the spike of step 2, not after 20 steps
    assert "no checkpoint was written before it" in proc.stderr
    assert list_checkpoints(dump / "checkpoints") == [] and not (dump / "DONE").exists()
    # a healthy start, then divergence: the named last good checkpoint exists and is from before the streak
    proc = healthy_start.wait(check=False)
    assert proc.returncode == rundir.EXIT_DIVERGED and "the last good checkpoint is step 4" in proc.stderr
    assert [p.name for p in list_checkpoints(good / "checkpoints")][-1] == f"{4:010d}"
    exit_rec = RunDir(good).read_exit()
    assert exit_rec["code"] == 3 and "last good checkpoint is step 4" in exit_rec["cause"]


# ----------------------------------------------------------------------------- 3. logs that change on resume


@pytest.mark.slow
def test_random_kills_leave_metrics_identical(tmp_path, tiny):
    """kill -9 at random steps, log_freq not dividing checkpoint.every, a NaN step in between, probes on:
    metrics.jsonl (every line, events, probe and val records too) and DONE are the uninterrupted run's."""
    probes = ["probes.every=5", "probes.layers=[layers.0.attention.wq]"]
    common = [*tiny, *FAST, *probes, "steps=30", "checkpoint.every=4", "guard.inject_nan_steps=[9]"]
    ref = tmp_path / "ref"
    ref_run = start_train([f"dump_dir={ref}", *common])  # on the other core meanwhile
    dump, rng, killed = tmp_path / "kills", random.Random(1), 0
    for _ in range(3):
        before = logged_step(dump)
        proc = launch([f"dump_dir={dump}", *common])
        target = before + rng.randint(2, 9)  # a random step, then a random moment within it
        wait_for(lambda t=target, p=proc: p.poll() is not None or logged_step(dump) >= t)
        time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            killed += 1
        proc.wait()
    assert killed >= 2 and not (dump / "DONE").exists()
    run_train([f"dump_dir={dump}", *common])
    ref_run.wait()
    assert lines(dump) == lines(ref) and done(dump) == done(ref)
    assert any('"nonfinite_steps": 1' in x for x in lines(dump))
    assert sum('"probe/layers.0.attention.wq/rrc"' in x for x in lines(dump)) == 6  # steps 1, 6, ..., 26


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_restart_without_checkpoint_starts_metrics_afresh(tmp_path, tiny):
    common = [*tiny, *FAST, "steps=8", "checkpoint.every=4"]
    ref = tmp_path / "ref"
    ref_run = start_train([f"dump_dir={ref}", *common])
    dump = tmp_path / "run"
    crash = run_train([f"dump_dir={dump}", *common, "guard.crash_in_checkpoint=4"], check=False)
    assert crash.returncode == 137 and lines(dump)  # step 3 was logged, no checkpoint is complete
    run_train([f"dump_dir={dump}", *common])
    ref_run.wait()
    assert lines(dump) == lines(ref)


# ----------------------------------------------------------------------------- 5. signals


@pytest.mark.slow
def test_sigint_saves_exits_75_and_resumes_exactly(tmp_path, tiny):
    """Ctrl-C as SIGTERM: the eval line of the stop step is written (every step is an eval step here)."""
    common = [*tiny, "log_freq=1", "eval_freq=1", "eval_batches=1", "data.seq_len=16", "steps=60", "checkpoint.every=0"]
    dump, ref = tmp_path / "int", tmp_path / "ref"
    ref_run = start_train([f"dump_dir={ref}", *common])
    proc = launch([f"dump_dir={dump}", *common])
    wait_for(lambda: logged_step(dump) >= 3, proc)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == rundir.EXIT_REQUEUE
    err = proc.stderr.read()
    assert "received SIGINT" in err and no_traceback(err)
    stopped = int(list_checkpoints(dump / "checkpoints")[-1].name)
    assert 3 <= stopped < 60 and RunDir(dump).read_exit()["code"] == 75
    assert {r["step"] for r in RunDir(dump).read_metrics() if "val/loss" in r} >= {stopped}
    run_train([f"dump_dir={dump}", *common])
    ref_run.wait()
    assert lines(dump) == lines(ref)


def test_second_ctrl_c_exits_at_once_with_one_line(tmp_path, tiny):
    # a step of a few seconds: the first Ctrl-C cannot be acted on before the second comes
    slow = [*tiny, "model.dim=512", "model.head_dim=128", "model.n_layers=4", "data.seq_len=512",
            "data.batch_size=16", "data.micro_batch_size=16", "log_freq=1", "steps=50", "eval_batches=0"]  # fmt: skip
    dump = tmp_path / "twice"
    proc = launch([f"dump_dir={dump}", *slow])
    wait_for(lambda: RunDir(dump).lock_file.exists(), proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(1.3)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == rundir.EXIT_INTERRUPTED
    err = proc.stderr.read()
    assert [x for x in err.splitlines() if "interrupted again" in x] and no_traceback(err)
    assert RunDir(dump).read_exit()["code"] == rundir.EXIT_INTERRUPTED and not RunDir(dump).lock_file.exists()


def _direct(argv: list[str], world: int, port: int) -> list[subprocess.Popen]:
    """Ranks started without torchrun (as `srun` does): each gets RANK, WORLD_SIZE, MASTER_* itself."""
    procs = []
    for rank in range(world):
        e = dict(env(), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        procs.append(launch(argv, environ=e))
    return procs


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_stop_without_torchrun_one_signalled_rank_stops_all(tmp_path, tiny):
    """The stop flag is all-reduced every step: SIGTERM to rank 1 alone stops both ranks after the
    same step, whatever log_freq is (1000 here); both save and exit 75. (The exact resume after a
    2-rank stop is test_train.py::test_sigterm_on_two_ranks_saves_and_resumes_exactly.)"""
    common = [*tiny, "log_freq=1000", "data.seq_len=16", "steps=100000", "checkpoint.every=0", "eval_freq=0"]
    dump = tmp_path / "direct"
    procs = _direct([f"dump_dir={dump}", *common], 2, free_port())
    wait_for(lambda: (dump / "param_groups.json").exists(), procs[0])
    time.sleep(1.0)
    os.kill(procs[1].pid, signal.SIGTERM)
    assert [p.wait(timeout=120) for p in procs] == [75, 75]
    (ckpt,) = list_checkpoints(dump / "checkpoints")
    assert 0 < int(ckpt.name) < 100000 and len(list(ckpt.glob("rank*.pt"))) == 2
    exit_rec = RunDir(dump).read_exit()
    assert exit_rec["code"] == 75 and exit_rec["step"] == int(ckpt.name)


# ----------------------------------------------------------------------------- 4. two writers


@pytest.mark.slow
def test_second_trainer_is_refused_and_a_stale_lock_is_taken_over(tmp_path, tiny):
    common = [*tiny, "log_freq=1", "data.seq_len=16", "checkpoint.every=0", "eval_freq=0"]
    dump = tmp_path / "run"
    first = launch([f"dump_dir={dump}", *common, "steps=100000"])
    wait_for(lambda: logged_step(dump) >= 1, first)
    holder = RunDir(dump).lock_holder()
    assert holder["pid"] == first.pid and RunDir(dump).state() == "running"
    second = run_train([f"dump_dir={dump}", *common, "steps=100000"], check=False)
    assert second.returncode == 2 and first.poll() is None
    assert second.stderr.strip().splitlines() == [
        f"config error: dump_dir: {dump} is in use by the trainer pid {first.pid} on {holder['host']} "
        f"(started {holder['started']}) (its LOCK); stop it first, or use another dump_dir"
    ]
    assert RunDir(dump).read_exit() is None  # the refused trainer wrote nothing into the live run's directory
    os.killpg(first.pid, signal.SIGKILL)  # its LOCK stays behind
    first.wait()
    assert RunDir(dump).lock_holder()["pid"] == first.pid and RunDir(dump).state() == "started"
    third = run_train([f"dump_dir={dump}", *common, "steps=3"])
    assert f"taking over the lock of pid {first.pid}" in third.stderr
    assert not RunDir(dump).lock_file.exists()  # released at exit


def test_lock_staleness_rules(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    me = rundir._me()
    assert rundir.holder_alive(me)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert not rundir.holder_alive({**me, "pid": int(dead.stdout)})  # gone
    assert not rundir.holder_alive({**me, "proc_start": me["proc_start"] - 1})  # pid reused by another process
    assert not rundir.holder_alive({**me, "boot_id": "another-boot"})  # the host rebooted
    other = {**me, "host": "node17"}
    assert rundir.holder_alive(other, mtime=time.time() - 60)  # another host, fresh heartbeat
    assert not rundir.holder_alive(other, mtime=time.time() - rundir.STALE_S - 1)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert not rundir.holder_alive({**other, "slurm_job_id": "42", "slurm_restart_count": 0})  # a requeued job's past
    lock = rundir.RunLock(run)
    assert lock.acquire() is None and lock.held()
    with pytest.raises(rundir.LockHeld, match="is in use by the trainer pid"):
        _foreign(run).acquire()
    lock.release()
    assert not run.lock_file.exists()


def _foreign(run: RunDir) -> rundir.RunLock:
    """A lock object that believes it is another process on this host (pid 1 is always alive)."""
    lock = rundir.RunLock(run)
    lock.record = {**lock.record, "pid": 1, "proc_start": rundir._proc_start(1)}
    return lock


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_killed_torchrun_leaves_no_orphan_ranks(tmp_path, tiny):
    dump = tmp_path / "orphans"
    proc = launch([f"dump_dir={dump}", *tiny, "log_freq=1", "data.seq_len=16", "steps=100000", "checkpoint.every=50"],
                  nproc=2)  # fmt: skip
    wait_for(lambda: logged_step(dump) >= 2, proc)
    children = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert len(children) == 2
    os.kill(proc.pid, signal.SIGKILL)  # torchrun alone: its workers are in its session, not signalled
    proc.wait()
    wait_for(lambda: not any(Path(f"/proc/{c}").exists() and _not_zombie(c) for c in children), timeout=20)
    size = (dump / "metrics.jsonl").stat().st_size
    time.sleep(1.0)
    assert (dump / "metrics.jsonl").stat().st_size == size


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ----------------------------------------------------------------------------- 6. checkpoint I/O


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_unreadable_checkpoint_dir_is_one_line(tmp_path, tiny):
    common = [*tiny, *FAST, "steps=3", "checkpoint.every=3"]
    dump = tmp_path / "run"
    run_train([f"dump_dir={dump}", *common])
    (dump / "DONE").unlink()
    root = dump / "checkpoints"
    os.chmod(root, 0)
    try:  # root ignores permissions: drop the capabilities that let it
        cmd = ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c",
               " ".join(train_cmd([f"dump_dir={dump}", *common]))]  # fmt: skip
        if os.geteuid() != 0:
            cmd = train_cmd([f"dump_dir={dump}", *common])
        proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(root, 0o755)
    assert proc.returncode == rundir.EXIT_NO_CHECKPOINT, proc.stderr[-2000:]
    errors = [x for x in proc.stderr.splitlines() if " E " in x]
    assert len(errors) == 1 and f"cannot read {root} (Permission denied)" in errors[0] and no_traceback(proc.stderr)


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_restart_after_disk_full_makes_room(small_disk_3, tiny):
    """Room for two checkpoints and a half: the third write prunes the oldest first instead of failing."""
    dump = small_disk_3 / "run"
    proc = run_train(
        [f"dump_dir={dump}", *tiny, *FAST, "steps=12", "checkpoint.every=4", "checkpoint.keep=2"], check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "deleting 0000000004 now rather than after the write" in proc.stderr
    assert [p.name for p in list_checkpoints(dump / "checkpoints")] == [f"{8:010d}", f"{12:010d}"]


@pytest.fixture
def small_disk_3(tmp_path):
    yield from small_tmpfs(tmp_path, "5000k")


# ----------------------------------------------------------------------------- 7. bad values


def _leaf_keys() -> list[tuple[str, type]]:
    import dataclasses
    import typing

    from lingua_wd.train import TrainArgs

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            if dataclasses.is_dataclass(t):
                yield from walk(t, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", t

    return list(walk(TrainArgs, ""))


ENUMS = ["scaling.mode", "scaling.wd_mode", "scaling.extra_warmup", "scaling.output_init", "schedule.kind",
         "optim.variant", "data.tokenizer.name", "distributed.device", "distributed.param_dtype",
         "distributed.reduce_dtype", "logging.wandb_mode"]  # fmt: skip
OUT_OF_RANGE = ["steps=0", "steps=-3", "log_freq=0", "eval_freq=-1", "eval_batches=-1", "seed=-1", f"seed={2**70}",
                f"seed={2**32}", "data.seed=-1", "model.dim=0", "model.dim=-128", "model.dim=1073741824",
                "model.n_layers=0", "model.head_dim=3", "model.rope_theta=0", "model.rope_theta=-1",
                "model.norm_eps=0", "model.vocab_size=1000000000000", "model.vocab_size=12", "model.ffn_mult=0",
                "model.max_seq_len=8", "optim.lr=0", "optim.lr=-1", "optim.beta1=1", "optim.beta2=1.5", "optim.eps=0",
                "optim.weight_decay=-0.1", "optim.clip=-1", "data.seq_len=0", "data.batch_size=0",
                "data.batch_size=7", "data.micro_batch_size=0", "data.lanes=0", f"data.lanes={2**40}",
                "data.shuffle_docs=0", "data.shuffle_docs=1e12", "data.shuffle_docs=1000000000000", "data.workers=-1",
                "schedule.warmup=1.5", "schedule.warmup=-0.1", "schedule.warmup_steps=1000", "schedule.final_ratio=2",
                "checkpoint.every=-1", "checkpoint.keep=0", "guard.max_nonfinite=-1", "guard.spike_factor=1",
                "probes.every=-1", "probes.fraction=0", "probes.fraction=2", "probes.power_iters=0",
                "probes.layers=[nothing.matches]", "scaling.base_dim=-1", "data.sources={/nonexistent: 1.0}",
                "data.sources.x.y=1", "data.sources={x: -1}", "scaling.frozen_lr.hidden=nan",
                "scaling.frozen_lr.hidden=abc", "scaling.frozen_lr={hidden: {a: 1}}", "data.batch_size=1099511627776",
                "model.dim.x=1", "optim.lr.x=1"]  # fmt: skip


def bad_overrides() -> st.SearchStrategy[str]:
    """Wrong types, non-finite and out-of-range numbers, unknown keys at every depth, unknown enum values."""
    keys = _leaf_keys()
    by_type: dict = {}
    for k, t in keys:
        by_type.setdefault(str(t), []).append(k)
    ints = [k for k, t in keys if t is int]
    floats = [k for k, t in keys if t is float]
    bools = [k for k, t in keys if t is bool]
    lists = [k for k, t in keys if getattr(t, "__origin__", None) is list]
    dicts = [k for k, t in keys if getattr(t, "__origin__", None) is dict]
    sections = sorted({k.rsplit(".", 1)[0] + "." for k, _ in keys if "." in k}) + [""]
    return st.one_of(
        st.builds(
            "{}={}".format, st.sampled_from(ints), st.sampled_from(["abc", "1.5", "[1]", "{a: 1}", "nan", "true"])
        ),
        st.builds("{}={}".format, st.sampled_from(ints), st.integers(2**63, 2**90)),
        st.builds(
            "{}={}".format, st.sampled_from(floats), st.sampled_from(["nan", "inf", "-inf", "NaN", "abc", "[1]"])
        ),
        st.builds("{}={}".format, st.sampled_from(bools), st.sampled_from(["maybe", "tru", "[1]", "{a: 1}"])),
        st.builds("{}={}".format, st.sampled_from(lists), st.sampled_from(["{a: 1}", "[[1]]", "[{a: 1}]"])),
        st.builds("{}={}".format, st.sampled_from(dicts), st.sampled_from(["5", "[1]", "abc", "{a: nan}", "{a: [1]}"])),
        st.builds("{}{}=1".format, st.sampled_from(sections), st.from_regex(r"\Abogus_[a-z]{1,6}\Z")),
        st.builds("{}=bogus_{}".format, st.sampled_from(ENUMS), st.from_regex(r"\A[a-z]{1,6}\Z")),
        st.sampled_from(OUT_OF_RANGE),
    )


SHORT = [
    "logging.wandb_mode=disabled",
    "model.dim=64",
    "model.head_dim=32",
    "data.seq_len=16",
    "steps=1",
]  # if one slips


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(bad=bad_overrides(), good=st.lists(st.sampled_from(["model.dim=64", "model.head_dim=32", "data.seq_len=32",
                                                            "steps=3", "optim.lr=1e-3"]), max_size=3))  # fmt: skip
def test_fuzzed_bad_overrides_only_end_in_exit_2_with_one_line(tmp_path_factory, bad, good):
    """Through the trainer's entry point (in process: the same main() the CLI runs)."""
    from lingua_wd.train import main

    dump = tmp_path_factory.getbasetemp() / "fuzz" / "never"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([f"dump_dir={dump}", *SHORT, *good, bad])
    out = err.getvalue().strip().splitlines()
    assert code == 2 and len(out) == 1 and out[0].startswith("config error: "), (bad, out)
    assert "Traceback" not in err.getvalue() and not dump.exists()  # never a run that starts


@pytest.mark.parametrize(
    "bad, key",
    [
        ("optim.lr=inf", "optim.lr"),
        ("data.sources.x.y=1", "data.sources.x"),
        ("seed=-1", "seed"),
        ("model.dim=1073741824", "model"),
        ("model.rope_theta=nan", "model.rope_theta"),
    ],
)
def test_bad_values_on_the_command_line(tmp_path, bad, key):
    """In process, the CLI's own main(); the real process's exit code and stderr: the test below."""
    from lingua_wd.train import main

    dump, err = tmp_path / "never", io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([f"dump_dir={dump}", bad])
    assert code == 2 and len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
    assert err.getvalue().startswith(f"config error: {key}: ") and not dump.exists()


def test_memory_estimate_refuses_with_the_estimate(tmp_path):
    proc = subprocess.run(
        [sys.executable, TRAIN, f"dump_dir={tmp_path / 'x'}", "model.dim=16384", "model.n_layers=8"],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    (line,) = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and line.startswith("config error: model: needs ~") and "GB" in line and "RAM" in line


# ----------------------------------------------------------------------------- 8. rank-count-free results


def test_validation_set_is_the_same_on_any_rank_count():
    from lingua_wd.data import DataArgs, build_tokenizer, val_batches

    args = DataArgs(seq_len=32, batch_size=8, micro_batch_size=2)
    tok = build_tokenizer(args.tokenizer)

    def windows(world):
        return sorted(
            tuple(row.tolist()) for r in range(world) for b in val_batches(args, tok, r, world, 3) for row in b
        )

    one = windows(1)
    assert len(one) == 3 * 8 and windows(2) == one and windows(4) == one
    per_rank = [len(val_batches(args, tok, r, 4, 3)) for r in range(4)]
    assert per_rank == [3, 3, 3, 3]  # 24 windows / 4 ranks / micro-batches of 2


@pytest.mark.slow
def test_val_loss_and_train_loss_last_same_on_1_and_2_ranks(tmp_path, tiny):
    common = [*tiny, "steps=4", "log_freq=1", "eval_batches=4", "checkpoint.every=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    one_run = start_train([f"dump_dir={one}", *common])
    run_train([f"dump_dir={two}", *common], nproc=2)
    one_run.wait()
    a, b = done(one), done(two)
    assert math.isclose(a["val_loss"], b["val_loss"], rel_tol=1e-4), (a, b)
    assert math.isclose(a["train_loss_last"], b["train_loss_last"], rel_tol=1e-4), (a, b)


# ----------------------------------------------------------------------------- warnings say the real cause


def test_size_mismatch_and_missing_manifest_are_named(tmp_path, tiny, caplog):
    dump = tmp_path / "run"
    run_train([f"dump_dir={dump}", *tiny, "steps=4", "checkpoint.every=2", "eval_freq=0"])
    root = dump / "checkpoints"
    shard = root / f"{4:010d}" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    (root / f"{2:010d}" / MANIFEST).unlink()
    with caplog.at_level("WARNING"):
        assert list_checkpoints(root) == []
    text = caplog.text
    assert "__0_0.distcp: size mismatch (100 bytes, the manifest says" in text
    assert "no MANIFEST.json: its write was interrupted" in text


def test_dry_lanes_are_one_warning_line_with_the_count(tmp_path, caplog):
    from lingua_wd.data import DataArgs, TrainLoader, build_tokenizer

    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " * 40}) + "\n" for i in range(64)))
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "a single document " * 40}) + "\n")
    args = DataArgs(
        sources={str(tmp_path / "big.jsonl"): 1.0, str(tmp_path / "one.jsonl"): 1.0},
        seq_len=16, batch_size=8, micro_batch_size=2, lanes=8, workers=0, val_sources="",
    )  # fmt: skip
    loader = TrainLoader(args, build_tokenizer(args.tokenizer), 0, 1)
    with caplog.at_level("WARNING"):
        for _ in range(4):
            loader.next_batch()
    loader.close()
    dry = [r.getMessage() for r in caplog.records if "no usable document" in r.getMessage()]
    assert len(dry) == 1 and "in the share of 7 lanes so far (1, 2, 3, 4, 5, 6, 7)" in dry[0], dry


def test_run_state(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.state() == "new"
    run.path.mkdir()
    run.metrics.write_text("{}\n")
    assert run.state() == "started"
    (run.checkpoints / f"{4:010d}").mkdir(parents=True)
    assert run.state() == "started"  # no manifest: not resumable
    (run.checkpoints / f"{4:010d}" / MANIFEST).write_text("{}")
    assert run.state() == "resume"
    lock = rundir.RunLock(run)
    lock.acquire()
    assert run.state() == "running"
    lock.release()
    run.write_done({"step": 4})
    assert run.state() == "done" and run.read_done() == {"step": 4}
    run.write_exit(75, 4)
    assert run.read_exit()["cause"] == "stopped by a signal, checkpoint saved"
