"""The SLURM launcher on a real SLURM: a private cluster on this host (tests/slurm_cluster.py: munged,
slurmctld, two slurmd as two nodes), real sbatch / srun / scancel / scontrol, the real trainer.

The scenarios run side by side to keep the module to a few minutes: the module fixture submits every sweep
at once, starts the uninterrupted reference runs, and a driver thread acts on the jobs (time limit,
`scancel --signal=USR1`, `scontrol requeue`, `scancel`) as soon as their trainers have logged a few steps.
Each test then waits for its own scenario. The trainer is told to stop by a signal and stops at the end of
the step it is in (whatever log_freq); the runs log every step (log_freq=1) so that the comparison with the
uninterrupted runs covers every step's loss.
Without slurm-wlm and munge (apt-get install slurm-wlm munge) or root, the `slurm` tests skip.
"""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

import slurm_cluster
from conftest import ROOT, TRAIN, env, free_port, losses
from lingua_wd import sweep as sw
from lingua_wd.distributed import env_from_slurm, first_host
from lingua_wd.rundir import RunDir, last_loss

pytestmark = pytest.mark.slow  # every scenario here drives a real cluster for a minute or more

TIMEOUT = 360  # s for any one scenario to reach its end on a loaded 2-core machine
TINY = {
    "steps": 200, "log_freq": 1, "eval_freq": 0, "eval_batches": 1, "data.seq_len": 32, "data.batch_size": 8,
    "data.micro_batch_size": 4, "model.dim": 64, "model.head_dim": 32, "checkpoint.every": 50,
    "logging.wandb_mode": "disabled", "optim.lr": 3.0e-3,
}  # fmt: skip
SLURM = {"gpus_per_node": 0, "cpus_per_task": 1, "time": "10:00", "signal_s": 30}


# ----------------------------------------------------------------------------- no cluster needed


def test_rank_layout_from_srun_variables():
    step = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
            "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}  # fmt: skip
    e = dict(step)
    env_from_slurm(e)
    assert (e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"], e["MASTER_ADDR"]) == ("3", "4", "1", "gpu07")
    assert e["MASTER_PORT"] == str(20000 + 123456 % 20000)
    e = dict(step, MASTER_ADDR="10.0.0.1", MASTER_PORT="29500")  # the launcher's own rendezvous wins
    env_from_slurm(e)
    assert (e["MASTER_ADDR"], e["MASTER_PORT"]) == ("10.0.0.1", "29500")
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}  # a batch script is no rank
    e = dict(batch)
    env_from_slurm(e)
    assert e == batch
    for e in (dict(step, RANK="0"), dict(step, SLURM_STEP_NUM_TASKS="1")):  # torchrun inside srun; one task
        before = dict(e)
        env_from_slurm(e)
        assert e == before
    assert [first_host(s) for s in ("n1", "n[1-2]", "gpu-[01-04,9],cpu1", "a,b")] == ["n1", "n1", "gpu-01", "a"]


# ----------------------------------------------------------------------------- the cluster and its scenarios


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    why = slurm_cluster.missing()
    if why:
        pytest.skip(why)
    c = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except (RuntimeError, TimeoutError) as err:
        c.stop()
        pytest.fail(f"the test cluster did not start: {err}")
    with pytest.MonkeyPatch.context() as mp:  # the sweep module's own squeue calls go to this cluster
        mp.setenv("SLURM_CONF", c.env["SLURM_CONF"])
        yield c
    c.stop()


@dataclass
class Action:
    """Run `do` once, as soon as `when` is true (polled by the Driver)."""

    when: Callable[[], bool]
    do: Callable[[], None]
    at: Optional[float] = None
    error: Optional[BaseException] = None


class Driver(threading.Thread):
    """Polls the cluster every 0.3 s: runs each action once its condition holds, counts running tasks."""

    def __init__(self, watch: Callable[[], dict[str, int]]):
        super().__init__(daemon=True)
        self.actions: dict[str, Action] = {}
        self.stop = threading.Event()
        self.max_running: dict[str, int] = {}  # array job -> most tasks seen running at once
        self.watch = watch

    def run(self) -> None:
        while not self.stop.is_set():
            for a in self.actions.values():
                if a.at is None and a.error is None:
                    try:
                        if a.when():
                            a.do()
                            a.at = time.time()
                    except Exception as err:  # reported by the test that needs this action
                        a.error = err
            for job, n in self.watch().items():
                self.max_running[job] = max(n, self.max_running.get(job, 0))
            time.sleep(0.3)

    def done(self, name: str) -> float:
        a = self.actions[name]
        if a.error is not None:
            raise a.error
        assert a.at is not None, f"action {name} never ran"
        return a.at


