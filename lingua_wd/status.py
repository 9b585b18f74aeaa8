"""Where a sweep stands: `lingua-wd status SWEEP_DIR`, and the same table in `lingua-wd sweep`'s console.

Per run: its state (lingua_wd/sweep.py's run_state: new, started, resume, queued, running, done, failed
(exit N: cause), cancelled), its last logged step of its total, its last logged training loss and its
last validation loss. For the sweep: k of N done, and an ETA from measured throughput.

The ETA uses wall seconds per step *measured on this sweep's runs*, start-up, evaluation and
checkpoints included: each trainer session records its start time and start step in EXIT.json
(lingua_wd/rundir.py), and a running trainer's LOCK gives its start time. Runs of the same model shape
(model.dim, model.n_layers, data.seq_len, data.batch_size) use that shape's measured pace, others the
mean over every measured run. Failed and cancelled runs are left out (they are retried only when
asked). Remaining time = sum over runs of (steps left x seconds per step) / runs at a time.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from lingua_wd.args import run_cli
from lingua_wd.rundir import RunDir, format_duration, holder_alive, train_records

SHAPE_KEYS = ("model.dim", "model.n_layers", "data.seq_len", "data.batch_size")  # what a step's cost depends on
NOT_SCHEDULED = ("failed", "cancelled")  # trained again only with --retry-failed: not in the ETA


def state_kind(state: str) -> str:
    """`failed (exit 2: config error)` -> `failed`."""
    return state.split(" ", 1)[0]


@dataclass
class RunProgress:
    name: str
    state: str
    steps: int  # the run's total steps (its config)
    step: int = 0  # last logged training step
    loss: float = math.nan  # last logged training loss (mean of the steps since the previous line)
    val: float = math.nan  # last validation loss
    shape: tuple = ()  # SHAPE_KEYS values
    paces: list[float] = field(default_factory=list)  # measured wall seconds per step (sessions of this run)

    @property
    def kind(self) -> str:
        return state_kind(self.state)

    @property
    def left(self) -> int:
        return 0 if self.kind == "done" else max(0, self.steps - self.step)


def _session_pace(run: RunDir, now: float) -> list[float]:
    """Seconds per step of this run's last finished session (EXIT.json) and of a live one (LOCK)."""
    out = []
    rec = run.read_exit() or {}
    start_step = rec.get("start_step")
    if rec.get("started") and start_step is not None and rec.get("step", 0) > start_step:
        out.append((rec["time"] - rec["started"]) / (rec["step"] - start_step))
    holder = run.lock_holder()
    if holder is not None and holder_alive(holder):
        step = (train_records(run.read_metrics())[-1:] or [{"step": 0}])[0]["step"]
        resumed = rec.get("step", 0) if rec.get("time", 0) <= holder.get("start_time", 0) else 0
        if step > resumed:  # before its first line a live run says nothing about its pace
            out.append((now - holder["start_time"]) / (step - resumed))
    return out


def run_progress(run: RunDir, name: str, state: str, config: Any, now: Optional[float] = None) -> RunProgress:
    """One run's row: `config` is its resolved config (a DictConfig or mapping) for its steps and shape."""
    now = time.time() if now is None else now
    cfg = OmegaConf.create(config or {})
    records = run.read_metrics()
    train = train_records(records)
    vals = [r for r in records if isinstance(r.get("val/loss"), (int, float))]
    return RunProgress(
        name=name,
        state=state,
        steps=int(OmegaConf.select(cfg, "steps", default=0) or 0),
        step=int(train[-1]["step"]) if train else 0,
        loss=float(train[-1]["loss"]) if train else math.nan,
        val=float(vals[-1]["val/loss"]) if vals else math.nan,
        shape=tuple(OmegaConf.select(cfg, k, default=None) for k in SHAPE_KEYS),
        paces=_session_pace(run, now),
    )


def sweep_progress(sweep_dir: str | os.PathLike, manifest: dict, states: dict[str, str]) -> list[RunProgress]:
    """Every run of the manifest, in order, with its state from `states` (sweep.run_states)."""
    sweep_dir, now = Path(sweep_dir), time.time()
    out = []
    for r in manifest["runs"]:
        path = sweep_dir / r["config"]
        cfg = OmegaConf.load(path) if path.is_file() else {}
        out.append(run_progress(RunDir(sweep_dir / r["dump_dir"]), r["name"], states[r["name"]], cfg, now))
    return out


