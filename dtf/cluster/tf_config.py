"""TF_CONFIG: parse and validate it into a typed ClusterInfo, or build it from worker_hosts/task_index.

TensorFlow reads TF_CONFIG itself, but reports a malformed one late and obscurely (often as a hang). dtf validates it
up front and says which field is wrong and how to fix it.
"""
import dataclasses
import json
import os
import re
import socket
from typing import Dict, List, Mapping, Optional

from dtf.base.errors import UserError

TASK_TYPES = ("chief", "worker", "ps", "evaluator")
# Tasks that train and take part in the all-reduce (the evaluator only reads checkpoints).
TRAINING_TASK_TYPES = ("chief", "worker")


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """Where this process sits in the cluster. A process without TF_CONFIG is a one-worker 'cluster'."""

    cluster: Dict[str, List[str]]
    task_type: Optional[str]
    task_index: int
    rpc_layer: Optional[str] = None

    @property
    def num_workers(self) -> int:
        """Training processes: the chief (if any) plus the workers."""
        return sum(len(self.cluster.get(t, [])) for t in TRAINING_TASK_TYPES) or 1

    @property
    def is_multi_worker(self) -> bool:
        return self.num_workers > 1

    @property
    def is_chief(self) -> bool:
        """The chief task, or worker 0 when there is no chief (TensorFlow's rule)."""
        if self.task_type is None:
            return True
        if self.task_type == "chief":
            return True
        return self.task_type == "worker" and self.task_index == 0 and "chief" not in self.cluster

    @property
    def worker_addresses(self) -> List[str]:
        return list(self.cluster.get("chief", [])) + list(self.cluster.get("worker", []))

    @property
    def address(self) -> Optional[str]:
        if self.task_type is None:
            return None
        return self.cluster[self.task_type][self.task_index]

    @property
    def worker_id(self) -> str:
        """A short stable name for logs and per-worker temporary directories, e.g. 'worker_1'."""
        return "local" if self.task_type is None else f"{self.task_type}_{self.task_index}"

    def to_tf_config(self) -> str:
        config = {"cluster": self.cluster, "task": {"type": self.task_type, "index": self.task_index}}
        if self.rpc_layer:
            config["rpc_layer"] = self.rpc_layer
        return json.dumps(config)


LOCAL = ClusterInfo(cluster={}, task_type=None, task_index=0)


def _check_address(address, where: str):
    if not isinstance(address, str) or address.count(":") < 1:
        raise UserError(f"TF_CONFIG {where}: address {address!r} is not host:port; write e.g. \"127.0.0.1:12345\"")
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(
            f"TF_CONFIG {where}: address {address!r} is not host:port with a port in 1-65535; "
            "write e.g. \"127.0.0.1:12345\""
        )


def parse_tf_config(text: Optional[str] = None) -> ClusterInfo:
    """Parse TF_CONFIG into a validated ClusterInfo.

    Args:
        text: TF_CONFIG's JSON; None reads the environment's (unset or empty: a one-worker local cluster).

    Raises:
        UserError: invalid JSON, or a cluster/task that does not fit together (the message says what to set).
    """
    if text is None:
        text = os.environ.get("TF_CONFIG", "")
    if not text.strip():
        return LOCAL
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"TF_CONFIG is not valid JSON ({e.msg} at char {e.pos}); "
                        "set it to e.g. {\"cluster\": {\"worker\": [...]}, \"task\": {\"type\": \"worker\", \"index\": 0}}")
    if not isinstance(config, dict):
        raise UserError("TF_CONFIG must be a JSON object with 'cluster' and 'task' keys")
    cluster = config.get("cluster")
    if not cluster:
        raise UserError("TF_CONFIG has no 'cluster'; add \"cluster\": {\"worker\": [\"host:port\", ...]}")
    if not isinstance(cluster, dict):
        raise UserError("TF_CONFIG 'cluster' must be an object mapping task type to a list of host:port")
    seen = {}
    for task_type, addresses in cluster.items():
        if task_type not in TASK_TYPES:
            raise UserError(f"TF_CONFIG cluster has unknown task type {task_type!r}; valid: {', '.join(TASK_TYPES)}")
        if isinstance(addresses, str):
            addresses = [addresses]
        if not isinstance(addresses, list) or not addresses:
            raise UserError(f"TF_CONFIG cluster.{task_type} is empty; list at least one host:port or remove it")
        for i, address in enumerate(addresses):
            _check_address(address, f"cluster.{task_type}[{i}]")
            if address in seen:
                raise UserError(f"TF_CONFIG address {address} is used by both {seen[address]} and "
                                f"{task_type}[{i}]; give every task its own port")
            seen[address] = f"{task_type}[{i}]"
        cluster[task_type] = list(addresses)
    if len(cluster.get("chief", [])) > 1:
        raise UserError("TF_CONFIG cluster.chief has more than one address; a cluster has at most one chief")
    if not any(cluster.get(t) for t in TRAINING_TASK_TYPES):
        raise UserError("TF_CONFIG cluster has no 'worker' or 'chief' tasks; list the training workers")
    task = config.get("task")
    if not task:
        raise UserError("TF_CONFIG has no 'task'; add \"task\": {\"type\": \"worker\", \"index\": N} for this process")
    if not isinstance(task, dict) or "type" not in task:
        raise UserError("TF_CONFIG 'task' must be an object with 'type' and 'index'")
    task_type = task["type"]
    if task_type not in TASK_TYPES:
        raise UserError(f"TF_CONFIG task.type {task_type!r} is unknown; valid: {', '.join(TASK_TYPES)}")
    if task_type not in cluster:
        raise UserError(f"TF_CONFIG task.type is {task_type!r} but the cluster has no {task_type!r} tasks; "
                        f"valid here: {', '.join(cluster)}")
    index = task.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int):
        raise UserError(f"TF_CONFIG task.index must be an integer, got {index!r}")
    if not 0 <= index < len(cluster[task_type]):
        raise UserError(f"TF_CONFIG task.index {index} is out of range: cluster.{task_type} has "
                        f"{len(cluster[task_type])} address(es), so use 0..{len(cluster[task_type]) - 1}")
    return ClusterInfo(cluster=cluster, task_type=task_type, task_index=index, rpc_layer=config.get("rpc_layer"))


