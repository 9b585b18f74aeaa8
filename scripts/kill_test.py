"""Kill a training run at random moments, restart it each time, and compare with an uninterrupted run.

    python scripts/kill_test.py --kills 10 [--nproc 2] [-- extra train overrides]

Prints one line per kill (when, which checkpoint the restart resumed from) and the verdict: every
line of metrics.jsonl (without the wall-clock fields, lingua_wd.metrics.WALL_CLOCK_KEYS) and the
final DONE record must equal those of the uninterrupted run. log_freq (3) divides neither
checkpoint.every (7) nor eval_freq (10), so the log state saved in checkpoints is exercised.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lingua_wd.metrics import WALL_CLOCK_KEYS  # noqa: E402
from lingua_wd.rundir import RunDir  # noqa: E402

TINY = ["model.dim=64", "model.n_layers=2", "model.head_dim=32", "data.seq_len=32", "data.batch_size=8",
        "data.micro_batch_size=2", "log_freq=3", "eval_freq=10", "eval_batches=1", "steps=400",
        "checkpoint.every=7"]  # fmt: skip


def cmd(argv: list[str], nproc: int) -> list[str]:
    train = str(ROOT / "apps" / "train.py")
    if nproc == 1:
        return [sys.executable, train, *argv]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", train, *argv]


def losses(dump: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in RunDir(dump).read_metrics() if "loss" in r}


def lines(dump: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS} for r in RunDir(dump).read_metrics()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-wait", type=float, default=2.0, help="longest seconds of training before a kill")
    ap.add_argument("overrides", nargs="*")
    opts = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = [*TINY, *opts.overrides]
    work = Path(tempfile.mkdtemp(prefix="kill_test_"))
    ref, dump = work / "ref", work / "killed"
    subprocess.run(cmd([f"dump_dir={ref}", *argv], opts.nproc), env=env, check=True, capture_output=True)
    rng = random.Random(opts.seed)
    for k in range(opts.kills):
        proc = subprocess.Popen(cmd([f"dump_dir={dump}", *argv], opts.nproc), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
        before = max(losses(dump), default=0) if (dump / "metrics.jsonl").exists() else 0
        while (
            proc.poll() is None and (max(losses(dump), default=0) if (dump / "metrics.jsonl").exists() else 0) <= before
        ):
            time.sleep(0.05)  # wait until this start is training (past start-up and resume)
        wait = rng.uniform(0.0, opts.max_wait)
        time.sleep(wait)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        err = proc.communicate()[1]
        resumed = next((line.split("resumed from ")[1] for line in err.splitlines() if "resumed from" in line), "-")
        logged = max(losses(dump), default=0) if (dump / "metrics.jsonl").exists() else 0
        print(
            f"kill {k + 1:2d} {wait:4.1f}s into training: last logged step {logged:3d}, this start resumed from {resumed}"
        )
        if (dump / "DONE").exists():
            print("  (the run finished before this kill)")
    subprocess.run(cmd([f"dump_dir={dump}", *argv], opts.nproc), env=env, check=True, capture_output=True)
    same_steps = lines(dump) == lines(ref)
    done_ref, done = (RunDir(d).read_done() for d in (ref, dump))
    print(f"uninterrupted final: {done_ref}")
    print(f"killed {opts.kills}x final: {done}")
    verdict = same_steps and done == done_ref
    print(f"IDENTICAL metrics.jsonl ({len(lines(ref))} lines) and final record" if verdict else "MISMATCH")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
