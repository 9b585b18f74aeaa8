"""Sweeps and the transfer report: grid expansion, names, manifest, snapshot, sbatch rendering (golden +
`bash -n`), array index -> run, skip / resume, requeue on a signal, and a 4-run local sweep of the real
trainer whose report finds one optimum per width.

The SLURM launcher on a real cluster is tests/test_slurm.py; here the rendered array script runs under bash
with fake `srun` and `scontrol` on PATH (index -> run, skip, exit codes), and the scheduler's answers are
stubbed for the sweep's states and resubmission rules.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lingua_wd import report as rep
from lingua_wd import sweep as sw
from lingua_wd import transfer_stats as ts
from lingua_wd.args import ConfigError
from lingua_wd.cli import main as cli_main
from lingua_wd.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"

# A stand-in trainer for launcher tests (the rundir.py contract, nothing else): it resumes from the
# newest checkpoints/<step> dir, logs {"step", "loss"} per step, saves a checkpoint (with its MANIFEST.json)
# and exits 75 on SIGTERM / SIGUSR1 (or when FAKE_STOP_AT is reached, once), exits FAKE_EXIT at start if
# set, writes DONE at the end, and appends each call to $FAKE_CALLS. Its loss has a known optimum:
# lr* = 1e-2 * (dim / 64) ** FAKE_SHIFT[wd].
FAKE_TRAIN = r"""
import json, math, os, signal, sys, time
from pathlib import Path
from omegaconf import OmegaConf
cfg = OmegaConf.load(next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("config=")))
d = Path(cfg.dump_dir); d.mkdir(parents=True, exist_ok=True)
ck = d / "checkpoints"
done = sorted(int(p.name) for p in ck.iterdir()) if ck.is_dir() else []
start = done[-1] if done else 0
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps({"run": d.name, "start": start, "argv": sys.argv, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\n")
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))
(d / "started").write_text(str(os.getpid()))
if os.environ.get("FAKE_EXIT", "").startswith("-"):  # killed by a signal, e.g. before any handler is set
    signal.signal(-int(os.environ["FAKE_EXIT"]), signal.SIG_DFL)
    os.kill(os.getpid(), -int(os.environ["FAKE_EXIT"]))
if os.environ.get("FAKE_EXIT"):
    sys.exit(int(os.environ["FAKE_EXIT"]))
def save(step):
    (ck / f"{step:010d}").mkdir(parents=True, exist_ok=True)
    (ck / f"{step:010d}" / "MANIFEST.json").write_text("{}")
shift = json.loads(os.environ.get("FAKE_SHIFT", "{}")).get(str(cfg.scaling.wd), 0.0)
opt = 1e-2 * (cfg.model.dim / 64) ** shift
stop_at = int(os.environ.get("FAKE_STOP_AT", "-1"))
with open(d / "metrics.jsonl", "a") as f:
    for step in range(start + 1, cfg.steps + 1):
        time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
        loss = 3.0 + 0.1 * math.log(cfg.optim.lr / opt) ** 2 + 1.0 / step
        f.write(json.dumps({"step": step, "loss": loss}) + "\n"); f.flush()
        if stop or (step == stop_at and start == 0):
            save(step)
            sys.exit(75)
    f.write(json.dumps({"step": cfg.steps, "val/loss": loss + 0.05}) + "\n")
