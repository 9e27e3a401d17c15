"""The strategy factory: one public function, `create_strategy`, and the string→object mappers behind it.

Shaped after Model Garden's `distribute_utils.get_distribution_strategy`, but options that do not apply to the chosen
strategy are rejected instead of silently ignored.
"""
import os
import subprocess
import sys
from typing import Optional, Sequence

import tensorflow as tf

from dtf.base.errors import UserError
from dtf.base.logs import get_logger
from dtf.cluster import netns, tf_config as cluster_lib
from dtf.config.choices import COMMUNICATIONS, CROSS_DEVICE_OPS, DEFAULT_CLUSTER_TIMEOUT_S, STRATEGIES
from dtf.upstream import keras as keras_compat

log = get_logger(__name__)



def _pick(name: str, valid: Sequence[str], what: str) -> str:
    key = (name or "").strip().lower()
    if key not in valid:
        raise UserError(f"unknown {what} {name!r}; valid: {', '.join(valid)}")
    return key


def communication_options(name: str) -> tf.distribute.experimental.CommunicationOptions:
    impl = {
        "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
        "ring": tf.distribute.experimental.CommunicationImplementation.RING,
        "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
    }[_pick(name, COMMUNICATIONS, "communication")]
    return tf.distribute.experimental.CommunicationOptions(implementation=impl)


def cross_device_ops(name: Optional[str], num_packs: int = 1) -> Optional[tf.distribute.CrossDeviceOps]:
    if name is None:
        return None
    key = _pick(name, CROSS_DEVICE_OPS, "cross-device ops")
    if key == "nccl":
        return tf.distribute.NcclAllReduce(num_packs=num_packs)
    if key == "hierarchical_copy":
        return tf.distribute.HierarchicalCopyAllReduce(num_packs=num_packs)
    return tf.distribute.ReductionToOneDevice()


def simulate_cpu_devices(count: int):
    """Split the host CPU into `count` logical devices so MirroredStrategy has replicas on a laptop.

    TensorFlow fixes its device list the first time it initializes the runtime; after that this can only confirm the
    split already in place, and otherwise says why it cannot apply it.

    Args:
        count: logical CPU devices (>= 1).
    """
    if count < 1:
        raise UserError(f"--num_cpu_devices must be >= 1, got {count}")
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have < count:  # more than asked for is fine: mirrored uses the first `count`
            raise UserError(
                f"--num_cpu_devices={count} came too late: TensorFlow already initialized {have} CPU device(s) in "
                "this process. Create the strategy before running any TensorFlow op (first thing in the program)."
            ) from None


def _gpu_devices(num_gpus: Optional[int]):
    available = len(tf.config.list_physical_devices("GPU"))
    if num_gpus is None:
        return available
    if num_gpus > available:
        raise UserError(f"--num_gpus={num_gpus} but this machine has {available} GPU(s)")
    return num_gpus


def _reject(strategy: str, **options):
    given = [k for k, v in options.items() if v not in (None, False)]
    if given:
        raise UserError(f"option(s) {', '.join(given)} do not apply to strategy {strategy!r}; remove them")


def create_strategy(
    name: str = "auto",
    *,
    num_cpu_devices: Optional[int] = None,
    num_gpus: Optional[int] = None,
    devices: Optional[Sequence[str]] = None,
    communication: Optional[str] = None,
    cross_device_ops_name: Optional[str] = None,
    num_packs: int = 1,
    cluster_timeout_s: float = DEFAULT_CLUSTER_TIMEOUT_S,
) -> tf.distribute.Strategy:
    """Build a `tf.distribute.Strategy` by name.

    `auto` is multi_worker when TF_CONFIG names more than one training task, mirrored when there is more than one GPU
    or `num_cpu_devices > 1`, else the default strategy. Creating a mirrored or multi_worker strategy also applies the
    Keras 3 fixes (`dtf.upstream.keras`).

    Args:
        name: auto, default, one_device, mirrored or multi_worker.
        num_cpu_devices: split the host CPU into this many logical devices (mirrored replicas without a GPU); must
            come before TensorFlow initializes its devices.
        num_gpus: use the first N GPUs (mirrored); default all.
        devices: explicit device names for mirrored/one_device, e.g. ["/gpu:0", "/gpu:1"].
        communication: multi_worker collectives: auto, ring or nccl.
        cross_device_ops_name: mirrored all-reduce: nccl, hierarchical_copy or reduce_to_one.
        num_packs: gradient packing for nccl/hierarchical_copy.
        cluster_timeout_s: multi_worker: how long to wait for every worker before one clear error.

    Raises:
        UserError: an unknown name or an option that does not apply to it (the message names the argument).
    """
    name = _pick(name, STRATEGIES, "strategy")
    info = cluster_lib.parse_tf_config()
    if num_packs < 1:
        raise UserError(f"--num_packs must be >= 1, got {num_packs}")
    if num_packs != 1 and (cross_device_ops_name or "").lower() not in ("nccl", "hierarchical_copy"):
        raise UserError(f"--num_packs={num_packs} applies only with --cross_device_ops=nccl or hierarchical_copy")
    if name == "auto":
        if info.is_multi_worker:
            name = "multi_worker"
        elif (num_cpu_devices or 0) > 1 or devices or _gpu_devices(num_gpus) > 1:
            name = "mirrored"
        else:
            name = "default"
    if info.is_multi_worker and name != "multi_worker":
        raise UserError(f"TF_CONFIG names {info.num_workers} workers but strategy is {name!r}; "
                        "use --strategy=multi_worker (or auto), or unset TF_CONFIG")

    if name == "default":
        _reject(name, num_cpu_devices=num_cpu_devices if num_cpu_devices != 1 else None, num_gpus=num_gpus,
                devices=devices, communication=communication, cross_device_ops=cross_device_ops_name)
        strategy = tf.distribute.get_strategy()
    elif name == "one_device":
        _reject(name, num_cpu_devices=num_cpu_devices if num_cpu_devices != 1 else None,
                communication=communication, cross_device_ops=cross_device_ops_name)
        if devices and len(devices) != 1:
            raise UserError(f"strategy 'one_device' takes exactly one device, got {list(devices)}")
        device = devices[0] if devices else ("/gpu:0" if _gpu_devices(num_gpus) > 0 else "/cpu:0")
        strategy = tf.distribute.OneDeviceStrategy(device)
    elif name == "mirrored":
        _reject(name, communication=communication)
        strategy = _mirrored(num_cpu_devices, num_gpus, devices, cross_device_ops_name, num_packs)
    else:  # multi_worker
        _reject(name, num_cpu_devices=num_cpu_devices if num_cpu_devices != 1 else None, devices=devices,
                cross_device_ops=cross_device_ops_name)
        if not info.is_multi_worker:
            log.warning("strategy multi_worker without a multi-worker TF_CONFIG: training as one worker (a 1-worker "
                        "cluster); for more, start it with `python -m dtf.launch --num_workers=2 -- python -m dtf.run "
                        "<the same flags>`")
        keras_compat.apply()
        strategy = _multi_worker(info, communication or "auto", cluster_timeout_s)
    log.info(describe(strategy, info))
    return strategy


