"""Elastic resume: a run continues on another number of workers or replicas at the same global batch.

The global batch is the truth (the per-replica batch follows from it), so the worker and replica counts are not part
of a run's plan (dtf.experiment.rundir). Every backup records the layout it was written on (`layout_record`); a rerun
on another layout resumes at the same global step, the same LR schedule position and the same data position:

- the epochs stay those of the layout the run started on (an implicit epoch, one pass, keeps that layout's pass
  length), so the schedule and the step count do not change;
- with `--input_sharding=batch` the global batch sequence does not depend on the layout: nothing else changes;
- with shares (files, records, one pipeline) a pass depends on the layout: the rest of the interrupted pass is
  rebuilt from the old layout's shares (dtf.distribute.inputs.Carry): every example of it not yet trained on is
  trained on exactly once, in other batches than the old layout would have formed; later passes are the new layout's.

Each change is logged in one line and recorded (step, old → new workers and replicas) for summary.json, TensorBoard
and the progress line, with the training examples/s of every layout the run trained on.
"""
import dataclasses
import os
import time
from typing import List, Optional

import keras
import tensorflow as tf

from dtf.base.logs import get_logger
from dtf.distribute import inputs
from dtf.experiment import callbacks as callbacks_lib, rundir

log = get_logger(__name__)


def layout_record(workers: int, layout: inputs.Layout, steps_per_epoch: int, epoch_mode: str) -> dict:
    """What a backup records of the layout it was written on."""
    return {"workers": workers, **dataclasses.asdict(layout), "steps_per_epoch": steps_per_epoch,
            "epoch_mode": epoch_mode}


def recorded_layout(model_dir: str) -> Optional[dict]:
    """The layout record of the newest backup in `model_dir` (None: no backup, or one from before issue 23)."""
    backup = callbacks_lib.latest_backup(os.path.join(model_dir, rundir.BACKUP_DIR))
    return backup.layout if backup is not None else None


def _layout(record: dict) -> inputs.Layout:
    return inputs.Layout(*(record[f.name] for f in dataclasses.fields(inputs.Layout)))


def _shape(record: dict) -> str:
    return f"{record['workers']} worker(s) × {record['replicas']} replica(s)"


@dataclasses.dataclass
class Resume:
    """Where a resumed run stands on its new layout: the rest of an interrupted pass to read first (None: nothing
    carried), the layout changes so far (oldest first) and the training time of each layout so far."""

    carry: Optional[inputs.Carry] = None
    changes: List[dict] = dataclasses.field(default_factory=list)
    throughput: List[dict] = dataclasses.field(default_factory=list)


def resume(backup, now: dict) -> Resume:
    """The `Resume` of a run on layout `now` (a `layout_record`) from `backup` (dtf.experiment.callbacks.Backup);
    logs one line when the layout changed."""
    was = backup.layout
    state = Resume(inputs.Carry.from_json(backup.carry) if backup.carry else None, list(backup.layout_changes),
                   [dict(t) for t in backup.throughput])
    if was is None or (was["workers"], was["replicas"], _layout(was)) == (now["workers"], now["replicas"],
                                                                          _layout(now)):
        return state
    spe, mode = now["steps_per_epoch"], now["epoch_mode"]
    step = backup.epoch * spe + backup.steps_done
    old, new = _layout(was), _layout(now)
    state.changes.append({"step": step, "from": {"workers": was["workers"], "replicas": was["replicas"]},
                          "to": {"workers": now["workers"], "replicas": now["replicas"]}})
    if old.same_passes(new):
        keeps = ("the global batch sequence is the uninterrupted run's (--input_sharding=batch)"
                 if new.sharding == "batch" else "the same passes and batches")
    elif state.carry is not None and step < state.carry.step + state.carry.steps:
        keeps = (f"still inside the rest of pass {state.carry.pass_number + 1} carried over from the layout before "
                 "the last change: each of its examples not yet trained on is trained on once")
    else:
        first_pass, skip, _ = inputs.pass_position(step, old.steps_read, state.carry)
        state.carry = inputs.Carry(step, first_pass, skip, old.steps_read - skip, old)
        keeps = (f"the {old.steps_read - skip} steps left of pass {first_pass + 1} are rebuilt from the old layout's "
                 f"{old.pipelines} share(s) by {old.sharding}: each example of it not yet trained on is trained on "
                 f"once, in other batches; later passes are {new.steps_read}-step passes of the new layout")
        if new.steps_read != spe and mode == "pass":
            keeps += f", {spe}-step epochs streamed over them"
    log.info(f"elastic: resuming at global step {step} on {_shape(now)} (the backup was written on {_shape(was)}), "
             f"same global batch: {keeps}")
    return state


