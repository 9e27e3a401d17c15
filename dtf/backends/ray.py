"""Run a dtf command on Ray workers through Ray Train's TensorflowTrainer (`pip install -e '.[ray]'`).

Ray Train forms the cluster and sets TF_CONFIG in each worker actor; the actor runs the command (normally
`python -m dtf.run ...`, which brings dtf's Keras multi-worker fixes and chief-only outputs) as a child process with
that TF_CONFIG, in the directory `fit` was called from (the directory `dtf.launch` was started in): relative paths
in the command (flagfiles, those nested in them, --model_dir, --task files, files a task opens) mean what they mean
with the local launcher, and outputs land there. On a cluster of several nodes that directory must therefore be on
storage every node shares (e.g. NFS, at the same path); a node without it ends the run with one line, exit 2.

Output: each worker's lines once, as `[chief] ...` / `[worker 1] ...`, and nothing else of Ray's. Ray forwards every
actor's stdout/stderr to the driver by default, Train V2 logs each print() a second time, and its
PlacementGroupCleaner warns once a second that it cannot reach the State API (the dashboard, which a local instance
here does not start). So a Ray instance started here has log_to_driver off and logs warnings only, and the workers
send their lines to the driver through a small actor (`_Hub`) instead of printing them.

Failures follow dtf.base.exitcodes: a crash or a preemption (any status but 0, 2, 3) fails the worker group, which Ray
Train restarts up to `max_restarts` times (FailureConfig.max_failures), and the command resumes from the chief's
backup in its model_dir; 2 (user error) and 3 (diverged) end the run at once, unretried.

Elastic (`min_workers`): Ray Train V2's elastic worker group, `ScalingConfig(num_workers=(min_workers, num_workers))`
(in Ray 2.60, the version tested here): Ray starts the group with as many workers as it can get, at least
`min_workers`, and resizes it after failures or when resources come back; each start is a new TF_CONFIG, and the
command resumes from the chief's backup on the new count at the same global batch (dtf.experiment.elastic).

With no address a local Ray instance is started on 127.0.0.1 and stopped at the end.
"""
import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from typing import TYPE_CHECKING, List, Optional, Sequence, Union

from dtf.base import exitcodes, logs
from dtf.base.errors import UserError
from dtf.cluster.procs import role

if TYPE_CHECKING:
    from dtf.config import Config

_PR_SET_PDEATHSIG = 1
RELAY_INTERVAL_S = 0.2  # how often the driver prints the lines the workers sent
NICENESS = "RAY_worker_niceness"  # Ray's setting (RayConfig worker_niceness, default 15)


def _die_with_parent():
    """In the child: SIGKILL when the worker actor dies (Ray kills actors hard; a TF worker left behind would hang
    in a collective)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _missing_directory(cwd: str) -> Optional[str]:
    """The one-line error when the launch directory is not on this worker's node (a multi-node cluster without
    shared storage), else None."""
    if os.path.isdir(cwd):
        return None
    import ray

    return (f"dtf.backends.ray: error: the launch directory {cwd} does not exist on Ray node "
            f"{ray.util.get_node_ip_address()}; "
            "the command runs there, with relative paths taken from it: start dtf.launch in a directory every Ray "
            "node has (the same path on shared storage)")


def _train_loop(config: dict):
    """One Ray Train worker: run the command with Ray's TF_CONFIG in the launch directory, send its lines to the
    driver; raise on a retryable failure."""
    import ray
    import ray.train
    from ray.train.collective import barrier

    hub, cwd = config["hub"], config["cwd"]
    rank = ray.train.get_context().get_world_rank()
    missing = _missing_directory(cwd)
    if missing:  # said once per node
        ray.get([hub.say.remote(missing, once=True), hub.set.remote(rank, exitcodes.USER_ERROR)])
    barrier()  # no worker starts unless every one can: a lone worker would wait for its peers until it timed out
    if exitcodes.USER_ERROR in ray.get(hub.get.remote()).values():
        return
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Ray's TF backend sets TF_USE_LEGACY_KERAS=1 next to TF_CONFIG (it targets tf_keras); dtf is Keras 3, and
    # with it set `tf.keras` fails to import ("Keras cannot be imported") when tf_keras is not installed.
    env.pop("TF_USE_LEGACY_KERAS", None)
    proc = subprocess.Popen(config["command"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace",
                            preexec_fn=_die_with_parent)
    for line in proc.stdout:  # calls from one caller run in order: these arrive before the status below
        hub.say.remote(f"[{role(rank)}] {line.rstrip()}")
    status = proc.wait()
    status = 128 - status if status < 0 else status
    if exitcodes.should_restart(status):
        ray.get(hub.say.remote(f"dtf.backends.ray: {role(rank)} exited with status {status}; Ray Train restarts the "
                               "group while --max_restarts allows"))
        raise RuntimeError(f"dtf.backends.ray: {role(rank)} exited with status {status}")
    ray.get(hub.set.remote(rank, status))  # 0, or 2/3: never retried


class _Hub:
    """A Ray actor between the workers and the driver: the lines to print, and each worker's final (unretried) exit
    status. Works on any Ray cluster."""

    def __init__(self):
        self.lines, self.said, self.statuses = [], set(), {}

    def say(self, line: str, once: bool = False):
        if once:
            if line in self.said:
                return
            self.said.add(line)
        self.lines.append(line)

    def take(self) -> List[str]:
        lines, self.lines = self.lines, []
        return lines

    def set(self, rank: int, status: int):
        self.statuses[rank] = status

    def get(self) -> dict:
        return self.statuses


def _relay(hub, stop: threading.Event):
    """In the driver: print the workers' lines as they come, until `stop` (then the last ones)."""
    import ray

    while True:
        stopping = stop.is_set()
        for line in ray.get(hub.take.remote()):
            print(line, flush=True)
        if stopping:
            return
        stop.wait(RELAY_INTERVAL_S)


