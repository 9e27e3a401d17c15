"""One experiment from a Config: strategy → data → model/optimizer in scope → fit → evaluate → export → summary.

`dtf.run` calls `run_experiment`; `dtf.tune` uses `Experiment` piece by piece so that a trial is exactly a run.
Only the chief writes into `model_dir`; other workers write to private temporary directories (dtf.experiment.callbacks).
"""
import contextlib
import math
import os
import time
import warnings
from typing import List, Optional, Sequence

import keras
import tensorflow as tf

from dtf.base import versions
from dtf.base.errors import TrainingDiverged, UserError
from dtf.base.logs import get_logger
from dtf.cluster import data_service as data_service_lib, tf_config as cluster_lib
from dtf.config import specs
from dtf.config.batch_plan import BatchPlan
from dtf.config.config import Config
from dtf.distribute import inputs as data_lib, strategy as strategy_lib
from dtf.experiment import (atomic, callbacks as callbacks_lib, elastic, preemption, progress as progress_lib,
                            rundir, stop_at, task as task_lib)
from dtf.experiment.summaries import TrainingScalars, write_run_metadata
from dtf.optim import noise_scale, scaling
from dtf.upstream import keras as keras_upstream

log = get_logger(__name__)

DEFAULT_GLOBAL_BATCH = 64
BACKUP_DIR = rundir.BACKUP_DIR
MAX_STEPS = 2**31 - 1  # the largest step count every schedule and counter takes (int32)


# EVAL_NOTE: evaluation datasets are finite and read to the end (no `steps`): with `steps` Keras keeps one iterator
# across validations and the second one finds it empty. Reading to the end makes Keras warn on every validation.
warnings.filterwarnings("ignore", message="Your input ran out of data")


def resolve_cluster(config: Config) -> cluster_lib.ClusterInfo:
    if config.cluster_resolver == "slurm":
        if config.worker_hosts:
            raise UserError("--cluster_resolver=slurm and --worker_hosts both name the cluster; use one")
        os.environ["TF_CONFIG"] = cluster_lib.slurm_tf_config()
    return cluster_lib.resolve_cluster(config.worker_hosts, config.task_index)


def create_strategy(config: Config) -> tf.distribute.Strategy:
    return strategy_lib.create_strategy(
        config.strategy, num_cpu_devices=config.num_cpu_devices, num_gpus=config.num_gpus,
        communication=config.communication, cross_device_ops_name=config.cross_device_ops,
        num_packs=config.num_packs, cluster_timeout_s=config.cluster_timeout)


def check_model_dir(path: str, flag: str = "--model_dir"):
    """Fail before training if the chief cannot write `path` (on any TensorFlow filesystem; nothing is left behind)."""
    reason = atomic.unwritable(path)
    if reason:
        raise UserError(f"{flag}={path} is not writable ({reason}); choose a directory you can write")


