"""Sweeps: a base trainer config + a grid over dotted keys -> one resolved config per run.

A sweep YAML names a base config (a path or an inline mapping), overrides for every run, and a grid:
```
grid:
  model.dim: [128, 256, 512]                 # a list is one axis
  optim.lr: {logspace: [1.0e-3, 6.4e-2, 7]}  # log-spaced range, ends included (factors of 2 here)
  wd:                                        # a zipped group: its keys move together
    zip: {scaling.wd: [standard, none], optim.weight_decay: [0.1, 0.0]}
```
The runs are the product of the axes (first axis slowest). Each run gets a readable name built from its
values (`d128_lr8e-3_standard`), a config `<sweep>/configs/<name>.yaml` and a dump dir `<sweep>/runs/<name>`,
all listed in `<sweep>/manifest.json`. The code is copied into `<sweep>/code` once (as lingua's stool does),
and every run executes that copy, so editing the tree does not change queued runs.

Launchers: `local` (one run after another), `local_parallel` (one run per visible GPU, or `local.jobs` CPU
runs), `slurm` (one array job `--array=0-N%K` rendered from `slurm/array.sbatch`; each task runs one srun
task per rank, no torchrun, and requeues itself when its ranks saved a checkpoint on a signal). Each run has
a state (`run_state`): new, started, resume, queued, running, done, failed (exit N: cause) or cancelled, from
its run dir (lingua_wd/rundir.py) and, for SLURM, from squeue / sacct about the jobs the sweep submitted
(`jobs.json`). New, started and resume runs are trained or submitted (the trainer resumes from the newest
checkpoint in its dump dir); queued, running and done runs never twice; failed and cancelled ones only with
`--retry-failed`.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from lingua_wd import status
from lingua_wd.args import ConfigError, check, help_text, load_config, parse_args, to_args
from lingua_wd.rundir import EXIT_OK, EXIT_REQUEUE, RunDir, exit_cause, format_duration, holder_alive
from lingua_wd.status import state_kind

REPO_ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT_ITEMS = ("lingua_wd", "apps", "configs", "slurm", "pyproject.toml")
LAUNCHERS = ("local", "local_parallel", "slurm")
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # not inherited


@dataclass
class LocalArgs:
    jobs: int = 0  # local_parallel: runs at a time (0: one per visible GPU group of `nproc`)
    nproc: int = 1  # processes per run (> 1: torchrun --standalone --nproc_per_node=nproc)
    threads: int = 0  # OMP_NUM_THREADS per run on CPU (0: CPU cores / jobs)


@dataclass
class SlurmArgs:
    template: str = "slurm/array.sbatch"  # sbatch template ({{key}} placeholders), relative to the code root
    partition: str = ""  # --partition ("" = cluster default)
    account: str = ""  # --account ("" = none)
    qos: str = ""  # --qos ("" = none)
    time: str = "24:00:00"  # --time limit of one array task (each restart gets it anew)
    nodes: int = 1  # nodes per run
    gpus_per_node: int = 8  # --gpus-per-node (0: a CPU partition, no GPU request)
    tasks_per_node: int = 0  # ranks per node, one srun task each (0: gpus_per_node, or 1 without GPUs)
    cpus_per_task: int = 8  # CPUs per rank
    mem: str = ""  # --mem per node ("" = cluster default, "0" = all)
    max_parallel: int = 0  # K in --array=0-N%K: runs at a time (0 = no limit)
    signal_s: int = 300  # SIGUSR1 to the ranks this many s (SLURM: up to 30 s more) before the time limit
    max_requeues: int = 20  # a task stops requeueing itself after this many restarts
    setup: str = ""  # shell lines run before the trainer (module load, source .venv/bin/activate)
    python: str = ""  # the Python that runs the trainer on the nodes ("" = the one running `lingua-wd sweep`)
    extra: list[str] = field(default_factory=list)  # more sbatch options, e.g. ["--constraint=h100"]
    submit: bool = True  # run sbatch (false: only write <sweep>/submit.sbatch)


@dataclass
class ReportArgs:
    x: str = "optim.lr"  # dotted key on the x axis (log scale)
    line: str = "model.dim"  # dotted key with one line per value (the width)
    panel: str = "scaling.wd"  # dotted key(s), comma-separated, with one panel per value
    average: list[str] = field(default_factory=lambda: ["seed"])  # keys averaged over (seeds)
    last_n: int = 100  # final loss = mean training loss over the last N steps (the paper: 100)
    tol: float = 0.5  # verdict: "transfers" if the slope's 2-sigma interval lies within +-tol (eta* moves < m^tol)
    base_dim: int = (
        0  # line value of m = 1 (0: the runs' scaling.base_dim / base_depth / base_batch, else the smallest)
    )
    alignment_runs: list[str] = field(default_factory=list)  # run names whose probe metrics are plotted too


@dataclass
class SweepArgs:
    name: str = ""  # sweep name; its dir is <dump_root>/<name>
    dump_root: str = "dumps/sweeps"  # where sweep dirs are created
    base: Any = None  # trainer config: a YAML path (cwd, code root, then this file's dir) or an inline mapping
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted key -> value, set in every run
    grid: dict[str, Any] = field(default_factory=dict)  # dotted key -> list, range or {zip: {key: list}}
    short: dict[str, str] = field(default_factory=dict)  # dotted key -> short name in run names (adds to SHORT)
    launcher: str = "local"  # local | local_parallel | slurm
    validate: bool = True  # check every run config against the trainer's TrainArgs before launching
    local: LocalArgs = field(default_factory=LocalArgs)
    slurm: SlurmArgs = field(default_factory=SlurmArgs)
    report: ReportArgs = field(default_factory=ReportArgs)


# Short names of common keys in run names; "" writes the value alone. Other keys use their last component.
SHORT = {
    "model.dim": "d",
    "model.n_layers": "L",
    "optim.lr": "lr",
    "optim.weight_decay": "wd",
    "scaling.width": "",
    "scaling.wd": "",
    "seed": "s",
    "steps": "T",
    "data.batch_size": "B",
}


@dataclass
class Run:
    index: int  # position in the manifest
    name: str  # readable, deterministic, unique in the sweep
    params: dict[str, Any]  # dotted key -> grid value of this run


# ----------------------------------------------------------------------------- grid expansion


def _round(v: Any) -> Any:
    """Round range values to 6 significant digits so 1e-3 * 2**3 is 8e-3 (stable names and configs)."""
    return float(f"{v:.6g}") if isinstance(v, float) else v


def _range(key: str, spec: dict) -> list:
    check(len(spec) == 1, key, f"a range takes one of logspace / geomspace / linspace, got {sorted(spec)}")
    kind, a = next(iter(spec.items()))
    check(isinstance(a, (list, tuple)) and len(a) == 3, f"{key}.{kind}", "expects [start, stop_or_factor, num]")
    start, second, num = float(a[0]), float(a[1]), int(a[2])
    check(num >= 1, f"{key}.{kind}", f"num must be >= 1, got {num}")
    if kind == "logspace":  # [start, stop, num], both ends included
        check(start > 0 and second > 0, f"{key}.logspace", "start and stop must be positive")
        ratio = (second / start) ** (1 / (num - 1)) if num > 1 else 1.0
        return [_round(start * ratio**i) for i in range(num)]
    if kind == "geomspace":  # [start, factor, num]
        return [_round(start * second**i) for i in range(num)]
    if kind == "linspace":  # [start, stop, num]
        step = (second - start) / (num - 1) if num > 1 else 0.0
        return [_round(start + step * i) for i in range(num)]
    raise ConfigError(f"{key}: unknown range {kind!r} (choose from logspace, geomspace, linspace)")


def axis_values(key: str, spec: Any) -> list:
    """The values of one grid axis: a list, a range mapping, or a scalar (one value)."""
    if isinstance(spec, dict):
        return _range(key, spec)
    values = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    check(len(values) > 0, key, "an empty list gives no runs")
    return [_round(v) for v in values]


def expand_axis(key: str, spec: Any) -> list[dict[str, Any]]:
    """One axis as a list of assignments {dotted key: value}; a zipped group assigns several keys at once."""
    if isinstance(spec, dict) and "zip" in spec:
        check(len(spec) == 1 and isinstance(spec["zip"], dict), f"grid.{key}", "a zipped group is {zip: {key: values}}")
        cols = {k: axis_values(f"grid.{key}.zip.{k}", v) for k, v in spec["zip"].items()}
        check(len(cols) > 0, f"grid.{key}.zip", "is empty")
        lens = {k: len(v) for k, v in cols.items()}
        check(len(set(lens.values())) == 1, f"grid.{key}.zip", f"lists differ in length: {lens}")
        n = next(iter(lens.values()))
        return [{k: cols[k][i] for k in cols} for i in range(n)]
    return [{key: v} for v in axis_values(f"grid.{key}", spec)]


def format_value(v: Any) -> str:
    """Compact, file-name-safe text of a value: 0.008 -> 8e-3, 0.016 -> 1.6e-2, 128 -> 128."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if v == 0 or math.isfinite(v) and 0.1 <= abs(v) < 1e4:
            return f"{v:.4g}"
        exp = math.floor(math.log10(abs(v)))
        mant = v / 10**exp
        if round(mant, 3) >= 10:  # 9.9996e-3 rounds up to 1e-2
            mant, exp = mant / 10, exp + 1
        return f"{mant:.4g}e{exp}"
    return re.sub(r"[^A-Za-z0-9.+-]", "-", str(v))


