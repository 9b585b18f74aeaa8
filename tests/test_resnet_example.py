"""examples/resnet_digits.py as a user runs it: a real short sweep on sklearn's digits (2 WD rules x 2 widths x
2 base LRs, 30 steps each), its metrics files, the per-class LR/WD the library gave the hidden convolutions,
the probes on layer3.2.conv1, the figures, the reuse of finished runs, --help and a bad key."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None,
    reason="scikit-learn is missing (pip install -e '.[examples]'): it ships the digits data",
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "resnet_digits.py"
LAYER = "layer3.2.conv1"
ETA, LAMBDA = [4e-3, 1.6e-2], 0.1
# base_planes=8: the 0.25x base has 2 stage-1 planes, the 1x net 8, so m = 4 at 1x
ARGV = ["widths=[0.25,1.0]", "base_width=0.25", "base_planes=8", f"lrs=[{ETA[0]},{ETA[1]}]", "seeds=[0]",
        "steps=30", "probe_every=10", "probe_first=2", "batch_size=32", "workers=1", f"weight_decay={LAMBDA}"]  # fmt: skip


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)


def records(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / "runs" / f"{name}.jsonl").read_text().splitlines()]


@needs_sklearn
@pytest.mark.slow  # 8 tiny ResNets x 30 steps and 5 processes: ~25 s on 2 idle cores, ~70 s under load
def test_resnet_digits_sweep(tmp_path):
    out = tmp_path / "resnet"
    proc = run(f"out_dir={out}", *ARGV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 runs, 0 finished before, 8 to train" in proc.stdout
    for wd in ("standard", "independent"):
        for width, m in ((0.25, 1), (1.0, 4)):
            for eta in ETA:
                recs = records(out, f"{wd}_w{width:g}_lr{eta:g}_s0")
                head, logs, final = recs[0], recs[1:-1], recs[-1]
                assert head["width_mult"] == m
                # muP (eta/m for the hidden convs) and the WD rule: lambda (standard) or m lambda (independent)
                hidden = head["groups"]["hidden"]
                assert hidden["lr"] == pytest.approx(eta / m, rel=1e-12)
                assert hidden["weight_decay"] == pytest.approx(LAMBDA * (m if wd == "independent" else 1), rel=1e-12)
                assert head["groups"]["output"]["lr"] == pytest.approx(eta / m, rel=1e-12)
                assert [r["step"] for r in logs] == [1, 2, 10, 20, 30]
                assert logs[-1]["loss"] < logs[0]["loss"], f"{wd} {width} {eta}: the loss did not fall"
                for r in logs:
                    for metric in ("rel_update", "weight_align", "update_align", "align_ratio", "rrc"):
                        v = r[f"probe/{LAYER}/{metric}"]
                        assert math.isfinite(v) and v > 0, (metric, v)
                    # eq 4: rrc = align_ratio x rel_update
                    p = {k.rsplit("/", 1)[-1]: v for k, v in r.items() if k.startswith(f"probe/{LAYER}/")}
                    assert p["rrc"] == pytest.approx(p["align_ratio"] * p["rel_update"], rel=1e-4)
                assert final["final"] and math.isfinite(final["val_loss"]) and 0 <= final["val_acc"] <= 1
    for name in ("lr_transfer", "rrc_widths", "alignment_time"):
        png = out / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # a rerun trains nothing and leaves the finished runs' files as they were
    before = {p.name: p.read_bytes() for p in (out / "runs").glob("*.jsonl")}
    again = run(f"out_dir={out}", *ARGV, "plot=false")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "8 runs, 8 finished before, 0 to train" in again.stdout
    assert {p.name: p.read_bytes() for p in (out / "runs").glob("*.jsonl")} == before
    # finished runs of other settings are never reused as this command's
    other = run(f"out_dir={out}", *ARGV, "weight_decay=0.5", "plot=false")
    assert other.returncode == 2 and other.stderr.startswith("config error: out_dir") and "weight_decay" in other.stderr


@needs_sklearn
def test_resnet_digits_cli(tmp_path):
    help_ = run("--help")
    assert help_.returncode == 0 and "base_planes=16" in help_.stdout and "layer3.2.conv1" in help_.stdout
    bad = run(f"out_dir={tmp_path}", "wds=[decoupled]")
    assert bad.returncode == 2 and bad.stderr.startswith("config error: wds") and "Traceback" not in bad.stderr
    typo = run(f"out_dir={tmp_path}", "widht=[1.0]")
    assert typo.returncode == 2 and "widht" in typo.stderr and "Traceback" not in typo.stderr


def test_docs_quote_the_script():
    """docs/library.md's "lines added to the loop" are the script's own lines (no drift)."""
    doc = (ROOT / "docs" / "library.md").read_text().split("### The lines added to the loop", 1)[1]
    block = doc.split("```python", 1)[1].split("```", 1)[0]
    script = {line.strip() for line in SCRIPT.read_text().splitlines()}
    quoted = [line.strip() for line in block.splitlines() if line.strip() and line.strip() != "..."]
    assert len(quoted) > 15
    missing = [line for line in quoted if line not in script]
    assert not missing, f"docs/library.md quotes lines the script does not have: {missing}"


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state


@needs_sklearn
@pytest.mark.slow  # one process start and a kill: ~10 s
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
def test_resnet_digits_sigterm_ends_the_workers(tmp_path):
    """SIGTERM to the command ends its worker processes too, and leaves no file of an unfinished run."""
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), f"out_dir={out}", *ARGV, "steps=3000", "workers=2"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert "to train" in proc.stdout.readline()
    deadline = time.time() + 60
    children: list[int] = []
    while len(children) < 2 and time.time() < deadline:  # the pool's two workers (and its resource tracker)
        time.sleep(0.2)
        children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == proc.pid]
    assert len(children) >= 2, children
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) != 0
    deadline = time.time() + 10
    while any(_alive(c) for c in children) and time.time() < deadline:
        time.sleep(0.2)
    left = [c for c in children if _alive(c)]
    for c in left:  # do not leave them running when the test fails
        os.kill(c, signal.SIGKILL)
    assert not left, "workers outlived the command"
    assert not list((out / "runs").glob("*.jsonl")) if (out / "runs").exists() else True


def _ppid(proc_dir: Path) -> int:
    try:
        return int(proc_dir.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return -1
