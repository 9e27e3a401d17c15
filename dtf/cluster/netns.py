"""A private network namespace with only loopback, for the local launcher's worker group.

TensorFlow's gRPC server binds `0.0.0.0:PORT` whatever address TF_CONFIG names (`grpc_server_lib.cc`, no option),
and it runs any graph a client sends: on a shared network a local multi-worker job is remote code execution. The OS
can fence it: in a new network namespace whose only interface is `lo`, "every interface" is loopback. The launcher
moves itself there before starting workers, which inherit it; nothing else is reachable from inside either (no
remote model_dir, no downloads), so it can be turned off, with a warning naming the open ports.

Linux only. As root a network namespace alone; otherwise a user namespace too (unprivileged user namespaces must be
enabled). `unshare(2)` then `ip link set lo up` done with ioctls, so no `ip` binary is needed.
"""
import ctypes
import errno
import fcntl
import os
import socket
import struct
from typing import Optional

# Set by the launcher for its workers: they are in its private namespace, so their open ports are not exposed.
ISOLATED_ENV = "DTF_NETWORK_ISOLATED"
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
IFF_UP, IFF_RUNNING = 0x1, 0x40


def isolate() -> Optional[str]:
    """Move this process (call it before starting threads) into a new network namespace with loopback up. Returns
    None, or why the OS refused (the caller decides whether that is fatal)."""
    if not hasattr(os, "getuid") or not os.path.exists("/proc/self/ns/net"):
        return "this OS has no network namespaces"
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) != 0:
        code = ctypes.get_errno()
        return f"unshare() failed: {os.strerror(code)}" + (
            " (unprivileged user namespaces are disabled here)" if code in (errno.EPERM, errno.ENOSPC) else "")
    if flags & CLONE_NEWUSER:  # be root inside, as ourselves outside, so that we may configure lo
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        name = b"lo".ljust(16, b"\0")
        current = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH", name, 0)))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH", name, current | IFF_UP | IFF_RUNNING))
    return None


def isolated_by_launcher() -> bool:
    return os.environ.get(ISOLATED_ENV) == "1"


def interfaces(pid: int) -> list:
    """The network interfaces process `pid` sees (its namespace's), from /proc."""
    with open(f"/proc/{pid}/net/dev") as f:
        return [line.split(":")[0].strip() for line in f.readlines()[2:]]