@dataclass
class Sweep:
    cluster: slurm_cluster.Cluster
    file: Path
    dir: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        out = self.start_cli(*args).communicate(timeout=120)
        return check_cli(subprocess.CompletedProcess([], 0, *out), self)

    def start_cli(self, *args: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "lingua_wd.cli", "sweep", str(self.file), *args]
        return subprocess.Popen(
            cmd, cwd=ROOT, env=self.cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def run(self, name: str) -> RunDir:
        return RunDir(self.dir / "runs" / name)

    def task(self, name: str) -> str:
        return sw.latest_tasks(self.dir)[name]

    def run_node(self, name: str) -> str:
        return self.cluster.job(self.task(name))["NodeList"]

    def step(self, name: str) -> int:
        return last_loss(self.run(name).read_metrics())[0]

    def states(self) -> dict[str, str]:
        return sw.run_states(self.dir, sw.load_manifest(self.dir))

    def wait_states(self, want: dict[str, str], timeout: float = TIMEOUT) -> dict[str, str]:
        def ok() -> bool:
            states = self.states()
            return all(states[k].startswith(v) for k, v in want.items())  # a failure's cause goes on

        try:
            self.cluster.wait(ok, timeout, f"{self.dir.name}: {want}", every=1)
        except TimeoutError as err:
            raise AssertionError(f"{err}; states now {self.states()}\n{self.logs()}") from None
        return self.states()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted((self.dir / "logs").glob("*.out")))

    def task_log(self, name: str) -> str:
        job, _, index = self.task(name).partition("_")
        return (self.dir / "logs" / f"{job}_{index}.out").read_text()


def check_cli(out: subprocess.CompletedProcess, sweep: Sweep) -> subprocess.CompletedProcess:
    assert "Traceback" not in out.stderr and "error" not in out.stderr, f"{sweep.file}: {out.stdout}{out.stderr}"
    return out


def write_sweep(root: Path, name: str, grid: dict, overrides: Optional[dict] = None, **slurm) -> Path:
    cfg = {
        "name": name,
        "dump_root": str(root / "sweeps"),
        "base": "configs/debug.yaml",
        "overrides": {**TINY, **(overrides or {})},
        "grid": grid,
        "short": {"checkpoint.keep": "k"},
        "launcher": "slurm",
        "slurm": {**SLURM, **slurm},
    }
    path = root / f"{name}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


@dataclass
class Scenarios:
    cluster: slurm_cluster.Cluster
    driver: Driver
    acts: Sweep  # one run per treatment, all with the same training: time limit, USR1, requeue, scancel
    four: Sweep  # 4 short runs, max_parallel 2
    bad: Sweep  # a config error
    two: Sweep  # one run on both nodes
    pre: Sweep  # one run on a node of its own, preempted by a job of the `urgent` partition
    refs: dict[str, tuple[subprocess.Popen, Path]]
    second_four: str = ""  # what a second `lingua-wd sweep` said while the first one's jobs ran

    def reference(self, name: str) -> dict[int, float]:
        proc, dump = self.refs[name]
        proc.wait(TIMEOUT)
        assert proc.returncode == 0, (dump / "train.log").read_text()[-3000:]
        return losses(dump)


def start_reference(cmd: list[str], dump: Path) -> tuple[subprocess.Popen, Path]:
    dump.mkdir(parents=True)
    log = open(dump / "train.log", "w")  # noqa: SIM115 (the child keeps it)
    proc = subprocess.Popen(
        [*cmd, f"dump_dir={dump}"], cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT
    )  # fmt: skip
    return proc, dump