save(cfg.steps)
(d / "DONE").write_text(json.dumps({"step": cfg.steps}))
"""


def write(path: Path, text: str, mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    if mode:
        path.chmod(mode)
    return path


@pytest.fixture
def fake_repo(tmp_path: Path) -> Path:
    """A code root whose apps/train.py is the fake trainer (snapshotted like the real one)."""
    src = tmp_path / "src"
    write(src / "apps" / "train.py", FAKE_TRAIN)
    write(src / "lingua_wd" / "__init__.py", "")
    (src / "slurm").mkdir()
    (src / "slurm" / "array.sbatch").write_text((ROOT / "slurm" / "array.sbatch").read_text())
    return src


@pytest.fixture
def fake_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(sw, "visible_gpus", lambda: [])
    return calls


def calls_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def sweep_args(tmp_path: Path, grid: dict, **kw) -> sw.SweepArgs:
    base = {"steps": 6, "model": {"dim": 64, "head_dim": 32}, "optim": {"lr": 1e-3}, "scaling": {"wd": "standard"}}
    args = sw.SweepArgs(name="t", dump_root=str(tmp_path / "sweeps"), base=base, grid=grid, validate=False)
    for k, v in kw.items():
        setattr(args, k, v)
    return args


# ----------------------------------------------------------------------------- grid and names


def wait_for(path, then: float, timeout: float = 30) -> None:
    """Poll until path exists (at most timeout s), then sleep `then` s more."""
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(then)


def test_grid_product_ranges_zip_and_stable_names():
    grid = {
        "model.dim": [64, 128],
        "optim.lr": {"logspace": [1e-3, 8e-3, 4]},
        "wd": {"zip": {"scaling.wd": ["standard", "none"], "optim.weight_decay": [0.1, 0.0]}},
    }
    runs = sw.expand_grid(grid)
    assert len(runs) == 2 * 4 * 2
    assert [r.params["optim.lr"] for r in runs[:8:2]] == [0.001, 0.002, 0.004, 0.008]  # rounded, not 0.0080000001
    assert runs[0].name == "d64_lr1e-3_standard"
    assert runs[1].params == {"model.dim": 64, "optim.lr": 0.001, "scaling.wd": "none", "optim.weight_decay": 0.0}
    assert runs[-1].name == "d128_lr8e-3_none"
    assert [r.index for r in runs] == list(range(16))
    assert [r.name for r in sw.expand_grid(grid)] == [r.name for r in runs]  # deterministic
    assert len({r.name for r in runs}) == 16
    geo = sw.axis_values("optim.lr", {"geomspace": [1e-3, 2, 8]})
    assert geo[-1] == 0.128 and len(geo) == 8
    assert sw.axis_values("x", {"linspace": [0, 1, 3]}) == [0.0, 0.5, 1.0]
    assert sw.axis_values("seed", 3) == [3]


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.008, "8e-3"), (0.016, "1.6e-2"), (0.128, "0.128"), (1e-8, "1e-8"), (128, "128"), (1.0, "1"),
     (0.00999999, "1e-2"), (True, "true"), ("a b/c", "a-b-c")],
)  # fmt: skip
def test_format_value(value, text):
    assert sw.format_value(value) == text


def test_short_names_and_collisions():
    runs = sw.expand_grid({"seed": [0, 1], "data.seq_len": [64]}, {"data.seq_len": "T"})
    assert [r.name for r in runs] == ["s0_T64", "s1_T64"]
    with pytest.raises(ConfigError, match=r"^grid: run names collide \(\['tag-a-b'\]\)"):
        sw.expand_grid({"tag": ["a b", "a/b"]})


@pytest.mark.parametrize(
    ("grid", "msg"),
    [
        ({"wd": {"zip": {"a": [1, 2], "b": [1]}}}, r"^grid\.wd\.zip: lists differ in length"),
        ({"optim.lr": {"powers": [1, 2, 3]}}, r"^grid\.optim\.lr: unknown range"),
        ({"optim.lr": {"logspace": [1, 2]}}, r"^grid\.optim\.lr\.logspace: expects"),
        ({"optim.lr": []}, r"^grid\.optim\.lr: an empty list"),
    ],
)
def test_grid_errors_name_the_key(grid, msg):
    with pytest.raises(ConfigError, match=msg):
        sw.expand_grid(grid)


def test_load_sweep_yaml_and_cli_overrides(tmp_path: Path):
    path = write(tmp_path / "my_sweep.yaml", "grid: {optim.lr: [1.0e-3]}\nlauncher: local\n")
    args = sw.load_sweep(path, ["launcher=slurm", "slurm.partition=gpu", "slurm.nodes=2"])
    assert (args.name, args.launcher, args.slurm.partition, args.slurm.nodes) == ("my_sweep", "slurm", "gpu", 2)
    with pytest.raises(ConfigError, match=r"^launcher: unknown launcher"):
        sw.load_sweep(path, ["launcher=kubernetes"])
    with pytest.raises(ConfigError, match=r"^slurm\.nodez"):
        sw.load_sweep(path, ["slurm.nodez=2"])


# ----------------------------------------------------------------------------- configs, manifest, snapshot


def test_prepare_writes_configs_manifest_and_snapshot(tmp_path: Path, fake_repo: Path):
    base = write(tmp_path / "base.yaml", "steps: 5\nmodel: {dim: 32, n_layers: 2}\noptim: {lr: 1.0}\n")
    args = sweep_args(tmp_path, {"model.dim": [64, 128], "optim.lr": [1e-3, 2e-3]}, base=str(base))
    args.overrides = {"model.n_layers": 3, "scaling.frozen_lr.input": 0.016}
    sweep_dir, manifest = sw.prepare(args, src=fake_repo)
    assert [r["name"] for r in manifest["runs"]] == ["d64_lr1e-3", "d64_lr2e-3", "d128_lr1e-3", "d128_lr2e-3"]
    assert manifest["axis_keys"] == [["model.dim"], ["optim.lr"]]
    cfg = OmegaConf.load(sweep_dir / "configs" / "d128_lr2e-3.yaml")
    assert (cfg.model.dim, cfg.model.n_layers, cfg.optim.lr, cfg.steps) == (128, 3, 0.002, 5)
    assert cfg.scaling.frozen_lr.input == 0.016
    assert cfg.dump_dir == str(sweep_dir / "runs" / "d128_lr2e-3") and cfg.name == "t/d128_lr2e-3"
    assert json.loads((sweep_dir / "manifest.json").read_text()) == manifest
    assert (sweep_dir / "code" / "apps" / "train.py").read_text() == (fake_repo / "apps" / "train.py").read_text()
    assert "time" in json.loads((sweep_dir / "code" / "SNAPSHOT.json").read_text())

    # the snapshot is frozen: editing the source does not reach an existing sweep unless asked
    (fake_repo / "apps" / "train.py").write_text("# edited\n")
    sw.prepare(args, src=fake_repo)
    assert (sweep_dir / "code" / "apps" / "train.py").read_text() != "# edited\n"
    sw.prepare(args, src=fake_repo, resnapshot=True)
    assert (sweep_dir / "code" / "apps" / "train.py").read_text() == "# edited\n"

    # a started run must keep its config; new grid points may be added
    (sweep_dir / "runs" / "d64_lr1e-3").mkdir(parents=True)
    (sweep_dir / "runs" / "d64_lr1e-3" / "metrics.jsonl").write_text("")
    args.overrides["model.n_layers"] = 4
    with pytest.raises(
        ConfigError, match=r"^grid: run d64_lr1e-3 already started with other values of \['model.n_layers'\]"
    ):
        sw.prepare(args, src=fake_repo)
    args.overrides["model.n_layers"] = 3
    args.grid["optim.lr"] = [1e-3, 2e-3, 4e-3]
    _, manifest = sw.prepare(args, src=fake_repo)
    assert len(manifest["runs"]) == 6


def test_run_state(tmp_path: Path):
    d = tmp_path / "run"
    run = RunDir(d)
    assert sw.run_state(d) == "new"
    d.mkdir()
    (d / "metrics.jsonl").write_text("")
    assert sw.run_state(d) == "started"
    (d / "checkpoints" / "0000000010.tmp").mkdir(parents=True)  # an incomplete save does not count
    (d / "checkpoints" / "0000000010").mkdir()  # nor a checkpoint without its manifest
    assert sw.run_state(d) == "started"
    (d / "checkpoints" / "0000000010" / "MANIFEST.json").write_text("{}")
    assert sw.run_state(d) == "resume"
    run.write_exit(75, 10)  # stopped by a signal after a checkpoint: resumable
    assert sw.run_state(d) == "resume"
    assert sw.run_state(d, "PENDING") == "queued" and sw.run_state(d, "COMPLETING") == "running"
    run.write_exit(2, 10)
    assert sw.run_state(d) == "failed (exit 2: config error)"
    run.write_exit(137, 10)
    assert sw.run_state(d) == "failed (exit 137: killed by SIGKILL)" and sw.state_kind(sw.run_state(d)) == "failed"
    assert sw.run_state(d, "RUNNING") == "running"  # a live job wins over the last exit
    assert sw.run_state(d, "CANCELLED") == "cancelled"
    run.write_cancelled("12_3", "None")
    assert sw.run_state(d) == "cancelled"
    run.clear_cancelled()
    run.write_done({"step": 10})
    assert sw.run_state(d, "RUNNING") == "done"


def test_validation_against_the_trainer_config(tmp_path: Path):
    if sw.train_args_class() is None:
        pytest.skip("the trainer is not importable")
    args = sweep_args(tmp_path, {"optim.lrr": [1e-3]})
    args.validate = True
    with pytest.raises(ConfigError, match=r"^optim\.lrr: .*\(run lrr1e-3\)"):
        sw.prepare(args, write=False)
    args.grid = {"model.dim": [64, 100]}  # the trainer refuses d=100 (head_dim 32 in the base): so does the sweep
    with pytest.raises(ConfigError, match=r"^model\.dim: 100 is not divisible by model\.head_dim=.*\(run d100\)"):
        sw.prepare(args, write=False)
    args.grid = {"optim.lr": [1e-3]}
    sweep_dir, _ = sw.prepare(args)
    cfg = OmegaConf.load(sweep_dir / "configs" / "lr1e-3.yaml")
    assert "logging" in cfg and cfg.optim.lr == 0.001  # resolved: the trainer's defaults are written out


# ----------------------------------------------------------------------------- local launchers


def test_local_skip_and_resume(tmp_path: Path, fake_repo: Path, fake_env: Path, monkeypatch: pytest.MonkeyPatch):
    args = sweep_args(tmp_path, {"model.dim": [64, 128], "optim.lr": [1e-3]})
    sweep_dir, manifest = sw.prepare(args, src=fake_repo)
    monkeypatch.setenv("FAKE_STOP_AT", "3")  # every run is "preempted" at step 3 on its first start
    codes = sw.launch_local(sweep_dir, manifest, args.local)
    assert codes == {"d64_lr1e-3": 75, "d128_lr1e-3": 75}
    assert [sw.run_state(sweep_dir / r["dump_dir"]) for r in manifest["runs"]] == ["resume", "resume"]
    (sweep_dir / "runs" / "d128_lr1e-3" / "DONE").write_text("{}")  # pretend this one finished elsewhere
    codes = sw.launch_local(sweep_dir, manifest, args.local)
    assert codes == {"d64_lr1e-3": 0}  # the finished run is skipped
    calls = calls_of(fake_env)
    assert [(c["run"], c["start"]) for c in calls] == [("d64_lr1e-3", 0), ("d128_lr1e-3", 0), ("d64_lr1e-3", 3)]
    assert calls[0]["argv"][0] == str(sweep_dir / "code" / "apps" / "train.py")  # the snapshot runs
    assert sw.launch_local(sweep_dir, manifest, args.local) == {}  # all done: nothing to do
    steps = [r["step"] for r in RunDir(sweep_dir / "runs" / "d64_lr1e-3").read_metrics() if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_local_parallel_cpu_jobs(tmp_path: Path, fake_repo: Path, fake_env: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FAKE_SLEEP", "0.05")
    args = sweep_args(tmp_path, {"optim.lr": [1e-3, 2e-3, 4e-3]})
    sweep_dir, manifest = sw.prepare(args, src=fake_repo)
    with pytest.raises(ConfigError, match=r"^local\.jobs: no GPU is visible"):
        sw.launch_local(sweep_dir, manifest, args.local, parallel=True)
    args.local.jobs = 3
    t0 = time.time()
    assert sw.launch_local(sweep_dir, manifest, args.local, parallel=True) == {
        n: 0 for n in ["lr1e-3", "lr2e-3", "lr4e-3"]
    }
    assert time.time() - t0 < 3 * 6 * 0.05 + 1.5  # ran side by side (each takes >= 0.3 s plus start-up)
    monkeypatch.setattr(sw, "visible_gpus", lambda: [0, 1, 2, 3])
    args2 = sweep_args(tmp_path, {"optim.lr": [1e-3, 2e-3]}, name="g")
    args2.local.nproc, args2.local.jobs = 1, 0
    sweep_dir2, manifest2 = sw.prepare(args2, src=fake_repo)
    sw.launch_local(sweep_dir2, manifest2, args2.local, parallel=True)
    devices = sorted(c["cuda"] for c in calls_of(fake_env) if "/g/" in c["argv"][1])
    assert devices == ["0", "1"]  # one GPU each, different GPUs


def test_signal_to_local_launcher_checkpoints_and_resumes(tmp_path: Path, fake_repo: Path, fake_env: Path):
    """SIGTERM to a running `lingua-wd sweep` reaches the trainer, which checkpoints; re-running resumes."""
    sweep_file = write(
        tmp_path / "s.yaml",
        f"""
        name: sig
        dump_root: {tmp_path / "sweeps"}
        validate: false
        base: {{steps: 400, model: {{dim: 64}}, optim: {{lr: 1.0e-3}}, scaling: {{wd: standard}}}}
        grid: {{optim.lr: [1.0e-3, 2.0e-3]}}
    """,
    )
    code = f"import sys; from lingua_wd import sweep; sweep.REPO_ROOT = sweep.Path({str(fake_repo)!r}); sys.exit(sweep.main())"
    env = dict(os.environ, FAKE_SLEEP="0.01", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(sweep_file)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    started = tmp_path / "sweeps" / "sig" / "runs" / "lr1e-3" / "started"
    wait_for(started, then=0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 75, out
    assert "lr1e-3 -> stopped by a signal, checkpoint saved (exit 75): the same command resumes it" in out
    sweep_dir = tmp_path / "sweeps" / "sig"
    assert sw.run_state(sweep_dir / "runs" / "lr1e-3") == "resume"
    assert sw.run_state(sweep_dir / "runs" / "lr2e-3") == "new"  # no new run starts after the signal
    env["FAKE_SLEEP"] = "0"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(sweep_file)], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    starts = [(c["run"], c["start"] > 0) for c in calls_of(fake_env)]
    assert starts == [("lr1e-3", False), ("lr1e-3", True), ("lr2e-3", False)]


# ----------------------------------------------------------------------------- SLURM


GOLDEN_MANIFEST = {
    "name": "fig1",
    "sweep_dir": "/sweeps/fig1",
    "code_dir": "/sweeps/fig1/code",
    "workdir": "/home/me/lingua_wd",
    "runs": [{"name": n} for n in ("d128_lr8e-3_standard", "d128_lr8e-3_independent", "d256_lr8e-3_standard")],
}


def golden_slurm_args() -> sw.SlurmArgs:
    return sw.SlurmArgs(
        partition="h100", account="proj42", qos="high", time="14:00:00", nodes=2, gpus_per_node=8,
        cpus_per_task=12, mem="0", max_parallel=2, signal_s=600, setup="source /home/me/lingua_wd/.venv/bin/activate",
        python="python", extra=["--exclusive"],
    )  # fmt: skip


def test_sbatch_matches_golden_and_parses():
    text = (ROOT / "slurm" / "array.sbatch").read_text()
    values = sw.sbatch_values(GOLDEN_MANIFEST, GOLDEN_MANIFEST["runs"], golden_slurm_args(), "fig1")
    rendered = sw.render_template(text, values)
    golden = GOLDEN / "array.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert rendered == golden.read_text()
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=12", "#SBATCH --partition=h100", "#SBATCH --account=proj42", "#SBATCH --qos=high",
                 "#SBATCH --time=14:00:00", "#SBATCH --signal=USR1@600", "#SBATCH --exclusive", "#SBATCH --requeue"):  # fmt: skip
        assert line in rendered.splitlines()
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=8 \\\n  python " in rendered
    subprocess.run(["bash", "-n"], input=rendered, text=True, check=True)
    path = Path("/tmp") / f"lingua_wd_sbatch_{os.getpid()}.sh"
    path.write_text(rendered)
    try:
        subprocess.run(["bash", "-n", str(path)], check=True)
    finally:
        path.unlink()


def test_cpu_only_template_and_slurm_arg_errors():
    args = sw.SlurmArgs(gpus_per_node=0, python="python")
    text = sw.render_template(
        (ROOT / "slurm" / "array.sbatch").read_text(),
        sw.sbatch_values(GOLDEN_MANIFEST, GOLDEN_MANIFEST["runs"], args, "x"),
    )
    assert "--gpus-per-node" not in text and "#SBATCH --ntasks-per-node=1" in text.splitlines()
    args.tasks_per_node = 4  # e.g. 4 CPU ranks per node
    assert sw.sbatch_values(GOLDEN_MANIFEST, [], args, "x")["tasks_per_node"] == 4
    assert sw.sbatch_values(GOLDEN_MANIFEST, [], sw.SlurmArgs(), "x")["python"] == sys.executable  # "" = this Python
    for key, value in [("gpus_per_node", -1), ("nodes", 0), ("cpus_per_task", 0), ("signal_s", -5)]:
        with pytest.raises(ConfigError, match=rf"^slurm\.{key}: must be >="):
            sw.sbatch_values(GOLDEN_MANIFEST, [], sw.SlurmArgs(**{key: value}), "x")


def test_render_template_errors():
    with pytest.raises(ConfigError, match=r"^slurm\.template: no value for placeholders \['b'\]"):
        sw.render_template("{{a}} {{b}}", {"a": 1})
    with pytest.raises(ConfigError, match=r"^slurm\.template: the template lacks placeholders \['c'\]"):
        sw.render_template("{{a}}", {"a": 1, "c": 2})
    assert sw.render_template("${X} {{a}} $((1 + 2))", {"a": "v"}) == "${X} v $((1 + 2))"


@pytest.fixture
def fake_slurm(tmp_path: Path) -> tuple[Path, Path]:
    """Fake srun / scontrol on PATH: srun drops its options and execs the rest; scontrol logs its calls."""
    bin_ = tmp_path / "bin"
    log = tmp_path / "slurm_calls.log"
    write(
        bin_ / "srun",
        f'#!/bin/bash\necho "srun $*" >> {log}\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
        0o755,
    )
    scontrol = f"""#!/bin/bash
    echo "scontrol $*" >> {log}
    case "$1 $2" in
      "show hostnames") echo node001;;
      "show node") echo "NodeName=node001 Arch=x86_64 NodeAddr=10.1.2.3 NodeHostName=node001";;
      "show job") echo "JobId=$3 JobState=RUNNING Reason=None Requeue=1 Restarts=0";;
    esac
    exit 0
    """
    write(bin_ / "scontrol", scontrol, 0o755)
    return bin_, log


def task_env(bin_: Path, index: int, restart: int = 0) -> dict:
    return dict(
        os.environ, PATH=f"{bin_}:{os.environ['PATH']}", SLURM_ARRAY_TASK_ID=str(index), SLURM_ARRAY_JOB_ID="4242",
        SLURM_JOB_ID=str(5000 + index), SLURM_NNODES="1", SLURM_JOB_NODELIST="node001", SLURM_RESTART_COUNT=str(restart),
    )  # fmt: skip


def test_array_script_index_exit_codes_and_records(
    tmp_path: Path, fake_repo: Path, fake_env: Path, fake_slurm, monkeypatch
):
    """The rendered script under bash with a fake srun: index -> run, skip of finished runs, the trainer's
    exit code passed on and recorded in EXIT.json when the trainer did not, a requeue only after exit 75."""
    bin_, log = fake_slurm
    args = sweep_args(tmp_path, {"model.dim": [64, 128], "optim.lr": [1e-3, 2e-3]})
    args.slurm.gpus_per_node = 0
    sweep_dir, manifest = sw.prepare(args, src=fake_repo)
    (sweep_dir / "runs" / "d64_lr2e-3").mkdir(parents=True)
    RunDir(sweep_dir / "runs" / "d64_lr2e-3").write_done({})  # finished before submission: not in the array
    path, n = sw.write_sbatch(sweep_dir, manifest, args.slurm)
    pending = [r["name"] for r in sw.pending_runs(sweep_dir, manifest)]
    assert n == 3 and pending == ["d64_lr1e-3", "d128_lr1e-3", "d128_lr2e-3"]
    assert "#SBATCH --array=0-2" in path.read_text().splitlines()
    for i, name in enumerate(pending):
        proc = subprocess.run(["bash", str(path)], env=task_env(bin_, i), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"-> {name} on node001" in proc.stdout and f"{name} finished" in proc.stdout
        assert RunDir(sweep_dir / "runs" / name).read_exit()["code"] == 0
    assert [c["run"] for c in calls_of(fake_env)] == pending
    sruns = [line for line in log.read_text().splitlines() if line.startswith("srun")]
    assert all(t.startswith("srun --kill-on-bad-exit=1 --ntasks-per-node=1 ") for t in sruns)
    assert f"{sweep_dir}/code/apps/train.py config={sweep_dir}/configs/d128_lr2e-3.yaml" in sruns[2]
    proc = subprocess.run(["bash", str(path)], env=task_env(bin_, 3), capture_output=True, text=True)
    assert proc.returncode == 2 and "outside the 3 runs" in proc.stderr
    proc = subprocess.run(["bash", str(path)], env=task_env(bin_, 0), capture_output=True, text=True)
    assert proc.returncode == 0 and "already finished" in proc.stdout
    assert len(calls_of(fake_env)) == 3
    # a trainer that fails: its code is the task's exit code and the run's recorded exit; no requeue
    RunDir(sweep_dir / "runs" / "d64_lr1e-3").done.unlink()
    monkeypatch.setenv("FAKE_EXIT", "3")
    proc = subprocess.run(["bash", str(path)], env=task_env(bin_, 0), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "failed (exit 3)" in proc.stderr
    assert sw.run_state(sweep_dir / "runs" / "d64_lr1e-3") == "failed (exit 3: diverged)"
    # exit 75 (a checkpoint after a signal to the ranks): the task requeues itself, up to max_requeues
    monkeypatch.setenv("FAKE_EXIT", "75")
    proc = subprocess.run(["bash", str(path)], env=task_env(bin_, 0), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "requeueing 4242_0" in proc.stdout
    assert "scontrol requeue 4242_0" in log.read_text()  # the task, never the array's job id
    proc = subprocess.run(["bash", str(path)], env=task_env(bin_, 0, restart=20), capture_output=True, text=True)
    assert proc.returncode == 75 and "not requeued (slurm.max_requeues)" in proc.stderr
    assert log.read_text().count("scontrol requeue") == 1
    # a SIGUSR1 before the trainer set its handler (128 + 10): requeued, it resumes from the last checkpoint
    monkeypatch.setenv("FAKE_EXIT", "-10")
    proc = subprocess.run(["bash", str(path)], env=task_env(bin_, 0), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "stopped by a signal before it could save (exit 138): requeueing" in proc.stdout
    assert log.read_text().count("scontrol requeue") == 2


def test_cli_dry_run_writes_nothing_and_slurm_settings_are_remembered(tmp_path: Path, capsys, monkeypatch):
    sweep_file = write(
        tmp_path / "s.yaml",
        f"""
        dump_root: {tmp_path / "sweeps"}
        validate: false
        base: {{steps: 10}}
        grid: {{model.dim: [64, 128], optim.lr: {{geomspace: [1.0e-3, 2, 3]}}}}
        slurm: {{partition: cpu}}
    """,
    )
    assert cli_main(["sweep", str(sweep_file), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 runs" in out and "d128_lr4e-3" in out and "would train 6 runs" in out
    argv = ["sweep", str(sweep_file), "--dry-run", "launcher=slurm", "slurm.max_parallel=4", "slurm.gpus_per_node=0"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    script = out[out.index("#!/bin/bash") :]
    assert "#SBATCH --array=0-5%4" in script and "--gpus-per-node" not in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert not (tmp_path / "sweeps").exists()  # --dry-run wrote nothing, not even with launcher=slurm
    # a real call remembers the launcher settings given on the command line; the file's own keys win
    monkeypatch.setattr(sw, "submit", lambda path: "77")
    argv = ["sweep", str(sweep_file), "launcher=slurm", "slurm.time=1:00:00", "slurm.gpus_per_node=0"]
    assert cli_main(argv) == 0
    assert "submitted array job 77 (6 tasks)" in capsys.readouterr().out
    first = (tmp_path / "sweeps" / "s" / "submit.sbatch").read_text()
    assert "#SBATCH --time=1:00:00" in first  # not 3600 (YAML's sexagesimal 1:00:00)
    args = sw.load_sweep(sweep_file, ["slurm.max_parallel=3"])
    assert (args.launcher, args.slurm.time, args.slurm.gpus_per_node, args.slurm.max_parallel) == (
        "slurm",
        "1:00:00",
        0,
        3,
    )
    assert args.slurm.partition == "cpu"
    sweep_file.write_text(sweep_file.read_text().replace("partition: cpu", "partition: big"))
    assert sw.load_sweep(sweep_file).slurm.partition == "big"
    assert cli_main(["sweep", str(sweep_file), "launcher=nope"]) == 2
    assert "config error: launcher: unknown launcher" in capsys.readouterr().err


def test_slurm_states_resubmission_and_retry(tmp_path: Path, capsys, monkeypatch):
    """The sweep remembers its jobs: queued / running runs are never submitted twice, failed and cancelled
    ones only with --retry-failed (SLURM's answers stubbed; tests/test_slurm.py asks a real one)."""
    sweep_file = write(
        tmp_path / "s.yaml",
        f"""
        dump_root: {tmp_path / "sweeps"}
        validate: false
        base: {{steps: 10}}
        grid: {{optim.lr: [1.0e-3, 2.0e-3, 4.0e-3, 8.0e-3]}}
        launcher: slurm
        slurm: {{gpus_per_node: 0}}
    """,
    )
    jobs = iter(["100", "101", "102"])
    submitted: list[str] = []

    def fake_submit(path: Path) -> str:
        submitted.append(path.read_text())
        return next(jobs)

    monkeypatch.setattr(sw, "submit", fake_submit)
    slurm: dict[str, str] = {}
    monkeypatch.setattr(sw, "slurm_states", lambda tasks: {t: slurm[t] for t in tasks if t in slurm})
    assert cli_main(["sweep", str(sweep_file)]) == 0
    sweep_dir = tmp_path / "sweeps" / "s"
    assert sw.latest_tasks(sweep_dir) == {"lr1e-3": "100_0", "lr2e-3": "100_1", "lr4e-3": "100_2", "lr8e-3": "100_3"}
    slurm.update({"100_0": "RUNNING", "100_1": "PENDING", "100_2": "COMPLETED", "100_3": "CANCELLED"})
    runs = {n: RunDir(sweep_dir / "runs" / n) for n in ("lr1e-3", "lr2e-3", "lr4e-3", "lr8e-3")}
    runs["lr4e-3"].write_exit(2, 0)  # a config error
    capsys.readouterr()
    assert cli_main(["sweep", str(sweep_file)]) == 0
    out = capsys.readouterr().out
    assert "lr1e-3  running" in out and "lr2e-3  queued" in out and "lr8e-3  cancelled" in out
    assert "failed (exit 2: config error)" in out and "nothing to submit" in out and len(submitted) == 1
    assert runs["lr8e-3"].read_cancelled() is not None  # SLURM's word is kept once SLURM forgets the job
    del slurm["100_3"]
    assert sw.run_states(sweep_dir, sw.load_manifest(sweep_dir))["lr8e-3"] == "cancelled"
    assert cli_main(["sweep", str(sweep_file), "--retry-failed"]) == 0
    assert "submitted array job 101 (2 tasks)" in capsys.readouterr().out
    assert "RUNS=(\n  lr4e-3\n  lr8e-3\n)" in submitted[-1] and runs["lr8e-3"].read_cancelled() is None
    assert sw.latest_tasks(sweep_dir)["lr8e-3"] == "101_1" and sw.latest_tasks(sweep_dir)["lr1e-3"] == "100_0"


def test_slurm_state_sources(monkeypatch, tmp_path: Path):
    """squeue first; then sacct; without accounting the jobcomp/filetxt log."""
    comp = tmp_path / "jobcomp.txt"
    comp.write_text(
        "JobId=7 JobState=COMPLETED ArrayJobId=5 ArrayTaskId=1 ExitCode=0:0\n"
        "JobId=8 JobState=FAILED ArrayJobId=5 ArrayTaskId=2 ExitCode=2:0\n"
        "JobId=9 JobState=PENDING ArrayJobId=5 ArrayTaskId=3 ExitCode=0:0\n"
        "JobId=9 JobState=CANCELLED ArrayJobId=5 ArrayTaskId=3 ExitCode=0:0\n"
    )
    answers = {
        "squeue": ["5_0|RUNNING"],
        "sacct": None,  # accounting_storage/none
        "scontrol": ["JobCompLoc              = " + str(comp), "JobCompType             = jobcomp/filetxt"],
    }
    monkeypatch.setattr(sw, "_slurm_lines", lambda cmd: answers[cmd[0]])
    tasks = ["5_0", "5_1", "5_2", "5_3", "5_4"]
    assert sw.slurm_states(tasks) == {"5_0": "RUNNING", "5_1": "COMPLETED", "5_2": "FAILED", "5_3": "CANCELLED"}
    answers["sacct"] = ["5_1|COMPLETED", "5_2|FAILED", "5_3|CANCELLED by 0", "5_4|PENDING"]
    assert sw.slurm_states(tasks)["5_3"] == "CANCELLED" and sw.slurm_states(tasks)["5_4"] == "PENDING"
    assert sw.slurm_states([]) == {}


def test_local_failed_runs_are_recorded_and_retried_only_when_asked(
    tmp_path: Path, fake_repo: Path, fake_env: Path, monkeypatch
):
    args = sweep_args(tmp_path, {"optim.lr": [1e-3, 2e-3]})
    sweep_dir, manifest = sw.prepare(args, src=fake_repo)
    monkeypatch.setenv("FAKE_EXIT", "4")
    assert sw.launch_local(sweep_dir, manifest, args.local) == {"lr1e-3": 4, "lr2e-3": 4}
    states = sw.run_states(sweep_dir, manifest)
    assert states == {n: "failed (exit 4: checkpoint write failed)" for n in ("lr1e-3", "lr2e-3")}
    assert sw.pending_runs(sweep_dir, manifest) == []
    monkeypatch.delenv("FAKE_EXIT")
    retry = sw.pending_runs(sweep_dir, manifest, retry=True)
    assert sw.launch_local(sweep_dir, manifest, args.local, runs=retry) == {"lr1e-3": 0, "lr2e-3": 0}
    assert set(sw.run_states(sweep_dir, manifest).values()) == {"done"}


# ----------------------------------------------------------------------------- report


def test_final_train_loss_weights_each_logged_step():
    recs = [
        {"step": 5, "loss": 4.0},
        {"step": 10, "loss": 2.0},
        {"step": 10, "val/loss": 9.0},
        {"step": 12, "loss": 1.0},
    ]
    assert rep.final_train_loss(recs, 4) == (pytest.approx((2 * 2.0 + 2 * 1.0) / 4), 12)
    assert rep.final_train_loss(recs, 100)[0] == pytest.approx((5 * 4 + 5 * 2 + 2 * 1) / 12)
    assert rep.final_train_loss(recs + [{"step": 12, "loss": 3.0}], 2)[0] == 3.0  # re-logged step: newest wins
    assert rep.last_val_loss(recs) == 9.0 and math.isnan(rep.last_val_loss([]))


def test_run_states_map_onto_outcomes():
    """done -> done, a logged non-finite loss or exit 3 -> diverged, everything unfinished -> incomplete."""
    v = {"optim.lr": 1e-3, "model.dim": 64}
    assert rep.RunResult("a", "done", v, train=3.0).outcome("train") == ts.Outcome("done", 3.0)
    assert rep.RunResult("b", "done", v, diverged=True).outcome("train").status == "diverged"
    assert rep.RunResult("c", "failed (exit 3: diverged)", v, diverged=True).outcome("train").status == "diverged"
    for state in ("new", "started", "resume", "queued", "running", "cancelled", "failed (exit 2: config error)"):
        assert rep.RunResult("d", state, v, train=2.0).outcome("train").status == "incomplete", state
    assert rep.RunResult("e", "done", v, train=3.0).outcome("val").status == "incomplete"  # no val loss logged


def test_group_runs_averages_seeds_and_keeps_the_missing():
    args = sw.ReportArgs(panel="scaling.width,scaling.wd")

    def v(lr: float, seed: int, dim: int = 64) -> dict:
        return {"optim.lr": lr, "model.dim": dim, "scaling.width": "mup", "scaling.wd": "none", "seed": seed}

    results = [
        rep.RunResult("a", "done", v(1e-3, 0), train=3.0), rep.RunResult("b", "done", v(1e-3, 1), train=2.0),
        rep.RunResult("c", "done", v(2e-3, 0), train=1.0), rep.RunResult("d", "done", v(2e-3, 1), diverged=True),
        rep.RunResult("e", "done", v(4e-3, 0), train=2.2), rep.RunResult("f", "resume", v(4e-3, 1), train=0.1),
        rep.RunResult("g", "queued", v(8e-3, 0), train=0.1),
    ]  # fmt: skip
    grouped = rep.group_runs(results, args, [], "train")
    assert list(grouped) == ["mup/none"] and list(grouped["mup/none"]) == [64.0]
    line = ts.line_optimum(64, grouped["mup/none"][64.0])
    p = {pt.lr: pt for pt in line.points}
    assert p[1e-3].mean == 2.5 and p[1e-3].std == pytest.approx(math.sqrt(0.5)) and p[1e-3].n == 2
    assert p[2e-3].mean == math.inf and p[4e-3].n_missing == 1 and p[8e-3].n_missing == 1
    assert not line.complete and line.status == "incomplete (2 missing)"
    with pytest.raises(ConfigError, match="report.line"):
        rep.group_runs([rep.RunResult("h", "done", {**v(1e-3, 0), "model.dim": "wide"})], args, [], "train")


def test_report_plot_legends_cover_no_point():
    """The case seen on a half-finished cpu_small sweep: a rule's optimum at the top edge of the grid (an open ^
    at the highest LR) lay under the shift plot's legend, whose labels carry the verdicts. In both report plots
    every drawn point now stays clear of every legend, and each legend lists what its axes draw."""
    lrs = [0.004, 0.008, 0.016, 0.032]

    def line(losses):
        return {lr: [ts.Outcome("done", y)] if y is not None else [ts.Outcome("incomplete")] for lr, y in zip(lrs, losses, strict=True)}  # fmt: skip

    bowl = line([3.36, 3.19, 3.10, 3.14])
    panels = {
        "mup/independent": ts.analyse_panel({32: bowl, 64: line([3.19, 3.01, 2.92, 2.90]), 128: line([None] * 4)}),
        "sp/standard": ts.analyse_panel({32: bowl, 64: line([3.03, 2.93, 2.90, 2.98]), 128: line([2.95, 2.92, 8.0, 3.3])}),
    }  # fmt: skip
    assert panels["mup/independent"].lines[1].edge == "high"  # sp's d128 has a point far above: an open ^ at the top
    args = sw.ReportArgs()
    shift, transfer = rep.shift_figure(panels, args), rep.transfer_figure(panels, args, 32.0, "final train loss")
    for fig in (shift, transfer):
        fig.set_dpi(rep.DPI)  # as the report saves them
        fig.canvas.draw()
        boxes = [ax.get_legend().get_window_extent() for ax in fig.axes]
        points = [ax.transData.transform(xy) for ax in fig.axes for ln in ax.lines for xy in ln.get_xydata()]
        assert len(points) >= 4 and not [p for p in points for box in boxes if box.contains(*p)]
        rep._plt().close(fig)
    assert [t.get_text().split(":")[0] for t in shift.axes[0].get_legend().get_texts()] == list(panels)
    labels = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in transfer.axes]
    assert labels == [["dim=32 (m=1)", "dim=64 (m=2)", "dim=128 (m=4), incomplete: 4 missing"],
                      ["dim=32 (m=1)", "dim=64 (m=2)", "dim=128 (m=4)"]]  # fmt: skip


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_report_on_fake_sweep(tmp_path: Path, fake_repo: Path, fake_env: Path, monkeypatch: pytest.MonkeyPatch):
    """Known optima: lr* = 1e-2 m^-1 for standard, 1e-2 for independent. With one standard run unfinished the
    standard verdict is withheld naming it; once it finishes: slope -1 (shifts), 0 (transfers), and the regret of
    standard is exactly 0.1 (ln m)^2 (the fake loss is a parabola in ln lr)."""
    monkeypatch.setenv("FAKE_SHIFT", json.dumps({"standard": -1.0, "independent": 0.0}))
    grid = {
        "model.dim": [64, 128, 256],
        "optim.lr": {"geomspace": [1.25e-3, 2, 6]},
        "scaling.wd": ["standard", "independent"],
    }
    args = sweep_args(tmp_path, grid)
    args.base["steps"] = 20
    args.base["scaling"]["base_dim"] = 64
    args.report.last_n = 5
    args.report.alignment_runs = ["d64_lr1e-2_standard"]
    args.local.jobs = 4
    sweep_dir, manifest = sw.prepare(args, src=fake_repo)
    # one diverged run (never an optimum, not missing) and one run left unfinished
    div = sweep_dir / "runs" / "d256_lr4e-2_independent"
    write(div / "metrics.jsonl", '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": NaN}\n')
    (div / "DONE").write_text("{}")
    todo = [r for r in sw.pending_runs(sweep_dir, manifest) if r["name"] != "d256_lr5e-3_standard"]
    assert sw.launch_local(sweep_dir, manifest, args.local, parallel=True, runs=todo).get(div.name) is None
    with open(sweep_dir / "runs" / "d64_lr1e-2_standard" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 20, "probe/layers.0.feed_forward.w1/align_ratio": 1.1}) + "\n")
    summary = rep.report(sweep_dir, rep.report_args(sweep_dir, []))
    train = summary["metrics"]["train"]
    assert sorted(train) == ["independent", "standard"]
    std, ind = train["standard"], train["independent"]
    assert std["shift"]["verdict"] is None and std["shift"]["n_missing"] == 1
    assert "1 of 18 runs not finished (missing per width 256: 1)" in std["shift"]["reason"]
    assert [ln["status"] for ln in std["lines"]] == ["ok", "ok", "incomplete (1 missing)"]
    assert [ln["eta"] for ln in ind["lines"]] == [pytest.approx(1e-2)] * 3  # the exact parabola's vertex
    assert ind["shift"]["verdict"] == "transfers" and ind["shift"]["slope"] == pytest.approx(0.0, abs=1e-9)
    assert [r["regret"] for r in ind["regret"]] == [pytest.approx(0.0, abs=1e-9)] * 3
    assert ind["lines"][2]["points"][-1]["n_diverged"] == 1
    md = (sweep_dir / "report.md").read_text()
    assert "**Verdict withheld**: 1 of 18 runs not finished" in md and "incomplete (1 missing)" in md
    assert "Not the paper's setup" in md and "## Alignment probes: d64_lr1e-2_standard" in md
    for png in ("transfer_train.png", "transfer_val.png", "shift_train.png", "alignment_d64_lr1e-2_standard.png"):
        assert (sweep_dir / png).stat().st_size > 5000
    # the last run finishes: the verdict is drawn
    sw.launch_local(sweep_dir, manifest, args.local, parallel=True)
    std = rep.report(sweep_dir, rep.report_args(sweep_dir, []))["metrics"]["train"]["standard"]
    assert std["shift"]["verdict"] == "shifts with width" and std["shift"]["slope"] == pytest.approx(-1.0)
    assert [ln["eta"] for ln in std["lines"]] == [pytest.approx(1e-2), pytest.approx(5e-3), pytest.approx(2.5e-3)]
    regret = [r["regret"] for r in std["regret"]]
    assert regret == [
        pytest.approx(0.0, abs=1e-9),
        pytest.approx(0.1 * math.log(2) ** 2),
        pytest.approx(0.1 * math.log(4) ** 2),
    ]
    # the CLI: overrides on top of the sweep's report section
    assert cli_main(["report", str(sweep_dir), "last_n=3", f"out_dir={tmp_path / 'r2'}"]) == 0
    assert json.loads((tmp_path / "r2" / "report.json").read_text())["last_n"] == 3
    assert cli_main(["report", str(sweep_dir), "last_m=3"]) == 2
    assert cli_main(["report", str(sweep_dir), "tol=0"]) == 2


