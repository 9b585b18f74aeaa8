"""End-to-end trainer runs in subprocesses: the demo, 2-rank FSDP2 on gloo, kill -9 and resume, rotation."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import launch, losses, read_metrics, run_train, start_train
from lingua_wd.checkpoint import MANIFEST, list_checkpoints


def test_demo_run_writes_config_metrics_checkpoint(tmp_path, tiny):
    dump = tmp_path / "run"
    run_train(["config=configs/debug.yaml", f"dump_dir={dump}", *tiny, "steps=30", "log_freq=1", "eval_freq=15"])
    cfg = yaml.safe_load((dump / "config.yaml").read_text())
    assert cfg["steps"] == 30 and cfg["model"]["dim"] == 64 and cfg["model"]["vocab_size"] == 258
    recs = read_metrics(dump)
    loss = losses(dump)
    assert sorted(loss) == list(range(1, 31))
    assert sum(list(loss.values())[-5:]) / 5 < 0.7 * sum(list(loss.values())[:3]) / 3  # it learns
    assert [r["step"] for r in recs if "val/loss" in r] == [15, 30]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in recs if "loss" in r)
    ckpts = list_checkpoints(dump / "checkpoints")
    assert [p.name for p in ckpts][-1] == f"{30:010d}"
    done = json.loads((dump / "DONE").read_text())
    assert done["step"] == 30 and done["val_loss"] > 0


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_two_rank_fsdp_loss_falls(tmp_path, tiny):
    dump = tmp_path / "fsdp"
    proc = run_train([f"dump_dir={dump}", *tiny, "steps=40", "log_freq=10", "checkpoint.every=0"], nproc=2)
    loss = losses(dump)
    assert loss[40] < 0.7 * loss[10], loss
    assert "2 ranks on cpu" in proc.stdout + proc.stderr
    assert len(list((dump / "checkpoints" / f"{40:010d}").glob("rank*.pt"))) == 2


def _wait_for_checkpoint(root: Path, proc, min_step: int, timeout=180):
    t0 = time.time()
    while time.time() - t0 < timeout:
        done = [int(p.name) for p in list_checkpoints(root)]
        if done and max(done) >= min_step:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def _wait_for_step(dump: Path, proc, step: int, timeout=180):
    t0 = time.time()
    while not (dump / "metrics.jsonl").exists() or max(losses(dump), default=0) < step:
        assert time.time() - t0 < timeout and proc.poll() is None
        time.sleep(0.05)


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_kill9_and_resume_is_bitwise_identical(tmp_path, tiny):
    common = [*tiny, "steps=24", "log_freq=1", "checkpoint.every=3", "checkpoint.keep=2", "eval_freq=0"]
    ref = tmp_path / "ref"
    ref_run = start_train([f"dump_dir={ref}", *common])
    dump = tmp_path / "killed"
    proc = launch([f"dump_dir={dump}", *common])
    _wait_for_checkpoint(dump / "checkpoints", proc, 6)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(dump))
    assert killed_at < 24
    run_train([f"dump_dir={dump}", *common])
    ref_run.wait()
    assert losses(dump) == losses(ref)  # bitwise: floats compared exactly
    assert [r["step"] for r in read_metrics(dump) if "loss" in r] == list(range(1, 25))  # no duplicated lines


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_sigterm_on_two_ranks_saves_and_resumes_exactly(tmp_path, tiny):
    common = [*tiny, "steps=30", "log_freq=1", "checkpoint.every=0", "eval_freq=0"]
    ref = tmp_path / "ref"
    run_train([f"dump_dir={ref}", *common], nproc=2)
    dump = tmp_path / "term"
    proc = launch([f"dump_dir={dump}", *common], nproc=2)
    _wait_for_step(dump, proc, 5)
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM does: torchrun and both workers get it
    proc.wait(timeout=120)  # torchrun itself exits non-zero on SIGTERM; the workers exit 75 after saving
    stopped = int(list_checkpoints(dump / "checkpoints")[-1].name)
    assert 5 <= stopped < 30
    run_train([f"dump_dir={dump}", *common], nproc=2)
    assert losses(dump) == losses(ref)


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_sigterm_single_process_exits_75(tmp_path, tiny):
    dump = tmp_path / "one"
    proc = launch([f"dump_dir={dump}", *tiny, "steps=2000", "log_freq=1", "checkpoint.every=0", "eval_freq=0"])
    _wait_for_step(dump, proc, 3)
    os.killpg(proc.pid, signal.SIGUSR1)
    assert proc.wait(timeout=120) == 75
    assert 3 <= int(list_checkpoints(dump / "checkpoints")[-1].name) < 2000
    assert not (dump / "DONE").exists()


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_rotation_keeps_last_k_and_skips_incomplete(tmp_path, tiny):
    dump = tmp_path / "rot"
    run_train([f"dump_dir={dump}", *tiny, "steps=10", "checkpoint.every=2", "checkpoint.keep=2", "eval_freq=0"])
    root = dump / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [f"{8:010d}", f"{10:010d}"]
    # a later checkpoint whose manifest is missing (a crash mid-write) is never picked
    broken = root / f"{12:010d}"
    broken.mkdir()
    (broken / "junk").write_text("x")
    assert [p.name for p in list_checkpoints(root)] == [f"{8:010d}", f"{10:010d}"]
    # damage a file of a complete checkpoint: its manifest no longer matches and it is skipped
    victim = next((root / f"{10:010d}").glob("*.distcp"))
    victim.write_bytes(victim.read_bytes()[:10])
    assert [p.name for p in list_checkpoints(root)] == [f"{8:010d}"]
    assert json.loads((root / f"{8:010d}" / MANIFEST).read_text())["step"] == 8


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_finished_run_is_not_rerun(tmp_path, tiny):
    dump = tmp_path / "fin"
    run_train([f"dump_dir={dump}", *tiny, "steps=4", "eval_freq=0"])
    before = (dump / "metrics.jsonl").read_text()
    proc = run_train([f"dump_dir={dump}", *tiny, "steps=4", "eval_freq=0"])
    assert "already complete" in proc.stderr + proc.stdout
    assert (dump / "metrics.jsonl").read_text() == before


@pytest.mark.gpu
def test_gpu_bf16_fsdp_compile(tmp_path, tiny):
    dump = tmp_path / "gpu"
    run_train(
        [
            f"dump_dir={dump}",
            *tiny,
            "model.dim=256",
            "model.head_dim=128",
            "steps=60",
            "log_freq=1",
            "distributed.device=cuda",
            "distributed.compile=true",
            "distributed.param_dtype=bf16",
        ],
        timeout=600,
    )
    recs = [r for r in read_metrics(dump) if "loss" in r]
    first, last = (sum(r["loss"] for r in part) / 3 for part in (recs[:3], recs[-3:]))
    assert last < 0.7 * first
    assert recs[-1]["peak_mem_gb"] > 0 and recs[-1]["mfu"] is not None and recs[-1]["mfu"] > 0
    assert torch.cuda.is_available()


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_console_progress_eta_and_end_summary(tmp_path, tiny):
    """Each log line says step k/N, elapsed and ETA; the end prints one paragraph whose numbers are DONE's; the
    session (start, start step) is timed in EXIT.json; a resumed session says where it resumed."""
    import re

    dump = tmp_path / "run"
    common = [f"dump_dir={dump}", *tiny, "steps=16", "log_freq=2", "eval_freq=0", "checkpoint.every=0"]
    proc = launch(common)
    _wait_for_step(dump, proc, 4)
    os.killpg(proc.pid, signal.SIGUSR1)  # saves a checkpoint, exits 75
    assert proc.wait(timeout=120) == 75
    first = json.loads((dump / "EXIT.json").read_text())
    assert first["start_step"] == 0 and first["started"] <= first["time"] and first["step"] >= 4
    lines = proc.stderr.read().splitlines()
    progress = [x for x in lines if re.search(r"\| step +\d+/16 \| loss ", " | " + x.split(" I ", 1)[-1])]
    assert progress and all(re.search(r"\| elapsed \d+s \| eta (\d+s|\d+m\d\ds|\?)$", x) for x in progress), lines
    done = run_train(common)
    summary = [x for x in done.stderr.splitlines() if "run finished:" in x]
    rec = json.loads((dump / "DONE").read_text())
    assert rec["last_n"] == 16 and rec["tokens"] == 16 * 8 * 32
    want = (
        f"run finished: 16 steps, 4,096 tokens. Final train loss {rec['train_loss_last']:.4f} (mean of the last 16 "
        f"steps), val loss {rec['val_loss']:.4f}. This session: {16 - first['step']} steps in "
    )
    assert len(summary) == 1 and want in summary[0], summary
    assert f"resumed at step {first['step']}, " in summary[0] and "tokens/s on average, no MFU" in summary[0]
    assert json.loads((dump / "EXIT.json").read_text())["start_step"] == first["step"]