def build_tf_config(worker_hosts, task_index: int, task_type: str = "worker") -> str:
    """TF_CONFIG JSON for `worker_hosts` ("h1:p1,h2:p2" or a list) and this process's task index.

    The first worker is the chief (TensorFlow's worker-0 rule), as with `--worker_hosts/--task_index` in peers.

    Args:
        worker_hosts: "h1:p1,h2:p2" or a list of host:port.
        task_index: this process's index in `worker_hosts`.
        task_type: TF_CONFIG's task type (worker).
    """
    if isinstance(worker_hosts, str):
        worker_hosts = [h.strip() for h in worker_hosts.split(",") if h.strip()]
    if not worker_hosts:
        raise UserError("--worker_hosts is empty; give a comma-separated host:port list, e.g. 127.0.0.1:2222,127.0.0.1:2223")
    text = json.dumps({"cluster": {"worker": list(worker_hosts)}, "task": {"type": task_type, "index": task_index}})
    try:
        parse_tf_config(text)
    except UserError as e:
        raise UserError(str(e).replace("TF_CONFIG task.index", "--task_index").replace("TF_CONFIG", "--worker_hosts"))
    return text


def resolve_cluster(worker_hosts=None, task_index=None) -> ClusterInfo:
    """The cluster from --worker_hosts/--task_index if given (and export it as TF_CONFIG), else from TF_CONFIG."""
    if worker_hosts:
        if task_index is None:
            raise UserError("--worker_hosts needs --task_index (this process's position in the list)")
        if os.environ.get("TF_CONFIG"):
            raise UserError("both TF_CONFIG and --worker_hosts are set; use one of them")
        os.environ["TF_CONFIG"] = build_tf_config(worker_hosts, task_index)
    elif task_index not in (None, 0):
        raise UserError("--task_index is set without --worker_hosts; give both, or neither and use TF_CONFIG")
    return parse_tf_config()


def free_ports(count: int, host: str = "127.0.0.1") -> List[int]:
    """`count` distinct free TCP ports on `host`, held open together so none is handed out twice.

    The OS may still give a port away between this call and the worker binding it; the launcher retries with fresh
    ports when a worker fails to bind.
    """
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def local_cluster(num_workers: int, host: str = "127.0.0.1") -> List[str]:
    """TF_CONFIG strings for `num_workers` processes on loopback ports (worker 0 is the chief)."""
    hosts = [f"{host}:{port}" for port in free_ports(num_workers, host)]
    return [build_tf_config(hosts, i) for i in range(num_workers)]


# Per-job worker ports under Slurm: a block of PORT_STRIDE ports per (job, start), below Linux's ephemeral range
# (32768+, where outgoing connections take their local ports), so two jobs sharing a node do not collide unless their
# job ids are equal modulo PORT_SLOTS. Task i on a node uses block + i, so a node runs at most PORT_STRIDE tasks.
SLURM_PORT_LOW, SLURM_PORT_STRIDE, SLURM_PORT_SLOTS = 12000, 32, 640
SLURM_PORT_ENV = "DTF_SLURM_PORT"  # an explicit first port for the job, instead of the one derived from its id
# A rerun or requeue moves to another block: jobs up to 100 ids apart, in their first 3 starts and 2 requeues, never
# share one (their blocks fall in disjoint ranges of the 640).
_RESTART_SHIFT, _REQUEUE_SHIFT = 106, 320


