"""Run a group of worker processes on loopback with their TF_CONFIGs, and never leave one behind.

Shared by `dtf.launch` (the user-facing launcher) and the multi-worker tests. A worker that fails takes the whole
group down promptly: MultiWorkerMirroredStrategy cannot continue with a missing peer, and the survivors would
otherwise hang in a collective.
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Callable, Dict, List, Optional, Sequence

from dtf.base import errors, exitcodes
from dtf.cluster import tf_config as cluster_lib

TAIL_LINES = 40
# Seconds between SIGTERM and SIGKILL after a worker crashed: a worker whose peer died hangs in the collective rather
# than exiting, so waiting longer only delays the stop. A preemption (a worker exited 143, or the caller was signalled)
# waits `preemption_grace_s` instead: dtf workers then stop at an agreed step and back up (dtf.experiment.preemption).
GRACE_S = 3.0


@dataclasses.dataclass
class WorkerResult:
    index: int
    pid: int
    returncode: Optional[int]  # None: killed by the group (another worker failed, or the timeout)
    output: str
    tail: List[str]
    role: str  # 'chief', 'worker N' or 'evaluator'

    @property
    def status(self) -> str:
        """How the worker ended, for people: 'exit code 3', 'killed by SIGKILL', 'stopped by the group'."""
        return describe_returncode(self.returncode)


@dataclasses.dataclass
class GroupResult:
    workers: List[WorkerResult]
    timed_out: bool
    first_failure: Optional[int]  # index of the worker that failed first, if any
    stop_s: Optional[float] = None  # seconds from noticing the failure (or the timeout) to every worker gone

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(w.returncode == 0 for w in self.workers)

    def report(self) -> str:
        lines = []
        for w in self.workers:
            lines.append(f"--- {w.role} (pid {w.pid}) exit={w.returncode} ---")
            lines.extend(w.tail)
        return "\n".join(lines)


def role(index: int, tf_config: Optional[str] = None) -> str:
    """How logs name process `index`: 'chief', 'worker N', or 'evaluator' when its TF_CONFIG task is one."""
    if tf_config and json.loads(tf_config).get("task", {}).get("type") == "evaluator":
        return "evaluator"
    return "chief" if index == 0 else f"worker {index}"


def describe_returncode(returncode: Optional[int]) -> str:
    if returncode is None:
        return "stopped by the group"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


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


def _process_env(base_env: Dict[str, str], tf_config: Optional[str], extra: Optional[Dict[str, str]]) -> dict:
    """A process's environment: the group's, its own TF_CONFIG (None: an inherited one is removed), then `extra`."""
    env = dict(base_env)
    if tf_config is None:
        env.pop("TF_CONFIG", None)
    else:
        env["TF_CONFIG"] = tf_config
    if extra:
        env.update(extra)
    return env


class _Watcher:
    """Threads that collect process `index`'s output and note, in `exited`, when it ends (the first failure is the
    cause, the processes stopped after it its victims)."""

    def __init__(self, index: int, proc: subprocess.Popen, on_line, exited: List[int], changed: threading.Event):
        self.index, self.proc, self.on_line, self.exited, self.changed = index, proc, on_line, exited, changed
        self.output, self.tail = [], deque(maxlen=TAIL_LINES)
        self.threads = []
        for target in (self._read, self._wait):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self.threads.append(t)

    def _read(self):
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.output.append(line)
            self.tail.append(line)
            if self.on_line:
                self.on_line(self.index, line)

    def _wait(self):
        self.proc.wait()
        self.exited.append(self.index)
        self.changed.set()


def _wait_for_group(procs: List[subprocess.Popen], exited: List[int], changed: threading.Event,
                    deadline: Optional[float], preemption_grace_s: float):
    """Wait until every process has ended; once one fails or the deadline passes, stop the others.
    (timed_out, first_failure, indices of the processes the group stopped, seconds the stop took)."""
    while len(exited) < len(procs):
        changed.wait(0.1)
        changed.clear()
        failed = [i for i in list(exited) if procs[i].returncode != 0]
        timed_out = not failed and deadline is not None and time.monotonic() > deadline
        if failed or timed_out:
            killed = {i for i in range(len(procs)) if i not in exited}
            preempted = bool(failed) and procs[failed[0]].returncode in (exitcodes.PREEMPTED, -signal.SIGTERM)
            started = time.monotonic()
            stop_all(procs, preemption_grace_s if preempted else GRACE_S)
            return timed_out, failed[0] if failed else None, killed, time.monotonic() - started
    return False, None, set(), None


def run_group(
    command: Sequence[str],
    tf_configs: Sequence[Optional[str]],
    *,
    env: Optional[Dict[str, str]] = None,
    process_envs: Optional[Sequence[Optional[Dict[str, str]]]] = None,
    process_commands: Optional[Sequence[Optional[Sequence[str]]]] = None,
    cwd: Optional[str] = None,
    timeout_s: Optional[float] = None,
    on_line: Optional[Callable[[int, str], None]] = None,
    on_start: Optional[Callable[[List[subprocess.Popen]], None]] = None,
    preemption_grace_s: float = GRACE_S,
) -> GroupResult:
    """Start one process per TF_CONFIG running `command`, wait for all; stop the rest as soon as one fails.

    Each process runs in its own session (process group) so that stopping it also stops anything it spawned.
    `on_line(index, line)` sees every output line as it arrives; `on_start(procs)` runs once all are started.
    A `tf_configs` entry of None starts that process without TF_CONFIG (an inherited one is removed);
    `process_envs[i]`, if given, is added to process i's environment (after TF_CONFIG);
    `process_commands[i]`, if given, runs instead of `command` (e.g. an evaluator beside the workers).
    When a worker exits preempted (143), or `Stopped` unwinds through here, the others get `preemption_grace_s`
    between SIGTERM and SIGKILL to finish backing up.
    """
    if process_envs is not None and len(process_envs) != len(tf_configs):
        raise ValueError(f"process_envs has {len(process_envs)} entries for {len(tf_configs)} processes")
    base_env = dict(os.environ if env is None else env)
    base_env.setdefault("PYTHONUNBUFFERED", "1")
    procs, watchers = [], []
    exited = []  # worker indices in the order their processes ended: the first failure is the cause, not a victim
    changed = threading.Event()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        for i, tf_config in enumerate(tf_configs):
            own = process_commands[i] if process_commands else None
            worker_env = _process_env(base_env, tf_config, process_envs[i] if process_envs is not None else None)
            p = subprocess.Popen(list(own or command), env=worker_env, cwd=cwd, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                 text=True, errors="replace")
            procs.append(p)
            watchers.append(_Watcher(i, p, on_line, exited, changed))
        if on_start:
            on_start(procs)
        timed_out, first_failure, killed, stop_s = _wait_for_group(procs, exited, changed, deadline,
                                                                   preemption_grace_s)
    except errors.Stopped:  # the caller was signalled: pass SIGTERM on and give the workers time to back up
        stop_all(procs, preemption_grace_s)
        raise
    except BaseException:  # Ctrl-C, or a test failure: nobody outlives the caller.
        stop_all(procs)
        raise
    finally:
        for t in (t for w in watchers for t in w.threads):
            t.join(timeout=5)
    return GroupResult(
        workers=[WorkerResult(index=w.index, pid=w.proc.pid,
                              returncode=None if w.index in killed else w.proc.returncode,
                              output="\n".join(w.output), tail=list(w.tail), role=role(w.index, tf_configs[w.index]))
                 for w in watchers],
        timed_out=timed_out, first_failure=first_failure, stop_s=stop_s)


def run_local_workers(command: Sequence[str], num_workers: int, **kwargs) -> GroupResult:
    """`run_group` on a fresh loopback cluster of `num_workers` (worker 0 is the chief)."""
    return run_group(command, cluster_lib.local_cluster(num_workers), **kwargs)


def python_command(*args: str) -> List[str]:
    return [sys.executable, *args]


def _on_stop_signal(signum, frame):
    del frame
    for s in (signal.SIGINT, signal.SIGTERM):  # one stop is enough: let it finish stopping the group
        signal.signal(s, signal.SIG_IGN)
    raise errors.Stopped(signum)


def raise_stopped_on_signals():
    """From now on SIGINT/SIGTERM raise `Stopped` in the main thread."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _on_stop_signal)