def run_name(assignments: list[dict[str, Any]], short: dict[str, str]) -> str:
    """Name from each axis's first key: `d128_lr8e-3_independent`. A zipped group shows its first key."""
    parts = []
    for a in assignments:
        key, value = next(iter(a.items()))
        prefix = short.get(key, key.rsplit(".", 1)[-1])
        text = format_value(value)
        parts.append(f"{prefix}-{text}" if prefix and not isinstance(value, (int, float)) else prefix + text)
    return "_".join(parts) or "run"


def expand_grid(grid: dict[str, Any], short: dict[str, str] | None = None) -> list[Run]:
    """All runs of the grid, first axis slowest, with unique readable names."""
    short = {**SHORT, **(short or {})}
    axes = [expand_axis(k, v) for k, v in grid.items()]
    runs = []
    for i, combo in enumerate(itertools.product(*axes)):
        params = {k: v for a in combo for k, v in a.items()}
        runs.append(Run(index=i, name=run_name(list(combo), short), params=params))
    names = [r.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    check(not dup, "grid", f"run names collide ({dup[:3]}); give the keys distinct names under `short`")
    return runs


# ----------------------------------------------------------------------------- configs and manifest


def load_sweep(path: str | os.PathLike, overrides: list[str] | None = None) -> SweepArgs:
    """Sweep YAML <- dotted overrides (`launcher=slurm slurm.partition=gpu`); `name` defaults to the file stem.

    For an existing sweep dir, the launcher settings it saved (REMEMBERED) fill in every key that neither
    the file nor the command line sets, so `slurm.time=...` given once stays the sweep's setting.
    """
    check(Path(path).is_file(), "sweep", f"no such file {path}")
    # YAML reads an unquoted 1:00:00 as the sexagesimal integer 3600 (which SLURM takes as minutes)
    overrides = [re.sub(r"^(slurm\.time)=([^'\"].*)$", r"\1='\2'", o) for o in overrides or []]
    args = parse_args(SweepArgs, [f"config={path}", *overrides])
    args.name = args.name or Path(path).stem
    check(re.fullmatch(r"[A-Za-z0-9._+-]+", args.name) is not None, "name", f"{args.name!r} is not file-name safe")
    args = _with_saved_settings(args, Path(path), overrides)
    check(args.launcher in LAUNCHERS, "launcher", f"unknown launcher {args.launcher!r} (choose from {LAUNCHERS})")
    check(len(args.grid) > 0, "grid", "is empty: name at least one key to sweep")
    return args


REMEMBERED = ("launcher", "slurm", "local")  # sections a sweep dir keeps from the call that wrote it


def sweep_dir_of(args: SweepArgs) -> Path:
    return (Path(args.dump_root).expanduser() / args.name).resolve()


def _leaf_keys(cfg: Any, prefix: str = "") -> list[str]:
    if not isinstance(cfg, DictConfig):
        return [prefix[:-1]]
    return [k for key, v in cfg.items_ex(resolve=False) for k in _leaf_keys(v, f"{prefix}{key}.")]


def _with_saved_settings(args: SweepArgs, path: Path, overrides: list[str]) -> SweepArgs:
    saved_path = sweep_dir_of(args) / "sweep.yaml"
    if not saved_path.is_file():
        return args
    explicit = set(_leaf_keys(OmegaConf.load(path))) | {o.split("=", 1)[0] for o in overrides}
    cfg = OmegaConf.structured(args)
    missing = object()
    try:
        saved = OmegaConf.load(saved_path)
        for key in _leaf_keys(saved):
            set_here = any(key == e or key.startswith(e + ".") or e.startswith(key + ".") for e in explicit)
            known = OmegaConf.select(cfg, key, default=missing) is not missing  # e.g. not a key of an older version
            if key.split(".", 1)[0] in REMEMBERED and known and not set_here:
                OmegaConf.update(cfg, key, OmegaConf.select(saved, key), merge=False)
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except Exception as err:  # a saved value the current SweepArgs refuses: name the file
        raise ConfigError(f"{saved_path}: {str(err).splitlines()[0]}") from None


def base_config(args: SweepArgs, sweep_file: str | os.PathLike | None) -> DictConfig:
    """The base trainer config as a DictConfig (a path is looked up in the cwd, the code root, the sweep's dir)."""
    if args.base is None or args.base == "":
        return OmegaConf.create({})
    if isinstance(args.base, (dict, DictConfig)):
        return OmegaConf.create(args.base)
    check(isinstance(args.base, str), "base", "must be a YAML path or a mapping")
    here = Path(sweep_file).resolve().parent if sweep_file else Path.cwd()
    for root in (Path.cwd(), REPO_ROOT, here):
        path = root / Path(args.base).expanduser()
        if path.is_file():
            return OmegaConf.load(path)
    raise ConfigError(f"base: no such file {args.base} (looked in the cwd, {REPO_ROOT} and {here})")


def run_config(base: DictConfig, args: SweepArgs, run: Run, sweep_dir: Path) -> DictConfig:
    """base <- overrides <- the run's grid values; dump_dir and name point into the sweep dir."""
    cfg = OmegaConf.create(OmegaConf.to_container(base, resolve=False))
    for key, value in [*args.overrides.items(), *run.params.items()]:
        OmegaConf.update(cfg, key, value, force_add=True)
    cfg.dump_dir = str(sweep_dir / "runs" / run.name)
    cfg.name = f"{args.name}/{run.name}"
    return cfg


def train_args_class() -> Any:
    """The trainer's TrainArgs, or None while the trainer module is not importable."""
    try:
        from lingua_wd.train import TrainArgs  # noqa: PLC0415 (the trainer is heavy and optional here)
    except ImportError:
        return None
    return TrainArgs


def resolve_with_trainer(cfg: DictConfig, run_name_: str) -> DictConfig:
    """Merge into the trainer's structured defaults and run the trainer's checks of the width plan's keys
    (optim.check_plan_args), so a misspelt key or a width the trainer refuses fails now, not on the cluster."""
    cls = train_args_class()
    if cls is None:
        return cfg
    from lingua_wd.optim import check_plan_args  # noqa: PLC0415 (torch, like the trainer)

    try:
        merged = load_config(cls, base=[cfg])
        a = to_args(merged)
        tokens_per_step = a.data.seq_len * a.data.batch_size
        check_plan_args(a.model, a.optim, a.schedule, a.scaling, a.steps, tokens_per_step, a.data.batch_size)
        return merged
    except ConfigError as err:
        raise ConfigError(f"{err} (run {run_name_})") from None


def changed_keys(old: DictConfig, new: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys set in `new` whose value in `old` differs (keys only in `old`, e.g. defaults, are ignored)."""
    out = []
    for key, value in new.items():
        full = f"{prefix}{key}"
        if isinstance(value, DictConfig):
            sub = old.get(key) if key in old else None
            out += changed_keys(sub, value, f"{full}.") if isinstance(sub, DictConfig) else [full]
        elif key not in old or old[key] != value:
            out.append(full)
    return out


# ----------------------------------------------------------------------------- run states

TRAIN_STATES = ("new", "started", "resume")  # what `lingua-wd sweep` trains or submits
RETRY_STATES = ("failed", "cancelled")  # trained or submitted again only with --retry-failed
# SLURM's words for a job it still holds -> the run's state (squeue %T, sacct State)
SLURM_LIVE = {
    **dict.fromkeys(("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SPECIAL_EXIT", "RESV_DEL_HOLD"), "queued"),
    **dict.fromkeys(("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESIZING",
                     "STOPPED"), "running"),
}  # fmt: skip


def file_state(run: RunDir) -> str:
    """From the run directory alone: done | resume (a complete checkpoint) | started (metrics) | new."""
    if run.is_done():
        return "done"
    try:  # a checkpoint is complete once its manifest is written (lingua_wd/checkpoint.py)
        if any((p / "MANIFEST.json").is_file() for p in run.checkpoints.iterdir() if p.name.isdigit()):
            return "resume"
    except OSError:
        pass
    return "started" if run.metrics.is_file() else "new"


def run_state(dump_dir: str | os.PathLike, job_state: Optional[str] = None) -> str:
    """done | queued | running | cancelled | failed (exit N: cause) | resume | started | new.

    `job_state` is SLURM's word for the run's latest job (None: no job known). A live job, or a live trainer
    holding the run's LOCK (a local launcher's), wins over the run dir's records; a failure is the last exit
    recorded in EXIT.json (by the trainer, else its launcher).
    """
    run = RunDir(dump_dir)
    if run.is_done():
        return "done"
    if job_state in SLURM_LIVE:
        return SLURM_LIVE[job_state]
    holder = run.lock_holder()
    if holder is not None and holder_alive(holder):
        return "running"
    if run.read_cancelled() is not None or job_state == "CANCELLED":
        return "cancelled"
    rec = run.read_exit()
    if rec is not None and rec.get("code") not in (EXIT_OK, EXIT_REQUEUE):
        code = int(rec["code"])
        return f"failed (exit {code}: {rec.get('cause') or exit_cause(code)})"
    return file_state(run)


def snapshot_code(dest: Path, src: Optional[Path] = None) -> None:
    """Copy the package, apps, configs and templates to dest (stool-style), with the git commit if any."""
    src = src or REPO_ROOT
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for item in SNAPSHOT_ITEMS:
        p = src / item
        if p.is_dir():
            shutil.copytree(p, tmp / item, ignore=ignore)
        elif p.is_file():
            shutil.copy2(p, tmp / item)
    info = {"source": str(src), "time": _now(), **_git_info(src)}
    (tmp / "SNAPSHOT.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _git_info(src: Path) -> dict:
    def git(*a: str) -> str:
        out = subprocess.run(["git", "-C", str(src), *a], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def prepare(
    args: SweepArgs,
    sweep_file: str | os.PathLike | None = None,
    src: Optional[Path] = None,
    resnapshot: bool = False,
    write: bool = True,
) -> tuple[Path, dict]:
    """Expand the grid, write configs/, manifest.json, sweep.yaml and the code snapshot; return (dir, manifest).

    Re-running on an existing sweep dir keeps its snapshot (unless `resnapshot`) and adds new grid points;
    a run that already started must keep its config, so changing it is an error, not a silent restart.
    """
    sweep_dir = sweep_dir_of(args)
    runs = expand_grid(args.grid, args.short)
    base = base_config(args, sweep_file)
    manifest = {
        "name": args.name,
        "sweep_dir": str(sweep_dir),
        "code_dir": str(sweep_dir / "code"),
        "workdir": str(Path.cwd()),
        "created": _now(),
        "axes": list(args.grid),
        "axis_keys": [list(expand_axis(k, v)[0]) for k, v in args.grid.items()],
        "runs": [],
    }
    configs = {}
    for run in runs:
        raw = run_config(base, args, run, sweep_dir)
        cfg = resolve_with_trainer(raw, run.name) if args.validate else raw
        configs[run.name] = (raw, OmegaConf.to_yaml(cfg))
        entry = {"index": run.index, "name": run.name, "params": run.params}
        entry |= {"config": f"configs/{run.name}.yaml", "dump_dir": f"runs/{run.name}"}
        manifest["runs"].append(entry)
    if not write:
        return sweep_dir, manifest
    for name, (raw, _) in configs.items():
        path = sweep_dir / "configs" / f"{name}.yaml"
        if path.is_file() and file_state(RunDir(sweep_dir / "runs" / name)) != "new":
            diff = changed_keys(OmegaConf.load(path), raw)
            check(not diff, "grid", f"run {name} already started with other values of {diff}; use a new sweep name")
    (sweep_dir / "configs").mkdir(parents=True, exist_ok=True)
    (sweep_dir / "logs").mkdir(exist_ok=True)
    for name, (_, text) in configs.items():
        (sweep_dir / "configs" / f"{name}.yaml").write_text(text)
    (sweep_dir / "sweep.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(args)))
    if resnapshot or not (sweep_dir / "code").is_dir():
        snapshot_code(sweep_dir / "code", src)
    _write_json(sweep_dir / "manifest.json", manifest)
    return sweep_dir, manifest


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def load_manifest(sweep_dir: str | os.PathLike) -> dict:
    path = Path(sweep_dir) / "manifest.json"
    check(path.is_file(), "sweep_dir", f"{sweep_dir} has no manifest.json (not a sweep dir)")
    return json.loads(path.read_text())


def run_states(sweep_dir: str | os.PathLike, manifest: dict, persist: bool = False) -> dict[str, str]:
    """Every run's state; runs submitted to SLURM by this sweep (jobs.json) ask SLURM about their latest job.
    A job SLURM reports cancelled (e.g. while pending, so no task ever ran) is recorded in the run dir
    when `persist`, so the run stays cancelled after SLURM has forgotten the job."""
    tasks = latest_tasks(sweep_dir)
    jobs = slurm_states(sorted(set(tasks.values())))
    states = {}
    for r in manifest["runs"]:
        task = tasks.get(r["name"])
        job_state = jobs.get(task) if task else None
        run = RunDir(Path(sweep_dir) / r["dump_dir"])
        if persist and job_state == "CANCELLED" and run.read_cancelled() is None and not run.is_done():
            run.write_cancelled(task or "", "SLURM reports the job cancelled")
        states[r["name"]] = run_state(run.path, job_state)
    return states


def pending_runs(
    sweep_dir: str | os.PathLike, manifest: dict, retry: bool = False, states: Optional[dict[str, str]] = None
) -> list[dict]:
    """Runs to train or submit, in manifest order (SLURM array index i trains the i-th): new, started and
    resume; failed and cancelled ones too with `retry`; never queued, running or done ones."""
    states = states if states is not None else run_states(sweep_dir, manifest)
    wanted = TRAIN_STATES + (RETRY_STATES if retry else ())
    return [r for r in manifest["runs"] if state_kind(states[r["name"]]) in wanted]


# ----------------------------------------------------------------------------- local launchers


def train_command(manifest: dict, run: dict, nproc: int = 1) -> list[str]:
    """The command that trains one run from the code snapshot; resume is the trainer's (newest checkpoint)."""
    script = str(Path(manifest["code_dir"]) / "apps" / "train.py")
    config = f"config={Path(manifest['sweep_dir']) / run['config']}"
    if nproc > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            script,
            config,
        ]
    return [sys.executable, script, config]


