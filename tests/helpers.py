"""Helpers shared by several test files (and the scripts they start): one place, so no test imports another test
module. Fixtures live in conftest.py; a test file's private helpers stay in that file."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import keras
import numpy as np
import psutil
import pytest
import tensorflow as tf

from dtf.optim import scaling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- weights ---------------------------------------------------------------------------------------------------------

def model_weights(path):
    """The weights saved at `path`: a model_dir (its model.keras), a .keras file, or an .npz of `np.savez(*weights)`."""
    path = str(path)
    if path.endswith(".npz"):
        with np.load(path) as f:
            return [f[f"arr_{i}"] for i in range(len(f.files))]
    if os.path.isdir(path):
        path = os.path.join(path, "model.keras")
    return keras.models.load_model(path, compile=False).get_weights()


def max_weight_delta(a, b) -> float:
    """max |a - b| over every weight; `a` and `b` are lists of arrays or paths `model_weights` reads."""
    a, b = (model_weights(w) if isinstance(w, (str, os.PathLike)) else w for w in (a, b))
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


# --- `python -m dtf.launch` in a subprocess --------------------------------------------------------------------------

PID_LINE = re.compile(r"launch: (chief|worker \d+) pid (\d+) \((127\.0\.0\.1:\d+)\)")


def launch_env(**extra):
    """os.environ with the repository and tests/ importable, for `python -m dtf.launch` and its workers."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]), **extra)