def run_command(config) -> List[str]:
    """`python -m dtf.run` with every flag of a dtf Config: `fit(config, ...)` runs exactly that experiment."""
    return [sys.executable, "-m", "dtf.run", *(line for line in config.to_flagfile().splitlines()
                                                if line.startswith("--"))]


def _import_trainer():
    """Ray's TensorflowTrainer module imports TensorFlow: quietly (no load-time banners), without leaving dtf's quiet
    settings in this process's environment, which the local Ray instance, and so the command, would inherit."""
    before = set(os.environ)
    logs.quiet_tensorflow()
    try:
        with logs.silenced_stderr():
            from ray.train.tensorflow import TensorflowTrainer
    finally:
        for name in set(os.environ) - before:
            del os.environ[name]
    return TensorflowTrainer


def _init_local(ray, num_workers: int, quiet: dict):
    """A local Ray instance, on loopback only. Its workers, and so the training processes they start, run at normal
    priority, as the local launcher's: Ray renices workers to 15 by default (to keep its own daemons responsive), and
    on a machine doing anything else that starved them: with three busy processes on 2 cores the README's 2-worker
    run took 417 s instead of 84 s, nearly all of it before training began."""
    saved = os.environ.get(NICENESS)
    os.environ[NICENESS] = saved if saved is not None else "0"  # read by the raylet and workers ray.init starts
    try:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False,
                 num_cpus=max(num_workers, os.cpu_count() or 1), **quiet)
    finally:
        if saved is None:
            del os.environ[NICENESS]


def fit(command: Union[Sequence[str], "Config"], num_workers: int, *, address: Optional[str] = None,
        use_gpu: bool = False, max_restarts: int = 0, cwd: Optional[str] = None,
        min_workers: Optional[int] = None) -> int:
    """Run a dtf command as one multi-worker job on Ray Train workers; return dtf's exit status: 0, 2/3 from the
    workers, or 1 when Ray Train gave up after `max_restarts`.

    Args:
        command: argv, e.g. `[sys.executable, "-m", "dtf.run", "--flagfile=exp.flags"]`, or a dtf Config.
        num_workers: Ray Train workers, one dtf worker each (TF_CONFIG is Ray's).
        address: a running Ray cluster (HOST:PORT, ray://HOST:10001 or auto); default: start a local instance.
        use_gpu: give each worker a GPU.
        max_restarts: whole-group restarts after a crash (Ray Train's FailureConfig); 2 and 3 are never retried.
        cwd: the directory the command runs in on every node (relative paths resolve there); default: this
            process's working directory.
        min_workers: an elastic group of `min_workers` to `num_workers` workers (see the module doc); default: a
            fixed group of `num_workers`.
    """
    if hasattr(command, "to_flagfile"):
        command = run_command(command)
    try:
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        TensorflowTrainer = _import_trainer()
    except ImportError as e:
        raise UserError(f"--backend=ray needs Ray Train ({e}); pip install -e '.[ray]'") from None
    if num_workers < 1 or max_restarts < 0:
        raise UserError(f"num_workers must be >= 1 and max_restarts >= 0, got {num_workers} and {max_restarts}")
    if min_workers is not None and not 1 <= min_workers <= num_workers:
        raise UserError(f"min_workers must be between 1 and num_workers={num_workers}, got {min_workers}",
                        arguments=("min_workers",))
    workers = (min_workers, num_workers) if min_workers is not None and min_workers < num_workers else num_workers
    started = not ray.is_initialized()
    if started:  # the workers' lines come through _Hub; Ray's own output from the actors is noise here
        quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
        if address:
            try:
                ray.init(address=address, **quiet)
            except (ValueError, ConnectionError) as e:
                raise UserError(f"address={address}: cannot join that Ray cluster ({e}); give its head as HOST:PORT "
                                "(e.g. 10.0.0.1:6379), ray://HOST:10001, or auto", arguments=("address",)) from None
        else:
            _init_local(ray, num_workers, quiet)
    try:
        with tempfile.TemporaryDirectory(prefix="dtf-ray-") as local_storage:
            hub = ray.remote(num_cpus=0)(_Hub).remote()
            trainer = TensorflowTrainer(
                _train_loop, train_loop_config={"command": list(command), "cwd": os.path.abspath(cwd or os.getcwd()),
                                                "hub": hub},
                scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
                run_config=RunConfig(name="dtf", storage_path=None if address else local_storage,
                                     failure_config=FailureConfig(max_failures=max_restarts)))
            stop = threading.Event()
            relay = threading.Thread(target=_relay, args=(hub, stop), name="dtf-ray-relay", daemon=True)
            relay.start()
            try:
                trainer.fit()
                failure = None
            except Exception as e:  # Ray Train gave up; the workers' output says why
                failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            finally:
                stop.set()
                relay.join()
            if failure:
                print(f"dtf.backends.ray: training failed after {max_restarts} restart(s): {failure}", file=sys.stderr)
                return exitcodes.CRASH
            return max(ray.get(hub.get.remote()).values(), default=exitcodes.OK)
    finally:
        if started:
            ray.shutdown()
