"""`python -m dtf.launch`: bad input, dry run, stopping the group when a worker fails or the launcher is signalled,
port retries, the timeout, and a SIGKILLed worker whose restarted group ends with the uninterrupted run's weights.

Every process a test starts is checked by PID afterwards: the launcher must leave nothing behind."""
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

from dtf.cluster import tf_config as cluster_lib
from dtf import launch
from dtf.cluster import procs
from helpers import REPO, alive, launch_env, max_weight_delta, process, write_script


# --- bad input -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, flag", [
    (["--num_workers=0", "--", "python"], "--num_workers"),
    (["--num_workers=-2", "--", "python"], "--num_workers"),
    (["--", "python"], "--num_workers"),
    (["--num_workers=2"], "'--'"),
    (["--num_workers=2", "--"], "'--'"),
    (["--num_workers=2", "python", "train.py"], "'--'"),
    (["--num_workers=2", "--max_restarts=-1", "--", "python"], "--max_restarts"),
    (["--num_workers=2", "--timeout=0", "--", "python"], "--timeout"),
    (["--num_workers=2", "--emit=helm", "--", "python"], "--emit"),
    (["--num_workers=2", "--emit=tfjob", "--dry_run", "--", "python"], "--dry_run"),
    (["--num_workers=2", "--image=x", "--", "python"], "--image"),
    (["--num_workers=2", "--emit=slurm", "--job_name=Bad_Name", "--", "python"], "--job_name"),
    (["--num_workers=2", "--", "no-such-program-dtf"], "no-such-program-dtf"),
    (["--num_workers=two", "--", "python"], "--num_workers"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, flag):
    assert launch.main(["dtf.launch", *args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("dtf.launch: error: "), err
    assert flag in err


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dtf.launch", "--num_workers=0", "--", "python", "x.py"],
                          env=launch_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "dtf.launch: error: --num_workers must be >= 1, got 0; e.g. --num_workers=2"], proc.stderr


def test_dry_run_prints_loopback_tf_configs_and_starts_nothing(capsys, tmp_path):
    marker = tmp_path / "ran"
    command = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    assert launch.main(["dtf.launch", "--num_workers=3", "--dry_run", "--", *command]) == 0
    lines = capsys.readouterr().out.splitlines()
    configs = [json.loads(line) for line in lines[:3]]
    workers = configs[0]["cluster"]["worker"]
    assert len(set(workers)) == 3 and all(w.startswith("127.0.0.1:") for w in workers)
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    assert all(c["cluster"] == {"worker": workers} for c in configs)
    assert len(lines) == 4 and shlex.split(lines[3]) == command
    time.sleep(0.5)
    assert not marker.exists()


# --- failures, signals, ports, timeout (plain Python workers: fast) --------------------------------------------------

# The chief ignores SIGTERM, as TF's runtime does once the strategy is up, so stopping it needs the SIGKILL.
STUBBORN_CHIEF_FAILING_WORKER = """
import json, os, signal, sys, time
task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
print("RESTART", os.environ["DTF_LAUNCH_RESTART"], json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"][task])
if task == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)
time.sleep(1)
for i in range(30):
    print("worker line", i)
sys.exit(5)  # a crash: restarted while --max_restarts allows
"""


def test_failed_worker_stops_the_others_and_is_reported(start_launcher, tmp_path):
    job = write_script(tmp_path, "job.py", STUBBORN_CHIEF_FAILING_WORKER)
    began = time.monotonic()
    launcher = start_launcher("--num_workers=2", "--max_restarts=1", "--", sys.executable, job)
    assert launcher.wait(60) == 5  # the failed worker's exit code, after the one restart
    elapsed = time.monotonic() - began
    out = launcher.output
    # Reported twice (one per start): who died, how, and its last lines.
    assert len(re.findall(r"launch: worker 1 \(pid \d+, 127\.0\.0\.1:\d+\) died: exit code 5; "
                          r"stopped the others in \d+\.\d+s", out)) == 2
    assert "  | worker line 29" in out and "  | worker line 9" not in out  # the last 20 lines
    stop_s = [float(s) for s in re.findall(r"stopped the others in (\d+\.\d+)s", out)]
    assert all(s < 5 for s in stop_s), stop_s
    assert "restarting all 2 worker(s) on new ports (restart 1 of 1)" in out
    assert "giving up after 1 restart(s)" in out
    assert elapsed < 40
    # The restart got new ports and DTF_LAUNCH_RESTART=1; output is prefixed by role.
    first, second = launcher.workers[:2], launcher.workers[2:]
    assert [w[0] for w in first] == [w[0] for w in second] == ["chief", "worker 1"]
    assert not {w[2] for w in first} & {w[2] for w in second}
    assert re.search(r"^\[chief\] RESTART 0 ", out, re.M) and re.search(r"^\[worker 1\] RESTART 1 ", out, re.M)
    assert launcher.leftovers() == []


SLEEPERS = """
import json, os, signal, time
if json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 1:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("UP", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_to_the_launcher_stops_everyone(start_launcher, tmp_path, sig, status):
    job = write_script(tmp_path, "sleep.py", SLEEPERS)
    # These workers ignore SIGTERM: the launcher kills them once its --preemption_grace_s is over.
    launcher = start_launcher("--num_workers=2", "--preemption_grace_s=3", "--", sys.executable, job)
    launcher.wait_for(r"^\[worker 1\] UP", 60)
    launcher.wait_for(r"^\[chief\] UP", 10)
    launcher.snapshot()
    sent = time.monotonic()
    launcher.proc.send_signal(sig)
    assert launcher.wait(20) == status
    assert time.monotonic() - sent < 8
    assert f"got {sig.name}; stopped all workers" in launcher.output
    assert len(launcher.workers) == 2, launcher.output
    assert launcher.leftovers() == []


# Worker 1 exits with STATUSES[start] on its start-th start (then 0); the chief waits for the group to stop it.
EXITS_BY_START = """
import json, os, sys, time
statuses = [int(s) for s in sys.argv[1].split(",")]
start = int(os.environ["DTF_LAUNCH_RESTART"])
if json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 1:
    sys.exit(statuses[start] if start < len(statuses) else 0)
time.sleep(0 if start >= len(statuses) else 60)
"""


def _starts(err: str) -> int:
    return len(re.findall(r"launch: starting 2 worker\(s\)", err))


@pytest.mark.parametrize("status, reason", [(2, "user error"), (3, "training diverged")])
def test_user_error_and_divergence_are_never_restarted(tmp_path, capfd, status, reason):
    job = write_script(tmp_path, "exits.py", EXITS_BY_START)
    assert launch.launch([sys.executable, job, str(status)], 2, max_restarts=3, timeout_s=60) == status
    err = capfd.readouterr().err
    assert _starts(err) == 1, err
    assert f"not restarting: exit status {status} ({reason}) would repeat on a rerun" in err


def test_crash_restarts_up_to_max_restarts_and_preemption_does_not_count(tmp_path, capfd):
    job = write_script(tmp_path, "exits.py", EXITS_BY_START)
    # 143, 1, 143, 1: two crashes use up --max_restarts=2, the two preemptions are free; the fifth start succeeds.
    assert launch.launch([sys.executable, job, "143,1,143,1"], 2, max_restarts=2, timeout_s=90) == 0
    err = capfd.readouterr().err
    assert _starts(err) == 5, err
    assert err.count("not counted against --max_restarts") == 2
    assert "(restart 2 of 2)" in err and "finished" in err and "(2 restart(s))" in err
    # One more crash than --max_restarts allows: the crash status comes back.
    assert launch.launch([sys.executable, job, "1,1"], 2, max_restarts=1, timeout_s=60) == 1
    assert "giving up after 1 restart(s)" in capfd.readouterr().err


def test_typo_flag_under_max_restarts_runs_once_and_exits_2(tmp_path):
    """The real runner: a misspelt flag fails at parse time (no TensorFlow), once, whatever --max_restarts says."""
    proc = subprocess.run([sys.executable, "-m", "dtf.launch", "--num_workers=2", "--max_restarts=3", "--",
                           sys.executable, "-m", "dtf.run", "--epochs_typo=3", f"--model_dir={tmp_path / 'run'}"],
                          env=launch_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(re.findall(r"launch: starting 2 worker\(s\)", proc.stderr)) == 1, proc.stderr
    assert "Unknown command line flag 'epochs_typo'" in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()


# Binds its own port on all interfaces, as TF's gRPC server does, and reports failure the same way.
BINDER = """
import json, os, socket, sys, time
config = json.loads(os.environ["TF_CONFIG"])
port = int(config["cluster"]["worker"][config["task"]["index"]].rsplit(":", 1)[1])
s = socket.socket()
try:
    s.bind(("0.0.0.0", port))
except OSError as e:
    sys.exit(f"Could not start gRPC server: {e}")
time.sleep(0.5)
print("BOUND", port)
"""


def test_taken_port_is_retried_on_fresh_ports(tmp_path, capfd, monkeypatch):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    real_free_ports, calls = cluster_lib.free_ports, []

    def free_ports(count, host):
        calls.append(host)
        ports = real_free_ports(count, host)
        return [ports[0], taken] if len(calls) == 1 else ports

    monkeypatch.setattr(cluster_lib, "free_ports", free_ports)
    try:
        status = launch.launch([sys.executable, write_script(tmp_path, "bind.py", BINDER)], 2, max_restarts=0,
                               timeout_s=60)
    finally:
        holder.close()
    out, err = capfd.readouterr()
    assert status == 0, out + err
    assert calls == ["127.0.0.1", "127.0.0.1"]
    assert "worker 1 (pid" in err and "Could not start gRPC server" in err
    assert "a port was taken; retrying on fresh ports (1 of 3)" in err
    assert out.count("BOUND") == 2 and f"BOUND {taken}" not in out


def test_timeout_bounds_the_whole_group(tmp_path, capfd, monkeypatch):
    pids = []
    real_run_group = launch.procs.run_group

    def run_group(*args, **kwargs):
        on_start = kwargs["on_start"]
        kwargs["on_start"] = lambda procs: (pids.extend(process(p.pid) for p in procs), on_start(procs))
        return real_run_group(*args, **kwargs)

    monkeypatch.setattr(launch.procs, "run_group", run_group)
    began = time.monotonic()
    status = launch.launch([sys.executable, write_script(tmp_path, "sleep.py", SLEEPERS)], 2, max_restarts=3,
                           timeout_s=2)
    assert status == launch.TIMEOUT_STATUS
    assert time.monotonic() - began < 2 + 3 + 3  # the timeout, the SIGTERM grace, slack
    assert "--timeout=2s ran out; stopped all workers" in capfd.readouterr().err
    assert len(pids) == 2 and not [p for p in pids if alive(p)]


def test_group_blames_the_worker_that_failed_first():
    """Worker 1 fails first; the chief (deaf to SIGTERM, like TF) fails 0.1s later while being stopped. The cause
    is worker 1 even though both exits land in the same moment of the launcher's loop."""
    at = time.time() + 2  # both processes are up by then
    code = ("import json, os, signal, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "i = json.loads(os.environ['TF_CONFIG'])['task']['index']\n"
            f"time.sleep(max(0, {at} + (0 if i == 1 else 0.1) - time.time()))\n"
            "sys.exit(5 if i == 1 else 4)\n")
    result = procs.run_local_workers([sys.executable, "-c", code], 2, timeout_s=30)
    assert result.first_failure == 1 and result.workers[1].status == "exit code 5"
    assert result.workers[0].status == "stopped by the group" and result.stop_s < procs.GRACE_S


# --- a real 2-worker TF job: SIGKILL one worker mid-epoch, restart, same weights -----------------------------------

JOB = """
import json, os, sys, time
import numpy as np, keras
import dtf, equiv_common as eq
from dtf.experiment import callbacks as cb
OUT = sys.argv[1]
TASK = dtf.parse_tf_config().task_index
RESTART = int(os.environ["DTF_LAUNCH_RESTART"])

class MidEpoch(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
    def on_train_batch_begin(self, batch, logs=None):
        if self.epoch == 2 and batch == 3 and TASK == 1 and RESTART == 0 and os.environ.get("PAUSE_MID_EPOCH"):
            print("MID_EPOCH 2", flush=True)
            time.sleep(120)  # the test SIGKILLs this worker here

strategy = dtf.create_strategy()
weights, history = eq.train(strategy, "sgd", epochs=4,
                            callbacks=[cb.BackupAndRestore(os.path.join(OUT, "backup")), MidEpoch()])
if TASK == 0:
    np.savez(os.path.join(OUT, "weights.npz"), *weights)
    json.dump({"epochs_run": len(history["loss"]), "restart": RESTART}, open(os.path.join(OUT, "run.json"), "w"))
"""


@pytest.mark.slow
def test_sigkilled_worker_restarts_and_matches_uninterrupted_run(start_launcher, tmp_path, monkeypatch):
    job = write_script(tmp_path, "job.py", JOB)
    (tmp_path / "ref").mkdir()
    (tmp_path / "killed").mkdir()
    reference = start_launcher("--num_workers=2", "--timeout=150", "--", sys.executable, job, str(tmp_path / "ref"))
    assert reference.wait(160) == 0, reference.output
    assert json.loads((tmp_path / "ref" / "run.json").read_text()) == {"epochs_run": 4, "restart": 0}

    monkeypatch.setenv("PAUSE_MID_EPOCH", "1")
    killed = start_launcher("--num_workers=2", "--max_restarts=1", "--timeout=150", "--",
                            sys.executable, job, str(tmp_path / "killed"))
    killed.wait_for(r"^\[worker 1\] MID_EPOCH 2$", 120)
    killed.snapshot()
    victim = killed.workers[1]
    assert victim[0] == "worker 1"
    os.kill(victim[1], signal.SIGKILL)
    assert killed.wait(150) == 0, killed.output
    out = killed.output
    assert f"worker 1 (pid {victim[1]}, {victim[2]}) died: killed by SIGKILL" in out
    assert "restarting all 2 worker(s) on new ports (restart 1 of 1)" in out
    # The restarted group resumed from the epoch-end backup: only epochs 2 and 3 ran again.
    assert json.loads((tmp_path / "killed" / "run.json").read_text()) == {"epochs_run": 2, "restart": 1}
    diff = max_weight_delta(tmp_path / "killed" / "weights.npz", tmp_path / "ref" / "weights.npz")
    print(f"max |weights(killed+restarted) - weights(uninterrupted)| = {diff:.2e}")
    assert diff < 1e-5
    assert len(killed.workers) == 4 and killed.leftovers() == [] and reference.leftovers() == []


def _run_command(model_dir):
    return [sys.executable, "-m", "dtf.run", "--dataset=synthetic", "--model=mlp", "--epochs=2",
            "--steps_per_epoch=40", "--global_batch_size=32", "--validation_freq=10", "--backup_every_steps=5",
            f"--model_dir={model_dir}"]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.path.join(REPO, "dtf", "run.py")), reason="needs the runner (dtf.run)")
