"""--data_service: training input produced by a tf.data service instead of (only) the training processes.

`grpc://host:port` uses a running dispatcher; `local:N` starts a dispatcher and N tf.data workers as processes of
their own (`python -m dtf.cluster.data_service dispatcher|worker ...`) for the run's lifetime and stops them afterwards.

Why the service keeps dtf's guarantees (see dtf.distribute.inputs for the pipeline it serves): each training input
pipeline's pass (with --epoch_mode=pass, the epoch cut from it) is split into `jobs` parts by batch position (batch i
goes to part i % jobs). Each part is registered as its own dataset whose only source element is the part number
(`from_tensors(k).flat_map(...)`), and read in
`distributed_epoch` mode (ShardingPolicy.DYNAMIC): DYNAMIC hands each source split to one service worker, and one
split means one worker produces the whole part, exactly once, in order. The consumer interleaves the parts
round-robin, which restores the local order batch for batch. Splitting the real source instead (DYNAMIC over files
or records) would spread work finer, but then the order depends on timing, and positional ops in a share (`shard`,
`take`) apply to each worker's splits, not the whole share: measured, `range(100).shard(2, 0)` came out as 101
elements, 80 distinct, over 2 epochs. ShardingPolicy.OFF would have every service worker produce every element.

This module does not import TensorFlow except in the server processes (it is in dtf's light set).
"""
import contextlib
import ctypes
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator, List, Optional

from dtf.base.errors import UserError
from dtf.base.logs import get_logger
from dtf.cluster import netns, procs, tf_config as cluster_lib
from dtf.config import specs

log = get_logger(__name__)

FLAG = specs.DATA_SERVICE_FLAG
HOST = "127.0.0.1"
DEFAULT_JOBS = 4  # parts per pass for a grpc:// service, whose worker count dtf does not know
START_TIMEOUT_S = 60.0
PR_SET_PDEATHSIG = 1


def reachable(address: str, timeout_s: float = 2.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


@dataclasses.dataclass(frozen=True)
class Service:
    """A usable service: `target` for tf.data (grpc://host:port) and how many parts to split each pass into."""

    target: str
    jobs: int


@contextlib.contextmanager
def running(text: Optional[str]) -> Iterator[Optional[Service]]:
    """The service --data_service names, for the duration of the block (None without the flag). local:N processes
    are stopped and reaped when the block ends, however it ends."""
    if not text:
        yield None
        return
    spec = specs.parse_data_service(text)
    if spec.address:
        if not reachable(spec.address):
            raise UserError(f"--{FLAG}={text}: nothing answers at {spec.address}; start the tf.data dispatcher "
                            f"there or fix the address (or use --{FLAG}=local:N)")
        yield Service(f"grpc://{spec.address}", DEFAULT_JOBS)
        return
    with local(spec.local_workers) as service:
        yield service


def fence(text: Optional[str], paths=(), multi_worker: bool = False) -> Optional[str]:
    """With --data_service=local:N, move this process into a private network namespace with only loopback (as
    dtf.launch does for its workers) before TensorFlow starts: TensorFlow binds the tf.data servers to every interface
    (`0.0.0.0`/`[::]`, hard-coded in its `GrpcDataServerBase::Start`; no config field sets an address), so only the
    OS can fence them, and the servers are reachable only from their consumer if that consumer is inside too.
    Not done when the run needs the network: the peers of a multi-worker job, or a remote path (`paths`, e.g.
    model_dir, data_dir). Returns None when fenced (or nothing to fence), else why not; `local` then warns with it."""
    global _unfenced
    try:
        if not text or not specs.parse_data_service(text).local_workers or netns.isolated_by_launcher():
            return None
    except UserError:  # the run reports it after parsing every flag
        return None
    remote = [p for p in paths if p and "://" in str(p)]
    if multi_worker:
        _unfenced = "the other workers of this multi-worker run must be reachable"
    elif remote:
        _unfenced = f"{remote[0]} needs the network"
    elif os.path.isdir("/proc/self/task") and len(os.listdir("/proc/self/task")) > 1:  # (a --task imported TF)
        _unfenced = "it already runs threads, which a namespace change would leave outside"
    else:
        _unfenced = netns.isolate()
        if _unfenced is None:
            os.environ[netns.ISOLATED_ENV] = "1"  # this process and its children see only loopback
    return _unfenced


_unfenced: Optional[str] = None  # why `fence` left this process on the host's network


def server_commands(dispatcher_port: int, worker_ports: List[int]) -> List[List[str]]:
    """The dispatcher's command, then each worker's."""
    dispatcher = procs.python_command("-m", "dtf.cluster.data_service", "dispatcher", str(dispatcher_port))
    return [dispatcher] + [procs.python_command("-m", "dtf.cluster.data_service", "worker", str(port),
                                                f"{HOST}:{dispatcher_port}") for port in worker_ports]


@contextlib.contextmanager
def local(num_workers: int, timeout_s: float = START_TIMEOUT_S) -> Iterator[Service]:
    """A dispatcher and `num_workers` workers on free loopback ports, each its own process group; healthy (all
    listening) before this yields, all stopped (SIGTERM, then SIGKILL) and reaped after."""
    ports = cluster_lib.free_ports(num_workers + 1, HOST)
    if not netns.isolated_by_launcher():
        log.warning(f"tf.data service on ports {','.join(map(str, ports))}: TensorFlow binds its servers to every "
                    f"interface (no option), unauthenticated, and this process is not in a private network namespace"
                    f"{f' ({_unfenced})' if _unfenced else ''}; run on a trusted network only")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.pop("TF_CONFIG", None)  # a server is no training task
    servers: List[subprocess.Popen] = []
    try:
        for command in server_commands(ports[0], ports[1:]):
            servers.append(subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            start_new_session=True, preexec_fn=_die_with_parent))
        _wait_healthy(servers, ports, timeout_s)
        log.info(f"tf.data service: dispatcher {HOST}:{ports[0]} (pid {servers[0].pid}), {num_workers} worker(s) "
                 f"on {','.join(map(str, ports[1:]))}")
        yield Service(f"grpc://{HOST}:{ports[0]}", num_workers)
    finally:
        procs.stop_all(servers)


