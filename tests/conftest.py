"""Shared test helpers: tiny configs, subprocess launches of the real trainer, metrics readers."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: a worker's intra-op threads would spin-wait on a core the other
    # worker holds (an in-process test went from 0.5 s alone to 11 s under -n 2; the suite 8m49s -> 7m47s)
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "apps" / "train.py")

# a model small enough for a CPU test: 2 blocks, d=64, byte vocab
TINY = [
    "model.dim=64",
    "model.n_layers=2",
    "model.head_dim=32",
    "data.seq_len=32",
    "data.batch_size=8",
    "data.micro_batch_size=2",
    "eval_batches=2",
    "optim.lr=3e-3",
    "logging.wandb_mode=disabled",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    e.pop("RANK", None), e.pop("WORLD_SIZE", None), e.pop("LOCAL_RANK", None), e.pop("MASTER_PORT", None)
    return e


def train_cmd(argv: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, TRAIN, *argv]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        TRAIN,
        *argv,
    ]


def launch(argv: list[str], nproc: int = 1, **kw) -> subprocess.Popen:
    """A trainer in its own session (os.killpg reaches torchrun and its ranks), stderr piped for the test to read;
    `environ=` replaces the environment."""
    return subprocess.Popen(
        train_cmd(argv, nproc),
        cwd=ROOT,
        env=kw.pop("environ", env()),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,
    )


class Started:
    """A trainer running in the background, its output in files (a full pipe would stall it). A trainer uses
    one core: a test starts its reference run first, does its own work meanwhile, then `wait()`s for it."""

    running: list[Started] = []  # stopped after each test (autouse fixture below), should a test fail early

    def __init__(self, argv: list[str], nproc: int = 1, timeout: float = 300):
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(train_cmd(argv, nproc), cwd=ROOT, env=env(), stdout=self.out, stderr=self.err,
                                     text=True, start_new_session=True)  # fmt: skip
        self.deadline = time.monotonic() + timeout
        Started.running.append(self)

    def wait(self, check: bool = True) -> subprocess.CompletedProcess:
        try:
            code = self.proc.wait(max(0.0, self.deadline - time.monotonic()))
        finally:
            self.stop()
        with self.out, self.err:
            self.out.seek(0), self.err.seek(0)
            done = subprocess.CompletedProcess(self.proc.args, code, self.out.read(), self.err.read())
        if check and code != 0:
            raise AssertionError(f"train exited {code}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
        return done

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # torchrun and its ranks too
            self.proc.wait()
        if self in Started.running:
            Started.running.remove(self)


def start_train(argv: list[str], nproc: int = 1, timeout: float = 300) -> Started:
    return Started(argv, nproc, timeout)


def run_train(argv: list[str], nproc: int = 1, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    return start_train(argv, nproc, timeout).wait(check)


@pytest.fixture(autouse=True)
def _no_trainer_left_running():
    before = list(Started.running)  # a module fixture's runs are its own to wait for
    yield
    for started in [s for s in Started.running if s not in before]:
        started.stop()


def read_metrics(dump_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(dump_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(dump_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(dump_dir) if "loss" in r}


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker only (keywords also hold file names)
            item.add_marker(skip)


def probe_reference(w0, w1, x, lr, wd, r: float = 1.0) -> dict[str, float]:
    """SPEC §5 in float64 from W_t, W_{t+1}, X alone; r: the group's update RMS per unit LR (eq 33; Muon's,
    1 for AdamW)."""
    dw, nx = w1 - w0, x.norm()
    dwg = w1 - (1 - lr * wd) * w0
    wx, dwx, dwgx = (x @ w0.T).norm(), (x @ dw.T).norm(), (x @ dwg.T).norm()
    one_minus_a2 = 1 - (1 - lr * wd) ** 2
    out = {
        "rel_update": dw.norm() / w0.norm(),
        "weight_align": wx / (w0.norm() * nx),
        "update_align": dwx / (dw.norm() * nx),
        "rrc": dwx / wx,
        "weight_rms": w0.norm() / math.sqrt(w0.numel()),
        "eq_weight_rms": r * lr / math.sqrt(one_minus_a2),
        "eq_rel_update": math.sqrt(one_minus_a2),
        "sigma_max": torch.linalg.svdvals(w0)[0],
        "grad_rel_update": dwg.norm() / w0.norm(),
        "grad_update_align": dwgx / (dwg.norm() * nx),
        "grad_rrc": dwgx / wx,
        "update_srank": dw.norm() ** 2 / torch.linalg.svdvals(dw)[0] ** 2,
    }
    out["align_ratio"] = out["update_align"] / out["weight_align"]
    return {k: float(v) for k, v in out.items()}


def small_tmpfs(tmp_path: Path, size: str):
    """A tmpfs of `size` (e.g. "2560k") mounted at tmp_path/small for disk-full tests (a generator for a
    fixture: yields the mount point, unmounts after); skips where mounting needs root we do not have."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)