def test_report_names_the_paper_setup_and_its_finding(tmp_path: Path):
    """Runs with the paper's App. G.3 shape get the paper's finding next to theirs; other shapes do not."""
    paper = OmegaConf.load(ROOT / "configs" / "paper" / "llama.yaml")
    values = {k: OmegaConf.select(paper, k) for k in rep.SETUP_KEYS}
    results = [rep.RunResult("a", "done", {**values, "scaling.width": "mup", "scaling.wd": "independent"})]
    assert rep.setup_differences(results) == []
    assert rep.comparable_finding("independent", True).verdict == "transfers"
    assert rep.comparable_finding("timescale", True) is None  # [003]'s finding comes from ResNets, not this setup
    assert rep.comparable_finding("independent", False) is None
    results[0].values["model.n_layers"] = 2
    assert rep.setup_differences(results) == ["model.n_layers=2 (paper: 20)"]


def test_status_table_eta_and_finish_lines(tmp_path: Path, fake_repo: Path, fake_env: Path, capsys):
    """`lingua-wd status`: state, step k/N and last loss per run, k of N done; the ETA from the sessions timed in
    EXIT.json (same model shape: its pace; n at a time); the launcher prints `[k/N] name -> ...` per run."""
    args = sweep_args(tmp_path, {"optim.lr": [1e-3, 2e-3, 4e-3], "model.dim": [64, 128]})
    sweep_dir, manifest = sw.prepare(args, src=fake_repo)
    first = [r for r in manifest["runs"] if r["name"] in ("lr1e-3_d64", "lr1e-3_d128")]
    sw.launch_local(sweep_dir, manifest, args.local, runs=first)
    out = capsys.readouterr().out
    assert "[sweep] [1/6] lr1e-3_d64 -> finished (" in out and "[sweep] [2/6] lr1e-3_d128 -> finished (" in out
    failed = RunDir(sweep_dir / "runs" / "lr2e-3_d64")
    failed.write_exit(3, 2, "diverged")
    # time the two finished sessions: 2 s/step at d64, 4 s/step at d128
    for name, pace in (("lr1e-3_d64", 2.0), ("lr1e-3_d128", 4.0)):
        RunDir(sweep_dir / "runs" / name).write_exit(0, 6, started=time.time() - 6 * pace, start_step=0)
    assert cli_main(["status", str(sweep_dir)]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if " lr1e-3_d64 " in line)
    assert row.split()[2:5] == ["done", "6/6", f"{3.0 + 0.1 * math.log(0.1) ** 2 + 1 / 6:.4f}"]
    assert "lr2e-3_d64" in text and "failed (exit 3: diverged)" in text
    # left: lr2e-3_d128 (6 steps x 4 s), lr4e-3_d64 (6 x 2 s), lr4e-3_d128 (6 x 4 s); the failed run is not counted
    assert "2 of 6 done (1 failed, 3 new); ETA 1m00s (from 2 measured runs, 1 at a time)" in text
    assert cli_main(["status", str(sweep_dir), "parallel=2"]) == 0 and "ETA 30s" in capsys.readouterr().out
    assert cli_main(["status", str(tmp_path)]) == 2 and "no manifest.json" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(sw.train_args_class() is None, reason="the trainer is not importable")