def run_env(manifest: dict, devices: Optional[list[int]], threads: int) -> dict[str, str]:
    """PYTHONPATH puts the snapshot first, so `import lingua_wd` is the copy the sweep was launched with."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (manifest["code_dir"], env.get("PYTHONPATH", "")) if p)
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def visible_gpus() -> list[int]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [int(x) for x in env.split(",") if x.strip().isdigit()]
    try:
        import torch  # noqa: PLC0415

        return list(range(torch.cuda.device_count()))
    except ImportError:
        return []


class _Stopper:
    """SIGINT/SIGTERM to the launcher: ask every running trainer to checkpoint (SIGTERM) and start no more."""

    def __init__(self) -> None:
        self.stop = False
        self.procs: list[subprocess.Popen] = []
        self.old = {}

    def __enter__(self) -> _Stopper:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self.old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, frame: Any) -> None:
        self.stop = True
        print(f"[sweep] signal {signum}: stopping runs (they checkpoint; run the sweep again to resume)", flush=True)
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)


def launch_local(
    sweep_dir: Path, manifest: dict, args: LocalArgs, parallel: bool = False, runs: Optional[list[dict]] = None
) -> dict[str, int]:
    """Train `runs` (default: the pending ones) here; returns name -> exit code (skipped runs are absent).

    Sequential by default; `parallel` runs one per GPU group of `nproc` GPUs (or `jobs` CPU runs at once).
    Each trainer gets its own session, so a Ctrl-C reaches only this launcher, which forwards SIGTERM.
    An exit the trainer did not record itself (killed, a crash at start-up) goes to the run's EXIT.json.
    """
    todo = list(pending_runs(sweep_dir, manifest) if runs is None else runs)
    gpus = visible_gpus()
    slots: list[Optional[list[int]]]
    if parallel and gpus:
        groups = [gpus[i : i + args.nproc] for i in range(0, len(gpus) - args.nproc + 1, args.nproc)]
        slots = list(groups[: args.jobs or len(groups)])
    elif parallel:
        check(args.jobs > 0, "local.jobs", "no GPU is visible: set local.jobs to the number of CPU runs at a time")
        slots = [None] * args.jobs
    else:
        slots = [gpus[: args.nproc] if gpus else None]
    threads = args.threads or (max(1, (os.cpu_count() or 1) // len(slots)) if not gpus else 0)
    at_a_time = len(slots)
    done = sum(state_kind(run_state(sweep_dir / r["dump_dir"])) == "done" for r in manifest["runs"])
    codes: dict[str, int] = {}
    running: list[tuple[subprocess.Popen, dict, Optional[list[int]], Any, float]] = []
    print(f"[sweep] {len(todo)} of {len(manifest['runs'])} runs to train, {len(slots)} at a time", flush=True)
    with _Stopper() as stopper:
        while (todo and not stopper.stop) or running:
            while todo and slots and not stopper.stop:
                run, dev = todo.pop(0), slots.pop(0)
                rd = RunDir(sweep_dir / run["dump_dir"])
                rd.path.mkdir(parents=True, exist_ok=True)
                state = run_state(rd.path)
                rd.clear_cancelled()
                log = open(rd.train_log, "a")  # noqa: SIM115 (closed when the run ends)
                cmd = train_command(manifest, run, args.nproc)
                print(f"[sweep] start {run['name']} ({state}) -> {rd.train_log}", flush=True)
                started = time.time()
                proc = subprocess.Popen(
                    cmd, cwd=manifest["workdir"], env=run_env(manifest, dev, threads),
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
                stopper.procs.append(proc)
                running.append((proc, run, dev, log, started))
            time.sleep(0.2)
            for item in [x for x in running if x[0].poll() is not None]:
                proc, run, dev, log, started = item
                running.remove(item)
                stopper.procs.remove(proc)
                log.close()
                slots.append(dev)
                code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode  # killed: as a shell says
                cause = ""
                if stopper.stop and code == 128 + signal.SIGTERM:  # our SIGTERM came before its handler was set
                    code, cause = EXIT_REQUEUE, "stopped by the sweep during its start-up, nothing saved"
                codes[run["name"]] = code
                RunDir(sweep_dir / run["dump_dir"]).record_exit(code, started, cause)
                done += RunDir(sweep_dir / run["dump_dir"]).is_done()
                print(finish_line(sweep_dir, manifest, run, code, time.time() - started, at_a_time, done), flush=True)
    return codes


def finish_line(sweep_dir: Path, manifest: dict, run: dict, code: int, wall: float, parallel: int, done: int) -> str:
    """`[sweep] [k/N] name -> final loss 3.4123, val 3.3012 (52s); ETA 10m05s (...)` once a run exits; k counts
    the runs done, one more per run this launcher saw finish (runs finishing together are counted in turn)."""
    states = run_states(sweep_dir, manifest)
    runs = status.sweep_progress(sweep_dir, manifest, states)
    rd = RunDir(sweep_dir / run["dump_dir"])
    record = rd.read_done() if code == EXIT_OK else None
    if record is not None:
        loss, val = record.get("train_loss_last"), record.get("val_loss")
        what = "finished"
        if isinstance(loss, (int, float)):
            what = f"final loss {loss:.4f} (mean of the last {record.get('last_n', '?')} steps)"
        what += f", val {val:.4f}" if isinstance(val, (int, float)) else ""
    elif code == EXIT_REQUEUE:
        what = f"{(rd.read_exit() or {}).get('cause') or exit_cause(code)} (exit 75): the same command resumes it"
    else:
        what = f"FAILED ({states[run['name']]}); see {rd.train_log}"
    left, how = status.eta(runs, parallel)
    tail = f"; ETA {format_duration(left)} ({how})" if left else ""
    return f"[sweep] [{done}/{len(runs)}] {run['name']} -> {what} ({format_duration(wall)}){tail}"


# ----------------------------------------------------------------------------- SLURM


def jobs_path(sweep_dir: str | os.PathLike) -> Path:
    """The sweep's own record of its SLURM array jobs: [{"job": id, "runs": [name per array index], "time"}]."""
    return Path(sweep_dir) / "jobs.json"


