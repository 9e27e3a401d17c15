"""Reruns on a model_dir that holds a run (dtf.experiment.rundir): a finished run is left as it is, more epochs continue
it, a different plan is refused (or moved aside with --restart), a diverged run is resumed only from a finite backup,
and one run at a time holds the directory."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import dtf
from dtf.experiment import callbacks
from dtf.experiment import rundir
from dtf.experiment import train
from dtf.config import config as config_lib
from dtf.base.errors import UserError
from helpers import model_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = dict(dataset="synthetic/8x8x1", model="mlp", strategy="one_device", global_batch_size=16, steps_per_epoch=4,
             warmup_epochs=0, progress="none", log_every_steps=1)
CLI_QUICK = ["--dataset=synthetic/8x8x1", "--model=mlp", "--strategy=one_device", "--steps_per_epoch=3",
             "--warmup_epochs=0", "--log_every_steps=1"]


def _cli(args, cwd, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "dtf.run", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if "error:" in line]


@pytest.mark.slow
def test_rerun_leaves_finished_run_continues_with_more_epochs_and_refuses_another_plan(tmp_path):
    run = tmp_path / "run"
    base = [*CLI_QUICK, "--global_batch_size=16", "--model_dir=run"]
    first = _cli([*base, "--epochs=1"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    outputs = {name: _sha(run / name) for name in ("model.keras", "summary.json", "flags.txt")}

    # The same run again (its flags.txt, as the README says): nothing trained, nothing replaced, one line.
    again = _cli([f"--flagfile={run / 'flags.txt'}"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {name: _sha(run / name) for name in outputs} == outputs
    said = [line for line in again.stdout.splitlines() if line.startswith("dtf:")]
    assert len(said) == 1 and "already holds this run, finished (1 epochs)" in said[0] and "val_accuracy=" in said[0]
    assert "Traceback" not in again.stderr

    # Another global batch: refused before anything is written, naming the flag and both ways out.
    listing = sorted(p.relative_to(run) for p in run.rglob("*"))
    other = _cli([*base[:-2], "--global_batch_size=32", "--model_dir=run", "--epochs=1"], tmp_path)
    assert other.returncode == 2, other.stderr[-3000:]
    assert "Traceback" not in other.stderr
    (line,) = _error_lines(other.stderr)
    assert line.startswith("dtf.run: error: --model_dir=run holds another run: --global_batch_size=32 (was 16)")
    assert "--restart" in line and "new --model_dir" in line
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == listing
    assert {name: _sha(run / name) for name in outputs} == outputs

    # More epochs: continues from the end of epoch 1, at a learning rate above 0 (the schedule spans 2 epochs now).
    more = _cli([*base, "--epochs=2"], tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "continuing the run in run from epoch 2, step 0 to --epochs=2 (it was planned for 1)" in more.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] == [1, 0] and summary["epochs"] == 2
    assert len(summary["history"]["loss"]) == 1
    lrs = _step_lrs(run)
    assert lrs[3] == 0 and lrs[4] > lrs[5] > 0  # the 1-epoch cosine ended at 0; steps 4-5 of the 2-epoch one
    continued = _sha(run / "model.keras")
    assert continued != outputs["model.keras"]

    # --restart with another plan: the old run is moved aside whole, this one trains from step 0.
    restarted = _cli([*base[:-2], "--global_batch_size=32", "--model_dir=run", "--epochs=1", "--restart"], tmp_path)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.before-restart-")]
    assert _sha(aside / "model.keras") == continued
    assert json.loads((aside / "summary.json").read_text())["global_batch_size"] == 16
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_batch_size"] == 32 and summary["resumed_from"] == [0, 0]
    assert "--restart" not in (run / "flags.txt").read_text()  # rerunning flags.txt must not restart again


def _step_lrs(run):
    """{optimizer step: learning rate} of the step-level TensorBoard scalars
    (dtf.experiment.summaries.TrainingScalars)."""
    import tensorflow as tf

    out = {}
    for path in (run / "tensorboard" / "train").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == "learning_rate":
                    out[event.step] = float(tf.make_ndarray(value.tensor))
    return out


def test_fewer_epochs_than_trained_are_refused(tmp_path):
    model_dir = str(tmp_path / "run")
    train.run_experiment(config_lib.Config(model_dir=model_dir, epochs=2, **QUICK))
    with pytest.raises(UserError, match=r"--epochs=1 is fewer than the 2 epoch\(s\) the run in .* has trained"):
        train.run_experiment(config_lib.Config(model_dir=model_dir, epochs=1, **QUICK))


def test_a_run_that_trained_every_epoch_but_wrote_no_outputs_writes_them_from_its_backup(tmp_path):
    model_dir = tmp_path / "run"
    first = train.run_experiment(config_lib.Config(model_dir=str(model_dir), epochs=1, **QUICK))
    weights = np.concatenate([w.ravel() for w in model_weights(model_dir / "model.keras")])
    for name in ("model.keras", "summary.json", "flags.txt"):  # as if killed before the export
        (model_dir / name).unlink()
    again = train.run_experiment(config_lib.Config(model_dir=str(model_dir), epochs=1, **QUICK))
    assert again["history"] == {} and again["resumed_from"] == [1, 0]
    assert again["final_metrics"]["val_loss"] == pytest.approx(first["final_metrics"]["val_loss"], rel=1e-6)
    assert np.array_equal(np.concatenate([w.ravel() for w in model_weights(model_dir / "model.keras")]), weights)


class Separable(dtf.Task):
    """Two linearly separable classes: a sane LR learns them within a few epochs."""

    def datasets(self):
        import tensorflow as tf

        x = np.random.default_rng(0).normal(size=(1024, 4)).astype("float32")
        y = (x[:, 0] + x[:, 1] > 0).astype("int32")
        return {"train": tf.data.Dataset.from_tensor_slices((x, y))}

    def build_model(self):
        import keras

        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(2)])


def test_a_diverged_run_resumes_only_from_finite_state_and_a_sane_lr_converges(tmp_path):
    from dtf.base.errors import TrainingDiverged

    # Diverges in its first epoch: no backup is finite, so none is kept, and the rerun trains from step 0.
    early = str(tmp_path / "early")
    separable = dict(QUICK, steps_per_epoch=8, global_batch_size=32)
    with pytest.raises(TrainingDiverged):
        train.run_experiment(config_lib.Config(model_dir=early, epochs=3, base_lr=1e30, **separable), task=Separable())
    assert callbacks.latest_backup(os.path.join(early, "backup")) is None
    sane = train.run_experiment(config_lib.Config(model_dir=early, epochs=3, base_lr=2.0, **separable),
                                task=Separable())
    losses = sane["history"]["loss"]
    assert sane["resumed_from"] == [0, 0] and all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]

    # Warms up from a small LR (epoch 1 is finite and backed up), then diverges: the backup stays the finite one
    # and says the run diverged after it; the rerun with a lower LR continues from it (a change of LR flags that
    # would otherwise be another plan).
    late = str(tmp_path / "late")
    with pytest.raises(TrainingDiverged):
        train.run_experiment(config_lib.Config(
            model_dir=late, epochs=4, base_lr=1e5, **{**QUICK, "warmup_epochs": 2.0}, warmup_start_lr=0.01,
            lr_schedule="constant"))
    backup = callbacks.latest_backup(os.path.join(late, "backup"))
    assert backup.diverged and backup.epoch >= 1 and backup.steps_done == 0
    assert all(np.isfinite(w).all() for w in _weights_of(backup))
    # The finite backup's weights are huge (its loss ~7e30); a tiny LR keeps the continuation finite whichever
    # batches follow (0.05 did only for some).
    resumed = train.run_experiment(config_lib.Config(model_dir=late, epochs=4, base_lr=1e-4, **QUICK))
    assert resumed["resumed_from"] == [backup.epoch, 0]
    assert all(np.isfinite(resumed["history"]["loss"]))
    # Other plan changes after a divergence are still refused.
    with pytest.raises(UserError, match="holds another run"):
        train.run_experiment(config_lib.Config(model_dir=late, epochs=5, base_lr=0.05, seed=7, **QUICK))


def _weights_of(backup):
    import h5py

    values = []
    with h5py.File(backup.weights, "r") as f:
        f.visititems(lambda name, obj: values.append(np.asarray(obj)) if isinstance(obj, h5py.Dataset) else None)
    assert values
    return values


def test_weights_without_their_metadata_are_an_error_not_a_fresh_start(tmp_path):
    model_dir = tmp_path / "run"
    train.run_experiment(config_lib.Config(model_dir=str(model_dir), epochs=1, **QUICK))
    for name in os.listdir(model_dir / "backup"):
        if name.startswith("training_metadata"):
            os.remove(model_dir / "backup" / name)
    with pytest.raises(UserError, match=r"has no training_metadata.json to say where it stands"):
        callbacks.latest_backup(str(model_dir / "backup"))


def test_a_lock_from_another_host_is_stale_only_when_its_heartbeat_stopped(tmp_path):
    lock_path = tmp_path / rundir.LOCK
    lock_path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": time.time(), "beat": time.time()}))
    with pytest.raises(UserError, match=r"is in use by another run \(pid 1 on elsewhere"):
        rundir.RunLock(str(tmp_path)).acquire()
    lock_path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0, "beat": time.time() - 1000}))
    lock = rundir.RunLock(str(tmp_path)).acquire()
    assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_path.exists()


@pytest.mark.slow
def test_a_second_run_is_refused_while_the_first_holds_the_dir_and_a_killed_runs_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    args = [*CLI_QUICK, "--global_batch_size=16", "--model_dir=run", "--epochs=200", "--progress=none"]
    env = dict(os.environ, PYTHONPATH=REPO)
    first = subprocess.Popen([sys.executable, "-m", "dtf.run", *args], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (run / "backup" / callbacks.METADATA).exists():  # training, and holding the lock
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-3000:] if first.poll() else ""
            time.sleep(0.5)
        second = _cli(args, tmp_path)
        assert second.returncode == 2
        (line,) = _error_lines(second.stderr)
        assert f"is in use by another run (pid {first.pid} on " in line and "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert (run / rundir.LOCK).exists()  # left behind by the killed run
    done = json.loads((run / "backup" / callbacks.METADATA).read_text())["epoch"]
    third = _cli([*args[:-2], f"--epochs={done + 1}", "--progress=none"], tmp_path)  # one more epoch
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"taking over the lock of a run that is gone (pid {first.pid}" in third.stderr
    assert "continuing the run in run from epoch" in third.stderr
    assert not (run / rundir.LOCK).exists()
