"""A private SLURM cluster on this host, for the `slurm` tests and for trying sweeps by hand.

munged with its own key and socket, slurmctld, and two slurmd as two nodes (lwd1, lwd2 at 127.0.0.2 and
127.0.0.3, each on its own port, both on this host's hostname), every file under one directory. The nodes
have 4 CPUs and 2 fake GPUs each (gres files that are links to /dev/null), so GPU templates are accepted.
Settings that keep the tests quick: requeued jobs wait 6 s, not 2 min (`cred_expire=5`), the scheduler runs
every 2 s, KillWait is 15 s; slurmctld logs at debug2, so a test can see when it checks time limits. The `debug` partition (default) can be preempted with a 30 s grace time
(PreemptMode=REQUEUE) by jobs of the `urgent` partition.

    python tests/slurm_cluster.py up /tmp/lwd-slurm     # then: export SLURM_CONF=/tmp/lwd-slurm/slurm.conf
    python tests/slurm_cluster.py down /tmp/lwd-slurm

Needs Debian's `slurm-wlm` and `munge` (apt-get install slurm-wlm munge) and root (slurmd runs jobs).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "srun")
NODES = ("lwd1", "lwd2")
KILL_WAIT = 15


def missing() -> Optional[str]:
    """Why the cluster cannot run here, or None."""
    absent = [c for c in (*DAEMONS, *CLIENTS) if shutil.which(c) is None]
    if absent:
        return f"slurm-wlm / munge not installed (missing {', '.join(absent)}): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "the test cluster's slurmd must run as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, root: Path, cpus: int = 4, gpus: int = 2):
        self.root = Path(root).resolve()
        self.cpus, self.gpus = cpus, gpus
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # ------------------------------------------------------------------ configuration

    def write_config(self) -> None:
        r = self.root
        for d in ("munge", "state", "log", "dev", *(f"spool/{n}" for n in NODES)):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o700)
        key = r / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        for i in range(self.gpus * len(NODES)):
            gpu = r / "dev" / f"gpu{i}"
            if not gpu.is_symlink():
                gpu.symlink_to("/dev/null")  # a character device, as slurmd wants of a GPU file
        host = socket.gethostname().split(".")[0]
        ctld_port, ports = _free_port(), [_free_port() for _ in NODES]
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        nodes = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.{i + 2} NodeHostname={host} Port={ports[i]} CPUs={self.cpus} "
            f"RealMemory=1000{gres} State=UNKNOWN"
            for i, n in enumerate(NODES)
        )
        self.conf.write_text(f"""\
ClusterName=lwdtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.%n.log
SlurmctldDebug=debug2
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={r}/log/jobcomp.txt
MpiDefault=none
MailProg=/bin/true
KillWait={KILL_WAIT}
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
GresTypes=gpu
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=urgent Nodes={",".join(NODES)} MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
""")
        lines = [f"NodeName={n} Name=gpu File={r}/dev/gpu[{i * self.gpus}-{i * self.gpus + self.gpus - 1}]"
                 for i, n in enumerate(NODES)]  # fmt: skip
        (r / "gres.conf").write_text("\n".join(lines) + "\n" if self.gpus else "")

    # ------------------------------------------------------------------ daemons

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")  # noqa: SIM115 (the child keeps it)
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )

    def start(self, timeout: float = 60) -> Cluster:
        self.write_config()
        r = self.root
        self._spawn(
            "munged",
            ["munged", "-F", "--force", f"--socket={r}/munge/munge.socket", f"--key-file={r}/munge/munge.key",
             f"--pid-file={r}/munge/munged.pid", f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge/seed"],
        )  # fmt: skip
        self.wait(lambda: (r / "munge" / "munge.socket").exists(), 20, "munged's socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self.wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, timeout, "slurmctld")
        for n in NODES:
            self._spawn(f"slurmd.{n}", ["slurmd", "-D", "-f", str(self.conf), "-N", n])
        self.wait(self._nodes_idle, timeout, "both nodes idle")
        return self

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-p", "debug", "-o", "%N %t", check=False).stdout.split("\n")
        states = dict(line.split() for line in out if line.strip())
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.root}/log")
        return len(states) == len(NODES) and all(s == "idle" for s in states.values())

    def stop(self) -> None:
        """Cancel every job, wait for them to end (KillWait), then stop the daemons."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--me", check=False)
            try:
                self.wait(lambda: not self.run("squeue", "-h", check=False).stdout.strip(), KILL_WAIT + 20, "no jobs")
            except TimeoutError:
                pass
        for name in [f"slurmd.{n}" for n in NODES] + ["slurmctld", "munged"]:
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # ------------------------------------------------------------------ clients

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()}")
        return out

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict ({} once SLURM has forgotten the job)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def jobcomp(self) -> list[dict[str, str]]:
        path = self.root / "log" / "jobcomp.txt"
        lines = path.read_text().splitlines() if path.is_file() else []
        return [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in lines]

    def log(self, daemon: str) -> str:
        return (self.root / "log" / f"{daemon}.log").read_text(errors="replace")

    def next_time_limit_check(self) -> Optional[float]:
        """When slurmctld next checks time limits and sends --signal warnings (every 30 s: PERIODIC_TIMEOUT),
        from the last check in its log (SlurmctldDebug=debug2); None before the first."""
        with open(self.root / "log" / "slurmctld.log", "rb") as f:  # its tail: the log grows fast at debug2
            f.seek(max(0, f.seek(0, os.SEEK_END) - (1 << 20)))
            text = f.read().decode(errors="replace")
        at = text.rfind("Testing job time limits")
        if at < 0:
            return None
        stamp = text[text.rfind("[", 0, at) + 1 : text.rfind("]", 0, at)]
        return datetime.datetime.fromisoformat(stamp).timestamp() + 30

    @staticmethod
    def wait(pred: Callable[[], object], timeout: float, what: str, every: float = 0.5) -> object:
        deadline = time.time() + timeout
        while True:
            value = pred()
            if value:
                return value
            if time.time() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(every)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print(__doc__)
        return 2
    root = Path(argv[1]).resolve()
    if argv[0] == "up":
        why = missing()
        if why:
            print(why, file=sys.stderr)
            return 1
        cluster = Cluster(root).start()
        pids = {name: p.pid for name, p in cluster.procs.items()}
        (root / "pids.json").write_text(json.dumps(pids))
        print(f"cluster up: export SLURM_CONF={cluster.conf}  (pids {pids})")
        return 0
    pids = json.loads((root / "pids.json").read_text())
    env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"))
    subprocess.run(["scancel", "--me"], env=env, check=False)
    deadline = time.time() + KILL_WAIT + 20
    while time.time() < deadline and subprocess.run(["squeue", "-h"], env=env, capture_output=True).stdout.strip():
        time.sleep(1)
    for name in [f"slurmd.{n}" for n in NODES] + ["slurmctld", "munged"]:
        try:
            os.kill(pids[name], signal.SIGTERM)
        except (KeyError, ProcessLookupError):
            pass
    print("cluster down")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
