"""Cluster manifests for a dtf job: a Kubeflow TFJob here, the Slurm sbatch script in dtf.backends.slurm.

Both run the same command `python -m dtf.launch` would run locally; the cluster manager replaces the launcher.
Kubeflow's Training Operator sets TF_CONFIG in each pod itself. Resuming after a restart needs `model_dir` on storage
every worker can reach (a shared volume or object store): the backup is written by the chief and read by all.
"""
import dataclasses
import math
import re
from typing import Optional, Sequence

import yaml

from dtf.base.errors import UserError

KINDS = ("tfjob", "slurm")
DEFAULT_IMAGE = "dtf:latest"
DEFAULT_JOB_NAME = "dtf-job"
DISPATCHER_PORT, WORKER_PORT = 5050, 5051  # the tf.data service's pods (--data_service_workers)
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # DNS-1035
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_QUANTITY = re.compile(r"^\d+(\.\d+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


def check_job_name(name: str) -> str:
    """TFJob names must be DNS-1035 labels (the Training Operator's webhook checks it); Slurm accepts those too."""
    if len(name) > 63 or not _DNS_LABEL.match(name):
        raise UserError(f"--job_name={name!r} is not a valid job name; use up to 63 lowercase letters, digits and "
                        "'-', starting with a letter and ending with a letter or digit, e.g. --job_name=mnist-run1")
    return name


@dataclasses.dataclass(frozen=True)
class PodResources:
    """What each training pod asks for; requests equal limits (Kubernetes' Guaranteed class: never evicted first)."""

    gpus: Optional[int] = None
    cpu: Optional[str] = None
    memory: Optional[str] = None

    def __post_init__(self):
        if self.gpus is not None and self.gpus < 1:
            raise UserError(f"--gpus_per_worker must be >= 1, got {self.gpus}; leave it out for CPU-only pods")
        for flag, value, example in (("--cpu", self.cpu, "4 or 500m"), ("--memory", self.memory, "16Gi")):
            if value is not None and not _QUANTITY.match(value):
                raise UserError(f"{flag}={value} is not a Kubernetes quantity; write e.g. {flag}={example.split()[0]} "
                                f"({example})")

    def to_k8s(self) -> Optional[dict]:
        amounts = {k: v for k, v in (("cpu", self.cpu), ("memory", self.memory),
                                     ("nvidia.com/gpu", None if self.gpus is None else str(self.gpus))) if v}
        return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else None


@dataclasses.dataclass(frozen=True)
class SharedVolume:
    """A PersistentVolumeClaim (ReadWriteMany) mounted in every pod: where model_dir lives, so a restarted pod
    resumes from the chief's backup. Given as --volume=CLAIM:/mount/path."""

    claim: str
    mount_path: str

    @classmethod
    def parse(cls, text: str) -> "SharedVolume":
        claim, _, path = text.partition(":")
        if not _DNS_SUBDOMAIN.match(claim) or not path.startswith("/"):
            raise UserError(f"--volume={text} is not CLAIM:/mount/path; write e.g. --volume=dtf-runs:/shared for the "
                            "PersistentVolumeClaim dtf-runs mounted at /shared")
        return cls(claim, path.rstrip("/") or "/")

    def check_model_dir(self, command: Sequence[str]):
        """The model_dir in a dtf command must be on the volume (or an object store URL such as gs://...): pod-local
        files vanish with a restarted pod."""
        for arg in command:
            if arg.startswith("--model_dir="):
                model_dir = arg.split("=", 1)[1]
                if "://" not in model_dir and not (model_dir + "/").startswith(self.mount_path.rstrip("/") + "/"):
                    raise UserError(f"--model_dir={model_dir} is not on the shared volume mounted at "
                                    f"{self.mount_path}; put it there, e.g. --model_dir={self.mount_path}/run1, so a "
                                    "restarted pod resumes from the chief's backup")


def _replica(count: int, image: str, command: Sequence[str], resources: PodResources,
             volume: Optional[SharedVolume]) -> dict:
    container = {
        "name": "tensorflow",  # the Training Operator finds the TF container by this name
        "image": image,
        "command": list(command),
    }
    pod = {"containers": [container]}
    if resources.to_k8s():
        container["resources"] = resources.to_k8s()
    if volume:
        container["volumeMounts"] = [{"name": "dtf-shared", "mountPath": volume.mount_path}]
        pod["volumes"] = [{"name": "dtf-shared", "persistentVolumeClaim": {"claimName": volume.claim}}]
    # ExitCode: the operator restarts a pod after 128-255 (143: preempted/SIGTERM, 137: SIGKILL/OOM) and never after
    # 1-127 (2: user error, 3: diverged) -- dtf.base.exitcodes was chosen for this.
    return {"replicas": count, "restartPolicy": "ExitCode", "template": {"spec": pod}}


def tfjob(command: Sequence[str], num_workers: int, *, image: str = DEFAULT_IMAGE, job_name: str = DEFAULT_JOB_NAME,
          max_restarts: Optional[int] = None, timeout_s: Optional[float] = None,
          evaluator: Optional[Sequence[str]] = None, resources: PodResources = PodResources(),
          volume: Optional[SharedVolume] = None, data_service_workers: Optional[int] = None) -> str:
    """A Kubeflow TFJob (kubeflow.org/v1): one Chief plus `num_workers - 1` Workers, each running `command`, and an
    Evaluator running `evaluator` if given (outside the training cluster; it reads the chief's outputs on the volume).
    With `data_service_workers`, also a tf.data service (see `data_service`) that the training command is pointed at.

    `max_restarts` becomes runPolicy.backoffLimit and `timeout_s` activeDeadlineSeconds, so the flags mean what they
    mean for the local launcher. `resources` apply to the training pods.
    """
    if volume:
        volume.check_model_dir(command)
    job_name = check_job_name(job_name)
    if data_service_workers is not None:
        command = [*command, f"--data_service=grpc://{job_name}-data:{DISPATCHER_PORT}"]
    specs = {"Chief": _replica(1, image, command, resources, volume)}
    if num_workers > 1:
        specs["Worker"] = _replica(num_workers - 1, image, command, resources, volume)
    if evaluator:
        specs["Evaluator"] = _replica(1, image, evaluator, PodResources(), volume)
    # Running: when the chief is done, pods still running (the evaluator's loop, a hung worker) are deleted.
    run_policy = {"cleanPodPolicy": "Running"}
    if max_restarts is not None:
        run_policy["backoffLimit"] = max_restarts
    if timeout_s is not None:
        run_policy["activeDeadlineSeconds"] = math.ceil(timeout_s)
    spec = {"tfReplicaSpecs": specs, "runPolicy": run_policy}
    manifest = {"apiVersion": "kubeflow.org/v1", "kind": "TFJob", "metadata": {"name": job_name}, "spec": spec}
    if data_service_workers is None:
        return yaml.safe_dump(manifest, sort_keys=False)
    return yaml.safe_dump_all([manifest, *data_service(job_name, image, data_service_workers)], sort_keys=False)


def data_service(job_name: str, image: str, workers: int) -> list:
    """A tf.data service beside a TFJob: the dispatcher (a Deployment of 1 behind the Service `<job>-data`, the
    address the training command gets) and `workers` tf.data workers (a Deployment), each registering with its pod
    IP. The TFJob replica types (Chief, Worker, PS, Evaluator) have no place for it, and the operator's
    cleanPodPolicy does not reach it: `kubectl delete -f` the same file when the job is done."""
    if workers < 1:
        raise UserError(f"--data_service_workers must be >= 1, got {workers}")
    name, labels = f"{job_name}-data", {"app": f"{job_name}-data", "role": "dispatcher"}
    dispatcher = ["python", "-m", "dtf.cluster.data_service", "dispatcher", str(DISPATCHER_PORT)]
    worker = ["python", "-m", "dtf.cluster.data_service", "worker", str(WORKER_PORT), f"{name}:{DISPATCHER_PORT}",
              "$(POD_IP)"]  # Kubernetes expands $(VAR) in a container's command
    pod_ip = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}

    def deployment(suffix, replicas, role, command, port, env=None):
        container = {"name": "data-service", "image": image, "command": command,
                     "ports": [{"containerPort": port}], **({"env": env} if env else {})}
        selector = {"app": f"{job_name}-data", "role": role}
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": f"{name}-{suffix}"},
                "spec": {"replicas": replicas, "selector": {"matchLabels": selector},
                         "template": {"metadata": {"labels": selector}, "spec": {"containers": [container]}}}}

    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
               "spec": {"selector": labels, "ports": [{"port": DISPATCHER_PORT, "targetPort": DISPATCHER_PORT}]}}
    return [service, deployment("dispatcher", 1, "dispatcher", dispatcher, DISPATCHER_PORT),
            deployment("workers", workers, "worker", worker, WORKER_PORT, [pod_ip])]
