"""A private network namespace whose only interface is loopback, for tests that start servers binding every
interface (Slurm's daemons, Ray, TensorFlow's gRPC servers): nothing in it is reachable from, or reaches, any network.

`with LoopbackNamespace() as ns: subprocess.run(ns.wrap(["cmd"]))`. On exit every process still in the namespace is
killed, then the namespace itself. Needs root (or unprivileged user namespaces), `unshare`, `nsenter` and `ip`.
"""
import os
import shutil
import signal
import subprocess
from typing import List, Optional, Sequence

import psutil

TOOLS = ("unshare", "nsenter", "ip")
# Daemons and `ip` live in sbin directories, which a non-login PATH (e.g. CI's) may lack.
PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
LIFETIME_S = 3600  # the namespace's holder process ends by itself after this, whatever happens to the test


class LoopbackNamespace:
    def __init__(self):
        self.holder: Optional[subprocess.Popen] = None

    @staticmethod
    def unavailable() -> Optional[str]:
        missing = [t for t in TOOLS if shutil.which(t, path=PATH) is None]
        if missing:
            return f"not installed: {', '.join(missing)}"
        return None if os.geteuid() == 0 else "needs root for a private network namespace"

    def __enter__(self) -> "LoopbackNamespace":
        # Loopback up, plus a second loopback address: glibc's getaddrinfo(AI_ADDRCONFIG) (used by Slurm and Ray)
        # finds no IPv4 at all when 127.0.0.1 is the only address.
        self.holder = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", "ip link set lo up && ip addr add 127.0.0.2/8 dev lo && echo ready && "
             f"exec sleep {LIFETIME_S}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, env=dict(os.environ, PATH=PATH))
        ready = self.holder.stdout.readline().strip()
        if ready != "ready":
            output = ready + self.holder.stdout.read()
            self.__exit__()
            raise OSError(f"cannot make a private network namespace: {output.strip()}")
        return self

    def wrap(self, command: Sequence[str]) -> List[str]:
        """`command`, run inside the namespace."""
        return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", *command]

    def processes(self) -> List[psutil.Process]:
        """Every process in the namespace but its holder (daemons detach from their starters; this finds them)."""
        try:
            ns = os.readlink(f"/proc/{self.holder.pid}/ns/net")
        except OSError:
            return []
        found = []
        for p in psutil.process_iter():
            try:
                if p.pid != self.holder.pid and os.readlink(f"/proc/{p.pid}/ns/net") == ns:
                    found.append(p)
            except OSError:
                continue
        return found

    def __exit__(self, *exc):
        if self.holder is None:
            return
        for p in self.processes():
            try:
                p.kill()
            except psutil.Error:
                pass
        if self.holder.poll() is None:
            os.killpg(self.holder.pid, signal.SIGKILL)
        self.holder.wait()
        self.holder.stdout.close()
        self.holder = None