def read_jobs(sweep_dir: str | os.PathLike) -> list[dict]:
    path = jobs_path(sweep_dir)
    return json.loads(path.read_text()) if path.is_file() else []


def record_job(sweep_dir: Path, job_id: str, runs: list[dict]) -> None:
    jobs = read_jobs(sweep_dir) + [{"job": job_id, "runs": [r["name"] for r in runs], "time": _now()}]
    _write_json(jobs_path(sweep_dir), jobs)


def latest_tasks(sweep_dir: str | os.PathLike) -> dict[str, str]:
    """Run name -> the array task (`<job>_<index>`) of its latest submission."""
    return {name: f"{j['job']}_{i}" for j in read_jobs(sweep_dir) for i, name in enumerate(j["runs"])}


def _slurm_lines(cmd: list[str]) -> Optional[list[str]]:
    """stdout lines of a SLURM command, None if it is missing or fails (e.g. sacct without accounting)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.splitlines() if out.returncode == 0 else None


def slurm_states(tasks: list[str]) -> dict[str, str]:
    """Array task (`123_4`) -> SLURM's state word (PENDING, RUNNING, CANCELLED, ...). squeue knows the jobs
    SLURM still holds (finished ones for MinJobAge, 5 min by default); sacct, where accounting is on,
    knows the rest; without it the jobcomp/filetxt log (tasks that ran). A task none of them knows is absent."""
    if not tasks:
        return {}
    arrays = ",".join(sorted({t.split("_")[0] for t in tasks}))
    found: dict[str, str] = {}
    for line in _slurm_lines(["squeue", "-h", "-r", "-t", "all", "-j", arrays, "-o", "%i|%T"]) or []:
        task, _, state = line.partition("|")
        found[task.strip()] = state.strip()
    rest = [t for t in tasks if t not in found]
    if rest:
        sacct = _slurm_lines(["sacct", "-n", "-P", "-X", "-j", arrays, "-o", "JobID,State"])
        older = _parse_sacct(sacct) if sacct is not None else _jobcomp_states()
        found |= {t: older[t] for t in rest if t in older}
    return {t: found[t] for t in tasks if t in found}


def _parse_sacct(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        task, _, state = line.partition("|")
        out[task] = state.split(" ")[0]  # "CANCELLED by 1000"
    return out


JOBCOMP_TAIL = 32 << 20  # bytes of the jobcomp log read


def _jobcomp_states() -> dict[str, str]:
    """Array task -> JobState of its last record in the jobcomp/filetxt log, if the cluster keeps a readable one."""
    config = _slurm_lines(["scontrol", "show", "config"]) or []
    conf = {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in config)}
    if conf.get("JobCompType") != "jobcomp/filetxt":
        return {}
    try:  # the log of every job of the cluster: its tail is enough for a sweep's recent jobs
        with open(conf.get("JobCompLoc", ""), "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - JOBCOMP_TAIL))
            text = f.read().decode(errors="replace")
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        rec = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if "ArrayJobId" in rec and "ArrayTaskId" in rec:
            out[f"{rec['ArrayJobId']}_{rec['ArrayTaskId']}"] = rec.get("JobState", "")
    return out


def render_template(text: str, values: dict[str, Any]) -> str:
    """Replace `{{key}}` placeholders (bash keeps its own ${...}); an unknown or unused key is an error."""
    used = set(re.findall(r"\{\{(\w+)\}\}", text))
    missing = sorted(used - set(values))
    check(not missing, "slurm.template", f"no value for placeholders {missing}")
    unused = sorted(set(values) - used)
    check(not unused, "slurm.template", f"the template lacks placeholders {unused}")
    return re.sub(r"\{\{(\w+)\}\}", lambda m: str(values[m.group(1)]), text)


def check_slurm_args(args: SlurmArgs) -> None:
    check(args.nodes >= 1, "slurm.nodes", f"must be >= 1, got {args.nodes}")
    check(
        args.gpus_per_node >= 0, "slurm.gpus_per_node", f"must be >= 0 (0: a CPU partition), got {args.gpus_per_node}"
    )
    check(args.tasks_per_node >= 0, "slurm.tasks_per_node", f"must be >= 0, got {args.tasks_per_node}")
    check(args.cpus_per_task >= 1, "slurm.cpus_per_task", f"must be >= 1, got {args.cpus_per_task}")
    check(args.signal_s >= 0, "slurm.signal_s", f"must be >= 0, got {args.signal_s}")
    check(args.max_requeues >= 0, "slurm.max_requeues", f"must be >= 0, got {args.max_requeues}")
    check(args.max_parallel >= 0, "slurm.max_parallel", f"must be >= 0, got {args.max_parallel}")


def sbatch_values(manifest: dict, runs: list[dict], args: SlurmArgs, job_name: str) -> dict[str, Any]:
    """Placeholder values for the template; the run names are embedded, so array index i is runs[i]."""
    check_slurm_args(args)
    array = f"0-{len(runs) - 1}" + (f"%{args.max_parallel}" if args.max_parallel > 0 else "")
    options = [("partition", args.partition), ("account", args.account), ("qos", args.qos), ("mem", args.mem)]
    lines = [f"#SBATCH --{k}={v}" for k, v in options if v] + [f"#SBATCH {e}" for e in args.extra]
    gpus = args.gpus_per_node
    return {
        "job_name": job_name,
        "array": array,
        "nodes": args.nodes,
        "tasks_per_node": args.tasks_per_node or gpus or 1,
        "gpus": f"#SBATCH --gpus-per-node={gpus}" if gpus else "# (no GPUs: slurm.gpus_per_node=0)",
        "cpus_per_task": args.cpus_per_task,
        "time": args.time,
        "signal_s": args.signal_s,
        "sbatch_options": "\n".join(lines) if lines else "# (no partition / account / qos / mem / extra options)",
        "sweep_dir": manifest["sweep_dir"],
        "code_dir": manifest["code_dir"],
        "workdir": manifest["workdir"],
        "runs": "\n".join(f"  {r['name']}" for r in runs),
        "n_runs": len(runs),
        "setup": args.setup.strip() or "# (slurm.setup is empty)",
        "python": args.python or sys.executable,
        "max_requeues": args.max_requeues,
    }


def render_sbatch(manifest: dict, runs: list[dict], args: SlurmArgs) -> str:
    """The array job script over `runs`, from the sweep's code snapshot (or this tree's template before one exists)."""
    template = Path(manifest["code_dir"]) / args.template
    if not template.is_file():
        template = REPO_ROOT / args.template
    check(template.is_file(), "slurm.template", f"no such file {args.template}")
    return render_template(template.read_text(), sbatch_values(manifest, runs, args, manifest["name"]))


def write_sbatch(
    sweep_dir: Path, manifest: dict, args: SlurmArgs, runs: Optional[list[dict]] = None
) -> tuple[Path, int]:
    """Render <sweep>/submit.sbatch over `runs` (default: the pending ones); returns (path, number of tasks)."""
    runs = pending_runs(sweep_dir, manifest) if runs is None else runs
    path = sweep_dir / "submit.sbatch"
    if not runs:
        return path, 0
    path.write_text(render_sbatch(manifest, runs, args))
    path.chmod(0o755)
    return path, len(runs)


def submit(path: Path) -> str:
    """sbatch the array script; returns the job id."""
    out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


# ----------------------------------------------------------------------------- CLI


def runs_at_a_time(args: SweepArgs) -> int:
    """How many runs the launcher trains at once, for the ETA (0: unknown, status counts the running ones)."""
    if args.launcher == "slurm":
        return args.slurm.max_parallel
    if args.launcher == "local_parallel":
        gpus = visible_gpus()
        return args.local.jobs or (len(gpus) // max(1, args.local.nproc) if gpus else 0)
    return 1


USAGE = """usage: lingua-wd sweep SWEEP.yaml [key=value ...] [--dry-run] [--retry-failed] [--resnapshot]
  SWEEP.yaml      a base trainer config + a grid over dotted keys (see docs/sweeps.md)
  key=value       override a sweep field, e.g. launcher=slurm slurm.partition=gpu local.jobs=2;
                  launcher, slurm.* and local.* are remembered by the sweep dir for later calls
  --dry-run       list the runs and their state and what would be trained or submitted (with
                  launcher=slurm, the job script); writes nothing
  --retry-failed  train or submit failed and cancelled runs again, too
  --resnapshot    refresh the code snapshot of an existing sweep dir (queued SLURM tasks see the new code)
