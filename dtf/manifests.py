"""Cluster manifests for a dtf job: a Kubeflow TFJob and a Slurm sbatch script, plus TF_CONFIG from a Slurm task.

Both run the same command `python -m dtf.launch` would run locally; the cluster manager replaces the launcher.
Kubeflow's Training Operator sets TF_CONFIG in each pod itself. Under Slurm, `python -m dtf.run` resolves the
cluster itself (`--cluster_resolver=slurm`, which the script adds); any other command gets a TF_CONFIG built by
`python -m dtf.manifests slurm_tf_config` in each task. Resuming after a restart needs `model_dir` on storage every
worker can reach (a shared volume or filesystem): the backup is written by the chief and read by all.
"""
import math
import re
import shlex
import sys
from typing import Optional, Sequence

import yaml

from dtf.cluster import slurm_tf_config
from dtf.errors import UserError

KINDS = ("tfjob", "slurm")
DEFAULT_IMAGE = "dtf:latest"
DEFAULT_JOB_NAME = "dtf-job"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check_job_name(name: str) -> str:
    """Kubernetes object names (and so TFJob pod names) must be DNS labels; Slurm accepts those too."""
    if len(name) > 63 or not _DNS_LABEL.match(name):
        raise UserError(f"--job_name={name!r} is not a valid job name; use up to 63 lowercase letters, digits and "
                        "'-', starting and ending with a letter or digit, e.g. --job_name=mnist-run1")
    return name


def _replica(count: int, image: str, command: Sequence[str]) -> dict:
    return {
        "replicas": count,
        "restartPolicy": "OnFailure",
        "template": {"spec": {"containers": [{
            "name": "tensorflow",  # the Training Operator finds the TF container by this name
            "image": image,
            "command": list(command),
        }]}},
    }


def tfjob(command: Sequence[str], num_workers: int, *, image: str = DEFAULT_IMAGE, job_name: str = DEFAULT_JOB_NAME,
          max_restarts: Optional[int] = None, timeout_s: Optional[float] = None) -> str:
    """A Kubeflow TFJob (kubeflow.org/v1): one Chief plus `num_workers - 1` Workers, each running `command`.

    `max_restarts` becomes runPolicy.backoffLimit and `timeout_s` activeDeadlineSeconds, so the flags mean what they
    mean for the local launcher.
    """
    specs = {"Chief": _replica(1, image, command)}
    if num_workers > 1:
        specs["Worker"] = _replica(num_workers - 1, image, command)
    spec = {"tfReplicaSpecs": specs}
    run_policy = {}
    if max_restarts is not None:
        run_policy["backoffLimit"] = max_restarts
    if timeout_s is not None:
        run_policy["activeDeadlineSeconds"] = math.ceil(timeout_s)
    if run_policy:
        spec["runPolicy"] = run_policy
    manifest = {"apiVersion": "kubeflow.org/v1", "kind": "TFJob",
                "metadata": {"name": check_job_name(job_name)}, "spec": spec}
    return yaml.safe_dump(manifest, sort_keys=False)


def is_dtf_run(command: Sequence[str]) -> bool:
    return any(a == "-m" and b == "dtf.run" for a, b in zip(command, command[1:]))


def _slurm_task_command(command: Sequence[str]) -> str:
    """The srun payload: dtf.run gets --cluster_resolver=slurm; anything else runs with a TF_CONFIG from Slurm."""
    if is_dtf_run(command):
        command = list(command)
        if not any(a.startswith("--cluster_resolver") for a in command):
            at = command.index("dtf.run") + 1  # before any '--' the user's command may contain
            command[at:at] = ["--cluster_resolver=slurm"]
        return shlex.join(command)
    wrapper = ('TF_CONFIG="$(python -m dtf.manifests slurm_tf_config)" && export TF_CONFIG && exec "$@"')
    return shlex.join(["bash", "-c", wrapper, "dtf-task", *command])


def sbatch(command: Sequence[str], num_workers: int, *, job_name: str = DEFAULT_JOB_NAME,
           max_restarts: Optional[int] = None, timeout_s: Optional[float] = None) -> str:
    """An sbatch script: one task per node on `num_workers` nodes, all running `command` in one srun step.

    `--kill-on-bad-exit` ends the step when any task fails (as the local launcher does); the step is then rerun up
    to `max_restarts` times with DTF_LAUNCH_RESTART set, and resumes from the backup in the shared model_dir.
    """
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={check_job_name(job_name)}",
             f"#SBATCH --nodes={num_workers}",
             "#SBATCH --ntasks-per-node=1"]
    if timeout_s is not None:
        lines.append(f"#SBATCH --time={math.ceil(timeout_s / 60)}")
    lines += ["set -u",
              "# Written by `python -m dtf.launch --emit=slurm`. Task 0 (the first node) is the chief.",
              f"for attempt in $(seq 0 {max_restarts or 0}); do",
              "  export DTF_LAUNCH_RESTART=$attempt",
              f"  srun --nodes={num_workers} --ntasks-per-node=1 --kill-on-bad-exit=1 {_slurm_task_command(command)}",
              "  status=$?",
              "  [ $status -eq 0 ] && exit 0",
              '  echo "dtf: srun step failed with status $status (attempt $attempt)" >&2',
              "done",
              "exit $status"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    """`python -m dtf.manifests slurm_tf_config`: print this Slurm task's TF_CONFIG (used by the sbatch script)."""
    if list(argv[1:]) != ["slurm_tf_config"]:
        print("dtf.manifests: error: usage: python -m dtf.manifests slurm_tf_config (inside a Slurm step)",
              file=sys.stderr)
        return 2
    try:
        print(slurm_tf_config())
    except UserError as e:
        print(f"dtf.manifests: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
