"""The hypermodel of a sweep: a trial is a `dtf.run` experiment. Its Config is `config_from_flags(**trial values)` (the
same code path as `dtf.run`) and it trains with `Experiment.fit` and dtf's callbacks; a diverged trial is recorded as
failed and the sweep goes on; a Hyperband trial promoted to a higher rung continues its parent's run."""
import contextlib
import os
import sys
import time

from dtf.base.versions import load_tensorflow as _load_tensorflow

_load_tensorflow()  # TensorFlow the dtf way (quiet, version-checked) before keras-tuner imports it
from dtf.upstream import keras_tuner as _checked  # noqa: E402,F401  (keras-tuner's version, before it is used)
import keras  # noqa: E402
import keras_tuner as kt  # noqa: E402
import tensorflow as tf  # noqa: E402

from dtf.config import flags as dtf_flags  # noqa: E402
from dtf.experiment import atomic, progress, train  # noqa: E402
from dtf.experiment.stop_at import StopAtTarget  # noqa: E402
from dtf.experiment.summaries import EPOCH_SCALARS, write_run_metadata  # noqa: E402
from dtf.tuning import distributed, trial_files  # noqa: E402
from dtf.tuning.objectives import speed_objective, speed_score  # noqa: E402


class ObjectiveNotReported(kt.errors.FatalError):
    """Stops the whole sweep (keras-tuner only records other errors as a failed trial and goes on)."""


class StopAfter(keras.callbacks.Callback):
    """Ends training after `epochs` epochs (a Hyperband rung's budget) without shortening the LR schedule."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs = int(epochs)

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 >= self.epochs:
            self.model.stop_training = True


def _hyperparameter(hp, field: str, spec: dict):
    """The trial's value of one space field: fixed when the space leaves one choice, else a choice or a range."""
    if "values" in spec:
        if len(spec["values"]) == 1:
            return hp.Fixed(field, spec["values"][0])
        return hp.Choice(field, spec["values"])
    if spec["min"] == spec["max"]:
        return hp.Fixed(field, spec["min"])
    return hp.Float(field, spec["min"], spec["max"], sampling="log" if spec["log"] else "linear")


def _keras_history(history: dict) -> keras.callbacks.History:
    """What keras-tuner reads a trial's objective from."""
    result = keras.callbacks.History()
    result.history = history
    result.epoch = list(range(len(history.get("loss", []))))
    return result