@pytest.fixture(scope="module")
def scenarios(cluster: slurm_cluster.Cluster, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("sweeps")
    # k2 sleeps 0.2 s a step (guard.step_sleep_s, no CPU): it must outlast the wait for slurmctld's next
    # time-limit check (up to 34 s after its step 3) on an idle machine too; the numbers are the same
    acts_grid = {"k": {"zip": {"checkpoint.keep": [2, 3, 4, 5], "guard.step_sleep_s": [0.2, 0.0, 0.0, 0.0]}}}
    acts = Sweep(cluster, write_sweep(root, "acts", acts_grid), root / "sweeps" / "acts")
    four = Sweep(cluster, write_sweep(root, "four", {"optim.lr": [1e-3, 2e-3, 4e-3, 8e-3]}, {"steps": 60},
                                      max_parallel=2), root / "sweeps" / "four")  # fmt: skip
    bad = Sweep(cluster, write_sweep(root, "bad", {"optim.lr": [1e-3]}, {"data.sources": {"/nonexistent.jsonl": 1.0}}),
                root / "sweeps" / "bad")  # fmt: skip
    two = Sweep(cluster, write_sweep(root, "two", {"optim.lr": [3e-3]}, {"steps": 40}, nodes=2, gpus_per_node=1),
                root / "sweeps" / "two")  # fmt: skip
    pre = Sweep(cluster, root / "pre.yaml", root / "sweeps" / "pre")  # written when a node is free (below)
    starts = [(s, s.start_cli()) for s in (acts, four, bad, two)]  # side by side: each imports torch
    for _, proc in starts:
        out = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "submitted array job" in out[0], out
    refs = {
        "acts": start_reference([sys.executable, TRAIN, f"config={acts.dir}/configs/k3.yaml"], root / "ref_acts"),
        "two": start_reference(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
             TRAIN, f"config={two.dir}/configs/lr3e-3.yaml"], root / "ref_two",
        ),
    }  # fmt: skip

    def running_per_array() -> dict[str, int]:
        out = cluster.run("squeue", "-h", "-r", "-t", "RUNNING", "-o", "%F", check=False).stdout.split()
        return {job: out.count(job) for job in set(out)}

    driver = Driver(watch=running_per_array)
    scen = Scenarios(cluster, driver, acts, four, bad, two, pre, refs)

    def near_tick() -> bool:  # slurmctld checks time limits (and sends warnings) within 4 s
        tick = cluster.next_time_limit_check()
        return tick is not None and 0.5 < tick - time.time() < 4

    def job_of(name: str) -> dict[str, str]:
        return cluster.job(acts.task(name))

    def free_node() -> Optional[str]:
        """A node no job holds or will take, once every scenario but k2's (resumed, 20 s more) has ended."""
        if not all(acts.states()[k] in ("done", "cancelled") for k in ("k3", "k4", "k5")):
            return None
        if any(st in ("queued", "running", "new") for w in (four, bad, two) for st in w.states().values()):
            return None
        jobs = [line.split() for line in cluster.run("squeue", "-h", "-o", "%i %T %N", check=False).stdout.splitlines()]
        if any(j[0] != acts.task("k2") or j[1] != "RUNNING" for j in jobs):
            return None
        held = {n for j in jobs for n in slurm_cluster.NODES if n in j[2]}
        return next(n for n in slurm_cluster.NODES if n not in held)

    def start_pre() -> None:
        write_sweep(root, "pre", {"checkpoint.keep": [6]}, extra=[f"--nodelist={free_node()}"])
        pre.cli()

    actions = {
        # the time limit: cut to 1 min just before slurmctld's next check, whose warning (signal_s = 30 s)
        # then goes out at once; the requeued task gets 10 min again, or it would be warned at its start
        "time_limit": Action(lambda: acts.step("k2") >= 3 and near_tick(),
                             lambda: cluster.run("scontrol", "update", f"JobId={acts.task('k2')}", "TimeLimit=1")),
        "time_limit_reset": Action(
            lambda: job_of("k2").get("Restarts") == "1" and job_of("k2").get("JobState") == "PENDING",
            lambda: cluster.run("scontrol", "update", f"JobId={acts.task('k2')}", "TimeLimit=10"),
        ),
        "usr1": Action(lambda: acts.step("k3") >= 3, lambda: cluster.run("scancel", "--signal=USR1", acts.task("k3"))),
        "requeue": Action(lambda: acts.step("k4") >= 55, lambda: cluster.run("scontrol", "requeue", acts.task("k4"))),
        "cancel": Action(lambda: acts.step("k5") >= 3, lambda: cluster.run("scancel", acts.task("k5"))),
        # preemption: alongside k2's resumed run, on the other node: the urgent job takes all its CPUs
        # (after k2's requeue: its resumed task may not land on the node given to k6)
        "pre": Action(lambda: driver.actions["time_limit_reset"].at is not None and free_node() is not None,
                      start_pre),
        "preempt": Action(lambda: (pre.dir / "runs" / "k6" / "metrics.jsonl").is_file() and pre.step("k6") >= 3,
                          lambda: cluster.run("sbatch", "-p", "urgent", "-w", pre.run_node("k6"), "-c",
                                              str(cluster.cpus), "-t", "1", "-o", "/dev/null", "--wrap", "sleep 1")),
    }  # fmt: skip
    driver.actions.update(actions)
    driver.start()
    # a second `lingua-wd sweep` while the first one's jobs are queued or running submits nothing
    cluster.wait(lambda: any(st == "running" for st in four.states().values()), TIMEOUT, "four: a running task")
    scen.second_four = four.cli().stdout
    yield scen
    driver.stop.set()
    driver.join(5)
    for proc, _ in refs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slurm
