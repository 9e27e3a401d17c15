"""model_dir and tune_dir on a non-local TensorFlow filesystem: `ram://` (TensorFlow's in-memory filesystem, one
process) stands for gs:// and friends. Every output and the resume go through tf.io.gfile; nothing lands on disk."""
import json
import os

import keras
import tensorflow as tf

from dtf.config import config as config_lib
from dtf.experiment import train
from dtf.tuning import results, space, trial_files

QUICK = dict(dataset="synthetic/8x8x1", model="mlp", strategy="one_device", num_cpu_devices=1, global_batch_size=16,
             steps_per_epoch=3, log_every_steps=1, warmup_epochs=0, backup_every_steps=2, checkpoint_every=1)


def _read(path):
    with tf.io.gfile.GFile(path) as f:
        return f.read()


def test_a_run_writes_and_resumes_on_a_remote_filesystem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a path mistaken for a local one would appear here
    model_dir = "ram://dtf-test/run"
    first = train.run_experiment(config_lib.Config(model_dir=model_dir, epochs=1, **QUICK))
    assert first["resumed_from"] == [0, 0]
    names = set(tf.io.gfile.listdir(model_dir))
    assert {"flags.txt", "summary.json", "model.keras", "backup", "tensorboard", "checkpoints"} <= {
        n.rstrip("/") for n in names}, names
    assert json.loads(_read(f"{model_dir}/summary.json"))["epochs"] == 1
    assert "--model_dir=ram://dtf-test/run" in _read(f"{model_dir}/flags.txt")
    assert json.loads(_read(f"{model_dir}/backup/training_metadata.json"))["epoch"] == 1
    assert tf.io.gfile.glob(f"{model_dir}/tensorboard/train/events.out.tfevents.*")
    weights = keras.models.load_model(f"{model_dir}/model.keras").get_weights()

    second = train.run_experiment(config_lib.Config(model_dir=model_dir, epochs=2, **QUICK))
    assert second["resumed_from"] == [1, 0]  # read the remote backup
    assert len(second["history"]["loss"]) == 1
    assert keras.models.load_model(f"{model_dir}/model.keras").get_weights()[0].shape == weights[0].shape
    assert os.listdir(tmp_path) == []


def test_check_model_dir_on_a_remote_filesystem():
    train.check_model_dir("ram://dtf-test/check/run")
    assert not tf.io.gfile.exists("ram://dtf-test/check")  # the probe is gone, and nothing was created


def test_tune_results_on_a_remote_filesystem():
    tune_dir = "ram://dtf-test/tune"
    tf.io.gfile.makedirs(tune_dir)
    rows = [{"trial": "0", "global_batch_size": 16, "base_lr": 0.1, "warmup_epochs": 0.0, "lr_scaling": "linear",
             "peak_lr": 0.1, "objective": 0.5, "epochs_run": 1, "wall_time_s": 1.0, "status": "completed",
             "tuner": ""}]
    results.write_results(rows, tune_dir)
    assert _read(f"{tune_dir}/results.csv").splitlines()[0].startswith("trial,global_batch_size")
    path = results.write_best_flags(rows[0], tune_dir, config_lib.Config(model_dir="x"))
    assert "--global_batch_size=16" in _read(path)
    assert results.plot(rows, tune_dir, "val_accuracy") and tf.io.gfile.exists(f"{tune_dir}/objective_vs_batch.png")
    trial_files.write_info(tune_dir, "0", {"status": "completed"})
    assert trial_files.read_info(tune_dir, "0") == {"status": "completed"}
    space.check_signature(tune_dir, {"space": 1}, write=True)
    space.check_signature(tune_dir, {"space": 1}, write=False)  # the same sweep: accepted
