"""TensorBoard content beyond Keras's own: learning rate, global examples/sec and step time every N steps and per
epoch, the resolved flags as text, and the config as HParams. Chief only writes into the real log directory."""
import dataclasses
import os
import time

import keras
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api

from dtf.experiment import atomic, callbacks as callbacks_lib
from dtf.optim import scaling

# The scalars TrainingScalars adds to every epoch's logs (so to the history), besides the task's metrics.
EPOCH_SCALARS = ("learning_rate", "examples_per_sec", "step_time_ms")


class TrainingScalars(keras.callbacks.Callback):
    """Writes `learning_rate`, `examples_per_sec` (global: all replicas) and `step_time_ms` every `every_n_steps`
    at the optimizer's step, and adds them to each epoch's logs, so Keras's TensorBoard callback (listed after this
    one) writes them as `epoch_…` tags and they land in the history and summary.json.

    Each tag is written by one writer only: TensorBoard drops points when one tag's steps go backwards across files.
    """

    def __init__(self, log_dir: str, global_batch_size: int, every_n_steps: int = 10, cluster=None):
        super().__init__()
        self._real_dir = log_dir
        self._dir = callbacks_lib.write_dir(log_dir, cluster)
        self.global_batch_size, self.every = global_batch_size, every_n_steps
        self._writer = None

    def on_train_begin(self, logs=None):
        self._writer = tf.summary.create_file_writer(self._dir)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self._window_start = self._last_step_end = time.perf_counter()
        self._epoch_steps = self._window_steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self._last_step_end = time.perf_counter()  # epoch rates stop here: Keras validates before on_epoch_end
        self._epoch_steps += 1
        self._window_steps += 1
        if self._epoch_steps % self.every == 0:
            now = time.perf_counter()
            seconds, steps = now - self._window_start, self._window_steps
            # Step and LR stay tensors: the summary ops read them, Python never waits for their values.
            optimizer = self.model.optimizer
            with self._writer.as_default(step=optimizer.iterations), tf.summary.record_if(True):  # record_if: Keras's is global
                tf.summary.scalar("learning_rate", tf.cast(optimizer.learning_rate, tf.float32))
                tf.summary.scalar("examples_per_sec", steps * self.global_batch_size / seconds)
                tf.summary.scalar("step_time_ms", 1000 * seconds / steps)
            self._window_start, self._window_steps = now, 0

    def on_epoch_end(self, epoch, logs=None):
        seconds = max(self._last_step_end - self._epoch_start, 1e-9)
        if logs is not None:
            logs["learning_rate"] = scaling.current_lr(self.model.optimizer)
            logs["examples_per_sec"] = self._epoch_steps * self.global_batch_size / seconds
            logs["step_time_ms"] = 1000 * seconds / max(self._epoch_steps, 1)
        self._writer.flush()

    def on_train_end(self, logs=None):
        self._writer.close()
        callbacks_lib.remove_if_private(self._dir, self._real_dir)


def hparams(config) -> dict:
    """The config as HParams values (TensorBoard takes bool/int/float/str; None and lists become strings)."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        out[field.name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


def write_run_metadata(log_dir: str, config):
    """The resolved flagfile as text and the config as HParams, once, at step 0."""
    with atomic.writing(log_dir):
        tf.io.gfile.makedirs(log_dir)
    with tf.summary.create_file_writer(os.path.join(log_dir, "train")).as_default(step=0):
        tf.summary.text("flags", "```\n" + config.to_flagfile() + "```")
        hparams_api.hparams(hparams(config))