class Experiment:
    """The parts of one run, built in dtf's one order; each method is used by both the runner and the tuner.

    `task` defaults to the one the config names (`--task`, else the built-in task of `--dataset`/`--model`).
    `data_service`: the running service --data_service names (dtf.cluster.data_service.running), for training input."""

    def __init__(self, config: Config, strategy: tf.distribute.Strategy, cluster: cluster_lib.ClusterInfo,
                 task: Optional[task_lib.Task] = None, data_service: Optional[data_service_lib.Service] = None):
        self.config, self.strategy, self.cluster = config, strategy, cluster
        self.data_service = data_service
        self.task = task or task_lib.from_config(config)
        self.task_label = (f"--task={config.task}" if config.task else
                           task_lib.BUILTIN if task is None else f"task {type(task).__qualname__}")
        self.plan = BatchPlan.create(
            strategy.num_replicas_in_sync, global_batch_size=config.global_batch_size or (
                None if config.per_replica_batch_size else DEFAULT_GLOBAL_BATCH),
            per_replica_batch_size=config.per_replica_batch_size)
        task_lib.require(self.task, self.task_label, "datasets", "build_model")
        self.train_split, self.eval_split = task_lib.splits(self.task, self.task_label)
        if self.eval_split is None:
            log.info(f"{self.task_label} has no validation or test split: training without validation")
        self.sharding, sizes = (("batch", [self.train_split.num_examples]) if config.input_sharding == "batch"
                                else data_lib.share_sizes(self.train_split, cluster.num_workers))
        self.steps_per_pass = data_lib.training_steps(sizes, self.plan.global_batch_size, self.plan.num_replicas)
        self.set_epochs()
        self.resume_state, self.first_step = elastic.Resume(), 0
        self.recorder: Optional[elastic.LayoutRecorder] = None  # made with the callbacks of a run that backs up
        self.effective_batch = self.plan.global_batch_size * (config.gradient_accumulation_steps or 1)
        self.peak_lr = scaling.scaled_lr(config.base_lr, self.effective_batch, config.reference_batch_size,
                                         config.lr_scaling)

    def set_epochs(self, origin: Optional[dict] = None):
        """Steps per epoch and epoch mode. `origin`: the layout record of the backup this run resumes
        (dtf.experiment.elastic): on another layout the run keeps the epochs it started with (an implicit epoch stays
        its first layout's pass), so its LR schedule and step count do not change."""
        config = self.config
        self.steps_per_epoch = config.steps_per_epoch or (origin or {}).get("steps_per_epoch") or self.steps_per_pass
        if origin and config.epoch_mode in ("auto", origin["epoch_mode"]):
            self.epoch_mode = origin["epoch_mode"]
        else:
            self.epoch_mode = data_lib.resolve_epoch_mode(config.epoch_mode, config.steps_per_epoch,
                                                          self.steps_per_pass)
        # One-pass epochs kept from another layout stream over this layout's passes when theirs differ in length.
        self.reading_mode = data_lib.reading_mode(self.epoch_mode, self.steps_per_epoch, self.steps_per_pass,
                                                  one_pass_epochs=config.steps_per_epoch is None)
        self.total_steps = self.steps_per_epoch * config.epochs
        if self.total_steps > MAX_STEPS:
            raise UserError(f"--epochs={config.epochs} × {self.steps_per_epoch} steps per epoch is {self.total_steps} "
                            f"steps, more than a run can count ({MAX_STEPS}); lower --epochs")

    def layout_record(self) -> dict:
        """This run's layout, as its backups record it (dtf.experiment.elastic)."""
        layout = data_lib.Layout(self.cluster.num_workers, self.plan.num_replicas, self.sharding,
                                 data_lib.steps_read(self.reading_mode, self.steps_per_epoch, self.steps_per_pass))
        return elastic.layout_record(self.cluster.num_workers, layout, self.steps_per_epoch, self.epoch_mode)

    def resume(self, backup: callbacks_lib.Backup):
        """Resume from `backup`, on this layout or another (logged; dtf.experiment.elastic)."""
        self.resume_state = elastic.resume(backup, self.layout_record())
        self.first_step = backup.epoch * self.steps_per_epoch + backup.steps_done

    def resolved_config(self) -> Config:
        """The config to re-run this experiment anywhere: the global batch made explicit (it is the truth), the
        built-in task's defaults filled in, a task file's path made absolute, and no per-process cluster position."""
        c = self.config
        task = dict(task=specs.canonical_spec(c.task)) if c.task else dict(
            dataset=c.dataset or task_lib.DEFAULT_DATASET, model=c.model or task_lib.DEFAULT_MODEL)
        return c.replace(global_batch_size=self.plan.global_batch_size, per_replica_batch_size=None,
                         epoch_mode=self.epoch_mode, worker_hosts=None, task_index=None, **task)

    def describe(self) -> str:
        return (f"{strategy_lib.strategy_name(self.strategy)} × {self.plan.num_replicas} replica(s), global batch "
                f"{self.plan.global_batch_size} = {self.plan.num_replicas} × {self.plan.per_replica_batch_size}, "
                f"{scaling.explain_lr(self.config.base_lr, self.effective_batch, self.config.reference_batch_size, self.config.lr_scaling)}, "
                f"{self.steps_per_epoch} steps/epoch{self._streamed()} × {self.config.epochs} epochs")

    def _streamed(self) -> str:
        return f" (streamed over {self.steps_per_pass}-step passes)" if self.epoch_mode == "stream" else ""

    def _preprocess_batch(self, training: bool):
        if type(self.task).preprocess_batch is task_lib.Task.preprocess_batch:
            return None
        return lambda batch: self.task.preprocess_batch(batch, training=training)

    def train_data(self, initial_epoch: int = 0, initial_step: int = 0) -> data_lib.DistributedData:
        c = self.config
        return data_lib.distribute_dataset(
            self.strategy, self.train_split, self.plan.global_batch_size, training=True, seed=c.seed,
            shuffle_buffer=c.shuffle_buffer, cache=c.cache, deterministic=c.deterministic,
            initial_epoch=initial_epoch, initial_step=initial_step, steps_per_epoch=self.steps_per_epoch,
            epoch_mode=self.reading_mode,
            sharding=c.input_sharding, preprocess_batch=self._preprocess_batch(True), data_service=self.data_service,
            carry=self.resume_state.carry)

    def eval_data(self) -> Optional[data_lib.DistributedData]:
        if self.eval_split is None:
            return None
        return data_lib.distribute_dataset(self.strategy, self.eval_split, self.plan.global_batch_size,
                                           training=False, cache=self.config.cache,
                                           preprocess_batch=self._preprocess_batch(False))

    def sample_batch(self, split=None):
        """(features, labels) of the first per-replica batch of `split` (default: the training split), as a replica
        gets it (one row more when that is odd: the loss check splits it in halves)."""
        rows = self.plan.per_replica_batch_size + self.plan.per_replica_batch_size % 2
        batch = (split or self.train_split).read(None).take(rows).batch(rows)
        preprocess = self._preprocess_batch(False)
        if preprocess is not None:
            batch = batch.map(lambda *b: preprocess(b if len(b) > 1 else b[0]))
        x, y, _ = keras.utils.unpack_x_y_sample_weight(next(iter(batch)))
        return x, y

    def schedule(self):
        c = self.config
        start = c.warmup_start_lr if c.warmup_start_lr is not None else min(c.base_lr, self.peak_lr)
        updates_per_epoch = scaling.updates(self.steps_per_epoch, c.gradient_accumulation_steps)
        return scaling.build_schedule(  # counts optimizer updates: with accumulation, k batches make one
            c.lr_schedule, self.peak_lr, updates_per_epoch * c.epochs, updates_per_epoch, warmup_epochs=c.warmup_epochs,
            warmup_steps=c.warmup_steps, warmup_start_lr=start, decay_boundaries_epochs=c.lr_decay_boundaries,
            decay_rate=c.lr_decay_rate, final_lr=c.final_lr, power=c.lr_decay_power)

    def build_model(self) -> keras.Model:
        """The task's model, built inside the strategy scope with seeded initial weights, checked against one real
        batch, and compiled with the task's loss (made replica-count independent) and metrics."""
        c = self.config
        keras.utils.set_random_seed(c.seed)
        if c.mixed_precision:
            keras.mixed_precision.set_global_policy("mixed_float16")
        with self.strategy.scope():
            model = self.task.build_model()
            if not isinstance(model, keras.Model):
                raise UserError(f"{self.task_label}: build_model() returned a {type(model).__name__}; return a "
                                "keras.Model")
            features, labels = self.sample_batch()
            predictions = task_lib.check_model_accepts(model, features, self.task_label)
            if self.eval_split is not None:  # fails now, not after the first epoch's outputs are written
                task_lib.check_model_accepts(model, self.sample_batch(self.eval_split)[0],
                                             f"{self.task_label} ({self.eval_split.split} split)")
            loss = task_lib.loss_for_replicas(self.task.loss(), labels, predictions, self.task_label)
            optimizer = scaling.build_optimizer(
                c.optimizer, self.schedule(), momentum=c.momentum, nesterov=c.nesterov,
                weight_decay=c.weight_decay, clipnorm=c.clipnorm, global_clipnorm=c.global_clipnorm,
                clipvalue=c.clipvalue, gradient_accumulation_steps=c.gradient_accumulation_steps,
                trust_coefficient=c.trust_coefficient,
                measure_noise_scale=c.measure_noise_scale, per_replica_batch_size=self.plan.per_replica_batch_size,
                steps_per_epoch=self.steps_per_epoch)
            model.compile(optimizer=optimizer, loss=loss, metrics=self.task.metrics(),
                          steps_per_execution=c.steps_per_execution, jit_compile=c.jit_compile)
        return model

    def rerun_plan(self) -> dict:
        """What this run is, for a rerun to compare with (dtf.experiment.rundir)."""
        return rundir.plan_of(self.resolved_config())

    def callbacks(self, log_dir: str, backup_dir: Optional[str]) -> List[keras.callbacks.Callback]:
        c = self.config
        out = [keras.callbacks.TerminateOnNaN()]
        if c.measure_noise_scale:
            out.append(noise_scale.NoiseScaleLogger())
        if backup_dir:
            self.recorder = elastic.LayoutRecorder(self.layout_record(), self.resume_state, self.first_step,
                                                   self.plan.global_batch_size, log_dir, self.cluster.is_chief)
            out.append(self.recorder)
            out.append(callbacks_lib.BackupAndRestore(
                backup_dir, save_freq=c.backup_every_steps or "epoch", cluster=self.cluster, plan=self.rerun_plan(),
                epochs=c.epochs, layout=self.recorder))
        out.append(TrainingScalars(os.path.join(log_dir, "train"), self.plan.global_batch_size,
                                   every_n_steps=c.log_every_steps, cluster=self.cluster))
        out.append(callbacks_lib.TensorBoard(log_dir, cluster=self.cluster, update_freq=c.log_every_steps,
                                             profile_batch=tuple(c.profile_steps) or 0))
        if c.stop_at:
            out.append(stop_at.StopAtTarget(c.stop_at, c.validate_every_steps, self.eval_data,
                                            os.path.join(log_dir, "train") if self.cluster.is_chief else None))
        if c.checkpoint_every:
            out.append(callbacks_lib.ModelCheckpoint(
                os.path.join(c.model_dir, "checkpoints", "epoch_{epoch:03d}.keras"), cluster=self.cluster,
                every_n_epochs=c.checkpoint_every))
        return out

    def fit(self, model: keras.Model, callbacks: Sequence[keras.callbacks.Callback], initial_epoch: int = 0,
            initial_step: int = 0, verbose=None, progress: Optional[keras.callbacks.Callback] = None,
            restore_from=None) -> dict:
        """Train from (initial_epoch, initial_step) to the end; returns the merged history. A resume from a
        mid-epoch backup first finishes that epoch, so the run sees exactly the batches an uninterrupted one would.
        progress: the display (default: --progress on the chief's stdout, nothing on the other workers or with
        verbose=0). restore_from: the backup the BackupAndRestore callback restores (False: none; None: the newest)."""
        if progress is None and verbose != 0 and self.cluster.is_chief:
            changed = [c for c in self.resume_state.changes if c["step"] == self.first_step]
            progress = progress_lib.TrainingProgress(self.config.progress, self.plan.global_batch_size,
                                                     note=elastic.describe_changes(changed))
        callbacks = [*callbacks, progress] if progress is not None else list(callbacks)
        eval_data = self.eval_data()
        history = {}

        def run(epochs, first_epoch, first_step, steps):
            train = self.train_data(first_epoch, first_step)
            for cb in callbacks:
                if isinstance(cb, callbacks_lib.BackupAndRestore):
                    cb.step_offset, cb.restore_on_begin, cb.restore_from = first_step, not history, restore_from
            keras_upstream.set_resume_epoch(model, None)  # `initial_epoch` is exact; a restored epoch would win
            h = model.fit(train.dataset, epochs=epochs, initial_epoch=first_epoch, steps_per_epoch=steps,
                          shuffle=False,  # no validation_steps: see EVAL_NOTE
                          validation_data=eval_data.dataset if eval_data else None,
                          validation_freq=self.config.validation_freq, callbacks=list(callbacks), verbose=0)
            for k, v in h.history.items():
                history.setdefault(k, []).extend(v)

        if initial_step:
            run(initial_epoch + 1, initial_epoch, initial_step, self.steps_per_epoch - initial_step)
            initial_epoch += 1
        if initial_epoch < self.config.epochs:
            run(self.config.epochs, initial_epoch, 0, self.steps_per_epoch)
        for key, values in history.items():
            if key.endswith("loss") and any(not math.isfinite(v) for v in values):
                raise TrainingDiverged(
                    f"training diverged: {key} became {values[-1]} by epoch {len(values)} at peak LR "
                    f"{self.peak_lr:g}; lower base_lr, add warmup_epochs, or set global_clipnorm",
                    arguments=("base_lr", "warmup_epochs", "global_clipnorm"))
        return history

    def evaluate(self, model: keras.Model) -> dict:
        """Metrics on the eval split ({} when the task has none)."""
        eval_data = self.eval_data()
        return model.evaluate(eval_data.dataset, verbose=0, return_dict=True) if eval_data else {}