def eta(runs: list[RunProgress], parallel: int) -> tuple[Optional[float], str]:
    """(seconds left, how it was estimated); None when nothing has been measured yet."""
    todo = [r for r in runs if r.kind not in ("done", *NOT_SCHEDULED) and (r.left > 0 or not r.steps)]
    if not todo:
        return 0.0, "nothing left to train"
    if any(not r.steps for r in todo):
        return None, "the run configs are not written yet"
    measured = [r for r in runs if r.paces]
    if not measured:
        return None, "no run has logged a step yet"
    by_shape: dict[tuple, list[float]] = {}
    for r in measured:
        by_shape.setdefault(r.shape, []).extend(r.paces)
    everyone = [p for ps in by_shape.values() for p in ps]
    mean_all = sum(everyone) / len(everyone)
    total = 0.0
    for r in todo:
        pace = by_shape.get(r.shape)
        total += r.left * (sum(pace) / len(pace) if pace else mean_all)
    guessed = sum(r.shape not in by_shape for r in todo)
    how = f"from {len(measured)} measured runs, {parallel} at a time"
    if guessed:
        how += f"; {guessed} runs of an unmeasured model shape at the mean pace"
    return total / max(1, parallel), how


def counts(runs: list[RunProgress]) -> str:
    out: dict[str, int] = {}
    for r in runs:
        out[r.kind] = out.get(r.kind, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in out.items())


def _num(v: float, fmt: str = ".4f") -> str:
    return format(v, fmt) if math.isfinite(v) else "-"


def table(runs: list[RunProgress], params: Optional[dict[str, dict]] = None) -> list[str]:
    """The per-run lines: index, name, state, step/steps, last train loss, last val loss (and grid values)."""
    w_name = max([len(r.name) for r in runs] + [3])
    w_state = max([len(r.state) for r in runs] + [5])
    steps = [f"{r.step}/{r.steps or '?'}" for r in runs]  # ?: no config yet (a dry run)
    w_step = max([len(x) for x in steps] + [4])
    head = f"  {'#':>4}  {'run':<{w_name}}  {'state':<{w_state}}  {'step':>{w_step}}  {'loss':>7}  {'val':>7}"
    lines = [head + ("  grid values" if params else "")]
    for i, (r, step) in enumerate(zip(runs, steps, strict=True)):
        line = f"  {i:4d}  {r.name:<{w_name}}  {r.state:<{w_state}}  {step:>{w_step}}"
        line += f"  {_num(r.loss):>7}  {_num(r.val):>7}"
        if params:
            line += "  " + " ".join(f"{k}={v}" for k, v in params.get(r.name, {}).items())
        lines.append(line.rstrip())
    return lines


def footer(runs: list[RunProgress], parallel: int) -> str:
    """`12 of 24 done (10 new, 1 running, 1 failed); ETA 11m05s (from 12 measured runs, 1 at a time)`."""
    done = sum(r.kind == "done" for r in runs)
    rest = [r for r in runs if r.kind != "done"]
    text = f"{done} of {len(runs)} done" + (f" ({counts(rest)})" if rest else "")
    if not rest:
        return text
    left, how = eta(runs, parallel)
    return f"{text}; ETA {format_duration(left) if left is not None else '?'} ({how})"


def report(sweep_dir: str | os.PathLike, manifest: dict, states: dict[str, str], parallel: int = 0) -> str:
    """The status text: a header, the table, the footer. parallel 0: the runs running now (at least 1)."""
    runs = sweep_progress(sweep_dir, manifest, states)
    parallel = parallel or max(1, sum(r.kind == "running" for r in runs))
    params = {r["name"]: r["params"] for r in manifest["runs"]}
    head = f"sweep {manifest['name']}: {len(runs)} runs in {manifest['sweep_dir']}"
    return "\n".join([head, *table(runs, params), "  " + footer(runs, parallel)])


@dataclass
class StatusArgs:
    sweep_dir: str = ""  # the sweep directory (its manifest.json and runs/)
    parallel: int = 0  # runs at a time for the ETA (0: the number running now, at least 1)


USAGE = "usage: lingua-wd status SWEEP_DIR [parallel=N]"


def _main(args: StatusArgs) -> int:
    from lingua_wd.args import check
    from lingua_wd.sweep import load_manifest, run_states  # noqa: PLC0415 (sweep imports this module)

    check(bool(args.sweep_dir), "sweep_dir", "give the sweep directory: lingua-wd status SWEEP_DIR")
    check(args.parallel >= 0, "parallel", f"must be >= 0, got {args.parallel}")
    manifest = load_manifest(args.sweep_dir)
    print(report(args.sweep_dir, manifest, run_states(args.sweep_dir, manifest), args.parallel))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(USAGE)
        return 2
    return run_cli(argv, StatusArgs, _main, USAGE, __doc__, positional=("sweep_dir",))


if __name__ == "__main__":
    sys.exit(main())