class DtfHyperModel(kt.HyperModel):
    """build(hp) = the trial's Config + Experiment → exp.build_model(); fit = exp.fit with dtf's callbacks."""

    def __init__(self, space, strategy, cluster, tune_dir, task, objective, sweep=None):
        super().__init__(name="dtf")
        self.sweep = sweep  # dtf.tracking.sweep.Sweep with --tracking_uri: each trial is a child run
        self.space, self.strategy, self.cluster, self.tune_dir = space, strategy, cluster, tune_dir
        self.task, self.objective = task, objective  # one task object serves every trial
        self.trial_id = None  # set by the tuner before each trial (see dtf.tuning.tuners)
        self.trials_run = []  # trial ids this process trained
        self.exp = None
        self.stdout = sys.stdout  # trial progress goes here, past search()'s redirect of keras-tuner's display
        self.data_service = None  # the running --data_service while trials train (see dtf.tune's search)
        self.speed = speed_objective(objective)  # steps_to:/seconds_to: a trial stops at the target it counts to
        self.stop_at = None  # the trial's StopAtTarget callback, with a speed objective

    def overrides(self, hp) -> dict:
        out = {field: _hyperparameter(hp, field, spec) for field, spec in self.space.items()}
        if "global_batch_size" in out:
            out["global_batch_size"] = int(out["global_batch_size"])
            out["per_replica_batch_size"] = None
        if "warmup_epochs" in out:
            out["warmup_epochs"] = float(out["warmup_epochs"])
        out["model_dir"] = os.path.join(self.tune_dir, "trials", str(self.trial_id))
        if self.speed:
            out["stop_at"] = str(self.speed[1])
        return out

    def build(self, hp):
        config = dtf_flags.config_from_flags(**self.overrides(hp))
        self.exp = train.Experiment(config, self.strategy, self.cluster, self.task, self.data_service)
        return self.exp.build_model()

    def resume_from_parent(self, hp, model) -> int:
        """The epoch to start at. A trial Hyperband promoted continues its parent trial, as Keras Tuner's own
        Hyperband means it to: the parent's final weights and optimizer state (its step counter, so the LR
        schedule goes on where it was), then only epochs tuner/initial_epoch..tuner/epochs are trained. Every
        Hyperband trial keeps the sweep's --epochs (max_epochs) as its schedule's length and stops early at
        tuner/epochs (`StopAfter`), so a promoted trial is the exact continuation of its parent's run."""
        parent = hp.values.get("tuner/trial_id")
        if parent is None:
            return 0
        path = trial_files.state_path(self.tune_dir, parent)
        if not tf.io.gfile.exists(path):  # e.g. a sweep begun before dtf kept this state: train it all
            print(f"dtf.tune: trial {self.trial_id}: no saved state of its parent trial {parent} ({path}); "
                  "training it from epoch 0", file=sys.stderr, flush=True)
            return 0
        with self.strategy.scope():
            if not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)  # its variables must exist to be loaded
            model.load_weights(path)
        return int(hp.values["tuner/initial_epoch"])

    def save_state(self, model):
        """Weights and optimizer state at the end of a Hyperband trial, for the trials it may be promoted to
        (on the tune_dir, so any tuner worker of a distributed sweep can continue it)."""
        if self.cluster.is_chief:
            path = trial_files.state_path(self.tune_dir, self.trial_id)
            tf.io.gfile.makedirs(os.path.dirname(path))
            with atomic.replacing(path) as tmp:
                model.save_weights(tmp)

    def trial_info(self, initial_epoch: int) -> dict:
        """The trial's row in trial_info/ (results.csv reads it), before it trains."""
        exp = self.exp
        info = {"trial": self.trial_id, "peak_lr": exp.peak_lr, "global_batch_size": exp.plan.global_batch_size,
                "base_lr": exp.config.base_lr, "warmup_epochs": exp.config.warmup_epochs,
                "lr_scaling": exp.config.lr_scaling, "initial_epoch": initial_epoch, "num_workers": 1}
        if distributed.role() is not None:
            info["tuner"] = distributed.role()
        return info

    def train_trial(self, hp, model, callbacks, log_dir: str, initial_epoch: int, tracking=()) -> dict:
        """exp.fit with dtf's callbacks (and a Hyperband rung's budget), its progress labelled with the trial;
        `tracking` callbacks after dtf's (they log what dtf's add to an epoch's logs)."""
        exp = self.exp
        budget = [StopAfter(hp.values["tuner/epochs"])] if "tuner/epochs" in hp.values else []
        shown = progress.TrainingProgress(exp.config.progress, exp.plan.global_batch_size, self.stdout,
                                          f"trial {self.trial_id}: ")
        own = exp.callbacks(log_dir, None)
        self.stop_at = next((cb for cb in own if isinstance(cb, StopAtTarget)), None)
        return exp.fit(model, list(callbacks or []) + own + list(tracking) + budget, initial_epoch=initial_epoch,
                       progress=shown)

    def fit(self, hp, model, *args, callbacks=None, **kwargs):
        trial_id = self.trial_id
        log_dir = os.path.join(self.tune_dir, "tb", str(trial_id))
        initial_epoch = self.resume_from_parent(hp, model)
        info = self.trial_info(initial_epoch)
        self.trials_run.append(trial_id)
        if self.cluster.is_chief:
            write_run_metadata(log_dir, self.exp.resolved_config())
        start = time.time()
        tracking = (self.sweep.trial(trial_id, self.exp, hp.values) if self.sweep is not None and self.cluster.is_chief
                    else contextlib.nullcontext([]))
        try:
            with tracking as tracking_callbacks:
                history = self.train_trial(hp, model, callbacks, log_dir, initial_epoch, tracking_callbacks)
        except train.TrainingDiverged as e:
            h = getattr(model, "history", None)
            info.update(status="diverged", wall_time_s=time.time() - start, message=str(e),
                        epochs_run=len(getattr(h, "history", {}).get("loss", [])) if h is not None else "")
            trial_files.write_info(self.tune_dir, trial_id, info)
            print(f"dtf.tune: trial {trial_id} failed: {e}", file=sys.stderr, flush=True)
            raise kt.errors.FailedTrialError(str(e)) from None
        if self.speed is None and self.objective not in history:
            reported = ", ".join(k for k in history if k not in EPOCH_SCALARS)
            raise ObjectiveNotReported(f"--objective={self.objective} is not a metric of this run; it reports: "
                                       f"{reported}")
        info.update(status="completed", wall_time_s=time.time() - start, epochs_run=len(history.get("loss", [])))
        if "tuner/epochs" in hp.values:
            self.save_state(model)
        if self.speed is not None:  # the steps or training seconds to the target (see dtf.experiment.stop_at)
            summary = self.stop_at.summary()
            value, oracle_value = speed_score(self.speed[0], summary, info["epochs_run"] * self.exp.steps_per_epoch)
            info.update(objective=value, reached=summary["reached"], stop_at=summary)
            trial_files.write_info(self.tune_dir, trial_id, info)
            return {self.objective: oracle_value}
        trial_files.write_info(self.tune_dir, trial_id, info)
        return _keras_history(history)
