"""Chief-aware Keras callbacks: only the chief writes to the real directory.

Keras 3's BackupAndRestore, ModelCheckpoint and TensorBoard have no multi-worker logic (tf_keras had
`distributed_file_utils`), so every worker writes the same files and they clobber each other or fail on h5 locks.
Here non-chief workers still do the writing (saving may read synchronized variables, so every worker must take part)
but into a private temporary directory that is removed when training ends. Restores read the chief's directory, so
after all workers restart they resume from the same state (the directory must be shared storage in a real cluster).
All directory I/O goes through `tf.io.gfile`, so the real directory may be on any TensorFlow filesystem (gs://, …).
"""
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import uuid
from typing import Optional

import keras
import tensorflow as tf

from dtf.base.errors import UserError
from dtf.base.logs import get_logger
from dtf.cluster import tf_config as cluster_lib
from dtf.experiment import atomic
from dtf.upstream import keras as keras_upstream

log = get_logger(__name__)


def write_dir(path: str, info: Optional[cluster_lib.ClusterInfo] = None) -> str:
    """Where this worker writes what belongs in `path`: `path` itself on the chief, a private temp dir elsewhere."""
    info = info or cluster_lib.parse_tf_config()
    if info.is_chief:
        with atomic.writing(path):
            tf.io.gfile.makedirs(path)
        return path
    return tempfile.mkdtemp(prefix=f"dtf-{info.worker_id}-")


def remove_if_private(path: str, real_path: str):
    """Remove what `write_dir(real_path)` handed a non-chief worker; the chief's real directory stays."""
    if path != real_path and tf.io.gfile.exists(path):
        tf.io.gfile.rmtree(path)


# A backup is a pair: a weights file with a name of its own, and METADATA naming it with its checksum. METADATA is
# replaced atomically, after the weights are complete, and PREVIOUS keeps the pair it replaced; so a kill at any
# moment leaves at least one whole, consistent pair, and a reader can tell a good pair from a damaged one.
METADATA = "training_metadata.json"
PREVIOUS = f"{METADATA}.bkp"
_WEIGHTS_PREFIX = "weights-"
_LEGACY_WEIGHTS = "latest.weights.h5"  # Keras's name, used by backups written before dtf named its weights files


@dataclasses.dataclass(frozen=True)
class Backup:
    epoch: int  # the epoch to run next (or the one in progress when steps_done > 0)
    steps_done: int  # steps of that epoch already trained
    weights: str  # path of the weights file
    plan: Optional[dict] = None  # the run's plan (dtf.experiment.rundir; None: written by a dtf that did not record it)
    epochs: Optional[int] = None  # the epochs the run was planned for
    diverged: bool = False  # the run went on past this backup and diverged (this one is its last finite state)
    # Elastic resume (dtf.experiment.elastic): the layout it was written on, the carried rest of a pass, the layout
    # changes so far, each layout's training steps and seconds (None/empty: written by a dtf that did not record them).
    layout: Optional[dict] = None
    carry: Optional[dict] = None
    layout_changes: tuple = ()
    throughput: tuple = ()


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_pair(backup_dir: str, name: str) -> Backup:
    """The backup METADATA or PREVIOUS describes; ValueError naming what is wrong if it is not whole."""
    try:
        with tf.io.gfile.GFile(os.path.join(backup_dir, name)) as f:
            meta = json.loads(f.read())
        epoch, steps_done = int(meta["epoch"]), int(meta.get("steps_done", 0))
        weights_name = meta.get("weights", _LEGACY_WEIGHTS)
        epochs = int(meta["epochs"]) if "epochs" in meta else None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{name} is not valid backup metadata ({type(e).__name__}: {e})") from None
    weights = os.path.join(backup_dir, weights_name)
    if not tf.io.gfile.exists(weights):
        raise ValueError(f"{name} names {weights_name}, which is missing")
    if "sha256" in meta and _sha256(weights) != meta["sha256"]:
        raise ValueError(f"{weights_name} does not match the checksum in {name} (a partial write)")
    return Backup(epoch, steps_done, weights, meta.get("plan"), epochs, bool(meta.get("diverged")), meta.get("layout"),
                  meta.get("carry"), tuple(meta.get("layout_changes") or ()), tuple(meta.get("throughput") or ()))