def write_script(tmp_path, name: str, code: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return str(path)


def process(pid: int):
    """A handle that knows its process's start time, so a reused PID (they wrap fast here) is not mistaken for it."""
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def alive(handle) -> bool:
    try:
        return handle is not None and handle.is_running() and handle.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for_backup(model_dir, reached, timeout_s: float, alive=lambda: True, report=lambda: "") -> dict:
    """The chief's backup metadata in `model_dir` once `reached(metadata)` holds; fails (showing `report()`) after
    `timeout_s`, or once `alive()` is false."""
    metadata, deadline = os.path.join(model_dir, "backup", "training_metadata.json"), time.monotonic() + timeout_s
    while True:
        try:
            with open(metadata) as f:
                backup = json.load(f)
        except (OSError, ValueError):  # not written yet, or caught mid-write
            backup = {}
        if reached(backup):
            return backup
        assert time.monotonic() < deadline and alive(), report()
        time.sleep(0.01)


def launch_to_success(args, cwd, timeout_s: float):
    """Run `python -m dtf.launch ARGS` to the end (a reference run); fail the test with its output unless it exits 0."""
    launcher = Launcher(list(args), str(cwd))
    try:
        assert launcher.wait(timeout_s) == 0, launcher.output
    finally:
        launcher.cleanup()


class Launcher:
    """`python -m dtf.launch` in a subprocess; collects its output, the worker pids it announces, and every
    descendant it has been seen with, so that the test can check all of them are gone."""

    def __init__(self, args, cwd):
        self.proc = subprocess.Popen([sys.executable, "-m", "dtf.launch", *args], cwd=cwd, env=launch_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines, self.workers = [], []  # workers: (role, pid, address) in start order
        self.seen = set()  # psutil.Process: equal only for the same pid *and* start time
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            m = PID_LINE.search(line)
            if m:
                self.workers.append((m.group(1), int(m.group(2)), m.group(3)))
                self.seen.add(process(int(m.group(2))))
                self.snapshot()

    def snapshot(self):
        try:
            self.seen.update(psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass

    def wait_for(self, pattern: str, timeout_s: float) -> str:
        """The first output line so far matching `pattern`, waiting up to `timeout_s` for one."""
        deadline = time.monotonic() + timeout_s
        while True:
            done = not self._reader.is_alive()
            match = next((line for line in list(self.lines) if re.search(pattern, line)), None)
            if match is not None:
                return match
            if done or time.monotonic() > deadline:
                pytest.fail(f"no line matching {pattern!r}:\n" + "\n".join(self.lines[-60:]))
            time.sleep(0.05)

    def wait_for_mid_epoch_backup(self, model_dir, epoch: int, timeout_s: float):
        """Until the chief's backup in `model_dir` is past step 0 of (0-based) `epoch`, while the launcher runs."""
        wait_for_backup(model_dir, lambda b: b.get("epoch") == epoch and b.get("steps_done", 0) > 0, timeout_s,
                        alive=lambda: self.proc.poll() is None, report=lambda: self.output)

    def wait(self, timeout_s: float) -> int:
        try:
            status = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail("launcher did not finish in time:\n" + "\n".join(self.lines[-60:]))
        self._reader.join(timeout=10)  # the rest of its output
        return status

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def leftovers(self):
        return sorted(handle.pid for handle in list(self.seen) if alive(handle))

    def cleanup(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for handle in list(self.seen):
            if alive(handle):
                handle.kill()


# --- input pipelines over records that carry their id (test_data.py, its probe script, and the files beside it) -----

TRAIN_IDS = 96  # 8 TFRecord files of 12
EVAL_FILE_LENGTHS = [13, 10, 13, 10, 12, 10, 12, 10]  # 90, uneven: 2 pipelines get 50 and 40
EVAL_RECORDS = 81  # 2 pipelines by records get 41 and 40: 6 and 5 batches of 8, with known cardinality
GLOBAL_BATCH = 16
STREAM_PASS_STEPS = 62  # the default experiment's pass, for the streaming-epoch checks (30-step epochs)
SHAPES_BATCH = 200
WEIGHTS = np.array([[0.5, -1.0, 0.25], [1.5, 0.5, -0.5], [-1.0, 0.75, 1.0], [0.25, -0.5, 2.0]], np.float32)


class PipelineStrategy:
    """Stands in for a strategy with `pipelines` workers and `replicas` replicas in all: returns every pipeline's
    dataset, so one process sees what each worker would read."""

    def __init__(self, pipelines: int, replicas: int):
        self.pipelines, self.num_replicas_in_sync = pipelines, replicas

    def distribute_datasets_from_function(self, dataset_fn):
        return [dataset_fn(tf.distribute.InputContext(self.pipelines, i, self.num_replicas_in_sync))
                for i in range(self.pipelines)]


def with_id(i):
    return tf.sin(tf.cast(i, tf.float32) * tf.constant([1.0, 2.0, 3.0, 4.0])), i


def parse_id(serialized):
    return with_id(tf.io.parse_single_example(serialized, {"id": tf.io.FixedLenFeature([], tf.int64)})["id"])


def write_id_files(directory, lengths):
    """TFRecord files holding consecutive ids, `lengths[k]` records in file k."""
    os.makedirs(directory)
    paths, start = [], 0
    for k, length in enumerate(lengths):
        path = os.path.join(directory, f"ids-{k:02d}.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for i in range(start, start + length):
                example = tf.train.Example(features=tf.train.Features(
                    feature={"id": tf.train.Feature(int64_list=tf.train.Int64List(value=[i]))}))
                writer.write(example.SerializeToString())
        paths.append(path)
        start += length
    return paths


# --- the constant-gradient model (test_scaling.py and its mirrored subprocess) ---------------------------------------

def constant_gradient_model(optimizer):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    # Per-example loss: Keras averages it over the global batch. (A scalar-returning loss is not divided by the
    # replica count under MirroredStrategy in Keras 3.15, so its gradient would be replicas × too large.)
    model.compile(optimizer, loss=lambda y_true, y_pred: y_pred)
    return model


class RecordLR(keras.callbacks.Callback):
    """current_lr before each batch and the kernel after it."""

    def __init__(self):
        super().__init__()
        self.lrs, self.kernels = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.lrs.append(scaling.current_lr(self.model.optimizer))

    def on_train_batch_end(self, batch, logs=None):
        self.kernels.append(float(self.model.get_weights()[0][0, 0]))


def mirrored_schedule():
    return scaling.build_schedule("cosine", peak_lr=0.4, total_steps=12, steps_per_epoch=4, warmup_epochs=1,
                                  warmup_start_lr=0.1, final_lr=0.04)


# --- the sbatch script on a real Slurm (test_slurm.py, test_slurm_preemption.py) -------------------------------------

SLURM_RUN = ["python", "-m", "dtf.run", "--dataset=synthetic", "--model=mlp", "--epochs=2", "--steps_per_epoch=10",
             "--global_batch_size=32", "--input_sharding=batch", "--validation_freq=10", "--cluster_timeout=60"]


def slurm_env(slurm, **extra):
    """The cluster's environment with dtf importable and this Python first on PATH, for sbatch and its steps."""
    return slurm.env(PYTHONPATH=REPO, PATH=os.path.dirname(sys.executable) + os.pathsep + slurm.env()["PATH"],
                     **extra)


def emit_slurm(*args) -> str:
    """The sbatch script `python -m dtf.launch --emit=slurm ARGS` prints."""
    proc = subprocess.run([sys.executable, "-m", "dtf.launch", "--emit=slurm", *args], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def submit(slurm, script: str, path, env=None) -> str:
    """Write `script` to `path`, sbatch it; the job id."""
    path.write_text(script)
    out = slurm.run(["sbatch", "--parsable", str(path)], env=env or slurm_env(slurm), cwd=str(path.parent)).stdout
    return out.strip().split(";")[0]