def run_experiment(config: Config, strategy: Optional[tf.distribute.Strategy] = None,
                   task: Optional[task_lib.Task] = None, restart: bool = False, tracker=None) -> dict:
    """Train, evaluate and export one experiment; returns the summary (also written to model_dir by the chief).

    A model_dir that already holds a run decides what this one does (dtf.experiment.rundir): resume it, continue it to
    more epochs, or, when it is finished, nothing at all (the summary returned is the run's, with "already_finished").

    Args:
        config: the run (`dtf.config.Config`; from flags, `dtf.config.flags.config_from_flags`).
        strategy: a strategy built already; default: the one the config names.
        task: a Task object to train instead of the one the config names (from Python, e.g. with constructor
            arguments).
        restart: move a different run in model_dir aside instead of refusing it.
        tracker: where the chief also logs the run (a `dtf.tracking.tracker.Tracker`, from --tracking_uri): checked
            before anything is written, then the run's params, metrics, outputs and status.

    Raises:
        UserError: bad input (named as the Config field); TrainingDiverged: the loss became NaN/inf;
        Preempted: SIGTERM stopped the run at an agreed step after a backup.
    """
    start = time.time()
    cluster = resolve_cluster(config)
    tracker = tracker if cluster.is_chief else None  # the chief alone logs
    if tracker is not None:
        tracker.check()  # an unreachable tracking store is one line (exit 2), before anything is written
    strategy = strategy or create_strategy(config)
    exp = Experiment(config, strategy, cluster, task)
    exp.set_epochs(elastic.recorded_layout(config.model_dir))  # a resume on another layout keeps the run's epochs
    resolved = exp.resolved_config()
    def decide():
        return rundir.decide(config.model_dir, exp.rerun_plan(), config.epochs, exp.steps_per_epoch, restart)

    decision = decide()  # reads only
    if decision.backup is None:  # a fresh run (or --restart): the epochs of its own layout
        exp.set_epochs()
        resolved = exp.resolved_config()
    if decision.action == "finished":
        return {**decision.summary, "already_finished": True}
    model = exp.build_model()  # its checks (the task's model against its data) come before anything is written
    lock = None
    if cluster.is_chief:
        check_model_dir(config.model_dir)
        if decision.move_aside and tf.io.gfile.exists(config.model_dir):
            rundir.RunLock(config.model_dir).check_free()
            log.info(f"{decision.message}: now in {rundir.move_aside(config.model_dir)}")
        lock = rundir.RunLock(config.model_dir).acquire()
    try:
        if cluster.is_chief and not decision.move_aside:  # again, now that no other run can change model_dir
            decision = decide()
        if decision.message and not decision.move_aside:
            log.info(decision.message)
        backup = decision.backup
        if backup is not None:
            exp.resume(backup)
        initial_epoch, initial_step = (backup.epoch, backup.steps_done) if backup else (0, 0)
        tracking = tracker.training(exp, resolved) if tracker is not None else contextlib.nullcontext([])
        with tracking as tracking_callbacks:
            if decision.action == "export":
                return _export_backup(exp, model, resolved, backup, start)
            return _train(exp, model, resolved, decision, initial_epoch, initial_step, start, tracking_callbacks)
    finally:
        if lock is not None:
            lock.release()


