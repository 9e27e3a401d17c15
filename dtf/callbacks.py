"""Chief-aware Keras callbacks: only the chief writes to the real directory.

Keras 3's BackupAndRestore, ModelCheckpoint and TensorBoard have no multi-worker logic (tf_keras had
`distributed_file_utils`), so every worker writes the same files and they clobber each other or fail on h5 locks.
Here non-chief workers still do the writing (saving may read synchronized variables, so every worker must take part)
but into a private temporary directory that is removed when training ends. Restores read the chief's directory, so
after all workers restart they resume from the same state (the directory must be shared storage in a real cluster).
"""
import json
import os
import shutil
import tempfile
from typing import Optional

import keras
import tensorflow as tf

from dtf import cluster as cluster_lib


def write_dir(path: str, info: Optional[cluster_lib.ClusterInfo] = None) -> str:
    """Where this worker writes what belongs in `path`: `path` itself on the chief, a private temp dir elsewhere."""
    info = info or cluster_lib.parse_tf_config()
    if info.is_chief:
        os.makedirs(path, exist_ok=True)
        return path
    return tempfile.mkdtemp(prefix=f"dtf-{info.worker_id}-")


def remove_if_private(path: str, real_path: str):
    """Remove what `write_dir(real_path)` handed a non-chief worker; the chief's real directory stays."""
    if path != real_path:
        shutil.rmtree(path, ignore_errors=True)


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` that restores every worker from the chief's backup and lets only the
    chief write there. `delete_checkpoint` defaults to False: a finished run keeps its last backup, so rerunning the
    same job does not train again from scratch."""

    def __init__(self, backup_dir: str, save_freq="epoch", delete_checkpoint: bool = False,
                 cluster: Optional[cluster_lib.ClusterInfo] = None):
        self._real_dir = backup_dir
        self._own_dir = write_dir(backup_dir, cluster)
        super().__init__(self._own_dir, save_freq=save_freq, delete_checkpoint=delete_checkpoint)

    def _point_at(self, directory: str):
        self.backup_dir = directory
        self._weights_path = os.path.join(directory, "latest.weights.h5")
        self._training_metadata_path = os.path.join(directory, "training_metadata.json")
        self._prev_weights_path = f"{self._weights_path}.bkp"
        self._prev_training_metadata_path = f"{self._training_metadata_path}.bkp"

    def on_train_begin(self, logs=None):
        if not self.restore_on_begin:
            return
        self._point_at(self._real_dir)
        try:
            super().on_train_begin(logs)
        finally:
            self._point_at(self._own_dir)

    # Keras records the epoch only, so a restore from a mid-epoch backup would replay the whole epoch on top of
    # weights that already saw part of it. dtf also records `steps_done` in the epoch, and backs up at every epoch
    # end even when `save_freq` is a step count; `step_offset` is set by a run that starts mid-epoch.
    step_offset = 0
    # A resume that first finishes an interrupted epoch calls `fit` twice; only the first may restore (by the second,
    # the chief may be writing the backup that a non-chief would read).
    restore_on_begin = True

    def on_epoch_begin(self, epoch, logs=None):
        self._current_epoch = epoch
        self._steps_done = self.step_offset

    def on_train_batch_end(self, batch, logs=None):
        self._steps_done = self.step_offset + batch + 1
        super().on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._current_epoch, self._steps_done, self._last_batch_seen = epoch + 1, 0, 0
        self._save_model()

    def _save_model(self):
        super()._save_model()
        with open(self._training_metadata_path, "w") as f:
            json.dump({"epoch": self._current_epoch, "steps_done": self._steps_done}, f)

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        remove_if_private(self._own_dir, self._real_dir)


class ModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """`keras.callbacks.ModelCheckpoint` whose file lands in the real directory only on the chief, saved at the end
    of every `every_n_epochs`-th epoch (counted from epoch 0, so resumed runs keep the same schedule)."""

    def __init__(self, filepath: str, cluster: Optional[cluster_lib.ClusterInfo] = None, every_n_epochs: int = 1,
                 **kwargs):
        real_dir = os.path.dirname(filepath) or "."
        self._own_dir, self._real_dir = write_dir(real_dir, cluster), real_dir
        self.every_n_epochs = every_n_epochs
        super().__init__(os.path.join(self._own_dir, os.path.basename(filepath)), save_freq="epoch", **kwargs)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs == 0:
            super().on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        remove_if_private(self._own_dir, self._real_dir)


class TensorBoard(keras.callbacks.TensorBoard):
    """`keras.callbacks.TensorBoard` whose event files land in `log_dir` only on the chief.

    Also fixes a Keras 3 bug: with an integer `update_freq`, the batch-level `record_if` condition is still in force
    at epoch end, so epoch summaries (train and validation) are silently dropped unless the last batch number happens
    to be a multiple of `update_freq`. Epoch-end writes here always record.
    """

    def __init__(self, log_dir: str, cluster: Optional[cluster_lib.ClusterInfo] = None, **kwargs):
        self._real_dir = log_dir
        self._own_dir = write_dir(log_dir, cluster)
        super().__init__(log_dir=self._own_dir, **kwargs)

    def on_epoch_end(self, epoch, logs=None):
        with tf.summary.record_if(True):
            super().on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        remove_if_private(self._own_dir, self._real_dir)
