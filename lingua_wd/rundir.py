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
  LOCK               the live trainer's host, pid and start time (one writer per run directory)
  CANCELLED          a launcher's record that the user cancelled the run (`scancel`): do not restart it
```

The lock: rank 0 of a trainer creates `LOCK` before writing anything and deletes it at exit; a
daemon thread refreshes its mtime every HEARTBEAT_S seconds. A second trainer finds it and exits
with one line naming the holder. A lock whose holder is dead is taken over with a warning: on the
same host when its pid is gone (or is another process now, by its start time in /proc), after a
reboot, when it was left by an earlier incarnation of the same SLURM job (a requeue), and on
another host when its heartbeat is older than STALE_S.

`python -m lingua_wd.rundir done|exit|cancel RUN_DIR ...` gives shell launchers (slurm/array.sbatch)
the same records without naming files (`--help`).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

# The trainer's exit codes (a SLURM launcher passes them on unchanged).
EXIT_OK = 0
EXIT_CONFIG = 2  # a bad config or data path: fix it, a retry gives the same answer
EXIT_DIVERGED = 3  # too many non-finite steps: stopped, nothing saved from the diverged weights
EXIT_CHECKPOINT = 4  # a checkpoint could not be written (disk full, I/O error)
EXIT_NO_CHECKPOINT = 5  # checkpoints exist but none is loadable (corrupt, unreadable): delete them to start over
EXIT_REQUEUE = 75  # stopped by a signal after saving a checkpoint: requeue and resume (EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # a second Ctrl-C: exited at once, nothing saved (128 + SIGINT, as a shell reports it)
EXIT_CAUSES = {
    EXIT_OK: "finished",
    EXIT_CONFIG: "config error",
    EXIT_DIVERGED: "diverged",
    EXIT_CHECKPOINT: "checkpoint write failed",
    EXIT_NO_CHECKPOINT: "no loadable checkpoint",
    EXIT_REQUEUE: "stopped by a signal, checkpoint saved",
    EXIT_INTERRUPTED: "interrupted twice, nothing saved",
}
HEARTBEAT_S = 30.0  # the lock holder refreshes the lock's mtime this often
STALE_S = 600.0  # a lock of another host not refreshed for this long is stale (its holder is gone)


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


def _entry(name: str) -> property:
    """A read-only attribute of RunDir: the path of `name` inside the run directory."""
    return property(lambda self: self.path / name, doc=f"<dump_dir>/{name}")


@dataclass(frozen=True)
class RunDir:
    """Paths of one run's directory; no I/O in the constructor."""

    path: Path

    def __init__(self, path: str | os.PathLike):
        object.__setattr__(self, "path", Path(path))

    # the layout of the module docstring: one path per entry
    config = _entry("config.yaml")
    metrics = _entry("metrics.jsonl")
    param_groups = _entry("param_groups.json")
    checkpoints = _entry("checkpoints")
    train_log = _entry("train.log")
    exit_file = _entry("EXIT.json")
    done = _entry("DONE")
    cancelled = _entry("CANCELLED")
    lock_file = _entry("LOCK")

    def is_done(self) -> bool:
        return self.done.is_file()

    def read_done(self) -> Optional[dict[str, Any]]:
        return _read_json(self.done)

    def write_done(self, record: dict[str, Any]) -> None:
        _atomic_write(self.done, json.dumps(record))

    def write_exit(
        self, code: int, step: int, cause: str = "", started: Optional[float] = None, start_step: Optional[int] = None
    ) -> None:
        """Record how the trainer ended (rank 0, at exit): what `lingua-wd status` shows for a failure.
        `started` (epoch s) and `start_step` (the step it resumed from) time the session: status's ETA."""
        record = {
            "code": code,
            "cause": cause or exit_cause(code),
            "step": step,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": time.time(),
            "started": started,
            "start_step": start_step,
        }
        _atomic_write(self.exit_file, json.dumps(record))

    def read_exit(self) -> Optional[dict[str, Any]]:
        return _read_json(self.exit_file)

    def record_exit(self, code: int, since: float, cause: str = "") -> None:
        """A launcher's fallback: record `code` unless the trainer recorded an exit at or after `since`
        (epoch s it was started at), e.g. when it was killed or never got to start."""
        rec = self.read_exit()
        if rec is None or float(rec.get("time", 0)) < since:
            self.write_exit(code, last_loss(self.read_metrics())[0], cause, started=since)

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

    def lock_holder(self) -> Optional[dict[str, Any]]:
        """The LOCK record (host, pid, start time, ...) if a lock file exists, live or stale."""
        return _read_json(self.lock_file)

    def state(self) -> str:
        """done (DONE) | running (a live lock) | resume (a checkpoint with a manifest) | started
        (metrics, no checkpoint) | new."""
        if self.is_done():
            return "done"
        holder = self.lock_holder()
        if holder is not None and holder_alive(holder):
            return "running"
        ckpts = self.checkpoints
        try:
            if any((p / "MANIFEST.json").is_file() for p in ckpts.iterdir() if p.name.isdigit()):
                return "resume"
        except OSError:
            pass
        return "started" if self.metrics.is_file() else "new"


class LockHeld(RuntimeError):
    """Another live trainer holds the run directory; the message is one line naming it."""


def _proc_start(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def process_start_time() -> float:
    """Epoch seconds this process started (Linux /proc: its start ticks after boot, plus the boot time), so a
    session's timing includes the interpreter's and torch's start-up; time.time() where /proc is missing."""
    try:
        ticks = _proc_start(os.getpid())
        btime = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, TypeError, ValueError):
        return time.time()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _me() -> dict[str, Any]:
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start_time": now,
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
        "proc_start": _proc_start(os.getpid()),
        "boot_id": _boot_id(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
    }


def holder_alive(holder: dict[str, Any], mtime: Optional[float] = None) -> bool:
    """Whether the process that wrote a LOCK record may still be running (see the module doc)."""
    me = _me()
    if holder.get("host") == me["host"] and holder.get("boot_id", "") == me["boot_id"]:
        start = _proc_start(int(holder.get("pid", -1)))
        return start is not None and start == holder.get("proc_start", start)
    if holder.get("host") == me["host"]:
        return False  # the host rebooted since
    job = holder.get("slurm_job_id")
    if job and job == me["slurm_job_id"] and holder.get("slurm_restart_count", 0) < me["slurm_restart_count"]:
        return False  # an earlier incarnation of this requeued job
    beat = mtime if mtime is not None else holder.get("heartbeat", holder.get("start_time", 0))
    return time.time() - beat < STALE_S


def describe_holder(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started', '?')})"


class RunLock:
    """One writer per run directory: `acquire()` at start (rank 0), `release()` at exit."""

    def __init__(self, run: RunDir):
        self.run, self.record = run, _me()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> Optional[dict[str, Any]]:
        """Take the lock; returns the stale holder it replaced (None if there was none).
        Raises LockHeld if a live trainer holds it. The check and the write happen under flock of
        the directory, so two trainers starting together cannot both win."""
        self.run.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run.path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # a filesystem without flock: the check below still catches all but a near tie
                pass
            holder = self.run.lock_holder()
            if holder is not None and not self._is_me(holder):
                try:
                    mtime = self.run.lock_file.stat().st_mtime
                except OSError:
                    mtime = None
                if holder_alive(holder, mtime):
                    raise LockHeld(
                        f"dump_dir: {self.run.path} is in use by the trainer {describe_holder(holder)} "
                        f"(its {self.run.lock_file.name}); stop it first, or use another dump_dir"
                    )
            _atomic_write(self.run.lock_file, json.dumps({**self.record, "heartbeat": time.time()}))
        finally:
            os.close(fd)  # closing releases the flock
        self._thread = threading.Thread(target=self._beat, name="lock-heartbeat", daemon=True)
        self._thread.start()
        return None if holder is None or self._is_me(holder) else holder

    def _is_me(self, holder: dict[str, Any]) -> bool:
        keys = ("host", "pid", "proc_start", "boot_id")
        return all(holder.get(k) == self.record[k] for k in keys)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.run.lock_file)
            except OSError:
                pass

    def held(self) -> bool:
        """Whether the lock file still names this process (another trainer may have taken it over)."""
        holder = self.run.lock_holder()
        return holder is not None and self._is_me(holder)

    def release(self) -> None:
        self._stop.set()
        if self.held():
            try:
                self.run.lock_file.unlink()
            except OSError:
                pass


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


# metrics.jsonl holds four kinds of records, told apart by their keys (every record has "step"):
#   train  {"step", "loss", "lr", "grad_norm", "tokens_per_s", ...}  every log_freq steps and at the end;
#          "loss" is the mean training loss of the steps since the previous train record
#   val    {"step", "val/loss"}                                      every eval_freq steps and at the end
#   probe  {"step", "probe/<layer>/<metric>", ...}                   every probes.every steps, its own record
#   event  {"step", "event", ...}                                    e.g. a loss spike (lingua_wd/guard.py)
PROBE_PREFIX = "probe/"


def train_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "loss" in r and "step" in r and "event" not in r]


def probe_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records holding probe metrics (their own records; before issue 15 they rode on the train records)."""
    return [r for r in records if "step" in r and any(k.startswith(PROBE_PREFIX) for k in r)]


def last_loss(records: list[dict[str, Any]]) -> tuple[int, float]:
    """(step, loss) of the last training-loss record, (0, nan) if none."""
    train = train_records(records)
    return (int(train[-1]["step"]), float(train[-1]["loss"])) if train else (0, math.nan)


def format_duration(seconds: Optional[float]) -> str:
    """How run durations are shown (console lines, summaries, `lingua-wd status`): 45s, 12m05s, 3h07m."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


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
