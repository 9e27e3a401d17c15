"""What a local multi-worker group exposes, read from the OS: TensorFlow's servers bind every interface, so the
launcher runs the group in a private network namespace with only loopback; with --noisolate_network the ports are
open on the host's interfaces and each worker warns, naming its port."""
import os
import re
import sys

import pytest

from dtf import netns
from test_launch import Launcher

WORKER = """
import os, sys, time
import dtf
strategy = dtf.create_strategy()  # multi_worker from TF_CONFIG: TensorFlow's gRPC server is up
print("READY", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.1)
"""


def listening_ports(pid="self") -> set:
    """TCP ports in LISTEN state in the network namespace of process `pid`."""
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.readlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _group(tmp_path, *launch_flags):
    script, stop = tmp_path / "worker.py", tmp_path / "stop"
    script.write_text(WORKER)
    launcher = Launcher(["--num_workers=2", "--timeout=240", *launch_flags, "--", sys.executable, str(script),
                         str(stop)], str(tmp_path))
    launcher.wait_for(r"^\[chief\] READY$", 200)
    launcher.wait_for(r"^\[worker 1\] READY$", 200)
    return launcher, stop


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/ns/net"), reason="network namespaces are Linux only")
def test_workers_listen_on_loopback_only(tmp_path):
    launcher, stop = _group(tmp_path)
    try:
        host_ports = listening_ports()
        for role, pid, address in launcher.workers:
            port = int(address.rsplit(":", 1)[1])
            assert port in listening_ports(pid), (role, port)  # TF's server is up, bound to every interface ...
            assert netns.interfaces(pid) == ["lo"], role  # ... of a namespace that has loopback only
            assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
            assert port not in host_ports, (role, port)  # nothing of the group on this host's interfaces
        print(f"isolated: worker ports {[a for _, _, a in launcher.workers]}; host listens on none of them")
        stop.write_text("")
        assert launcher.wait(60) == 0, launcher.output
        assert "listens on 0.0.0.0" not in launcher.output
    finally:
        launcher.cleanup()


@pytest.mark.slow
def test_without_isolation_the_ports_are_open_and_named(tmp_path):
    launcher, stop = _group(tmp_path, "--noisolate_network")
    try:
        host_ports = listening_ports()
        for role, pid, address in launcher.workers:
            port = int(address.rsplit(":", 1)[1])
            assert port in host_ports, (role, port)
            assert re.search(rf"TensorFlow's server listens on 0\.0\.0\.0:{port} \(every interface", launcher.output)
        stop.write_text("")
        assert launcher.wait(60) == 0, launcher.output
    finally:
        launcher.cleanup()