def _train(exp: Experiment, model: keras.Model, resolved: Config, decision: rundir.Decision, initial_epoch: int,
           initial_step: int, start: float, extra_callbacks: Sequence[keras.callbacks.Callback] = ()) -> dict:
    config, cluster = exp.config, exp.cluster
    stop = preemption.Preemption(cluster, config.preemption_grace_s)  # after the strategy: TF takes SIGTERM there
    try:  # until training is over, SIGTERM stops every worker at one agreed step (dtf.experiment.preemption)
        with data_service_lib.running(config.data_service) as service:  # training input only; evaluation is local
            exp.data_service = service
            log.info(exp.describe())
            log_dir = os.path.join(config.model_dir, "tensorboard")
            if cluster.is_chief:
                write_run_metadata(log_dir, resolved)
            callbacks = exp.callbacks(log_dir, os.path.join(config.model_dir, BACKUP_DIR)) + list(extra_callbacks)
            stop.attach(exp.steps_per_epoch, callbacks)
            history = exp.fit(model, [*callbacks, stop], initial_epoch, initial_step,
                              restore_from=decision.backup or False)
    finally:
        stop.close()
    final = exp.evaluate(model)
    # Training steps only (validation excluded): each epoch's step time, as TrainingScalars measured it.
    epoch_steps = [exp.steps_per_epoch] * len(history.get("step_time_ms", []))
    if epoch_steps and initial_step:
        epoch_steps[0] -= initial_step  # a resumed run finished a partial epoch first
    train_seconds = sum(ms / 1000 * n for ms, n in zip(history.get("step_time_ms", []), epoch_steps))
    summary = _summary(exp, resolved, history, final, [initial_epoch, initial_step], start)
    summary["examples_per_sec"] = sum(epoch_steps) * exp.plan.global_batch_size / max(train_seconds, 1e-9)
    summary.update({"stop_at": cb.summary() for cb in callbacks if isinstance(cb, stop_at.StopAtTarget)})
    _export(config, cluster, model, resolved, summary)
    return summary