_warned = set()


def latest_backup(backup_dir: str) -> Optional[Backup]:
    """The newest whole backup in `backup_dir`, None if there is none. A damaged newest backup falls back to the
    previous one with a warning; when backup files exist but none is whole, a UserError: silently training again
    from step 0 would be worse than stopping."""
    problems = []
    for name in (METADATA, PREVIOUS):
        if not tf.io.gfile.exists(os.path.join(backup_dir, name)):
            if name == METADATA and tf.io.gfile.exists(os.path.join(backup_dir, PREVIOUS)):
                problems.append(f"{METADATA} is missing")
            continue
        try:
            backup = _read_pair(backup_dir, name)
        except (ValueError, tf.errors.OpError) as e:
            problems.append(str(e))
            continue
        if problems:
            message = (f"the newest backup in {backup_dir} is damaged ({'; '.join(problems)}); resuming from the "
                       f"previous one (epoch {backup.epoch + 1}, step {backup.steps_done})")
            if message not in _warned:  # the runner and the callback both look; say it once
                _warned.add(message)
                log.warning(message)
        return backup
    if not problems and tf.io.gfile.isdir(backup_dir):
        orphans = sorted(name for name in tf.io.gfile.listdir(backup_dir)
                         if name.startswith(_WEIGHTS_PREFIX) or name == _LEGACY_WEIGHTS)
        if orphans:
            problems.append(f"{orphans[-1]} has no {METADATA} to say where it stands")
    if problems:
        raise UserError(f"the backup in {backup_dir} cannot be resumed: {'; '.join(problems)}; restore it from a "
                        f"copy, or delete {backup_dir} to train again from step 0")
    return None


