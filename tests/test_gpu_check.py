"""scripts/gpu_check.py (issue 19): its CPU smoke path, and the time budgets that make one call always return."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_cpu_smoke_runs_parts_and_writes_summary(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "gpu_check.py"),
        "--cpu-smoke",
        "--out",
        str(tmp_path),
        "--parts",
        "tests,checkpoint,data",
    ]  # fmt: skip  (the other scripts' own smoke tests: bench.py in test_loss.py, bench_probes.py in
    # test_probes.py, bench_optim.py in test_muon.py)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    for name in ("tests", "checkpoint", "data"):
        assert f"| {name} |" in summary and f"## {name}:" in summary
    for name in ("perf", "probes", "optim"):
        assert f"| {name} | " in summary and "skipped: not in --parts" in summary
    assert "gpu-marked" in summary and "deselected" in summary  # pytest's count line made it in
    assert "tokens/s" in summary and "no verdicts" in summary  # a table from a file the part wrote
    assert "| d | checkpoint GB | save s |" in summary  # a table from the part's stdout
    assert (tmp_path / "logs.txt").read_text().startswith("===== tests")


def test_part_past_its_budget_is_stopped_and_keeps_its_rows(tmp_path):
    slow = "import time; print('| d | x |'); print('| --- | --- |'); print('| 1 | 2 |', flush=True); time.sleep(120)"
    part = gpu_check.Part("slow", 1, ["-c", slow], ["-c", slow], "a part that hangs")
    gpu_check.run_part(part, tmp_path, budget_s=1, smoke=True, env=None)
    assert part.status.startswith("stopped at its budget") and part.seconds < 30
    assert gpu_check.markdown_tables(part.output) == [["| d | x |", "| --- | --- |", "| 1 | 2 |"]]


def test_budget_spent_skips_parts_and_unknown_part_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu-smoke", "--out",
                           str(tmp_path), "--budget-s", "5"], cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("skipped: the total budget is spent") == len(gpu_check.parts())
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(tmp_path), "--parts",
                          "nope"], cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "nope" in bad.stderr


def test_verdicts_read_the_tables_not_guesses(tmp_path):
    ps = {p.name: p for p in gpu_check.parts()}
    (tmp_path / "perf.md").write_text(
        "| run | d | micro-batch | settings | tokens/s | MFU | step ms |\n| --- | --- | --- | --- | --- | --- | --- |\n"
        "| ours | 512 | 8 | x | 1 | 36.0% | 1 |\n| ours | 512 | 16 | x | 1 | 39.5% | 1 |\n| HF | 512 | 8 | x | 1 | 41.0% | 1 |\n"
        "| ours | 1024 | 4 | x | 1 | 44.0% | 1 |\n"
    )
    ps["probes"].output = "| d | overhead |\n| --- | --- |\n| 1024 | +2.10% |\n| 2048 | +3.40% |\n"
    text = "\n".join(gpu_check.verdicts(ps, tmp_path))
    assert "| d=512 MFU >= 38% | 39.5% (micro-batch 16) | met |" in text  # best of ours; HF's row ignored
    assert "| d=1024 MFU >= 45% | 44.0% (micro-batch 4) | missed by 1.0 points |" in text
    assert "d=2048 MFU >= 50% | no MFU figure" in text and "not measured" in text
    assert "| probes d=1024 <= 3% | +2.10% | met |" in text and "| probes d=2048 <= 3% | +3.40% | missed |" in text