def test_dtf_run_resumes_mid_epoch_after_a_sigkill(start_launcher, tmp_path):
    """The runner under the launcher: worker 1 is SIGKILLed after the chief's first mid-epoch backup (step 5 of 40
    in epoch 2); the restarted group resumes from that step and ends with the uninterrupted run's weights."""
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    reference = start_launcher("--num_workers=2", "--timeout=150", "--", *_run_command(ref_dir))
    assert reference.wait(160) == 0, reference.output

    killed = start_launcher("--num_workers=2", "--max_restarts=1", "--timeout=150", "--", *_run_command(killed_dir))
    killed.wait_for_mid_epoch_backup(killed_dir, epoch=1, timeout_s=120)
    killed.snapshot()
    os.kill(killed.workers[1][1], signal.SIGKILL)
    assert killed.wait(150) == 0, killed.output
    out = killed.output
    assert "worker 1 (pid" in out and "died: killed by SIGKILL" in out
    resumed = re.search(r"resuming from the backup in .*: epoch 2, step (\d+)", out)
    assert resumed and 0 < int(resumed.group(1)) < 40, out
    diff = max_weight_delta(killed_dir, ref_dir)
    print(f"dtf.run: resumed at epoch 2 step {resumed.group(1)}; max |Δw| vs uninterrupted = {diff:.2e}")
    assert diff < 1e-5
    assert killed.leftovers() == [] and reference.leftovers() == []


@pytest.mark.slow
def test_diverged_run_under_the_launcher_exits_3_and_is_not_restarted(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dtf.launch", "--num_workers=1", "--max_restarts=2", "--timeout=300",
                           "--", sys.executable, "-m", "dtf.run", "--dataset=synthetic/8x8x1", "--model=mlp",
                           "--strategy=one_device", "--num_cpu_devices=1", "--base_lr=1e6", "--optimizer=sgd",
                           "--epochs=1", "--steps_per_epoch=5", "--lr_schedule=constant",
                           f"--model_dir={tmp_path / 'run'}"],
                          env=launch_env(), cwd=tmp_path, capture_output=True, text=True, timeout=320)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert len(re.findall(r"launch: starting 1 worker\(s\)", proc.stderr)) == 1, proc.stderr
    assert "not restarting: exit status 3 (training diverged)" in proc.stderr
    assert "dtf.run: error: training diverged" in proc.stdout + proc.stderr
