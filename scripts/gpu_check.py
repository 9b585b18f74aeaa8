"""Every GPU figure of docs/benchmarks.md in one prepared call on one GPU, in under 9 minutes (issue 19).

    python scripts/gpu_check.py --out OUT_DIR                 # on the GPU machine
    python scripts/gpu_check.py --cpu-smoke --out /tmp/gc     # on a CPU: every part, tiny shapes (checks the script)
    python scripts/gpu_check.py --fetch-wheels                # here, before: wheels the GPU image lacks -> .whl/

Parts, in order, each a subprocess with its own time budget (seconds, scaled by --budget-s / 480):

| part | what | budget |
| --- | --- | --- |
| tests | `pytest -m gpu tests/`: the gpu-marked tests | 75 |
| perf | `scripts/bench.py --baseline hf`: ours vs compiled HF at d=512 (micro-batch 8, 16), 1024 (4), 2048 (2) | 170 |
| profile | `scripts/bench.py --profile` at d=512 micro-batch 8: kernel-time categories + GPU idle | 45 |
| probes | `scripts/bench_probes.py --dims 1024 2048`: all linears every 10 steps, 2 sequences per GPU per step | 100 |
| checkpoint | `scripts/bench_checkpoint.py`: DCP save / verify / load GB/s with checksums (if the script exists) | 40 |
| optim | `scripts/bench_optim.py`: the Muon step's cost relative to AdamW (if the script exists) | 25 |
| data | `scripts/bench_data.py`: loader tokens/s per worker count | 25 |

A part that runs past its budget is stopped and reported as such; a part whose budget is gone before it
starts is skipped with a note; so one call always returns results. Everything goes to OUT_DIR/summary.md
(each part's status, its tables, the targets met or missed) and OUT_DIR/logs.txt (each part's output);
summary.md is rewritten after every part, so a call killed from outside keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
FULL_BUDGET_S = 480.0  # the parts' budgets below add up to this
# Targets of issue 19 (one H200, bf16, compile on): MFU per width, and the probe overhead.
MFU_TARGETS = {512: 38.0, 1024: 45.0, 2048: 50.0}
PROBE_TARGET_PCT = 3.0
# What the GPU image lacked last time (device README: carry them as wheels); Python 3.12 there.
WHEELS = ("omegaconf==2.3.0", "antlr4-python3-runtime==4.9.3", "zstandard==0.23.0")


@dataclass
class Part:
    name: str
    budget_s: float
    argv: list[str]  # after `python`; {out} is replaced by the output dir
    smoke_argv: list[str]
    what: str
    optional_script: str = ""  # the part is skipped with a note when this script does not exist (not landed yet)
    tables_from: str = ""  # a markdown file the part writes (relative to out); else tables are taken from stdout
    status: str = "not run"
    seconds: float = 0.0
    output: str = field(default="", repr=False)


def parts() -> list[Part]:
    return [
        Part("tests", 75, ["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/"],
             ["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_train.py"],  # one module's collection
             "the gpu-marked tests"),
        Part("perf", 170, ["scripts/bench.py", "--baseline", "hf", "--dims", "512,1024,2048", "--micro-batch", "8/16,4,2",
                           "--out", "{out}/perf.md", "--budget-s", "{budget}"],
             ["scripts/bench.py", "--cpu-smoke", "--baseline", "hf", "--warmup", "1", "--steps", "1",
              "--out", "{out}/perf.md"],
             "ours vs compiled HF, 20 blocks, seq 4096, vocab 128,256", tables_from="perf.md"),
        Part("profile", 45, ["scripts/bench.py", "--dims", "512", "--micro-batch", "8", "--profile", "--steps", "3",
                             "--out", "{out}/profile.md"],
             ["scripts/bench.py", "--cpu-smoke", "--profile", "--warmup", "1", "--steps", "1", "--out", "{out}/profile.md"],
             "where a d=512 step's GPU time goes", tables_from="profile.md"),
        Part("probes", 100, ["scripts/bench_probes.py", "--dims", "1024", "2048", "--reps", "1"],
             ["scripts/bench_probes.py", "--cpu-smoke"],
             "probe overhead: all linears every 10 steps, 2 sequences per GPU per step"),
        Part("checkpoint", 40, ["scripts/bench_checkpoint.py", "--dims", "2048", "--reps", "1"], ["scripts/bench_checkpoint.py", "--cpu-smoke"],
             "checkpoint save / load GB/s with checksums", optional_script="scripts/bench_checkpoint.py"),
        Part("optim", 25, ["scripts/bench_optim.py", "--dims", "1024", "2048"], ["scripts/bench_optim.py", "--cpu-smoke"],
             "Muon step vs AdamW step", optional_script="scripts/bench_optim.py"),
        Part("data", 25, ["scripts/bench_data.py", "--workers", "1", "8", "14", "--tokenizer", "bytes", "bpe",
                          "--seconds", "3", "--out", "{out}/data.md"],
             ["scripts/bench_data.py", "--workers", "0", "1", "--tokenizer", "bytes", "--seconds", "0.5",
              "--seq-len", "256", "--batch", "8", "--out", "{out}/data.md"],
             "loader tokens/s (one rank)", tables_from="data.md"),
    ]  # fmt: skip


def run_part(part: Part, out: Path, budget_s: float, smoke: bool, env: Optional[dict[str, str]]) -> None:
    """Run one part as a subprocess (its own process group, so a timeout stops everything it started)."""
    if part.optional_script and not (ROOT / part.optional_script).exists():
        part.status = f"skipped: {part.optional_script} has not landed"
        return
    argv = [a.replace("{out}", str(out)).replace("{budget}", f"{0.8 * budget_s:.0f}")
            for a in (part.smoke_argv if smoke else part.argv)]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        part.output, _ = proc.communicate(timeout=budget_s)
        part.status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        part.output, _ = proc.communicate()
        part.status = f"stopped at its budget ({budget_s:.0f} s): the rows it finished are kept"
    part.seconds = time.perf_counter() - t0


def markdown_tables(text: str) -> list[list[str]]:
    """The markdown tables in `text`, each a list of its lines."""
    tables, cur = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            tables.append(cur)
            cur = []
    if cur:
        tables.append(cur)
    return [t for t in tables if len(t) >= 3]


def table_rows(table: list[str]) -> list[dict[str, str]]:
    head = [c.strip() for c in table[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in line.strip("|").split("|")), strict=False)) for line in table[2:]]


def number(cell: str) -> Optional[float]:
    m = re.search(r"[-+]?\d[\d,]*\.?\d*", cell or "")
    return float(m.group(0).replace(",", "")) if m else None


def verdicts(by_name: dict[str, Part], out: Path) -> list[str]:
    """Targets met / missed, read from the parts' own tables (never guessed: a missing figure says so)."""
    lines = ["| target | measured | verdict |", "| --- | --- | --- |"]
    perf = by_name["perf"]
    rows = [r for t in markdown_tables(part_text(perf, out)) for r in table_rows(t) if r.get("run") == "ours"]
    for dim, target in MFU_TARGETS.items():
        mfus = [(number(r.get("MFU", "")), r.get("micro-batch", "?")) for r in rows if number(r.get("d", "")) == dim]
        mfus = [(m, mb) for m, mb in mfus if m is not None]
        if not mfus:
            lines.append(f"| d={dim} MFU >= {target:.0f}% | no MFU figure (perf: {perf.status}) | not measured |")
            continue
        best, mb = max(mfus)
        lines.append(f"| d={dim} MFU >= {target:.0f}% | {best:.1f}% (micro-batch {mb}) | "
                     f"{'met' if best >= target else f'missed by {target - best:.1f} points'} |")  # fmt: skip
    probes = by_name["probes"]
    prow = [r for t in markdown_tables(part_text(probes, out)) for r in table_rows(t) if "overhead" in r]
    for r in prow:
        pct = number(r["overhead"])
        if pct is not None:
            ok = pct <= PROBE_TARGET_PCT
            lines.append(
                f"| probes d={r.get('d')} <= {PROBE_TARGET_PCT:.0f}% | {pct:+.2f}% | {'met' if ok else 'missed'} |"
            )
    if not prow:
        lines.append(f"| probes <= {PROBE_TARGET_PCT:.0f}% | no figure (probes: {probes.status}) | not measured |")
    return lines


