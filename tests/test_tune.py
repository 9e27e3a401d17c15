"""dtf.tune end to end as a user runs it: a tiny sweep in a subprocess, its outputs, best.flags through dtf.run,
resume, and one-line errors for a bad search space."""
import csv
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300

BASE = ["--dataset=synthetic", "--model=mlp", "--strategy=mirrored", "--num_cpu_devices=2", "--epochs=1",
        "--steps_per_epoch=3", "--reference_batch_size=64", "--seed=1"]


def _run(module, args, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """3 grid trials over 2 replicas; base_lr=1e6 diverges."""
    tmp = tmp_path_factory.mktemp("tune")
    flagfile = tmp / "sweep.flags"
    flagfile.write_text("\n".join(BASE + ["--tune_global_batch_sizes=32,64", "--tune_base_lr=0.05,1e6",
                                          "--tuner=grid", "--max_trials=3", f"--tune_dir={tmp / 'tune'}"]) + "\n")
    proc = _run("dtf.tune", [f"--flagfile={flagfile}"], tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, flagfile, proc


def _rows(tune_dir):
    with open(os.path.join(tune_dir, "results.csv")) as f:
        return list(csv.DictReader(f))


def test_sweep_outputs(sweep):
    tmp, _, proc = sweep
    tune_dir = tmp / "tune"
    rows = _rows(tune_dir)
    assert len(rows) == 3
    assert {r["status"] for r in rows} <= {"completed", "diverged"}
    assert any(r["status"] == "diverged" for r in rows), rows  # the sweep went on after a diverged trial
    done = [r for r in rows if r["status"] == "completed"]
    assert done and all(r["objective"] and r["epochs_run"] == "1" and float(r["wall_time_s"]) > 0 for r in done)
    for r in rows:  # peak LR is dtf's linear scaling of the trial's global batch
        assert float(r["peak_lr"]) == pytest.approx(float(r["base_lr"]) * int(r["global_batch_size"]) / 64)
    assert "dtf.tune: 3 new trial(s)" in proc.stdout
    for r in done:  # one progress line per trial epoch (not a terminal), labelled with its trial, with examples/s
        [line] = [l for l in proc.stdout.splitlines() if l.startswith(f"trial {r['trial']}: epoch ")]
        assert re.match(rf"trial {r['trial']}: epoch 1/1: \d+ steps in \S+s, [\d,]+ examples/s - ", line), line
    assert "objective" in proc.stdout and "diverged" in proc.stdout  # the table
    assert (tune_dir / "objective_vs_batch.png").stat().st_size > 1000
    assert len(os.listdir(tune_dir / "tb")) == 3
    assert "Traceback" not in proc.stderr


def test_best_flags_trains_with_dtf_run(sweep):
    tmp, _, _ = sweep
    best = tmp / "tune" / "best.flags"
    text = best.read_text()
    assert "--base_lr=0.05" in text and f"--model_dir={tmp / 'tune' / 'best'}" in text
    proc = _run("dtf.run", [f"--flagfile={best}", "--epochs=1", f"--model_dir={tmp / 'best_run'}", "--noexport"],
                tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp / "best_run" / "summary.json").read_text())
    best_row = max((r for r in _rows(tmp / "tune") if r["status"] == "completed"), key=lambda r: float(r["objective"]))
    # A trial is a run: the same config trained by dtf.run reaches the objective the sweep reported.
    assert summary["final_metrics"]["val_accuracy"] == pytest.approx(float(best_row["objective"]), abs=1e-3)


OUTPUTS = ("results.csv", "best.flags", "objective_vs_batch.png")


def test_rerun_resumes_without_new_trials(sweep):
    tmp, flagfile, _ = sweep
    before = {name: (tmp / "tune" / name).read_bytes() for name in OUTPUTS}
    proc = _run("dtf.tune", [f"--flagfile={flagfile}"], tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dtf.tune: 0 new trial(s)" in proc.stdout and "(unchanged)" in proc.stdout
    assert {name: (tmp / "tune" / name).read_bytes() for name in OUTPUTS} == before  # a finished sweep stays as it is


@pytest.mark.parametrize("space, message", [
    (["--tune_global_batch_sizes="], "--tune_global_batch_sizes is empty"),
    (["--tune_base_lr=0.5:0.1"], "MIN 0.5 is greater than MAX 0.1"),
    (["--tune_base_lr=0.1", "--tuner=annealing"], "--tuner='annealing' is not valid"),
    (["--tune_global_batch_sizes=32,33"], "33 is not divisible by the 2 replicas"),
    (["--tune_lr_scaling=linear,cubic"], "--tune_lr_scaling: 'cubic' is not valid"),
    ([], "nothing to tune"),
    (["--tune_base_lr=0.1", "--objective=val_mean_absolute_error"],  # a classifier: known before trial 0 trains
     "--objective=val_mean_absolute_error is not a metric this task's model reports; choose one of: loss, accuracy, "
     "val_loss, val_accuracy"),
    (["--tune_base_lr=0.1", "--objective=val_mean_absolute_error", "--num_tuners=2"],  # said once, not per process
     "--objective=val_mean_absolute_error is not a metric this task's model reports"),
])
def test_invalid_space_is_one_line_exit_2(tmp_path, space, message):
    proc = _run("dtf.tune", BASE + space + [f"--tune_dir={tmp_path / 'tune'}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("dtf.tune: error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "tune").exists()  # no trial ran, nothing written: a corrected rerun starts clean


def test_tensorboard_serves_trial_hparams(sweep):
    """A real `tensorboard` on 127.0.0.1 reads tune_dir/tb: one HParams session group per trial."""
    import json
    import shutil
    import time
    import urllib.request

    from dtf.cluster.tf_config import free_ports

    tmp, _, _ = sweep
    exe = shutil.which("tensorboard")
    if exe is None:
        pytest.skip("tensorboard not on PATH")
    port = free_ports(1)[0]
    proc = subprocess.Popen([exe, f"--logdir={tmp / 'tune' / 'tb'}", "--host=127.0.0.1", f"--port={port}",
                             "--load_fast=false"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def post(path, body):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/data/plugin/hparams/{path}",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    try:
        deadline, groups, experiment = time.time() + 90, [], {}
        while time.time() < deadline:
            try:
                experiment = post("experiment", {"experimentName": ""})
                groups = post("session_groups", {"experimentName": "", "startIndex": 0, "sliceSize": 100,
                                                 "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS",
                                                                     "STATUS_FAILURE", "STATUS_RUNNING"],
                                                 "colParams": []}).get("sessionGroups", [])
                if len(groups) == 3:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert len(groups) == 3, groups
        infos = {h["name"]: h for h in experiment["hparamInfos"]}
        assert infos["global_batch_size"]["differs"] and infos["base_lr"]["differs"]
        assert sorted(g["hparams"]["global_batch_size"] for g in groups) == [32.0, 32.0, 64.0]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------ distributed (--num_tuners)

DIST_TIMEOUT_S = 150
GRID4 = ["--tune_global_batch_sizes=32,64", "--tune_base_lr=0.05,0.1", "--tuner=grid", "--max_trials=4"]


def _dist_flagfile(tmp):
    flagfile = tmp / "dist.flags"
    flagfile.write_text("\n".join(BASE + GRID4 + [f"--tune_dir={tmp / 'tune'}"]) + "\n")
    return flagfile


def _leftovers(marker: str):
    """pids of processes (other than this one) whose command line mentions `marker`."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(int(pid))
    return found


def _wait_gone(marker: str, timeout_s: float = 15):
    import time

    deadline = time.time() + timeout_s
    while _leftovers(marker) and time.time() < deadline:
        time.sleep(0.2)
    return _leftovers(marker)


class _Launch:
    """`python -m dtf.tune ... --num_tuners=N` in its own session, stdout read line by line by a thread."""

    def __init__(self, args, cwd):
        import queue
        import threading

        env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
                   PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "dtf.tune", *args], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines, self.queue = [], queue.Queue()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                self.queue.put(line.rstrip("\n"))
            self.queue.put(None)

        threading.Thread(target=read, daemon=True).start()

    @property
    def output(self):
        return "\n".join(self.lines)

    def wait_for(self, predicate, timeout_s):
        import queue
        import time

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                line = self.queue.get(timeout=max(0.01, deadline - time.time()))
            except queue.Empty:
                break
            if line is None:
                break
            if predicate(line):
                return line
        pytest.fail(f"no matching line within {timeout_s}s:\n{self.output[-4000:]}")

    def wait(self, timeout_s):
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"dtf.tune --num_tuners did not finish in {timeout_s}s:\n{self.output[-4000:]}")
        return self.proc.returncode

    def kill(self):
        """Last resort: the launcher's group and every process it started (each in its own session)."""
        import re
        import signal

        pids = [int(p) for p in re.findall(r"(?:chief|tuner\d+) pid (\d+)", self.output)]
        for pid in [self.proc.pid] + pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait()


def _check_grid4(tune_dir):
    import json

    rows = _rows(tune_dir)
    assert sorted(r["trial"] for r in rows) == ["0", "1", "2", "3"], rows
    assert all(r["status"] == "completed" and r["objective"] for r in rows), rows
    combos = [(r["global_batch_size"], r["base_lr"]) for r in rows]
    assert len(set(combos)) == 4, combos  # every grid point exactly once
    infos = [json.loads((tune_dir / "trial_info" / f"{r['trial']}.json").read_text()) for r in rows]
    assert all(i["status"] == "completed" for i in infos)
    return rows, infos


def _sweep_to_success(args, cwd) -> str:
    """A distributed sweep (`_Launch`) that must exit 0 within DIST_TIMEOUT_S; its output."""
    run = _Launch(args, cwd)
    try:
        assert run.wait(DIST_TIMEOUT_S) == 0, run.output[-4000:]
    finally:
        if run.proc.poll() is None:
            run.kill()
    return run.output


@pytest.mark.slow
def test_num_tuners_chief_and_two_workers(tmp_path):
    """Chief (oracle, no training) + 2 tuner workers on 127.0.0.1 share 4 grid trials; only the chief writes results."""
    flagfile = _dist_flagfile(tmp_path)
    out = _sweep_to_success([f"--flagfile={flagfile}", "--num_tuners=2"], tmp_path)
    rows, infos = _check_grid4(tmp_path / "tune")
    assert {r["tuner"] for r in rows} == {"tuner0", "tuner1"}, rows  # both workers trained
    assert {i["tuner"] for i in infos} == {"tuner0", "tuner1"}
    assert "chief" not in {r["tuner"] for r in rows}
    ran = {}
    for line in out.splitlines():
        if " ran " in line and "trial(s)" in line and line.startswith("[tuner"):
            tuner = line.split("]")[0].strip("[ ")
            ran[tuner] = line.split(": ", 2)[-1]
    assert set(ran) == {"tuner0", "tuner1"}, out[-3000:]
    assert sorted(sum((v.split(", ") for v in ran.values()), [])) == ["0", "1", "2", "3"], ran
    # results/best.flags/table come from the chief only
    assert "[ chief] dtf.tune: 4 new trial(s)" in out and "[ chief] dtf.tune: best trial" in out
    assert not any(l.startswith("[tuner") and ("new trial(s)" in l or "best trial" in l) for l in out.splitlines())
    assert (tmp_path / "tune" / "best.flags").exists()
    assert (tmp_path / "tune" / "objective_vs_batch.png").exists()
    assert "Traceback" not in out
    assert _wait_gone(str(tmp_path)) == []


@pytest.mark.slow
def test_num_tuners_resume_after_chief_killed(tmp_path):
    """SIGKILL the chief's process group after the first trial completes: the group stops (non-zero); rerunning the
    same command runs the rest, including the trial that was RUNNING, with none lost or duplicated."""
    import re
    import signal

    flagfile = _dist_flagfile(tmp_path)
    args = [f"--flagfile={flagfile}", "--num_tuners=2"]
    run = _Launch(args, tmp_path)
    try:
        started = run.wait_for(lambda l: "chief pid" in l, 60)
        chief_pid = int(re.search(r"chief pid (\d+)", started).group(1))
        run.wait_for(lambda l: re.search(r"\[ chief\] dtf.tune: trial \d+ ended: completed", l), DIST_TIMEOUT_S)
        os.killpg(chief_pid, signal.SIGKILL)
        code = run.wait(60)
    finally:
        if run.proc.poll() is None:
            run.kill()
    assert code != 0, run.output[-3000:]
    assert "chief failed (killed by SIGKILL)" in run.output
    assert _wait_gone(str(tmp_path)) == []
    assert not (tmp_path / "tune" / "results.csv").exists()
    done_before = set(re.findall(r"\[ chief\] dtf.tune: trial (\d+) ended: completed", run.output))
    assert done_before

    rerun = _Launch(args, tmp_path)
    try:
        assert rerun.wait(DIST_TIMEOUT_S) == 0, rerun.output[-4000:]
    finally:
        if rerun.proc.poll() is None:
            rerun.kill()
    rows, _ = _check_grid4(tmp_path / "tune")
    rerun_ids = set(re.findall(r"\[ chief\] dtf.tune: trial (\d+) -> tuner", rerun.output))
    assert rerun_ids == {"0", "1", "2", "3"} - done_before, (done_before, rerun_ids)  # only the unfinished ones
    assert "Traceback" not in rerun.output
    assert _wait_gone(str(tmp_path)) == []


@pytest.mark.slow
def test_finished_sweep_rerun_with_num_tuners_trains_nothing(sweep):
    """The finished single-process sweep rerun as a chief + 2 tuner workers: the chief reloads the sweep (keras-tuner
    alone would only reload a chief's own state and start over), hands out no trial, and leaves the outputs as
    they are."""
    tmp, flagfile, _ = sweep
    before = {name: (tmp / "tune" / name).read_bytes() for name in OUTPUTS}
    out = _sweep_to_success([f"--flagfile={flagfile}", "--num_tuners=2"], tmp)
    assert "[ chief] dtf.tune: 0 new trial(s)" in out, out[-3000:]
    assert not re.search(r"trial \d+ -> tuner", out) and not re.search(r"\] trial \d+: epoch", out), out[-3000:]
    assert "tuner0 ran 0 trial(s)" in out and "tuner1 ran 0 trial(s)" in out
    assert {name: (tmp / "tune" / name).read_bytes() for name in OUTPUTS} == before
    assert "Traceback" not in out
    assert _wait_gone(str(tmp / "tune")) == []


def test_hyperband_promoted_trial_continues_its_parent(run_python, tmp_path):
    """A trial Hyperband promotes starts from its parent's final weights and optimizer state (so its step counter,
    hence its LR schedule position, goes on) and trains only the remaining epochs; the sweep's total epochs drop."""
    import numpy as np

    run_python("""
        import numpy as np
        from dtf import tune
        from dtf.experiment import train
        fit = train.Experiment.fit

        def snapshot(model):
            return [w.copy() for w in model.get_weights()] + [np.array(v.numpy()) for v in model.optimizer.variables]

        def recording_fit(self, model, callbacks, initial_epoch=0, **kw):
            trial = os.path.basename(self.config.model_dir)
            start = snapshot(model)
            history = fit(self, model, callbacks, initial_epoch=initial_epoch, **kw)
            np.savez(os.path.join(OUT, f"start_{trial}.npz"), *start)
            np.savez(os.path.join(OUT, f"end_{trial}.npz"), *snapshot(model))
            return history

        train.Experiment.fit = recording_fit
        sys.exit(tune.main(["dtf.tune", "--dataset=synthetic", "--model=mlp", "--strategy=mirrored",
                            "--num_cpu_devices=2", "--epochs=3", "--steps_per_epoch=3", "--reference_batch_size=64",
                            "--seed=1", "--lr_schedule=cosine", "--tune_base_lr=0.01,0.03,0.1", "--tuner=hyperband",
                            f"--tune_dir={os.path.join(OUT, 'tune')}"]))
    """)
    tune_dir = tmp_path / "tune"
    rows = {r["trial"]: r for r in _rows(tune_dir)}
    hps = {t: json.loads((tune_dir / "sweep" / f"trial_{t}" / "trial.json").read_text())["hyperparameters"]["values"]
           for t in rows}
    promoted = [t for t, hp in hps.items() if "tuner/trial_id" in hp]
    assert promoted, hps
    load = lambda name: list(np.load(tmp_path / f"{name}.npz").values())  # noqa: E731
    for t in promoted:
        hp, parent = hps[t], hps[t]["tuner/trial_id"]
        info = json.loads((tune_dir / "trial_info" / f"{t}.json").read_text())
        assert hp["tuner/initial_epoch"] == hps[parent]["tuner/epochs"] > 0
        assert info["initial_epoch"] == hp["tuner/initial_epoch"]
        assert int(rows[t]["epochs_run"]) == hp["tuner/epochs"] - hp["tuner/initial_epoch"]  # only the remainder
        start, parent_end = load(f"start_{t}"), load(f"end_{parent}")
        assert len(start) == len(parent_end) and all(np.array_equal(a, b) for a, b in zip(start, parent_end))
        assert any(a.shape == () and a > 0 for a in start)  # the optimizer's step counter came along
        assert (tune_dir / "trials" / parent / "hyperband_state.weights.h5").exists()
    spent = sum(int(r["epochs_run"]) for r in rows.values())
    from_scratch = sum(hp["tuner/epochs"] for hp in hps.values())
    assert spent == from_scratch - sum(hps[t]["tuner/initial_epoch"] for t in promoted) < from_scratch