Run states: new, started, resume, queued, running, done, failed (exit N: cause), cancelled. Runs that are
new, started or resume are trained (or submitted); queued, running and done ones never twice."""
FLAGS = ("--dry-run", "--retry-failed", "--resnapshot", "--help")
HELP = help_text(SweepArgs, USAGE, __doc__)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = {a for a in argv if a.startswith("--")}
    rest = [a for a in argv if not a.startswith("--")]
    if "--help" in flags or "-h" in argv or not rest:
        print(HELP if rest or "--help" in flags or "-h" in argv else USAGE)
        return 0 if rest or "--help" in flags else 2
    try:
        check(not flags - set(FLAGS), "sweep", f"unknown flags {sorted(flags - set(FLAGS))} (choose from {FLAGS})")
        args = load_sweep(rest[0], rest[1:])
        dry, retry = "--dry-run" in flags, "--retry-failed" in flags
        sweep_dir, manifest = prepare(args, rest[0], resnapshot="--resnapshot" in flags, write=not dry)
        states = run_states(sweep_dir, manifest, persist=not dry)
        print(status.report(sweep_dir, manifest, states, runs_at_a_time(args)), flush=True)
        todo = pending_runs(sweep_dir, manifest, retry, states)
        if dry:
            return dry_run(manifest, todo, args)
        if retry:
            for r in todo:
                RunDir(sweep_dir / r["dump_dir"]).clear_cancelled()
        if args.launcher == "slurm":
            return launch_slurm(sweep_dir, manifest, todo, args.slurm)
        codes = launch_local(sweep_dir, manifest, args.local, args.launcher == "local_parallel", todo)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    failed = sorted(n for n, c in codes.items() if c not in (EXIT_OK, EXIT_REQUEUE))
    if failed:
        print(f"[sweep] {len(failed)} runs failed: {failed} (logs: <run>/train.log)", file=sys.stderr)
        return 1
    if any(c == EXIT_REQUEUE for c in codes.values()) or pending_runs(sweep_dir, manifest):
        print("[sweep] stopped early: run the same command again to resume", file=sys.stderr)
        return EXIT_REQUEUE
    print(f"[sweep] all runs finished; report with: lingua-wd report {sweep_dir}")
    return 0


def dry_run(manifest: dict, todo: list[dict], args: SweepArgs) -> int:
    """What a real call would do, without writing anything."""
    if not todo:
        print("[sweep] --dry-run: nothing to train or submit")
    elif args.launcher == "slurm":
        print(f"[sweep] --dry-run: would submit this array job ({len(todo)} tasks):\n")
        print(render_sbatch(manifest, todo, args.slurm))
    else:
        print(f"[sweep] --dry-run: would train {len(todo)} runs: {' '.join(r['name'] for r in todo)}")
    return 0


def launch_slurm(sweep_dir: Path, manifest: dict, todo: list[dict], args: SlurmArgs) -> int:
    """Write <sweep>/submit.sbatch over `todo` and submit it, remembering the job id (jobs.json)."""
    if not todo:
        print("[sweep] nothing to submit (every run is done, queued, running, failed or cancelled)")
        return 0
    path, n = write_sbatch(sweep_dir, manifest, args, todo)
    if not args.submit:
        print(f"[sweep] wrote {path} ({n} array tasks); submit with: sbatch {path}")
        return 0
    try:
        job = submit(path)
    except RuntimeError as err:
        print(f"[sweep] {err}", file=sys.stderr)
        return 1
    record_job(sweep_dir, job, todo)
    print(f"[sweep] submitted array job {job} ({n} tasks) from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
