"""The run directory: the one owner of its layout, its exit codes and its state.

Every other module (trainer, sweep, report, plots) asks this one where a file lives and what a
run's state is, instead of naming files itself.

```
<dump_dir>/
  config.yaml        the resolved config the run was started with
  metrics.jsonl      one JSON record per logged step (rank 0 writes, appending)
  param_groups.json  every parameter class with its LR, WD and theory predictions
  checkpoints/       <step:010d>/ per checkpoint (lingua_wd/checkpoint.py owns their insides)
  train.log          the launcher's copy of the trainer's console (sweeps)
  EXIT.json          the last exit of the trainer: code, cause, step, host, pid, time
  DONE               written once, at the end of a finished run: final step, losses
  CANCELLED          a launcher's record that the user cancelled the run (`scancel`): do not restart it
```

`python -m lingua_wd.rundir done|exit|cancel RUN_DIR ...` gives shell launchers (slurm/array.sbatch)
the same records without naming files (`--help`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

# The trainer's exit codes (a SLURM launcher passes them on unchanged).
EXIT_OK = 0
EXIT_CONFIG = 2  # a bad config or data path: fix it, a retry gives the same answer
EXIT_DIVERGED = 3  # too many non-finite steps: stopped, nothing saved from the diverged weights
EXIT_CHECKPOINT = 4  # a checkpoint could not be written (disk full, I/O error)
EXIT_REQUEUE = 75  # stopped by a signal after saving a checkpoint: requeue and resume (EX_TEMPFAIL)
EXIT_CAUSES = {
    EXIT_OK: "finished",
    EXIT_CONFIG: "config error",
    EXIT_DIVERGED: "diverged",
    EXIT_CHECKPOINT: "checkpoint write failed",
    EXIT_REQUEUE: "stopped by a signal, checkpoint saved",
}


def exit_cause(code: int) -> str:
    """A short human name for an exit code (signals as the shell reports them: 128 + N)."""
    if code in EXIT_CAUSES:
        return EXIT_CAUSES[code]
    if code > 128:
        try:
            import signal

            return f"killed by {signal.Signals(code - 128).name}"
        except ValueError:
            pass
    return f"exit {code}"


@dataclass(frozen=True)
class RunDir:
    """Paths of one run's directory; no I/O in the constructor."""

    path: Path

    def __init__(self, path: str | os.PathLike):
        object.__setattr__(self, "path", Path(path))

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def param_groups(self) -> Path:
        return self.path / "param_groups.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def train_log(self) -> Path:
        return self.path / "train.log"

    @property
    def exit_file(self) -> Path:
        return self.path / "EXIT.json"

    @property
    def cancelled(self) -> Path:
        return self.path / "CANCELLED"

    @property
    def done(self) -> Path:
        return self.path / "DONE"

    def is_done(self) -> bool:
        return self.done.is_file()

    def read_done(self) -> Optional[dict[str, Any]]:
        return _read_json(self.done)

    def write_done(self, record: dict[str, Any]) -> None:
        _atomic_write(self.done, json.dumps(record))

    def write_exit(self, code: int, step: int, cause: str = "") -> None:
        """Record how the trainer ended (rank 0, at exit): what `lingua-wd status` shows for a failure."""
        record = {
            "code": code,
            "cause": cause or exit_cause(code),
            "step": step,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": time.time(),
        }
        _atomic_write(self.exit_file, json.dumps(record))

    def read_exit(self) -> Optional[dict[str, Any]]:
        return _read_json(self.exit_file)

    def record_exit(self, code: int, since: float, cause: str = "") -> None:
        """A launcher's fallback: record `code` unless the trainer recorded an exit at or after `since`
        (epoch s it was started at), e.g. when it was killed or never got to start."""
        rec = self.read_exit()
        if rec is None or float(rec.get("time", 0)) < since:
            self.write_exit(code, last_loss(self.read_metrics())[0], cause)

    def write_cancelled(self, job: str, reason: str = "") -> None:
        """A launcher saw the user cancel the run (its job): sweeps leave it alone until asked."""
        record = {"job": job, "reason": reason, "host": socket.gethostname(), "time": time.time()}
        _atomic_write(self.cancelled, json.dumps(record))

    def read_cancelled(self) -> Optional[dict[str, Any]]:
        return _read_json(self.cancelled)

    def clear_cancelled(self) -> None:
        self.cancelled.unlink(missing_ok=True)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records in order; a torn line (a process killed mid-write) is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def last_loss(records: list[dict[str, Any]]) -> tuple[int, float]:
    """(step, loss) of the last training-loss record, (0, nan) if none."""
    for rec in reversed(records):
        if "loss" in rec and "step" in rec:
            return int(rec["step"]), float(rec["loss"])
    return 0, math.nan


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: Optional[list[str]] = None) -> int:
    """Records for shell launchers (slurm/array.sbatch), so that this module stays the files' one owner."""
    parser = argparse.ArgumentParser(prog="python -m lingua_wd.rundir", description=main.__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("done", help="exit 0 if the run is finished (DONE), 1 if not").add_argument("run_dir")
    p = sub.add_parser("exit", help="record an exit code unless the trainer recorded its exit since --since")
    p.add_argument("run_dir")
    p.add_argument("code", type=int)
    p.add_argument("--since", type=float, default=0.0, help="epoch seconds the trainer was started at")
    p.add_argument("--cause", default="", help="what happened (default: the code's meaning)")
    p = sub.add_parser("cancel", help="record that the user cancelled the run")
    p.add_argument("run_dir")
    p.add_argument("--job", default="", help="the job that was cancelled")
    p.add_argument("--reason", default="")
    args = parser.parse_args(argv)
    run = RunDir(args.run_dir)
    if args.cmd == "done":
        return 0 if run.is_done() else 1
    if args.cmd == "cancel":
        run.write_cancelled(args.job, args.reason)
        return 0
    run.record_exit(args.code, args.since, args.cause)
    return 0


if __name__ == "__main__":
    sys.exit(main())