def part_text(part: Part, out: Path) -> str:
    f = out / part.tables_from if part.tables_from else None
    return f.read_text() if f is not None and f.exists() else part.output


def write_summary(out: Path, ps: list[Part], meta: dict[str, str]) -> None:
    by_name = {p.name: p for p in ps}
    lines = [f"# GPU check {meta['date']}", "", f"Device: {meta['device']}. Command: `{meta['command']}`.", "",
             "| part | what | status | seconds |", "| --- | --- | --- | --- |"]  # fmt: skip
    lines += [f"| {p.name} | {p.what} | {p.status} | {p.seconds:.0f} |" for p in ps]
    lines += ["", "## Targets", ""]
    if meta["device"].startswith("CPU smoke"):
        lines += ["(a CPU smoke run checks the script only: no verdicts)"]
    else:
        lines += verdicts(by_name, out)
    for p in ps:
        if p.status == "not run" or p.status.startswith("skipped"):
            continue
        lines += ["", f"## {p.name}: {p.what}", ""]
        tables = markdown_tables(part_text(p, out))
        if p.name == "tests":  # pytest's last line: passed / failed / skipped counts
            tail = [x for x in p.output.splitlines() if x.strip()][-1:] or ["(no output)"]
            lines += ["```", *tail, "```"]
        for t in tables:
            lines += [*t, ""]
        if not tables and p.name != "tests":
            lines += ["(no table: see logs.txt)"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    log = [f"===== {p.name}: {p.status} ({p.seconds:.0f} s)\n{p.output}" for p in ps if p.output]
    (out / "logs.txt").write_text("\n".join(log))


def device_name(smoke: bool) -> str:
    if smoke:
        return f"CPU smoke run ({platform.processor() or platform.machine()}): figures mean nothing"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"


def fetch_wheels(dest: Path) -> int:
    """Download the wheels the GPU image lacks (device README: Python 3.12, manylinux x86_64)."""
    plats = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *plats, "-d", str(dest), *WHEELS]  # fmt: skip
    pure = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dest), WHEELS[1]]  # antlr4: sdist -> py3 wheel
    rc = subprocess.call(cmd[:-2] + [WHEELS[0], WHEELS[2]])
    return rc or subprocess.call(pure)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", default="", help="output folder for summary.md and logs.txt (required unless --fetch-wheels)"
    )
    p.add_argument(
        "--budget-s", type=float, default=FULL_BUDGET_S, help="total seconds; each part's budget scales with it"
    )
    p.add_argument("--parts", default="", help="comma-separated subset of the parts (default: all)")
    p.add_argument("--cpu-smoke", action="store_true", help="run every part with tiny shapes on CPU")
    p.add_argument("--fetch-wheels", action="store_true", help="download the wheels the GPU image lacks into .whl/")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    if a.fetch_wheels:
        return fetch_wheels(ROOT / ".whl")
    if not a.out:
        print("gpu_check: --out is required (a folder for summary.md and logs.txt)", file=sys.stderr)
        return 2
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ps = parts()
    wanted = set(filter(None, a.parts.split(",")))
    unknown = wanted - {p.name for p in ps}
    if unknown:
        print(f"gpu_check: --parts: unknown {sorted(unknown)} (known: {[p.name for p in ps]})", file=sys.stderr)
        return 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    meta = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "device": device_name(a.cpu_smoke),
            "command": "python scripts/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])}  # fmt: skip
    scale, t0, planned = a.budget_s / FULL_BUDGET_S, time.perf_counter(), 0.0
    for p in ps:
        if wanted and p.name not in wanted:
            p.status = "skipped: not in --parts"
            continue
        planned += p.budget_s * scale  # time a part's predecessors did not use rolls forward to it
        budget = min(planned, a.budget_s) - (time.perf_counter() - t0)
        if budget < 10:
            p.status = "skipped: the total budget is spent"
        else:
            run_part(p, out, budget, a.cpu_smoke, env)
        print(f"[gpu_check] {p.name}: {p.status} ({p.seconds:.0f} s)", flush=True)
        write_summary(out, ps, meta)
    write_summary(out, ps, meta)
    print((out / "summary.md").read_text())
    failed = [p.name for p in ps if p.status.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
