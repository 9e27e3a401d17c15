"""What a local multi-worker group exposes, read from the OS: TensorFlow's servers bind every interface, so the
launcher runs the group in a private network namespace with only loopback; with --noisolate_network the ports are
open on the host's interfaces and each worker warns, naming its port."""
import os
import re
import sys

import pytest

from dtf.cluster import netns
from helpers import Launcher

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


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/ns/net"), reason="network namespaces are Linux only")
def test_local_data_service_listens_on_loopback_only(tmp_path):
    """dtf.run --data_service=local:1 moves itself into a private loopback-only namespace before TensorFlow starts
    (before its --task module is imported), so the dispatcher and worker it starts (TF binds them to every interface)
    are not on this host's interfaces, and the run, their only consumer, still reaches them."""
    import signal
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", netns.ISOLATED_ENV)}
    run = subprocess.Popen([sys.executable, "-m", "dtf.run", f"--task={repo}/tests/tasks_for_tests.py:Regression",
                            "--epochs=200", "--data_service=local:1", f"--model_dir={tmp_path / 'run'}"],
                           cwd=str(tmp_path), env=dict(env, PYTHONPATH=repo),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in run.stdout:
            lines.append(line)
            m = re.search(r"tf\.data service: dispatcher 127\.0\.0\.1:(\d+) \(pid (\d+)\), 1 worker\(s\) on (\d+)", line)
            if m:
                break
        assert m, "".join(lines)
        ports, dispatcher = {int(m[1]), int(m[3])}, int(m[2])
        assert ports <= listening_ports(dispatcher)  # up, on every interface ... of a namespace with loopback only
        assert netns.interfaces(dispatcher) == ["lo"] and netns.interfaces(run.pid) == ["lo"]
        assert os.readlink(f"/proc/{run.pid}/ns/net") == os.readlink(f"/proc/{dispatcher}/ns/net")
        assert not ports & listening_ports(), ports  # nothing on this host's interfaces
        for line in run.stdout:  # and the run trains from them
            lines.append(line)
            if line.startswith("epoch 1/200:"):
                break
        assert lines[-1].startswith("epoch 1/200:"), "".join(lines)
        run.send_signal(signal.SIGTERM)  # enough seen; the run stops early (preempted) and takes its servers along
        rest = run.communicate(timeout=120)[0]
        assert run.returncode == 143, "".join(lines) + rest
        output = "".join(lines) + rest
        assert "binds its servers" not in output and "Traceback" not in output
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