def test_array_sweep_of_4_runs_with_max_parallel_2(scenarios: Scenarios):
    four = scenarios.four
    second = scenarios.second_four  # `lingua-wd sweep` again while a task was running
    assert "nothing to submit" in second and " running" in second and "new" not in second
    four.wait_states({n: "done" for n in ("lr1e-3", "lr2e-3", "lr4e-3", "lr8e-3")})
    (job,) = sw.read_jobs(four.dir)
    assert scenarios.driver.max_running[job["job"]] == 2  # --array=0-3%2

    def records() -> list[dict[str, str]]:  # written when a task's batch script has exited
        return [r for r in scenarios.cluster.jobcomp() if r.get("ArrayJobId") == job["job"]]

    comp = scenarios.cluster.wait(lambda: len(records()) == 4 and records(), 60, "four: 4 jobcomp records")
    assert sorted(r["ArrayTaskId"] for r in comp) == ["0", "1", "2", "3"]
    assert {(r["JobState"], r["ExitCode"]) for r in comp} == {("COMPLETED", "0:0")}
    out = four.cli().stdout
    assert "4 done" in out and "nothing to submit" in out and len(sw.read_jobs(four.dir)) == 1


@pytest.mark.slurm
def test_config_error_is_failed_with_exit_2_in_sweep_and_slurm(scenarios: Scenarios):
    bad = scenarios.bad
    bad.wait_states({"lr1e-3": "failed (exit 2: config error"})
    task = bad.task("lr1e-3")

    def records() -> list[dict[str, str]]:
        return [r for r in scenarios.cluster.jobcomp() if f"{r.get('ArrayJobId')}_{r.get('ArrayTaskId')}" == task]

    comp = scenarios.cluster.wait(records, 60, "bad: its jobcomp record")
    assert [(r["JobState"], r["ExitCode"]) for r in comp] == [("FAILED", "2:0")]  # the trainer's own code
    assert "config error: data.sources" in bad.run("lr1e-3").train_log.read_text()
    out = bad.cli().stdout  # not resubmitted unless asked
    assert "failed (exit 2: config error" in out and "nothing to submit" in out
    assert "would submit this array job (1 tasks)" in bad.cli("--dry-run", "--retry-failed").stdout
    assert len(sw.read_jobs(bad.dir)) == 1


def assert_resumed_exactly(scenarios: Scenarios, name: str, log_says: str) -> None:
    acts = scenarios.acts
    acts.wait_states({name: "done"})
    ref = scenarios.reference("acts")
    got = losses(acts.run(name).path)
    assert len(ref) == TINY["steps"] and got == ref  # every step's loss, bitwise
    log = acts.task_log(name)
    assert log_says in log, log
    assert "restart 1" in log and acts.run(name).read_exit()["code"] == 0