def _die_with_parent():
    """Linux: SIGKILL this server when the process that started it dies, even by SIGKILL (no finally runs then)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _wait_healthy(servers: List[subprocess.Popen], ports: List[int], timeout_s: float):
    deadline = time.monotonic() + timeout_s
    waiting = list(zip(servers, ports))
    while waiting:
        for server, port in list(waiting):
            if server.poll() is not None:
                raise UserError(f"--{FLAG}: a tf.data service process (port {port}) exited with "
                                f"{procs.describe_returncode(server.returncode)} before serving; see its output above")
            if reachable(f"{HOST}:{port}", timeout_s=0.5):
                waiting.remove((server, port))
        if waiting and time.monotonic() > deadline:
            raise UserError(f"--{FLAG}: the tf.data service did not start within {timeout_s:g}s (ports "
                            f"{', '.join(str(p) for _, p in waiting)}); retry, or start one and give grpc://HOST:PORT")
        time.sleep(0.2)


def serve(role: str, port: int, dispatcher: Optional[str] = None, host: str = HOST):
    """Run one server in this process until it is killed. A worker registers with the dispatcher as host:port, the
    address consumers dial (TF binds every interface whatever `host` is)."""
    from dtf.base import versions

    versions.load_tensorflow()
    import tensorflow as tf

    service = tf.data.experimental.service
    if role == "dispatcher":
        server = service.DispatchServer(service.DispatcherConfig(port=port))
    else:
        server = service.WorkerServer(service.WorkerConfig(dispatcher_address=dispatcher, worker_address=f"{host}:{port}",
                                                           port=port))
    server.join()


def wait(addresses: List[str], timeout_s: float = START_TIMEOUT_S) -> int:
    """Exit status 0 once every host:port answers, 2 (with one line) if one does not within `timeout_s`: the health
    check batch scripts run before training."""
    deadline = time.monotonic() + timeout_s
    for address in addresses:
        while not reachable(address, timeout_s=1.0):
            if time.monotonic() > deadline:
                sys.stderr.write(f"dtf.cluster.data_service: error: nothing answers at {address} after "
                                 f"{timeout_s:g}s\n")
                return 2
            time.sleep(0.5)
    return 0


USAGE = """python -m dtf.cluster.data_service dispatcher PORT
python -m dtf.cluster.data_service worker PORT DISPATCHER_HOST:PORT [ADVERTISED_HOST]
python -m dtf.cluster.data_service wait HOST:PORT..."""

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["wait"] and args[1:]:
        sys.exit(wait(args[1:]))
    if args[:1] == ["dispatcher"] and len(args) == 2 or args[:1] == ["worker"] and len(args) in (3, 4):
        serve(args[0], int(args[1]), *args[2:])
    else:
        sys.stderr.write(f"usage:\n{USAGE}\n")
        sys.exit(2)
