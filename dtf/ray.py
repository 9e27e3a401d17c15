"""Run a dtf command on Ray workers through Ray Train's TensorflowTrainer (`pip install -e '.[ray]'`).

Ray Train forms the cluster and sets TF_CONFIG in each worker actor; the actor runs the command (normally
`python -m dtf.run ...`, which brings dtf's Keras multi-worker fixes and chief-only outputs) as a child process with
that TF_CONFIG and prints its lines as `[chief] ...` / `[worker 1] ...`. Failures follow dtf.exitcodes: a crash or a
preemption (any status but 0, 2, 3) fails the worker group, which Ray Train restarts up to `max_restarts` times
(FailureConfig.max_failures), and the command resumes from the chief's backup in its model_dir; 2 (user error) and 3
(diverged) end the run at once, unretried. The model_dir must be on storage every Ray node shares (any path on a
single machine).

With no address a local Ray instance is started on 127.0.0.1 and stopped at the end.
"""
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
from typing import List, Optional, Sequence, Union

from dtf import exitcodes
from dtf.errors import UserError

_PR_SET_PDEATHSIG = 1


def _die_with_parent():
    """In the child: SIGKILL when the worker actor dies (Ray kills actors hard; a TF worker left behind would hang
    in a collective)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _role(rank: int) -> str:
    return "chief" if rank == 0 else f"worker {rank}"


def _train_loop(config: dict):
    """One Ray Train worker: run the command with Ray's TF_CONFIG; raise on a retryable failure."""
    import ray
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Ray's TF backend sets TF_USE_LEGACY_KERAS=1 next to TF_CONFIG (it targets tf_keras); dtf is Keras 3, and
    # with it set `tf.keras` fails to import ("Keras cannot be imported") when tf_keras is not installed.
    env.pop("TF_USE_LEGACY_KERAS", None)
    proc = subprocess.Popen(config["command"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace",
                            preexec_fn=_die_with_parent)
    for line in proc.stdout:
        print(f"[{_role(rank)}] {line.rstrip()}", flush=True)
    status = proc.wait()
    status = 128 - status if status < 0 else status
    if exitcodes.should_restart(status):
        raise RuntimeError(f"dtf.ray: {_role(rank)} exited with status {status}; Ray Train restarts the group")
    ray.get(config["statuses"].set.remote(rank, status))  # 0, or 2/3: never retried


class _Statuses:
    """A Ray actor the workers report their final (unretried) exit status to: works on any Ray cluster."""

    def __init__(self):
        self.statuses = {}

    def set(self, rank: int, status: int):
        self.statuses[rank] = status

    def get(self) -> dict:
        return self.statuses


def run_command(config) -> List[str]:
    """`python -m dtf.run` with every flag of a dtf Config: `fit(config, ...)` runs exactly that experiment."""
    return [sys.executable, "-m", "dtf.run", *(line for line in config.to_flagfile().splitlines()
                                                if line.startswith("--"))]


def fit(command: Union[Sequence[str], "dtf.config.Config"], num_workers: int, *, address: Optional[str] = None,
        use_gpu: bool = False, max_restarts: int = 0) -> int:
    """Run `command` (e.g. `[sys.executable, "-m", "dtf.run", "--flagfile=exp.flags"]`, or a dtf Config) on
    `num_workers` Ray Train workers; return dtf's exit status: 0, 2/3 from the workers, or 1 when Ray Train gave up
    after `max_restarts`."""
    if hasattr(command, "to_flagfile"):
        command = run_command(command)
    try:
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.tensorflow import TensorflowTrainer
    except ImportError as e:
        raise UserError(f"--backend=ray needs Ray Train ({e}); pip install -e '.[ray]'") from None
    if num_workers < 1 or max_restarts < 0:
        raise UserError(f"num_workers must be >= 1 and max_restarts >= 0, got {num_workers} and {max_restarts}")
    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address)
        else:  # a local instance, on loopback only
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False,
                     num_cpus=max(num_workers, os.cpu_count() or 1))
    try:
        with tempfile.TemporaryDirectory(prefix="dtf-ray-") as local_storage:
            statuses = ray.remote(num_cpus=0)(_Statuses).remote()
            trainer = TensorflowTrainer(
                _train_loop, train_loop_config={"command": list(command), "statuses": statuses},
                scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
                run_config=RunConfig(name="dtf", storage_path=None if address else local_storage,
                                     failure_config=FailureConfig(max_failures=max_restarts)))
            try:
                trainer.fit()
            except Exception as e:  # Ray Train gave up; the workers' output above says why
                print(f"dtf.ray: training failed after {max_restarts} restart(s): {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
                return exitcodes.CRASH
            return max(ray.get(statuses.get.remote()).values(), default=exitcodes.OK)
    finally:
        if started:
            ray.shutdown()
