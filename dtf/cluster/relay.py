"""A relay into a private network namespace: one TCP address outside it (an `http://` MLflow tracking server)
reachable from the processes inside it, and nothing else.

`dtf.launch --isolate_network` moves itself and its workers into a namespace whose only interface is loopback
(dtf.cluster.netns), where a tracking server on the host or elsewhere is out of reach. Before isolating, the launcher
starts the outer end: a process of its own (so it stays in the host's namespace) that listens on a Unix socket, a path
in the filesystem that both namespaces see, and connects each connection on to the server's host:port. After
isolating, the inner end (a thread of the launcher) listens on a loopback port inside the namespace and connects each
connection on to that socket. The workers learn the inner address from ROUTE_ENV; their tracking URI, and what they
record of it, stays the server's. Only connections from inside to that one server are carried, so the namespace still
exposes nothing. TLS (https://) cannot be carried this way: the certificate names the server, not 127.0.0.1.
"""
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, Optional, Tuple
from urllib.parse import urlsplit

from dtf.base.errors import UserError
from dtf.cluster import procs

ROUTE_ENV = "DTF_TRACKING_ROUTE"  # JSON {tracking URI (dtf.tracking.store.canonical): the URI to connect to instead}
START_TIMEOUT_S = 10.0
_CHUNK = 1 << 16
_PR_SET_PDEATHSIG = 1


def route(uri: str) -> str:
    """The URI to connect to for tracking URI `uri`: its relay inside a launcher's namespace, else itself."""
    try:
        return json.loads(os.environ.get(ROUTE_ENV) or "{}").get(uri, uri)
    except ValueError:
        return uri


def address(uri: str) -> Tuple[str, int]:
    parts = urlsplit(uri)
    return parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)


def _pump(source: socket.socket, target: socket.socket):
    try:
        while True:
            data = source.recv(_CHUNK)
            if not data:
                break
            target.sendall(data)
    except OSError:
        pass
    finally:
        for sock, how in ((target, socket.SHUT_WR), (source, socket.SHUT_RD)):
            try:
                sock.shutdown(how)
            except OSError:
                pass


def _bridge(a: socket.socket, b: socket.socket):
    """Carry bytes both ways until both directions are done, then close both."""
    back = threading.Thread(target=_pump, args=(b, a), daemon=True)
    back.start()
    _pump(a, b)
    back.join()
    a.close()
    b.close()


def _serve(listener: socket.socket, connect):
    """Accept on `listener` forever; bridge each connection to `connect()` (a connection that fails is dropped)."""
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return  # closed
        try:
            upstream = connect()
        except OSError:
            client.close()
            continue
        threading.Thread(target=_bridge, args=(client, upstream), daemon=True).start()


def serve_outside(path: str, host: str, port: int):
    """The outer end (its own process, in the host's namespace): Unix socket `path` → TCP host:port."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.rename(path + ".tmp", path)  # the path appears only once it accepts
    _serve(listener, lambda: socket.create_connection((host, port), timeout=30))


def _end_with_launcher():
    """Linux: the outer end gets SIGKILL when the launcher dies, however it dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Relay:
    """Both ends for one tracking URI: `start` before the namespace changes, `open_inside` after, `stop` at the end."""

    def __init__(self, uri: str):
        self.uri = uri
        self._dir = tempfile.mkdtemp(prefix="dtf-relay-")
        self.path = os.path.join(self._dir, "socket")
        self._outer: Optional[subprocess.Popen] = None
        self._inner: Optional[socket.socket] = None

    def start(self):
        host, port = address(self.uri)
        self._outer = subprocess.Popen(procs.python_command("-m", "dtf.cluster.relay", self.path, host, str(port)),
                                       stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_end_with_launcher)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not os.path.exists(self.path):
            if self._outer.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise UserError(f"--tracking_uri={self.uri}: the relay into the private network namespace did not "
                                "start; rerun with --noisolate_network (on a trusted network)")
            time.sleep(0.02)
        return self

    def open_inside(self) -> str:
        """Listen on loopback inside the (new) namespace; the URI workers connect to instead of `uri`."""
        self._inner = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._inner.bind(("127.0.0.1", 0))
        self._inner.listen(64)

        def connect():
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.path)
            return upstream

        threading.Thread(target=_serve, args=(self._inner, connect), name="dtf-tracking-relay", daemon=True).start()
        parts = urlsplit(self.uri)
        return parts._replace(netloc=f"127.0.0.1:{self._inner.getsockname()[1]}").geturl()

    def stop(self):
        if self._inner is not None:
            self._inner.close()
        if self._outer is not None:
            procs.stop_all([self._outer])
        shutil.rmtree(self._dir, ignore_errors=True)


def start_all(uris) -> Dict[str, Relay]:
    """A started relay for each http:// URI of `uris` (an https:// one cannot be relayed: a UserError)."""
    relays = {}
    try:
        for uri in sorted(set(uris)):
            if uri.startswith("https://"):
                raise UserError(f"--tracking_uri={uri} is out of reach in --isolate_network's private network "
                                "namespace, and TLS cannot be relayed into it; rerun with --noisolate_network (on a "
                                "trusted network), or track to a sqlite:/// or directory store on shared storage")
            relays[uri] = Relay(uri).start()
    except BaseException:
        stop_all(relays)
        raise
    return relays


def open_inside(relays: Dict[str, Relay]):
    """After the namespace changed: each relay's inner end, announced to the workers in ROUTE_ENV."""
    if relays:
        os.environ[ROUTE_ENV] = json.dumps({uri: relay.open_inside() for uri, relay in relays.items()})


def stop_all(relays: Dict[str, Relay]):
    for relay in relays.values():
        relay.stop()


if __name__ == "__main__":
    serve_outside(sys.argv[1], sys.argv[2], int(sys.argv[3]))
