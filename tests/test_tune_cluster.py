"""dtf.tune with trials as multi-worker jobs (issue 22): `--trial_workers=N --parallel_trials=K` sweeps whose trials
equal `dtf.launch --num_workers=N` runs (Δw = 0), survive a killed worker and a killed tuner, stop on a trial's user
error, record a diverged trial and go on; the same sweep as one job on the real Slurm (--emit=slurm); and the
steps_to:/seconds_to: objectives. In the Slurm group (conftest.SHARED_GROUPS): it starts a Slurm of its own."""
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from helpers import alive, launch_env, launch_to_success, max_weight_delta, slurm_env, submit, wait_for_backup

TIMEOUT_S = 420
BASE = ["--dataset=synthetic", "--model=mlp", "--reference_batch_size=64", "--seed=1", "--progress=epoch"]
REGRESSION = ["--task=tasks_for_tests:Regression", "--reference_batch_size=64", "--seed=1", "--progress=epoch"]
WORKER_PID = re.compile(r"^\[trial (\d+)\] dtf: launch: (chief|worker \d+) pid (\d+)")


class Tune:
    """`python -m dtf.tune` in a subprocess: its output lines, and every descendant it was seen with."""

    def __init__(self, args, cwd):
        self.proc = subprocess.Popen([sys.executable, "-m", "dtf.tune", *args], cwd=cwd, env=launch_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines, self.seen = [], set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if WORKER_PID.match(line):
                self.snapshot()

    def snapshot(self):
        try:
            self.seen.update(psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass

    def worker_pid(self, trial: str, role: str, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            for line in list(self.lines):
                m = WORKER_PID.match(line)
                if m and m.group(1) == trial and m.group(2) == role:
                    return int(m.group(3))
            time.sleep(0.02)
        pytest.fail(f"no pid of trial {trial}'s {role}:\n{self.output[-4000:]}")

    def wait(self, timeout_s: float = TIMEOUT_S) -> int:
        try:
            status = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill_all()
            pytest.fail("dtf.tune did not finish in time:\n" + self.output[-4000:])
        self._reader.join(timeout=10)
        return status

    def wait_gone(self, timeout_s: float = 90):
        """Until every process it was seen with has exited (a killed tuner's trial jobs back up and stop)."""
        deadline = time.monotonic() + timeout_s
        while any(alive(p) for p in list(self.seen)):
            assert time.monotonic() < deadline, [p.pid for p in self.seen if alive(p)]
            time.sleep(0.1)

    def kill_all(self):
        self.snapshot()
        self.proc.kill()
        for p in list(self.seen):
            if alive(p):
                p.kill()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


def _rows(tune_dir):
    with open(os.path.join(tune_dir, "results.csv")) as f:
        return list(csv.DictReader(f))


def _wait_for_backup(model_dir, tune: Tune, timeout_s: float = 180):
    """Until the trial's chief has backed up past step 0 (its run is under way)."""
    return wait_for_backup(model_dir, lambda b: b.get("steps_done", 0) > 0 or b.get("epoch", 0) > 0, timeout_s,
                           alive=lambda: tune.proc.poll() is None, report=lambda: tune.output[-4000:])


def _starts(output: str, trial: str) -> int:
    """How many times a trial's job was started (each launcher start, restarts included)."""
    return len(re.findall(rf"^\[trial {trial}\] dtf: launch: starting ", output, re.M))


# --- one 2x2 sweep of 2-worker trials, 2 at a time ------------------------------------------------------------------

SWEEP = [*BASE, "--epochs=2", "--steps_per_epoch=4", "--backup_every_steps=1", "--tune_global_batch_sizes=32,64",
         "--tune_base_lr=0.05,1e6", "--tuner=grid", "--max_trials=4", "--trial_workers=2", "--parallel_trials=2"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The 2x2 sweep, with one worker of trial 0 SIGKILLed once the trial has backed up; and the reference run of
    trial 0's flags under dtf.launch."""
    tmp = tmp_path_factory.mktemp("tune_cluster")
    tune_dir = tmp / "tune"
    start = time.monotonic()
    tune = Tune([*SWEEP, f"--tune_dir={tune_dir}"], tmp)
    try:
        worker = tune.worker_pid("0", "worker 1", 180)
        backup = _wait_for_backup(tune_dir / "trials" / "0", tune)
        os.kill(worker, signal.SIGKILL)
        status = tune.wait()
    finally:
        tune.kill_all()
    seconds = time.monotonic() - start
    assert status == 0, tune.output[-6000:]
    launch_to_success(["--num_workers=2", "--", sys.executable, "-m", "dtf.run", *BASE, "--epochs=2",
                       "--steps_per_epoch=4", "--backup_every_steps=1", "--global_batch_size=32", "--base_lr=0.05",
                       f"--model_dir={tmp / 'ref'}"], tmp, TIMEOUT_S)
    print(f"2x2 sweep of 2-worker trials: {seconds:.0f}s; trial 0's worker killed after backup {backup}")
    return tmp, tune.output


def test_four_trials_of_two_workers(sweep):
    tmp, output = sweep
    rows = _rows(tmp / "tune")
    assert len(rows) == 4 and {r["workers"] for r in rows} == {"2"}, rows
    assert sorted((r["global_batch_size"], float(r["base_lr"])) for r in rows) == [
        ("32", 0.05), ("32", 1e6), ("64", 0.05), ("64", 1e6)]
    for r in rows:
        if r["status"] == "completed":  # each trial's chief says it trained with 2 workers
            summary = json.loads((tmp / "tune" / "trials" / r["trial"] / "summary.json").read_text())
            assert summary["num_workers"] == 2 and summary["strategy"] == "multi_worker", summary
    # K=2 at once: trials 0 and 1 both started before the first trial ended
    before_first_end = output[:re.search(r"dtf.tune: trial \d+ ended", output).start()]
    assert _starts(before_first_end, "0") and _starts(before_first_end, "1"), before_first_end[-3000:]
    # only trial 0's chief, whose peer was SIGKILLed, crashes (with its traceback); the tuner and other trials do not
    assert not [line for line in output.splitlines() if "Traceback" in line and not line.startswith("[trial 0] ")]


def test_a_trial_equals_dtf_launch(sweep):
    """Trial 0 (global batch 32, base_lr 0.05) had a worker SIGKILLed and resumed from its backup; its weights
    still equal an uninterrupted `dtf.launch --num_workers=2` run of the same flags."""
    tmp, _ = sweep
    [row] = [r for r in _rows(tmp / "tune") if r["trial"] == "0"]
    assert (row["global_batch_size"], float(row["base_lr"]), row["status"]) == ("32", 0.05, "completed")
    delta = max_weight_delta(tmp / "tune" / "trials" / "0", tmp / "ref")
    print(f"trial 0 vs dtf.launch --num_workers=2: max |dw| = {delta}")
    assert delta == 0.0
    ref = json.loads((tmp / "ref" / "summary.json").read_text())
    assert float(row["objective"]) == ref["final_metrics"]["val_accuracy"]


def test_a_killed_worker_resumes_its_trial_from_its_backup(sweep):
    tmp, output = sweep
    [row] = [r for r in _rows(tmp / "tune") if r["trial"] == "0"]
    assert row["restarts"] == "1", row
    assert _starts(output, "0") == 2
    summary = json.loads((tmp / "tune" / "trials" / "0" / "summary.json").read_text())
    print(f"trial 0 resumed from (epoch, step) {summary['resumed_from']}")
    assert summary["resumed_from"] != [0, 0], summary["resumed_from"]  # not from step 0
    assert re.search(r"^\[trial 0\] \[chief\] dtf: resuming from the backup", output, re.M)


def test_a_diverged_trial_is_recorded_and_the_sweep_goes_on(sweep):
    tmp, output = sweep
    rows = _rows(tmp / "tune")
    diverged = [r for r in rows if float(r["base_lr"]) == 1e6]
    assert {r["status"] for r in diverged} == {"diverged"} and all(r["objective"] == "" for r in diverged)
    for r in diverged:
        assert _starts(output, r["trial"]) == 1  # exit 3 is never retried
    assert {r["status"] for r in rows if float(r["base_lr"]) == 0.05} == {"completed"}
    assert "train it: python -m dtf.launch --num_workers=2 -- python -m dtf.run --flagfile=" in output


# --- a trial's user error ---------------------------------------------------------------------------------------------

def test_a_trial_user_error_stops_the_sweep_after_one_attempt(tmp_path):
    """--strategy=mirrored is fine for dtf.tune's own checks but wrong in a 2-worker trial: the trial's dtf.run says
    so in one line (exit 2), no job is restarted, and the sweep ends with that line."""
    tune = Tune([*BASE, "--strategy=mirrored", "--epochs=1", "--steps_per_epoch=3", "--tune_global_batch_sizes=32",
                 "--tune_base_lr=0.05,0.1", "--tuner=grid", "--max_trials=2", "--trial_workers=2",
                 f"--tune_dir={tmp_path / 'tune'}"], tmp_path)
    status = tune.wait()
    assert status == 2, tune.output[-4000:]
    assert tune.lines[-1] == ("dtf.tune: error: TF_CONFIG names 2 workers but strategy is 'mirrored'; use "
                              "--strategy=multi_worker (or auto), or unset TF_CONFIG"), tune.output[-3000:]
    assert _starts(tune.output, "0") == 1 and _starts(tune.output, "1") == 0  # one attempt; no other trial
    assert "Traceback" not in tune.output


def test_a_silent_trial_is_stopped_and_recorded_as_stalled(tmp_path):
    """--trial_timeout_s=1: a worker importing TensorFlow prints nothing for longer, so the trial is stopped (SIGTERM
    to its launcher) and recorded as stalled; with no trial completed the sweep ends with exit 2 and says so."""
    tune = Tune([*BASE, "--epochs=1", "--steps_per_epoch=3", "--tune_global_batch_sizes=32", "--tune_base_lr=0.05",
                 "--tuner=grid", "--max_trials=1", "--trial_workers=1", "--trial_timeout_s=1",
                 f"--tune_dir={tmp_path / 'tune'}"], tmp_path)
    assert tune.wait() == 2, tune.output[-3000:]
    assert "[trial 0] dtf.tune: no output for --trial_timeout_s=1; stopping it" in tune.output
    assert [r["status"] for r in _rows(tmp_path / "tune")] == ["stalled"]
    assert tune.lines[-1].startswith("dtf.tune: error: no trial of the 1 completed (1 stalled; see ")
    assert tune.lines[-1].endswith("raise --trial_timeout_s")


# --- the tuner killed mid-sweep ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tuner", ["grid", "bayesian"])
def test_a_killed_tuner_reruns_without_repeating_a_finished_trial(tmp_path, tuner):
    space = "--tune_base_lr=0.05,0.1" if tuner == "grid" else "--tune_base_lr=0.01:0.1:log"
    args = [*BASE, "--epochs=2", "--steps_per_epoch=4", "--backup_every_steps=1", "--tune_global_batch_sizes=32",
            space, f"--tuner={tuner}", "--max_trials=2", "--trial_workers=1", f"--tune_dir={tmp_path / 'tune'}"]
    first = Tune(args, tmp_path)
    try:
        first.worker_pid("1", "chief", 240)  # trial 0 has ended and trial 1 is running
        _wait_for_backup(tmp_path / "tune" / "trials" / "1", first)
        first.snapshot()
        first.proc.kill()  # SIGKILL the tuner: its trial job gets SIGTERM (PDEATHSIG) and backs up
        first.wait()
        first.wait_gone()
    finally:
        first.kill_all()
    assert "[trial 0] dtf.tune: trial 0 ended: completed" in first.output
    second = Tune(args, tmp_path)
    assert second.wait() == 0, second.output[-5000:]
    assert _starts(second.output, "0") == 0, second.output  # the finished trial is not run again
    assert _starts(second.output, "1") == 1
    assert re.search(r"^\[trial 1\] \[chief\] dtf: resuming from the backup", second.output, re.M), second.output
    rows = _rows(tmp_path / "tune")
    assert [(r["trial"], r["status"]) for r in rows] == [("0", "completed"), ("1", "completed")]
    assert "dtf.tune: 0 new trial(s)" in second.output


def _scalars(log_dir) -> dict:
    """{tag: [(step, value)]} of the scalars in log_dir/train's event files."""
    import tensorflow as tf

    out = {}
    for path in sorted((log_dir / "train").glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag.startswith("stop_at/"):
                    out.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    return out


# --- objectives about speed -------------------------------------------------------------------------------------------

def test_steps_to_a_known_target(tmp_path):
    """Validated every step (--validate_every_steps=1): the reference run (a target it never reaches) records the
    validation loss after each step; a target between the values after steps 4 and 5 is first reached at step 5, in
    the middle of epoch 2 of 3-step epochs, so the trial with the same flags scores steps_to = 5 and stops there
    (epoch 3 is not trained). A trial whose LR barely moves the weights never reaches it: +inf, 'not_reached'."""
    run = [*REGRESSION, "--epochs=3", "--steps_per_epoch=3", "--validate_every_steps=1"]
    subprocess.run([sys.executable, "-m", "dtf.run", *run, "--global_batch_size=32", "--base_lr=0.05",
                    "--stop_at=val_loss<=-1", f"--model_dir={tmp_path / 'ref'}", "--noexport"],
                   cwd=tmp_path, env=launch_env(), check=True, capture_output=True, timeout=TIMEOUT_S)
    stop_at = json.loads((tmp_path / "ref" / "summary.json").read_text())["stop_at"]
    assert not stop_at["reached"] and [step for step, _ in stop_at["validations"]] == list(range(1, 10)), stop_at
    losses = [value for _, value in stop_at["validations"]]
    target = (losses[3] + losses[4]) / 2
    assert min(losses[:4]) > target > losses[4], losses
    tune = Tune([*run, "--tune_global_batch_sizes=32", "--tune_base_lr=0.05,1e-9", "--tuner=grid", "--max_trials=2",
                 f"--objective=steps_to:val_loss<={target!r}", f"--tune_dir={tmp_path / 'tune'}"], tmp_path)
    assert tune.wait() == 0, tune.output[-4000:]
    rows = {float(r["base_lr"]): r for r in _rows(tmp_path / "tune")}
    print({lr: (r["objective"], r["epochs_run"], r["status"]) for lr, r in rows.items()})
    assert (float(rows[0.05]["objective"]), rows[0.05]["epochs_run"], rows[0.05]["status"]) == (5.0, "2", "completed")
    assert (rows[1e-9]["objective"], rows[1e-9]["status"]) == ("inf", "not_reached")
    # TensorBoard (the HParams dashboard's metrics): the reached target's step in the trial's run, none where missed
    assert _scalars(tmp_path / "tune" / "tb" / rows[0.05]["trial"]).get("stop_at/steps") == [(5, 5.0)]
    assert "stop_at/steps" not in _scalars(tmp_path / "tune" / "tb" / rows[1e-9]["trial"])


def test_seconds_to_sweep_table_and_plot(tmp_path):
    """seconds_to with 1-worker trial jobs: each trial's training seconds to val_loss<=100 (reached at the first
    validation), validation excluded; the table, results.csv and the plot show them against the global batch."""
    tune = Tune([*REGRESSION, "--epochs=2", "--steps_per_epoch=3", "--tune_global_batch_sizes=32,64",
                 "--tune_base_lr=0.05", "--tuner=grid", "--max_trials=2", "--trial_workers=1", "--parallel_trials=2",
                 "--objective=seconds_to:val_loss<=100", f"--tune_dir={tmp_path / 'tune'}"], tmp_path)
    assert tune.wait() == 0, tune.output[-4000:]
    rows = _rows(tmp_path / "tune")
    assert [r["global_batch_size"] for r in rows] == ["32", "64"] and {r["status"] for r in rows} == {"completed"}
    for r in rows:
        seconds = float(r["objective"])
        stop_at = json.loads((tmp_path / "tune" / "trials" / r["trial"] / "summary.json").read_text())["stop_at"]
        assert stop_at["reached"] and stop_at["step"] == 3 and stop_at["epoch"] == 1, stop_at
        assert seconds == stop_at["train_seconds"] and 0 < seconds < float(r["wall_time_s"]) and math.isfinite(seconds)
        assert r["epochs_run"] == "1"  # stopped at the target
        shown = _scalars(tmp_path / "tune" / "trials" / r["trial"] / "tensorboard")["stop_at/train_seconds"]
        assert shown == [(3, pytest.approx(seconds, rel=1e-6))], shown  # beside the trial's HParams
    assert re.search(r"^\s*trial\s+global_batch_size.*objective", tune.output, re.M)  # the table
    assert (tmp_path / "tune" / "objective_vs_batch.png").stat().st_size > 1000


# --- the same sweep as one Slurm job ----------------------------------------------------------------------------------

def test_emit_slurm_sweep_runs_unchanged_and_matches_the_local_sweep(slurm, sweep, tmp_path):
    """`dtf.tune ... --emit=slurm` on the real Slurm: 2 trials of 2 tasks as concurrent srun steps of one job; each
    trial ends with the weights and objective of the local sweep's trial with the same values."""
    local_tmp, _ = sweep
    args = [arg for arg in SWEEP if not arg.startswith(("--tune_base_lr", "--max_trials"))]
    emitted = subprocess.run([sys.executable, "-m", "dtf.tune", *args, "--tune_base_lr=0.05", "--max_trials=2",
                              f"--tune_dir={tmp_path / 'tune'}", "--emit=slurm"], capture_output=True, text=True,
                             env=launch_env(), cwd=tmp_path, timeout=120)
    assert emitted.returncode == 0 and emitted.stdout.startswith("#!/bin/bash"), emitted.stderr
    assert "#SBATCH --ntasks=4" in emitted.stdout
    job = submit(slurm, emitted.stdout, tmp_path / "sweep.sbatch", env=slurm_env(slurm))
    ended = slurm.wait_jobs([job], timeout_s=TIMEOUT_S)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert ended[job]["JobState"] == "COMPLETED", log[-5000:]
    # both trial steps started before either ended; each trial's lines carry its id and the task number
    before_first_end = log[:re.search(r"dtf.tune: trial \d+ ended", log).start()]
    for trial in ("0", "1"):
        assert re.search(rf"^\[trial {trial}\] dtf.tune: 2 worker\(s\): srun --ntasks=2 ", before_first_end, re.M)
        assert re.search(rf"^\[trial {trial}\] 1: ", log, re.M)
    local = {(r["global_batch_size"], r["base_lr"]): r for r in _rows(local_tmp / "tune")}
    rows = _rows(tmp_path / "tune")
    assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"} and {r["workers"] for r in rows} == {"2"}
    for r in rows:
        twin = local[(r["global_batch_size"], r["base_lr"])]
        delta = max_weight_delta(tmp_path / "tune" / "trials" / r["trial"],
                                 local_tmp / "tune" / "trials" / twin["trial"])
        print(f"slurm trial {r['trial']} (batch {r['global_batch_size']}) vs local trial {twin['trial']}: "
              f"max |dw| = {delta}, objective {r['objective']} vs {twin['objective']}")
        assert delta == 0.0 and r["objective"] == twin["objective"]
