"""`python -m dtf.backends.slurm_task [--evaluator] -- <command...>`: one task of a dtf Slurm step (the sbatch script
runs it under srun).

Sets TF_CONFIG from the step's environment (tasks in rank order, task 0 the chief, ports chosen per job: see
`dtf.cluster.tf_config.slurm_port`), checks that this task's port is free so a taken port is reported in one line that
names it (TensorFlow only says "Could not start gRPC server"), then runs the command and reports its exit status in one
line, which the sbatch script reads to find the task that failed first. With --evaluator the task is the side-car
evaluator (its own one-task step): TF_CONFIG task type `evaluator`, which binds no port and joins no collective.

Exit status: the command's; 1 when the port is taken (a crash: the script reruns the step on other ports, counted as a
restart); 2 outside a Slurm step or with bad input.
"""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
from typing import Mapping, Sequence

from dtf.backends import slurm
from dtf.base.errors import PortTaken, UserError, guard
from dtf.cluster import tf_config as cluster_lib


def check_port_free(port: int, host: str, environ: Mapping[str, str]):
    """Bind the port on all interfaces, as TensorFlow's gRPC server will (with SO_REUSEADDR, as gRPC does, so a
    socket in TIME_WAIT from an earlier start is not mistaken for a listener)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))  # the check mirrors TF's bind; it listens on nothing
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise PortTaken(port, host, environ, cluster_lib.SLURM_PORT_ENV) from None
        raise
    finally:
        s.close()


def task_tf_config(environ: Mapping[str, str]) -> str:
    """This task's TF_CONFIG, after checking that its own port is free (raises PortTaken)."""
    tf_config = cluster_lib.slurm_tf_config(environ)
    host, _, port = cluster_lib.parse_tf_config(tf_config).address.rpartition(":")
    check_port_free(int(port), host, environ)
    return tf_config


def evaluator_tf_config(environ: Mapping[str, str]) -> str:
    """The evaluator's TF_CONFIG: the job's workers (as the workers' first start names them; TensorFlow and dtf
    expect them in the spec, the evaluator never contacts them) and its own address, which serves nothing."""
    if not environ.get(slurm.WORKER_TASKS_ENV):
        raise UserError(f"{slurm.WORKER_TASKS_ENV} is not set: run the evaluator from the script that "
                        "`dtf.launch --emit=slurm --evaluator=...` writes")
    workers_env = dict(environ, SLURM_STEP_NODELIST=environ.get("SLURM_JOB_NODELIST", ""),
                       SLURM_STEP_TASKS_PER_NODE=environ[slurm.WORKER_TASKS_ENV], SLURM_PROCID="0")
    workers = json.loads(cluster_lib.slurm_tf_config(workers_env))["cluster"]["worker"]
    host = environ.get("SLURMD_NODENAME") or socket.gethostname()
    port = cluster_lib.slurm_port(environ) + cluster_lib.SLURM_PORT_STRIDE - 1  # after the workers' ports
    return json.dumps({"cluster": {"worker": workers, "evaluator": [f"{host}:{port}"]},
                       "task": {"type": "evaluator", "index": 0}})


def _run(command: Sequence[str], environ: Mapping[str, str], evaluator: bool = False) -> int:
    tf_config = evaluator_tf_config(environ) if evaluator else task_tf_config(environ)
    if environ["SLURM_PROCID"] == "0" and not evaluator:
        workers = json.loads(tf_config)["cluster"]["worker"]
        print(f"dtf.backends.slurm_task: {len(workers)} worker(s): {','.join(workers)} (task 0 is the chief)",
              flush=True)
    # Slurm signals every process of the step; the command handles SIGTERM (or is SIGKILLed after KillWait). We only
    # outlive it to report its status, so SIGTERM/SIGINT must not end us first (a no-op handler, which, unlike
    # SIG_IGN, the command does not inherit).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        proc = subprocess.Popen(list(command), env=dict(environ, TF_CONFIG=tf_config))
    except OSError as e:
        raise UserError(f"cannot run {command[0]!r}: {e.strerror}") from None
    status = proc.wait()
    return 128 - status if status < 0 else status


def main(argv: Sequence[str]) -> int:
    evaluator = argv[1:2] == ["--evaluator"]
    args = list(argv[1 + evaluator:])
    command = args[1:] if args[:1] == ["--"] else []

    def run() -> int:
        if not command:
            raise UserError("usage: python -m dtf.backends.slurm_task [--evaluator] -- <command...> (inside a Slurm "
                            "job step)")
        return _run(command, os.environ, evaluator)

    status = guard("dtf.backends.slurm_task", run)
    if "SLURM_PROCID" in os.environ:
        # The sbatch script reads this line: srun reports only the highest status of all tasks (a peer stopped by
        # SIGTERM after another failed says 143), but the step's cause is the first task that failed.
        print(f"dtf.backends.slurm_task: exited with status {status}", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
