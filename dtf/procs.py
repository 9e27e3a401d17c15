"""Run a group of worker processes on loopback with their TF_CONFIGs, and never leave one behind.

Shared by `dtf.launch` (the user-facing launcher) and the multi-worker tests. A worker that fails takes the whole
group down promptly: MultiWorkerMirroredStrategy cannot continue with a missing peer, and the survivors would
otherwise hang in a collective.
"""
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Callable, Dict, List, Optional, Sequence

from dtf import cluster as cluster_lib

TAIL_LINES = 40
GRACE_S = 5.0


@dataclasses.dataclass
class WorkerResult:
    index: int
    pid: int
    returncode: Optional[int]  # None: killed by the group (another worker failed, or the timeout)
    output: str
    tail: List[str]

    @property
    def role(self) -> str:
        return "chief" if self.index == 0 else f"worker {self.index}"


@dataclasses.dataclass
class GroupResult:
    workers: List[WorkerResult]
    timed_out: bool
    first_failure: Optional[int]  # index of the worker that failed first, if any

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(w.returncode == 0 for w in self.workers)

    def report(self) -> str:
        lines = []
        for w in self.workers:
            lines.append(f"--- {w.role} (pid {w.pid}) exit={w.returncode} ---")
            lines.extend(w.tail)
        return "\n".join(lines)


def _kill_group(proc: subprocess.Popen, sig: int):
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all(procs: Sequence[subprocess.Popen], grace_s: float = GRACE_S):
    """SIGTERM every process group, then SIGKILL what is still alive after `grace_s`."""
    for p in procs:
        if p.poll() is None:
            _kill_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        if p.poll() is None:
            _kill_group(p, signal.SIGKILL)
            p.wait()
        else:
            _kill_group(p, signal.SIGKILL)  # children the worker may have left in its group


def run_group(
    command: Sequence[str],
    tf_configs: Sequence[str],
    *,
    env: Optional[Dict[str, str]] = None,
    cwd: Optional[str] = None,
    timeout_s: Optional[float] = None,
    on_line: Optional[Callable[[int, str], None]] = None,
    on_start: Optional[Callable[[List[subprocess.Popen]], None]] = None,
) -> GroupResult:
    """Start one process per TF_CONFIG running `command`, wait for all; stop the rest as soon as one fails.

    Each process runs in its own session (process group) so that stopping it also stops anything it spawned.
    `on_line(index, line)` sees every output line as it arrives; `on_start(procs)` runs once all are started.
    """
    base_env = dict(os.environ if env is None else env)
    base_env.setdefault("PYTHONUNBUFFERED", "1")
    procs, outputs, tails, readers = [], [], [], []
    for i, tf_config in enumerate(tf_configs):
        worker_env = dict(base_env, TF_CONFIG=tf_config)
        p = subprocess.Popen(list(command), env=worker_env, cwd=cwd, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                             text=True, errors="replace")
        procs.append(p)
        outputs.append([])
        tails.append(deque(maxlen=TAIL_LINES))

        def read(i=i, p=p):
            for line in p.stdout:
                line = line.rstrip("\n")
                outputs[i].append(line)
                tails[i].append(line)
                if on_line:
                    on_line(i, line)

        t = threading.Thread(target=read, daemon=True)
        t.start()
        readers.append(t)
    if on_start:
        on_start(procs)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    timed_out, first_failure, killed = False, None, set()
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                first_failure = failed[0]
                killed = {i for i, c in enumerate(codes) if c is None}
                stop_all(procs)
                break
            if all(c == 0 for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                timed_out = True
                killed = {i for i, c in enumerate(codes) if c is None}
                stop_all(procs)
                break
            time.sleep(0.1)
    except BaseException:  # Ctrl-C or a test failure: nobody outlives the caller.
        stop_all(procs)
        raise
    finally:
        for t in readers:
            t.join(timeout=5)
    return GroupResult(
        workers=[WorkerResult(index=i, pid=p.pid, returncode=None if i in killed else p.returncode,
                              output="\n".join(outputs[i]), tail=list(tails[i])) for i, p in enumerate(procs)],
        timed_out=timed_out, first_failure=first_failure)


def run_local_workers(command: Sequence[str], num_workers: int, **kwargs) -> GroupResult:
    """`run_group` on a fresh loopback cluster of `num_workers` (worker 0 is the chief)."""
    return run_group(command, cluster_lib.local_cluster(num_workers), **kwargs)


def python_command(*args: str) -> List[str]:
    return [sys.executable, *args]