def _split_top_level(text: str) -> List[str]:
    """Split on commas outside brackets: 'a[1,3],b' -> ['a[1,3]', 'b']."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


def _expand_part(part: str, hostlist: str) -> List[str]:
    """One comma-free part, its first bracket expanded and the rest recursively: 'r[1-2]-n[1,3]' -> 4 names."""
    match = re.match(r"^([^\[\]]*)\[([^\]]+)\](.*)$", part)
    if not match:
        if "[" in part or "]" in part:
            raise UserError(f"Slurm host list {hostlist!r} is malformed at {part!r}")
        return [part]
    prefix, ranges, rest = match.groups()
    names = []
    for item in ranges.split(","):
        low, _, high = item.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise UserError(f"Slurm host list {hostlist!r} has a bad range {item!r}")
        for n in range(int(low), int(high or low) + 1):
            names += [f"{prefix}{str(n).zfill(len(low))}{tail}" for tail in _expand_part(rest, hostlist)]
    return names


def expand_hostlist(hostlist: str) -> List[str]:
    """Slurm's compressed host list in its order: 'gpu[09-10],cpu1' -> ['gpu09', 'gpu10', 'cpu1'].

    Our own parser: TF's rejects text after a bracket (and importing it would load TensorFlow in every task)."""
    parts = _split_top_level(hostlist.strip())
    if not all(parts):
        raise UserError(f"Slurm host list {hostlist!r} has an empty entry")
    return [name for part in parts for name in _expand_part(part, hostlist)]


def expand_tasks_per_node(text: str) -> List[int]:
    """Slurm's SLURM_TASKS_PER_NODE: '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise UserError(f"Slurm tasks per node {text!r} is malformed at {part!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def slurm_port(environ: Mapping[str, str] = os.environ) -> int:
    """The first worker port of this job's current start: $DTF_SLURM_PORT, else derived from SLURM_JOB_ID, so
    concurrent jobs on one node use different ports, and moved by each rerun (DTF_LAUNCH_RESTART, counted by the
    sbatch script) and requeue (SLURM_RESTART_COUNT), away from a port that was taken."""
    if environ.get(SLURM_PORT_ENV):
        value = environ[SLURM_PORT_ENV]
        if not value.isdigit() or not 1024 <= int(value) <= 65535 - SLURM_PORT_STRIDE:
            raise UserError(f"{SLURM_PORT_ENV}={value} is not a port in 1024-{65535 - SLURM_PORT_STRIDE}; "
                            f"unset it to derive the ports from the job id")
        return int(value)
    job_id = environ.get("SLURM_JOB_ID", "")
    if not job_id.isdigit():
        raise UserError("SLURM_JOB_ID is not set: run this inside a Slurm job")
    start = int(environ.get("DTF_LAUNCH_RESTART") or 0)
    requeues = int(environ.get("SLURM_RESTART_COUNT") or 0)
    slot = (int(job_id) + _RESTART_SHIFT * start + _REQUEUE_SHIFT * requeues) % SLURM_PORT_SLOTS
    return SLURM_PORT_LOW + slot * SLURM_PORT_STRIDE


def slurm_tf_config(environ: Mapping[str, str] = os.environ, port: Optional[int] = None) -> str:
    """TF_CONFIG for this Slurm task: workers are the step's tasks in rank order; task 0 is the chief.

    Ranks follow the step's node list (Slurm's block distribution), which is the order used here. (TF's
    SlurmClusterResolver sorts host names instead, which disagrees with the ranks for names like node9, node10.)
    Ports: `port` (default `slurm_port(environ)`) + the task's position on its node.
    """
    def var(name):
        for key in (f"SLURM_STEP_{name}", f"SLURM_JOB_{name}"):
            if environ.get(key):
                return environ[key]
        raise UserError(f"SLURM_STEP_{name} is not set: run this inside a Slurm job step (srun)")

    if "SLURM_PROCID" not in environ:
        raise UserError("SLURM_PROCID is not set: run this inside a Slurm job step (srun)")
    hosts = expand_hostlist(var("NODELIST"))
    per_node = expand_tasks_per_node(var("TASKS_PER_NODE"))
    if len(per_node) != len(hosts):
        raise UserError(f"Slurm lists {len(hosts)} node(s) but tasks-per-node for {len(per_node)}")
    if max(per_node) > SLURM_PORT_STRIDE:
        raise UserError(f"{max(per_node)} tasks on one node; dtf gives a Slurm job at most {SLURM_PORT_STRIDE} "
                        "ports per node, so use fewer tasks per node (one task can drive all of a node's GPUs)")
    port = slurm_port(environ) if port is None else port
    workers = [f"{host}:{port + offset}" for host, count in zip(hosts, per_node) for offset in range(count)]
    rank = int(environ["SLURM_PROCID"])
    if not 0 <= rank < len(workers):
        raise UserError(f"SLURM_PROCID={rank} is outside the step's {len(workers)} task(s)")
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": rank}})