def restore(model: keras.Model, backup: Backup):
    """Load a backup's weights and optimizer state into a compiled model."""
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)  # its variables must exist to be loaded
    model.load_weights(backup.weights)


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` that restores every worker from the chief's backup and lets only the
    chief write there. `delete_checkpoint` defaults to False: a finished run keeps its last backup, so rerunning the
    same job does not train again from scratch.

    It keeps its own position (`epoch`, `steps_done`) and backs up itself (`save_now`): of Keras's class only the
    constructor's checks, `backup_dir`, `save_freq` and `on_train_end`'s `delete_checkpoint` are used, none of its
    private state."""

    def __init__(self, backup_dir: str, save_freq="epoch", delete_checkpoint: bool = False,
                 cluster: Optional[cluster_lib.ClusterInfo] = None, plan: Optional[dict] = None,
                 epochs: Optional[int] = None, layout=None):
        """
        Args:
            backup_dir: the chief's backup directory (on storage every worker reads); other workers write to a
                private temporary directory instead.
            save_freq: "epoch", or a step count: also back up every that many steps (counted as Keras does, across
                epochs); dtf backs up at every epoch end either way.
            delete_checkpoint: remove the backup when training ends (Keras's default is True; dtf keeps it).
            cluster: where this process sits (default: TF_CONFIG); decides who writes to `backup_dir`.
            plan, epochs: what the run is (dtf.experiment.rundir), recorded with every backup so a rerun can tell.
            layout: a dtf.experiment.elastic.LayoutRecorder (listed before this callback): its `backup_record()` is
                recorded with every backup, so a rerun on another layout resumes at the same data position.
        """
        self._layout = layout
        self._real_dir = backup_dir
        self._own_dir = write_dir(backup_dir, cluster)
        self._record = {"plan": plan, "epochs": epochs} if plan is not None else {}
        self._finite = True
        self._epoch, self._steps, self._steps_since_batch_backup = 0, 0, 0
        super().__init__(self._own_dir, save_freq=save_freq, delete_checkpoint=delete_checkpoint)

    @property
    def epoch(self) -> int:
        """The epoch to run next, or the one in progress when `steps_done` > 0 (as `Backup.epoch`)."""
        return self._epoch

    @property
    def steps_done(self) -> int:
        """Steps of `epoch` trained so far."""
        return self._steps

    # The backup to restore at the start of training: None reads the newest whole one (`latest_backup`); dtf.run sets
    # the one its rerun decision read (dtf.experiment.rundir), or False to start fresh, so every worker restores the
    # same one.
    restore_from = None

    def on_train_begin(self, logs=None):
        """Restore from `restore_from`, by default the newest whole backup in the chief's directory."""
        if not self.restore_on_begin or self.restore_from is False:
            return
        backup = self.restore_from or latest_backup(self._real_dir)
        if backup is None:
            return
        restore(self.model, backup)
        keras_upstream.set_resume_epoch(self.model, backup.epoch)

    # Keras records the epoch only, so a restore from a mid-epoch backup would replay the whole epoch on top of
    # weights that already saw part of it. dtf also records `steps_done` in the epoch, and backs up at every epoch
    # end even when `save_freq` is a step count; `step_offset` is set by a run that starts mid-epoch.
    step_offset = 0
    # A resume that first finishes an interrupted epoch calls `fit` twice; only the first may restore (by the second,
    # the chief may be writing the backup that a non-chief would read).
    restore_on_begin = True

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._steps = self.step_offset

    def on_train_batch_end(self, batch, logs=None):
        steps = self.step_offset + batch + 1
        self._steps_since_batch_backup += steps - self._steps  # Keras's count: across epochs, from the last such backup
        self._steps = steps
        self._check_finite(logs)
        if self.save_freq != "epoch" and self._steps_since_batch_backup >= self.save_freq:
            self._steps_since_batch_backup = 0
            self.save_now()

    def on_epoch_end(self, epoch, logs=None):
        self._epoch, self._steps = epoch + 1, 0
        self._check_finite(logs)
        self.save_now()

    def _check_finite(self, logs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self._finite = False

    def save_now(self):
        """Back up at (`epoch`, `steps_done`): weights under a new name, then the metadata naming them replaces the
        old atomically (the old is kept as PREVIOUS), then files no pair names are deleted. See METADATA for why a
        kill at any step is safe. Once the loss is NaN/inf nothing is saved: the last backup stays the last finite
        state (marked at train end)."""
        if not self._finite:
            return
        with atomic.writing(self.backup_dir):
            self._write_backup(self.backup_dir)

    def _write_backup(self, directory: str):
        tf.io.gfile.makedirs(directory)
        name = f"{_WEIGHTS_PREFIX}e{self._epoch}-s{self._steps}-{uuid.uuid4().hex[:8]}.weights.h5"
        with atomic.replacing(os.path.join(directory, name)) as tmp:  # a weights file without metadata is an error
            self.model.save_weights(tmp)
        keep = {name}
        try:
            previous = _read_pair(directory, METADATA)
        except (ValueError, tf.errors.OpError):  # none yet (or not whole: then it is no fallback either)
            previous = None
        if previous is not None:
            with tf.io.gfile.GFile(os.path.join(directory, METADATA)) as f:
                atomic.write_text(os.path.join(directory, PREVIOUS), f.read())
            keep.add(os.path.basename(previous.weights))
        atomic.write_json(os.path.join(directory, METADATA), {
            "epoch": self._epoch, "steps_done": self._steps, "weights": name,
            "sha256": _sha256(os.path.join(directory, name)), **self._record,
            **(self._layout.backup_record() if self._layout is not None else {})})
        for leftover in tf.io.gfile.listdir(directory):
            if leftover not in keep and (leftover.startswith(_WEIGHTS_PREFIX) or atomic.is_temporary(leftover)
                                         or leftover == _LEGACY_WEIGHTS):
                tf.io.gfile.remove(os.path.join(directory, leftover))

    def on_train_end(self, logs=None):
        if not self._finite:
            self._mark_diverged()
        super().on_train_end(logs)
        self.remove_private_dir()

    def remove_private_dir(self):
        """Remove this worker's private write directory (non-chief workers; the chief's real one stays)."""
        remove_if_private(self._own_dir, self._real_dir)

    def _mark_diverged(self):
        """Record in the last finite backup that the run diverged after it (a rerun may then change the LR)."""
        path = os.path.join(self.backup_dir, METADATA)
        if not tf.io.gfile.exists(path):
            return
        with tf.io.gfile.GFile(path) as f:
            meta = json.loads(f.read())
        atomic.write_json(path, {**meta, "diverged": True})


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