def _mirrored(num_cpu_devices: Optional[int], num_gpus: Optional[int], devices: Optional[Sequence[str]],
              cross_device_ops_name: Optional[str], num_packs: int) -> tf.distribute.MirroredStrategy:
    """Over the given devices, else the simulated CPU devices, else the GPUs (or the CPU when there are none)."""
    if num_cpu_devices:
        if num_gpus:
            raise UserError("give --num_cpu_devices (simulated CPU replicas) or --num_gpus, not both")
        simulate_cpu_devices(num_cpu_devices)
    if devices is None:
        if num_cpu_devices:
            devices = [d.name for d in tf.config.list_logical_devices("CPU")][:num_cpu_devices]
        else:
            gpus = _gpu_devices(num_gpus)
            devices = [f"/gpu:{i}" for i in range(gpus)] if gpus else ["/cpu:0"]
    keras_compat.apply()
    return tf.distribute.MirroredStrategy(
        devices=list(devices), cross_device_ops=cross_device_ops(cross_device_ops_name, num_packs))


# Runs in a separate process: the stuck constructor holds the GIL, so no thread of ours could run meanwhile.
_WATCHDOG = """
import os, signal, sys, select
pid, timeout, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
ready, _, _ = select.select([sys.stdin], [], [], timeout)
if not ready:
    sys.stderr.write(message + "\\n")
    sys.stderr.flush()
    os.kill(pid, signal.SIGKILL)  # TF's runtime ignores SIGTERM while it waits for the cluster
"""


def _multi_worker(info, communication: str, timeout_s: float):
    """MultiWorkerMirroredStrategy, failing clearly if the other workers do not come up within `timeout_s`.

    TF waits for missing peers forever inside the constructor (in C++, where neither its cluster-wait timeout nor the
    coordination service's register timeout took effect on TF 2.21), which looks like a silent hang. A watchdog
    process ends this one with one clear line instead; a half-joined cluster cannot be recovered in-process.
    Without TF_CONFIG there are no peers and TF starts no server: a local strategy, nothing to wait for or expose.
    """
    options = communication_options(communication)
    if info.address is None:
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if not netns.isolated_by_launcher():
        port = info.address.rpartition(":")[2]
        log.warning(f"{info.worker_id}: TensorFlow's server listens on 0.0.0.0:{port} (every interface, "
                    "unauthenticated, runs any graph it is sent); run multi-worker jobs on a trusted network only")
    others = [a for a in info.worker_addresses if a != info.address]
    message = (f"dtf: error: {info.worker_id} could not reach the other workers ({', '.join(others)}) within "
               f"{timeout_s:g}s; start every worker in TF_CONFIG and check the addresses (or raise --cluster_timeout)")
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(timeout_s), message],
                                stdin=subprocess.PIPE)
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    finally:
        watchdog.stdin.close()  # wakes the watchdog, which exits quietly
        watchdog.wait()


def strategy_name(strategy: tf.distribute.Strategy) -> str:
    """The --strategy name of a strategy object, for user output: TF's class names include private ones
    (`_DefaultDistributionStrategy`) and an internal one for multi_worker (`CollectiveAllReduceStrategy`)."""
    for cls, name in ((tf.distribute.MultiWorkerMirroredStrategy, "multi_worker"),
                      (tf.distribute.MirroredStrategy, "mirrored"), (tf.distribute.OneDeviceStrategy, "one_device")):
        if isinstance(strategy, cls):
            return name
    return "default" if type(strategy).__name__ == "_DefaultDistributionStrategy" else type(strategy).__name__


def describe(strategy: tf.distribute.Strategy, info: Optional[cluster_lib.ClusterInfo] = None) -> str:
    """One line: strategy, replicas, devices, worker/task and chief."""
    info = info or cluster_lib.parse_tf_config()
    kind = strategy_name(strategy)
    try:
        devices = strategy.extended.worker_devices
    except RuntimeError:  # the default strategy has no device list
        devices = ("default",)
    short = ",".join(d.split("/")[-1].replace("device:", "") for d in devices)
    return (f"strategy={kind} replicas={strategy.num_replicas_in_sync} devices={short} "
            f"worker={info.worker_id}/{info.num_workers} chief={info.is_chief}")