def _export_backup(exp: Experiment, model: keras.Model, resolved: Config, backup, start: float) -> dict:
    """The outputs of a run that trained every epoch but was stopped before writing them, from its last backup."""
    with exp.strategy.scope():
        callbacks_lib.restore(model, backup)
    summary = _summary(exp, resolved, {}, exp.evaluate(model), [backup.epoch, backup.steps_done], start)
    _export(exp.config, exp.cluster, model, resolved, summary)
    return summary


def _summary(exp: Experiment, resolved: Config, history: dict, final: dict, resumed_from, start: float) -> dict:
    config = exp.config
    return {
        "task": resolved.task, "dataset": resolved.dataset, "model": resolved.model,
        "strategy": strategy_lib.strategy_name(exp.strategy),
        "num_replicas": exp.plan.num_replicas, "num_workers": exp.cluster.num_workers,
        "global_batch_size": exp.plan.global_batch_size, "per_replica_batch_size": exp.plan.per_replica_batch_size,
        "base_lr": config.base_lr, "peak_lr": exp.peak_lr, "lr_scaling": config.lr_scaling,
        "warmup_epochs": config.warmup_epochs, "warmup_steps": config.warmup_steps, "epochs": config.epochs,
        "steps_per_epoch": exp.steps_per_epoch, "epoch_mode": exp.epoch_mode, "steps_per_pass": exp.steps_per_pass,
        "resumed_from": resumed_from,
        "layout_changes": exp.resume_state.changes,
        "examples_per_sec_by_layout": exp.recorder.summary() if exp.recorder else [],
        **{k: history[k][-1] for k in noise_scale.LOG_KEYS if k in history},
        "final_metrics": {**{k: v[-1] for k, v in history.items() if not k.startswith("val_")},
                          **{f"val_{k}": v for k, v in final.items()}},
        "history": history,
        "examples_per_sec": 0.0,
        "wall_time_s": time.time() - start, "versions": versions.versions(),
    }


def _export(config: Config, cluster, model: keras.Model, resolved: Config, summary: dict):
    """Final outputs. Every worker saves (saving reads synchronized variables); only the chief's land in model_dir."""
    out_dir = callbacks_lib.write_dir(config.model_dir, cluster)
    try:
        if config.export:
            with atomic.replacing(os.path.join(out_dir, "model.keras")) as tmp:
                model.save(tmp)
        atomic.write_text(os.path.join(out_dir, "flags.txt"), resolved.to_flagfile())
        atomic.write_json(os.path.join(out_dir, "summary.json"), summary)
    finally:
        callbacks_lib.remove_if_private(out_dir, config.model_dir)