@pytest.mark.slurm
def test_scancel_signal_usr1_saves_requeues_and_resumes_exactly(scenarios: Scenarios):
    scenarios.driver.done("usr1")
    assert_resumed_exactly(scenarios, "k3", "saved a checkpoint (exit 75): requeueing")
    assert "received SIGUSR1" in scenarios.acts.run("k3").train_log.read_text()


@pytest.mark.slurm
def test_scontrol_requeue_resumes_exactly(scenarios: Scenarios):
    scenarios.driver.done("requeue")
    assert_resumed_exactly(scenarios, "k4", "SLURM requeued")


@pytest.mark.slurm
def test_time_limit_saves_requeues_and_resumes_exactly(scenarios: Scenarios):
    cut = scenarios.driver.done("time_limit")
    acts = scenarios.acts
    acts.wait_states({"k2": "done"})
    log = scenarios.cluster.log("slurmctld").splitlines()
    warned = [line for line in log if "warning signal 10 to" in line]
    ticks = [line[1:24] for line in log if "Testing job time limits" in line]
    cut_at = datetime.datetime.fromtimestamp(cut).isoformat(timespec="milliseconds")
    assert any(f"JobId={acts.task('k2')}(" in line for line in warned), (cut_at, ticks[-6:], warned)  # --signal=USR1@30
    assert_resumed_exactly(scenarios, "k2", "saved a checkpoint (exit 75): requeueing")
    scenarios.driver.done("time_limit_reset")
    assert "received SIGUSR1" in acts.run("k2").train_log.read_text()  # SIGUSR1, to the rank itself
    text = acts.task_log("k2")
    stamp = text[: text.index(" k2 saved a checkpoint (exit 75)")].rsplit("[sweep] ", 1)[1]
    assert 0 < datetime.datetime.fromisoformat(stamp).timestamp() - cut < 40  # at slurmctld's next check


@pytest.mark.slurm
def test_scancel_cancels_for_good(scenarios: Scenarios):
    scenarios.driver.done("cancel")
    acts = scenarios.acts
    acts.wait_states({"k5": "cancelled"})
    task = acts.task("k5")
    cancelled_at = scenarios.driver.done("cancel")
    time.sleep(max(0.0, cancelled_at + 10 - time.time()))  # > the requeue hold (6 s): a requeued task is back
    assert scenarios.cluster.run("squeue", "-h", "-j", task, check=False).stdout.strip() == ""
    # k5 is the array's last task, whose job id is the array's own: the script must ask about the task
    assert acts.states()["k5"] == "cancelled" and "reason None): not requeued" in acts.task_log("k5")
    assert acts.run("k5").read_cancelled()["job"] == task
    out = acts.cli().stdout
    assert re.search(r"\bk5\s+cancelled\b", out) and "nothing to submit" in out  # the status table's row
    assert sw.latest_tasks(acts.dir)["k5"] == task  # not submitted again


@pytest.mark.slurm
def test_two_node_job_equals_two_process_run(scenarios: Scenarios):
    two = scenarios.two
    two.wait_states({"lr3e-3": "done"})
    ref = scenarios.reference("two")
    assert len(ref) == 40 and losses(two.run("lr3e-3").path) == ref
    log = two.run("lr3e-3").train_log.read_text()
    assert "2 ranks on cpu" in log
    assert "on lwd[1-2]" in two.task_log("lr3e-3")


@pytest.mark.slurm
def test_preemption_saves_requeues_and_resumes_exactly(scenarios: Scenarios):
    """A job of the `urgent` partition takes the node: SLURM's preemption (PreemptMode=REQUEUE, GraceTime 30 s)
    sends SIGTERM to the ranks, which save; the task requeues and resumes."""
    cluster, pre = scenarios.cluster, scenarios.pre
    cluster.wait(lambda: scenarios.driver.actions["preempt"].at or scenarios.driver.actions["preempt"].error,
                 TIMEOUT, "pre: the trainer running and a node of its own")  # fmt: skip
    scenarios.driver.done("pre"), scenarios.driver.done("preempt")
    pre.wait_states({"k6": "done"})
    assert losses(pre.run("k6").path) == scenarios.reference("acts")
    assert "received SIGTERM" in pre.run("k6").train_log.read_text()
    assert "saved a checkpoint (exit 75): requeueing" in pre.task_log("k6")