def test_half_finished_real_sweep_status_and_report(tmp_path: Path):
    """As a user would, with the real trainer: `lingua-wd sweep` shows `[k/N] name -> final loss` as runs finish;
    stopped (Ctrl-C) with 2 of 6 runs done, `lingua-wd status` shows every run's state, step and loss, k of N
    and an ETA measured on the finished runs, and `lingua-wd report` withholds every verdict naming the missing
    runs; the same command resumes the sweep, and the report then rests on complete lines."""
    sweep_file = write(
        tmp_path / "tiny.yaml",
        f"""
        name: tiny
        dump_root: {tmp_path / "sweeps"}
        base: configs/debug.yaml
        overrides:
          steps: 8
          log_freq: 2
          eval_freq: 0
          eval_batches: 1
          data.seq_len: 32
          data.batch_size: 8
          data.micro_batch_size: 8
          data.workers: 0
          model.head_dim: 32
          checkpoint.every: 0
          scaling.width: mup
          scaling.base_dim: 64
        grid:
          model.dim: [64, 128]
          optim.lr: [3.0e-3, 3.0e-2, 3.0e-1]
        report: {{last_n: 4, panel: scaling.wd}}
        launcher: local_parallel
        local: {{jobs: 2, threads: 1}}
    """,
    )
    sweep_dir = tmp_path / "sweeps" / "tiny"
    cmd = [sys.executable, "-m", "lingua_wd.cli", "sweep", str(sweep_file)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # wait for the second run to finish
        seen.append(line)
        if line.startswith("[sweep] [2/6] "):
            break
    assert any(
        re.match(r"\[sweep\] \[1/6\] d64_lr\S+ -> final loss \d\.\d{4} \(mean of the last 8 steps\)", x) for x in seen
    ), seen
    manifest = sw.load_manifest(sweep_dir)
    deadline = time.time() + 60
    while "running" not in sw.run_states(sweep_dir, manifest).values():  # the next two trainers hold their LOCK
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # the running trainers checkpoint and exit 75; no new run starts
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 75, rest
    states = sw.run_states(sweep_dir, manifest)
    assert list(states.values()).count("done") == 2 and "running" not in states.values()
    out = subprocess.run([*cmd[:3], "status", str(sweep_dir)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[1]: line.split() for line in out.stdout.splitlines()[2:-1]}
    done = [n for n, row in rows.items() if row[2] == "done"]
    assert len(done) == 2 and all(rows[n][3] == "8/8" and float(rows[n][4]) > 0 for n in done)
    eta = r"2 of 6 done \(.*\); ETA \d+(s|m\d\ds) \(from \d measured runs, 1 at a time"
    assert re.search(eta, out.stdout), out.stdout
    assert cli_main(["report", str(sweep_dir)]) == 0
    summary = json.loads((sweep_dir / "report.json").read_text())
    for metric in ("train", "val"):
        shift = summary["metrics"][metric]["standard"]["shift"]
        assert shift["verdict"] is None and shift["n_missing"] == 4
        assert shift["reason"].startswith("4 of 6 runs not finished"), shift
    assert "**Verdict withheld**: 4 of 6 runs not finished" in (sweep_dir / "report.md").read_text()
    # the same command resumes; every line is then complete
    assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True).returncode == 0
    assert set(sw.run_states(sweep_dir, manifest).values()) == {"done"}
    for n in manifest["runs"]:
        assert OmegaConf.load(sweep_dir / n["dump_dir"] / "config.yaml").dump_dir == str(sweep_dir / n["dump_dir"])
    assert cli_main(["report", str(sweep_dir)]) == 0
    shift = json.loads((sweep_dir / "report.json").read_text())["metrics"]["train"]["standard"]["shift"]
    assert shift["n_missing"] == 0 and "not finished" not in shift["reason"]
    assert cli_main(["sweep", str(sweep_file)]) == 0  # everything finished: a re-run trains nothing


def test_cli_dispatch(capsys):
    assert cli_main([]) == 2 and cli_main(["--help"]) == 0
    assert "sweep" in capsys.readouterr().out
    assert cli_main(["frobnicate"]) == 2 and "unknown command 'frobnicate'" in capsys.readouterr().err
    assert cli_main(["report", "--help"]) == 0 and "usage: lingua-wd report" in capsys.readouterr().out
    assert cli_main(["status", "--help"]) == 0 and "usage: lingua-wd status" in capsys.readouterr().out


# ----------------------------------------------------------------------------- coordinate check


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_coordcheck_separates_sp_from_mup(tmp_path: Path):
    """Adam's update RMS is ~eta per entry: muP gives hidden / output eta/m (slope -1 in width), sp keeps it;
    the hidden activations' change since init grows with width under sp and stays flat under muP."""
    from lingua_wd import coordcheck as cc

    out = tmp_path / "cc"
    argv = ["widths=[32,64,128]", "base_dim=32", "steps=3", "seeds=1", "seq_len=16", "batch_size=4", "vocab_size=64",
            "n_layers=1", "params=[sp,mup:independent]", f"out_dir={out}"]  # fmt: skip
    assert cli_main(["coordcheck", *argv]) == 0
    data = json.loads((out / "coordcheck.json").read_text())
    s = data["slopes"]
    assert s["sp"]["update_rms"]["hidden"] == pytest.approx(0.0, abs=0.1)
    assert s["mup:independent"]["update_rms"]["hidden"] == pytest.approx(-1.0, abs=0.1)
    assert s["mup:independent"]["update_rms"]["input"] == pytest.approx(0.0, abs=0.1)  # vector-like: not scaled
    assert s["sp"]["act_delta_rms"]["hidden"] > s["mup:independent"]["act_delta_rms"]["hidden"] + 0.2
    assert abs(s["mup:independent"]["act_delta_rms"]["hidden"]) < 0.2
    assert (out / "coordcheck.png").stat().st_size > 10000
    assert cc.slope([1, 2, 4], [3.0, 6.0, 12.0]) == pytest.approx(1.0)
    assert cli_main(["coordcheck", "params=[mup]"]) == 2  # mup needs a WD rule


@pytest.mark.slow  # a trainer process or several: see README, Tests
@pytest.mark.parametrize(("name", "n_runs"), [("cpu_small", 24), ("paper_fig1", 135)])
def test_shipped_sweeps_expand_validate_and_render(name: str, n_runs: int, tmp_path: Path):
    """The shipped grids: every run config merges into the trainer's TrainArgs; the sbatch parses."""
    path = ROOT / "configs" / "sweeps" / f"{name}.yaml"
    args = sw.load_sweep(path, [f"dump_root={tmp_path}", "slurm.submit=false"])
    args.validate = sw.train_args_class() is not None
    _, manifest = sw.prepare(args, path, write=False)
    assert len(manifest["runs"]) == n_runs
    if name == "paper_fig1":
        lrs = sorted({r["params"]["optim.lr"] for r in manifest["runs"]})
        assert 8e-3 in lrs and 6.4e-2 in lrs and len(lrs) == 9  # the paper's optima are on the grid
        none = next(r for r in manifest["runs"] if r["name"] == "d2048_lr6.4e-2_none")
        assert none["params"]["scaling.frozen_lr.input"] == 6.4e-2
    manifest |= {"sweep_dir": "/s", "code_dir": "/s/code", "workdir": "/w"}
    text = sw.render_template(
        (ROOT / args.slurm.template).read_text(), sw.sbatch_values(manifest, manifest["runs"], args.slurm, name)
    )
    assert f"#SBATCH --array=0-{n_runs - 1}" in text
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