def describe_changes(changes: List[dict]) -> str:
    """'step 17: 3 → 2 workers (3 → 2 replicas)' for each change, '; '-joined."""
    return "; ".join(f"step {c['step']}: {c['from']['workers']} → {c['to']['workers']} workers "
                     f"({c['from']['replicas']} → {c['to']['replicas']} replicas)" for c in changes)


class LayoutRecorder(keras.callbacks.Callback):
    """What every backup records of the layout (`backup_record`): the layout now, the carried rest of a pass, the
    changes so far, and every layout's training steps and seconds (validation excluded), this run's added to the
    earlier runs' of the same model_dir; summary.json shows examples/s per layout (`summary`). The chief also
    writes TensorBoard's `layout/workers` and `layout/replicas` at the step every run starts (and the change as
    text), into `log_dir`/train."""

    def __init__(self, now: dict, state: Resume, first_step: int, global_batch_size: int, log_dir: str,
                 is_chief: bool):
        super().__init__()
        self.now, self.state, self.global_batch_size = now, state, global_batch_size
        self.first_step = first_step
        self._log_dir = os.path.join(log_dir, "train") if is_chief else None
        self._mine = {"workers": now["workers"], "replicas": now["replicas"], "from_step": first_step, "steps": 0,
                      "seconds": 0.0}
        self._mark = None

    def backup_record(self) -> dict:
        return {"layout": self.now, "carry": self.state.carry.to_json() if self.state.carry else None,
                "layout_changes": self.state.changes, "throughput": self.records()}

    def on_train_begin(self, logs=None):
        if self._log_dir is None:
            return
        changes = [c for c in self.state.changes if c["step"] == self.first_step]
        writer = tf.summary.create_file_writer(self._log_dir)
        with writer.as_default(step=self.first_step), tf.summary.record_if(True):
            tf.summary.scalar("layout/workers", self.now["workers"])
            tf.summary.scalar("layout/replicas", self.now["replicas"])
            if changes:
                tf.summary.text("layout/change", describe_changes(changes))
        writer.close()
        self._log_dir = None  # once a run (a resume mid-epoch calls fit twice)

    def on_epoch_begin(self, epoch, logs=None):
        self._mark = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        self._mine["steps"] += 1
        self._mine["seconds"] += now - self._mark
        self._mark = now

    def records(self) -> List[dict]:
        """Every layout's steps and seconds so far; a run on the layout of the one before it extends its entry."""
        earlier = [dict(t) for t in self.state.throughput]
        if earlier and (earlier[-1]["workers"], earlier[-1]["replicas"]) == (self._mine["workers"],
                                                                             self._mine["replicas"]):
            last = earlier.pop()
            return earlier + [{**last, "steps": last["steps"] + self._mine["steps"],
                               "seconds": last["seconds"] + self._mine["seconds"]}]
        return earlier + [dict(self._mine)]

    def summary(self) -> List[dict]:
        """Per layout: workers, replicas, the global step it started at, steps, and training examples/s."""
        return [{"workers": t["workers"], "replicas": t["replicas"], "from_step": t["from_step"], "steps": t["steps"],
                 "examples_per_sec": t["steps"] * self.global_batch_size / max(t["seconds"], 1e-9)}
                for t in self.records()]

