"""Cluster manifests for a dtf job: a Kubeflow TFJob here, the Slurm sbatch script in dtf.slurm.

Both run the same command `python -m dtf.launch` would run locally; the cluster manager replaces the launcher.
Kubeflow's Training Operator sets TF_CONFIG in each pod itself. Resuming after a restart needs `model_dir` on storage
every worker can reach (a shared volume or object store): the backup is written by the chief and read by all.
"""
import math
import re
from typing import Optional, Sequence

import yaml

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
