"""A real single-node Slurm for tests: munged, slurmctld and slurmd (Debian's slurm-wlm + munge) as this test's own
processes, configured in a temporary directory, inside a private network namespace whose only interface is loopback
(tests/netns.py: the daemons, srun and TensorFlow's gRPC servers bind all interfaces; the namespace keeps them off
every network).

Usage: `with SlurmCluster(tmp_dir) as slurm: slurm.run(["sbatch", ...])`. Everything started is stopped on exit,
even after a failure. `SlurmCluster.unavailable()` says why it cannot run here (None when it can).
"""
import os
import shutil
import signal
import subprocess
import time
from typing import List, Optional, Sequence

from netns import PATH, LoopbackNamespace

DAEMONS = ("munged", "slurmctld", "slurmd")
TOOLS = (*DAEMONS, "sbatch", "squeue", "scontrol", "scancel")
START_TIMEOUT_S = 60
NODE_CPUS = 8  # more than this machine has (config_overrides): two 2-task jobs must fit side by side

SLURM_CONF = """\
ClusterName=dtftest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={dir}/munge.sock,cred_expire=10
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# A requeued job becomes eligible by the clock, which only the periodic scheduling pass notices (default every 60 s).
SchedulerParameters=sched_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
KillWait=5
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class SlurmUnavailable(Exception):
    """Slurm cannot run on this machine (not installed, not root, or it did not come up); the message says why."""


class SlurmCluster:
    def __init__(self, directory: str):
        self.dir = os.path.abspath(directory)
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.procs: List[subprocess.Popen] = []
        self.ns: Optional[LoopbackNamespace] = None

    @staticmethod
    def unavailable() -> Optional[str]:
        missing = [t for t in TOOLS if shutil.which(t, path=PATH) is None]
        if missing:
            return f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)"
        return LoopbackNamespace.unavailable()

    # --- running commands inside the namespace ---------------------------------------------------------------------
    def _ns(self, command: Sequence[str]) -> List[str]:
        return self.ns.wrap(command)

    def env(self, **extra) -> dict:
        return dict(os.environ, **{"PATH": PATH, "SLURM_CONF": self.conf, **extra})

    def run(self, command: Sequence[str], timeout_s: float = 60, env: Optional[dict] = None, cwd=None,
            check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(self._ns(command), env=env or self.env(), cwd=cwd, capture_output=True, text=True,
                              timeout=timeout_s)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def start_in_ns(self, command: Sequence[str], log_name: str, **kwargs) -> subprocess.Popen:
        """A long-running process inside the namespace (stopped on exit)."""
        log = open(os.path.join(self.dir, log_name), "w")
        proc = subprocess.Popen(self._ns(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=kwargs.pop("env", None) or self.env(), **kwargs)
        log.close()
        self.procs.append(proc)
        return proc

    # --- jobs --------------------------------------------------------------------------------------------------------
    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict of its Key=Value fields."""
        out = self.run(["scontrol", "show", "job", "--oneliner", job_id]).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_jobs(self, job_ids: Sequence[str], timeout_s: float) -> dict:
        """Wait until every job has ended; {id: job fields}."""
        deadline = time.monotonic() + timeout_s
        while True:
            jobs = {j: self.job(j) for j in job_ids}
            if all(j["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
                   for j in jobs.values()):
                return jobs
            if time.monotonic() > deadline:
                raise AssertionError(f"jobs did not end in {timeout_s}s: "
                                     + "; ".join(f"{k}: {v['JobState']} {v.get('Reason')}" for k, v in jobs.items()))
            time.sleep(1)

    # --- start / stop ------------------------------------------------------------------------------------------------
    def __enter__(self) -> "SlurmCluster":
        why = self.unavailable()
        if why:
            raise SlurmUnavailable(why)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def _start(self):
        for sub in ("state", "spool"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        with open(self.conf, "w") as f:
            f.write(SLURM_CONF.format(dir=self.dir, cpus=NODE_CPUS))
        key = os.path.join(self.dir, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        try:
            self.ns = LoopbackNamespace().__enter__()
        except OSError as e:
            raise SlurmUnavailable(str(e)) from None
        d = self.dir
        self.start_in_ns(["munged", "-F", "-f", f"--key-file={key}", f"--socket={d}/munge.sock",
                          f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"],
                         "munged.out")
        self._wait(lambda: os.path.exists(f"{d}/munge.sock"), "munged")
        self.start_in_ns(["slurmctld", "-D", "-i", "-f", self.conf], "slurmctld.out")
        self.start_in_ns(["slurmd", "-D", "-N", "localhost", "-f", self.conf], "slurmd.out")
        self._wait(lambda: self.run(["sinfo", "-h", "-o", "%t"], check=False, timeout_s=20).stdout.strip() == "idle",
                   "the node to be idle")

    def _wait(self, ready, what: str):
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise SlurmUnavailable(f"waiting for {what}: " + (f"exited: {dead}; " if dead else "timed out; ")
                                       + self.logs())
            time.sleep(0.3)

    def logs(self, lines: int = 15) -> str:
        out = []
        for name in sorted(os.listdir(self.dir)):
            if name.endswith((".log", ".out")):
                with open(os.path.join(self.dir, name), errors="replace") as f:
                    out.append(f"--- {name}\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(out)

    def stop(self):
        """Cancel every job, stop the daemons, then kill whatever is left in the namespace, and the namespace."""
        if self.ns is None:
            return
        if any(p.poll() is None for p in self.procs):
            self.run(["scancel", "--full", "--user=root"], check=False, timeout_s=20)
        for p in reversed(self.procs):  # slurmd, slurmctld, munged
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.ns.__exit__()  # slurmstepd and job tasks, which slurmd daemonizes, die with the namespace
        self.ns = None
