"""Graceful preemption (dtf.experiment.preemption): SIGTERM to one worker of a 2-worker `dtf.launch` job (the chief, and
separately worker 1) stops every worker at one agreed step, the chief backs up there, the workers exit 143 within
the grace period, the launcher restarts them uncounted, and the job ends with the uninterrupted run's weights exactly.
The same for one mirrored process; and the launcher's side (passing SIGTERM on, waiting for the backup) without
TensorFlow."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from helpers import launch_env, launch_to_success, model_weights, max_weight_delta, write_script

GRACE_S = 25.0  # dtf.base.exitcodes.PREEMPTION_GRACE_S, the workers' default --preemption_grace_s
STOPPED = re.compile(r"preempted: stopped at epoch (\d+), step (\d+)")


def _run_command(model_dir, *extra):
    """dtf.run on 2 epochs × 40 steps, backing up every 5 steps (so a test can wait for training to be mid-epoch)."""
    return [sys.executable, "-m", "dtf.run", "--dataset=synthetic", "--model=mlp", "--epochs=2",
            "--steps_per_epoch=40", "--global_batch_size=32", "--validation_freq=10", "--backup_every_steps=5",
            f"--model_dir={model_dir}", *extra]


def _assert_same_weights(a_dir, b_dir):
    a, b = model_weights(a_dir), model_weights(b_dir)
    diff = max_weight_delta(a, b)
    print(f"max |weights(preempted+resumed) - weights(uninterrupted)| = {diff:.1e}")
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b)), diff


def _backup(model_dir):
    return json.loads((model_dir / "backup" / "training_metadata.json").read_text())


@pytest.fixture(scope="module")
def reference_2_workers(tmp_path_factory):
    """The uninterrupted 2-worker run, shared by the chief and the worker-1 cases."""
    model_dir = tmp_path_factory.mktemp("reference") / "run"
    launch_to_success(["--num_workers=2", "--timeout=200", "--", *_run_command(model_dir)], model_dir.parent, 210)
    return model_dir


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["chief", "worker 1"])
def test_sigterm_to_one_worker_stops_all_at_one_step_and_the_restart_matches(
        reference_2_workers, start_launcher, tmp_path, victim):
    model_dir = tmp_path / "run"
    job = start_launcher("--num_workers=2", "--max_restarts=0", "--timeout=200", "--", *_run_command(model_dir))
    job.wait_for_mid_epoch_backup(model_dir, epoch=1, timeout_s=150)
    job.snapshot()
    role, pid, _ = job.workers[0 if victim == "chief" else 1]
    assert role == victim
    process = psutil.Process(pid)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(GRACE_S)
    took = time.monotonic() - sent
    job.wait_for(r"launch: starting 2 worker\(s\) .*DTF_LAUNCH_RESTART=1", 60)
    assert job.wait(150) == 0, job.output
    out = job.output
    # Both workers stopped at the same step, the chief's backup is at that step, and the rerun resumed there.
    stops = dict(re.findall(r"^\[(chief|worker 1)\] dtf\.run: error: (preempted: stopped at epoch \d+, step \d+) ", out,
                            re.M))
    assert sorted(stops) == ["chief", "worker 1"] and stops["chief"] == stops["worker 1"], out
    epoch, step = STOPPED.match(stops["chief"]).groups()
    assert epoch == "2" and 0 < int(step) < 40, out
    assert f"[chief] dtf: resuming from the backup in {model_dir}/backup: epoch 2, step {step}" in out
    assert "preempted (exit status 143); restarting all 2 worker(s) on new ports (not counted" in out
    print(f"SIGTERM to the {victim}: both workers stopped at epoch 2 step {step}; the {victim} exited 143 "
          f"{took:.1f}s after the signal")
    _assert_same_weights(model_dir, reference_2_workers)
    assert job.leftovers() == []


@pytest.mark.slow
def test_a_stuck_peer_ends_the_job_143_at_the_grace_and_it_resumes_from_the_last_backup(
        reference_2_workers, start_launcher, tmp_path):
    """Worker 1 is frozen (SIGSTOP) when the chief gets SIGTERM: no step can be agreed on, so the chief's watchdog
    exits 143 at --preemption_grace_s without a new backup; the restart resumes from the last whole one."""
    model_dir = tmp_path / "run"
    job = start_launcher("--num_workers=2", "--preemption_grace_s=3", "--timeout=200", "--",
                         *_run_command(model_dir, "--preemption_grace_s=5"))
    job.wait_for_mid_epoch_backup(model_dir, epoch=1, timeout_s=150)
    job.snapshot()
    os.kill(job.workers[1][1], signal.SIGSTOP)
    chief = psutil.Process(job.workers[0][1])
    sent = time.monotonic()
    chief.send_signal(signal.SIGTERM)
    chief.wait(20)
    took = time.monotonic() - sent
    assert 4.9 < took < 6.5, job.output
    job.wait_for(r"chief .* died: exit code 143", 10)
    before = _backup(model_dir)
    assert before["steps_done"] % 5 == 0  # a regular backup (every 5 steps), none at a stop step
    assert job.wait(150) == 0, job.output
    out = job.output
    assert "preempted: stopped at" not in out
    assert re.search(r"^\[chief\] .*without a new backup \(the rerun resumes from the last whole one\)", out, re.M)
    assert f"resuming from the backup in {model_dir}/backup: epoch 2, step {before['steps_done']}" in out
    print(f"stuck peer: the chief exited 143 {took:.1f}s after SIGTERM (grace 5s); resumed at epoch 2 step "
          f"{before['steps_done']}")
    _assert_same_weights(model_dir, reference_2_workers)
    assert job.leftovers() == []


@pytest.mark.slow
def test_sigterm_to_a_mirrored_process_backs_up_at_its_step_and_the_rerun_matches(tmp_path):
    """One process (mirrored on 2 logical CPUs): SIGTERM → exit 143 after the current step, backed up at it; the
    rerun resumes at that step and ends with the uninterrupted run's weights exactly."""
    def start(model_dir):
        return subprocess.Popen(_run_command(model_dir, "--strategy=mirrored", "--num_cpu_devices=2"), cwd=tmp_path,
                                env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    reference = start(tmp_path / "ref")
    assert reference.wait(200) == 0, reference.stdout.read()

    model_dir = tmp_path / "run"
    proc = start(model_dir)
    deadline = time.monotonic() + 150
    while not (model_dir / "backup" / "training_metadata.json").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(GRACE_S) == 143
    took = time.monotonic() - sent
    out = proc.stdout.read()
    stopped = STOPPED.search(out)
    assert stopped and stopped.group(1) == "1", out
    assert _backup(model_dir)["epoch"] == 0 and _backup(model_dir)["steps_done"] == int(stopped.group(2))
    print(f"mirrored: exited 143 {took:.1f}s after SIGTERM, backed up at epoch 1 step {stopped.group(2)}")

    rerun = start(model_dir)
    assert rerun.wait(200) == 0
    assert f"resuming from the backup in {model_dir}/backup: epoch 1, step {stopped.group(2)}" in rerun.stdout.read()
    _assert_same_weights(model_dir, tmp_path / "ref")


# A worker that takes 4 s after SIGTERM to "back up" (longer than the 3 s a crashed group gets), then exits 143. With
# "self", worker 1 exits 143 by itself on the first start; every restarted worker just succeeds.
BACKS_UP = """
import json, os, signal, sys, time
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
if os.environ["DTF_LAUNCH_RESTART"] != "0":
    sys.exit(0)
def backup(signum, frame):
    time.sleep(4)
    open(os.path.join(sys.argv[1], f"backup-{index}"), "w").close()
    sys.exit(143)
signal.signal(signal.SIGTERM, backup)
open(os.path.join(sys.argv[1], f"up-{index}"), "w").close()  # its SIGTERM handler is in place
print("UP", flush=True)
if index == 1 and sys.argv[2] == "self":  # preempted once the chief can back up (not while it is still starting)
    while not os.path.exists(os.path.join(sys.argv[1], "up-0")):
        time.sleep(0.05)
    sys.exit(143)
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["launcher_sigterm", "worker_exits_143"])
def test_launcher_gives_workers_the_grace_period_to_back_up(start_launcher, tmp_path, how):
    job_file = write_script(tmp_path, "backs_up.py", BACKS_UP)
    job = start_launcher("--num_workers=2", "--preemption_grace_s=10", "--", sys.executable, job_file, str(tmp_path),
                         "self" if how == "worker_exits_143" else "wait")
    job.wait_for(r"^\[chief\] UP", 60)
    if how == "launcher_sigterm":  # passed on to every worker, each gets the time to back up; the launcher exits 143
        job.wait_for(r"^\[worker 1\] UP", 10)
        job.snapshot()
        job.proc.send_signal(signal.SIGTERM)
        assert job.wait(20) == 143, job.output
        assert "got SIGTERM; stopped all workers (they had 10s to back up)" in job.output
        assert (tmp_path / "backup-1").exists(), job.output
    else:  # worker 1 was preempted: the chief gets SIGTERM and the time to back up; the restart is uncounted
        assert job.wait(30) == 0, job.output
        assert re.search(r"worker 1 .* died: exit code 143; stopped the others in [4-9]\.\ds", job.output)
        assert "not counted against --max_restarts" in job.output
    assert (tmp_path / "backup-0").exists(), job.output
    assert job.leftovers() == []


def test_launcher_rejects_a_non_positive_grace(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dtf.launch", "--num_workers=2", "--preemption_grace_s=0", "--",
                           sys.executable], env=launch_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["dtf.launch: error: --preemption_grace_s must be > 0 seconds, got 0"]
