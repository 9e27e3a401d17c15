"""`python -m dtf.tune --flagfile=sweep.flags`: a keras-tuner sweep where every trial is a `dtf.run` experiment.

Takes every `dtf.run` flag plus a search space:

  --tune_global_batch_sizes=64,128,256   global batch (sharded over the replicas by dtf)
  --tune_base_lr=1e-3:1e-1:log           a range MIN:MAX[:log] (random/bayesian) or a list 0.01,0.1
  --tune_warmup_epochs=0,1
  --tune_lr_scaling=linear,sqrt
  --tuner=random|bayesian|hyperband|grid --max_trials=N --executions_per_trial=N
  --objective=val_accuracy|val_loss|val_<any metric> [--objective_direction=min|max] --tune_dir=DIR
  --task=package.module:Attr             tune your own task (its flags work here as in dtf.run)

A trial's Config is `config_from_flags(**trial_values)` — the same code path as `dtf.run` — and it trains with
`dtf.experiment.train.Experiment` under the strategy created once from the flags, so the batch is sharded per replica and the
peak LR scaled by dtf's rule. A trial that diverges is recorded as failed and the sweep goes on. Rerunning the same
command resumes the sweep (finished trials are kept). Outputs in --tune_dir: results.csv, best.flags (train it with
`python -m dtf.run --flagfile=TUNE_DIR/best.flags`), objective_vs_batch.png, TensorBoard logs in tb/<trial_id>
(with HParams), and keras-tuner's own state in sweep/. Hyperband: a promoted trial continues its parent's weights and
optimizer state (trials/<id>/hyperband_state.weights.h5) and trains only the epochs its rung adds.

Distributed: `--num_tuners=N` starts, with `dtf.cluster.procs`, one chief process (keras-tuner's oracle, served over gRPC on
127.0.0.1; it never trains) plus N tuner workers (tuner0..tuner{N-1}) that ask it for trials and train them with
whatever --strategy the flags say; each runs this same command line with KERASTUNER_TUNER_ID/_ORACLE_IP/_ORACLE_PORT
set and no TF_CONFIG. Output is prefixed [chief]/[tuner0]/...; if one fails all are stopped (non-zero exit). Only
the chief writes results.csv, best.flags and the plot. Rerunning the same command resumes (trials that were running
when the sweep was killed are run again). With those KERASTUNER_* variables already set (your own cluster), dtf.tune
just runs as that role.
"""
import csv
import json
import math
import os
import signal
import sys
import time
from typing import Dict, List, Optional

from dtf import cli
from dtf.base import errors
from dtf.cluster import data_service
from dtf.tuning import distributed
from dtf.tuning.objectives import MAXIMIZED_WORDS, MINIMIZED_WORDS, objective_direction

TUNERS = ("random", "bayesian", "hyperband", "grid")
PROJECT = "sweep"
SPACE_FILE = "space.json"
TRIALS_DIR = "trial_info"
BEST_FLAGS, PLOT = "best.flags", "objective_vs_batch.png"
# Space flag -> (Config field, value type).
SPACE_FLAGS = {
    "tune_global_batch_sizes": ("global_batch_size", int),
    "tune_base_lr": ("base_lr", float),
    "tune_warmup_epochs": ("warmup_epochs", float),
    "tune_lr_scaling": ("lr_scaling", str),
}
RESULT_COLUMNS = ["trial", "global_batch_size", "base_lr", "warmup_epochs", "lr_scaling", "peak_lr", "objective",
                  "epochs_run", "wall_time_s", "status", "tuner"]


def _define(argv):
    from absl import flags

    from dtf.config import flags as dtf_flags

    dtf_flags.define_flags()
    module = "dtf: tuning"
    kw = dict(module_name=module)
    flags.DEFINE_list("tune_global_batch_sizes", None, "Global batch sizes to try, e.g. 64,128,256.", **kw)
    flags.DEFINE_string("tune_base_lr", None, "base_lr: a range MIN:MAX[:log] or a list, e.g. 0.01,0.1.", **kw)
    flags.DEFINE_list("tune_warmup_epochs", None, "Warmup epochs to try, e.g. 0,1.", **kw)
    flags.DEFINE_list("tune_lr_scaling", None, "LR scaling rules to try, e.g. linear,sqrt.", **kw)
    flags.DEFINE_string("tuner", "random", f"Search algorithm: {', '.join(TUNERS)}.", **kw)
    flags.DEFINE_integer("max_trials", 10, "Trials to run (grid: at most this many; hyperband: ignored).", **kw)
    flags.DEFINE_integer("executions_per_trial", 1, "Trainings per trial (objective averaged).", **kw)
    flags.DEFINE_string("objective", "val_accuracy", "What to optimize: a metric the trials report, e.g. val_loss, "
                        "val_accuracy, val_mean_absolute_error (val_ = on the validation split).", **kw)
    flags.DEFINE_string("objective_direction", "auto", f"min or max; auto: min for names with "
                        f"{'/'.join(MINIMIZED_WORDS)}, max for {'/'.join(MAXIMIZED_WORDS)}.", **kw)
    flags.DEFINE_string("tune_dir", "runs/tune", "Sweep directory (rerun the same command to resume).", **kw)
    flags.DEFINE_integer("num_tuners", 0, "Distributed tuning on this host: a chief (oracle) process plus this many "
                         "tuner-worker processes on 127.0.0.1. 0: one process. Ignored when KERASTUNER_TUNER_ID is "
                         "set (the process runs as that role).", **kw)
    cli.define_task_flags(argv)  # last: a task flag that clashes with any of dtf's is reported as such


# ----------------------------------------------------------------------------------------------------------- space


def _parse_list(flag: str, values, kind) -> Optional[list]:
    from dtf.base.errors import UserError

    if values is None:
        return None
    values = [v.strip() for v in values if v.strip()]
    if not values:
        raise UserError(f"--{flag} is empty; give at least one value or leave the flag out")
    try:
        out = [kind(v) for v in values]
    except ValueError:
        raise UserError(f"--{flag}={','.join(values)} must be a comma-separated list of {kind.__name__}s")
    if kind is float and not all(math.isfinite(v) for v in out):
        raise UserError(f"--{flag}={','.join(values)} must be finite numbers")
    return list(dict.fromkeys(out))  # unique, in order


def parse_space(flag_values) -> Dict[str, dict]:
    """{Config field: {"values": [...]} or {"min":, "max":, "log":}} from the --tune_* flags (validated shapes)."""
    from dtf.base.errors import UserError

    space = {}
    for flag in ("tune_global_batch_sizes", "tune_warmup_epochs", "tune_lr_scaling"):
        field, kind = SPACE_FLAGS[flag]
        values = _parse_list(flag, flag_values[flag].value, kind)
        if values is not None:
            space[field] = {"values": values}
    lr = flag_values["tune_base_lr"].value
    if lr is not None:
        text = lr.strip()
        if not text:
            raise UserError("--tune_base_lr is empty; give MIN:MAX[:log] or a list such as 0.01,0.1")
        if ":" in text:
            parts = text.split(":")
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("log", "linear")):
                raise UserError(f"--tune_base_lr={text} must be MIN:MAX or MIN:MAX:log")
            try:
                lo, hi = float(parts[0]), float(parts[1])
            except ValueError:
                raise UserError(f"--tune_base_lr={text}: MIN and MAX must be numbers")
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise UserError(f"--tune_base_lr={text}: MIN and MAX must be finite")
            if lo > hi:
                raise UserError(f"--tune_base_lr={text}: MIN {lo:g} is greater than MAX {hi:g}")
            if lo <= 0:
                raise UserError(f"--tune_base_lr={text}: MIN must be > 0")
            space["base_lr"] = {"min": lo, "max": hi, "log": len(parts) == 3 and parts[2] == "log"}
        else:
            space["base_lr"] = {"values": _parse_list("tune_base_lr", text.split(","), float)}
    if not space:
        raise UserError("nothing to tune: give at least one of --tune_global_batch_sizes, --tune_base_lr, "
                        "--tune_warmup_epochs, --tune_lr_scaling")
    return space


def _corner_values(spec: dict) -> list:
    return spec["values"] if "values" in spec else [spec["min"], spec["max"]]


def validate_space(space: dict, base_config, num_replicas: int, tuner: str, max_trials: int,
                   executions_per_trial: int):
    """Fail with one line before any trial runs: every corner of the space must make a valid Config and plan."""
    import itertools

    from dtf.base.errors import UserError
    from dtf.config.batch_plan import BatchPlan

    if tuner not in TUNERS:
        raise UserError(f"--tuner={tuner!r} is not valid; choose one of: {', '.join(TUNERS)}")
    if max_trials < 1:
        raise UserError(f"--max_trials={max_trials} must be >= 1")
    if executions_per_trial < 1:
        raise UserError(f"--executions_per_trial={executions_per_trial} must be >= 1")
    if tuner == "grid" and any("values" not in s for s in space.values()):
        raise UserError("--tuner=grid needs lists, not ranges: give e.g. --tune_base_lr=0.01,0.1")
    if tuner == "hyperband" and base_config.epochs < 2:
        raise UserError(f"--tuner=hyperband needs --epochs >= 2 (its max epochs), got {base_config.epochs}")
    for batch in space.get("global_batch_size", {}).get("values", []):
        if batch % num_replicas:
            raise UserError(f"--tune_global_batch_sizes: {batch} is not divisible by the {num_replicas} replicas; "
                            f"use multiples of {num_replicas}")
    fields = list(space)
    for combo in itertools.product(*(_corner_values(space[f]) for f in fields)):
        overrides = dict(zip(fields, combo))
        if "global_batch_size" in overrides:
            overrides["per_replica_batch_size"] = None
        try:
            config = base_config.replace(**overrides)
        except UserError as e:  # the message names the Config field: name the search-space flag that set it
            message = str(e)
            for flag, (field, _) in SPACE_FLAGS.items():
                if field in overrides:
                    message = message.replace(f"--{field}=", f"--{flag}: ")
            raise UserError(f"search space point {overrides}: {message}") from None
        if config.global_batch_size:
            BatchPlan.create(num_replicas, global_batch_size=config.global_batch_size)


def reported_metrics(exp) -> List[str]:
    """The metric names a trial of `exp` reports (its history's keys but dtf's EPOCH_SCALARS): the compiled model's,
    and their val_ twins when the task has an evaluation split. Known from one symbolic build on one real batch;
    nothing trains."""
    model = exp.build_model()
    with exp.strategy.scope():
        model._symbolic_build(data_batch=exp.sample_batch())
    names = list(model.get_metrics_result())
    return names + ([f"val_{name}" for name in names] if exp.eval_split is not None else [])


def check_against_data(space: dict, config, strategy, cluster, task, objective: str):
    """Fail with one line before any trial trains or anything is written: each global batch of the space against
    the task's data (dtf.run's checks), and --objective against the metrics the task's model reports."""
    from dtf.base.errors import UserError
    from dtf.experiment import train
    from dtf.experiment.summaries import EPOCH_SCALARS

    exp = None
    for batch in space.get("global_batch_size", {}).get("values") or [None]:
        trial_config = config if batch is None else config.replace(global_batch_size=batch,
                                                                    per_replica_batch_size=None)
        try:
            exp = train.Experiment(trial_config, strategy, cluster, task)
        except UserError as e:
            if batch is None:
                raise
            raise UserError(f"--tune_global_batch_sizes: {batch}: {e.as_flags()}") from None
    names = reported_metrics(exp)
    if objective not in names and objective not in EPOCH_SCALARS:
        raise UserError(f"--objective={objective} is not a metric this task's model reports; choose one of: "
                        f"{', '.join(names)}")


def _space_signature(space: dict, flag_values) -> dict:
    return {"space": space, "tuner": flag_values["tuner"].value, "objective": flag_values["objective"].value,
            "task": flag_values["task"].value}


# ---------------------------------------------------------------------------------------------------- hypermodel


HYPERBAND_STATE = "hyperband_state.weights.h5"


def _state_path(tune_dir, trial_id) -> str:
    """Where a Hyperband trial's final weights and optimizer state are kept (next to its model_dir files)."""
    return os.path.join(tune_dir, "trials", str(trial_id), HYPERBAND_STATE)


def _make_hypermodel_class():
    import keras
    import keras_tuner as kt
    import tensorflow as tf

    from dtf.config import flags as dtf_flags
    from dtf.experiment import atomic, progress, train
    from dtf.experiment.summaries import EPOCH_SCALARS, write_run_metadata

    class DtfHyperModel(kt.HyperModel):
        """build(hp) = the trial's Config + Experiment → exp.build_model(); fit = exp.fit with dtf's callbacks."""

        def __init__(self, space, strategy, cluster, tune_dir, task, objective):
            super().__init__(name="dtf")
            self.space, self.strategy, self.cluster, self.tune_dir = space, strategy, cluster, tune_dir
            self.task, self.objective = task, objective  # one task object serves every trial
            self.trial_id = None  # set by the tuner before each trial (see _tuner_class)
            self.trials_run = []  # trial ids this process trained
            self.exp = None
            self.stdout = sys.stdout  # trial progress goes here, past search()'s redirect of keras-tuner's display
            self.data_service = None  # the running --data_service while trials train (see search below)

        def overrides(self, hp) -> dict:
            out = {}
            for field, spec in self.space.items():
                if "values" in spec:
                    if len(spec["values"]) == 1:
                        out[field] = hp.Fixed(field, spec["values"][0])
                    else:
                        out[field] = hp.Choice(field, spec["values"])
                else:
                    if spec["min"] == spec["max"]:
                        out[field] = hp.Fixed(field, spec["min"])
                    else:
                        out[field] = hp.Float(field, spec["min"], spec["max"],
                                              sampling="log" if spec["log"] else "linear")
            if "global_batch_size" in out:
                out["global_batch_size"] = int(out["global_batch_size"])
                out["per_replica_batch_size"] = None
            if "warmup_epochs" in out:
                out["warmup_epochs"] = float(out["warmup_epochs"])
            out["model_dir"] = os.path.join(self.tune_dir, "trials", str(self.trial_id))
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
            tuner/epochs (`_StopAfter`), so a promoted trial is the exact continuation of its parent's run."""
            parent = hp.values.get("tuner/trial_id")
            if parent is None:
                return 0
            path = _state_path(self.tune_dir, parent)
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
                path = _state_path(self.tune_dir, self.trial_id)
                tf.io.gfile.makedirs(os.path.dirname(path))
                with atomic.replacing(path) as tmp:
                    model.save_weights(tmp)

        def fit(self, hp, model, *args, callbacks=None, **kwargs):
            exp, trial_id = self.exp, self.trial_id
            log_dir = os.path.join(self.tune_dir, "tb", str(trial_id))
            initial_epoch = self.resume_from_parent(hp, model)
            info = {"trial": trial_id, "peak_lr": exp.peak_lr, "global_batch_size": exp.plan.global_batch_size,
                    "base_lr": exp.config.base_lr, "warmup_epochs": exp.config.warmup_epochs,
                    "lr_scaling": exp.config.lr_scaling, "initial_epoch": initial_epoch}
            if distributed.role() is not None:
                info["tuner"] = distributed.role()
            self.trials_run.append(trial_id)
            if self.cluster.is_chief:
                write_run_metadata(log_dir, exp.resolved_config())
            start = time.time()
            try:
                budget = [_StopAfter(hp.values["tuner/epochs"])] if "tuner/epochs" in hp.values else []
                shown = progress.TrainingProgress(exp.config.progress, exp.plan.global_batch_size, self.stdout,
                                                  f"trial {trial_id}: ")
                history = exp.fit(model, list(callbacks or []) + exp.callbacks(log_dir, None) + budget,
                                  initial_epoch=initial_epoch, progress=shown)
            except train.TrainingDiverged as e:
                h = getattr(model, "history", None)
                info.update(status="diverged", wall_time_s=time.time() - start, message=str(e),
                            epochs_run=len(getattr(h, "history", {}).get("loss", [])) if h is not None else "")
                _write_info(self.tune_dir, trial_id, info)
                print(f"dtf.tune: trial {trial_id} failed: {e}", file=sys.stderr, flush=True)
                raise kt.errors.FailedTrialError(str(e)) from None
            if self.objective not in history:
                reported = ", ".join(k for k in history if k not in EPOCH_SCALARS)
                raise ObjectiveNotReported(f"--objective={self.objective} is not a metric of this run; it reports: "
                                           f"{reported}")
            info.update(status="completed", wall_time_s=time.time() - start,
                        epochs_run=len(history.get("loss", [])))
            if "tuner/epochs" in hp.values:
                self.save_state(model)
            _write_info(self.tune_dir, trial_id, info)
            result = keras.callbacks.History()
            result.history = history
            result.epoch = list(range(len(history.get("loss", []))))
            return result

    class _StopAfter(keras.callbacks.Callback):
        """Ends training after `epochs` epochs (a Hyperband rung's budget) without shortening the LR schedule."""

        def __init__(self, epochs):
            super().__init__()
            self.epochs = int(epochs)

        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 >= self.epochs:
                self.model.stop_training = True

    class ObjectiveNotReported(kt.errors.FatalError):
        """Stops the whole sweep (keras-tuner only records other errors as a failed trial and goes on)."""

    return DtfHyperModel, ObjectiveNotReported


# tune_dir I/O goes through tf.io.gfile (any TensorFlow filesystem) and dtf.experiment.atomic (readers never see half a file).


def _write_info(tune_dir, trial_id, info):
    import tensorflow as tf

    from dtf.experiment import atomic

    path = os.path.join(tune_dir, TRIALS_DIR)
    tf.io.gfile.makedirs(path)
    atomic.write_json(os.path.join(path, f"{trial_id}.json"), info)


def _read_json(path: str):
    import tensorflow as tf

    with tf.io.gfile.GFile(path) as f:
        return json.loads(f.read())


def _read_info(tune_dir, trial_id) -> dict:
    import tensorflow as tf

    try:
        return _read_json(os.path.join(tune_dir, TRIALS_DIR, f"{trial_id}.json"))
    except (tf.errors.OpError, ValueError):
        return {}


def _tuner_class(name: str):
    import keras_tuner as kt

    base = {"random": kt.RandomSearch, "bayesian": kt.BayesianOptimization, "hyperband": kt.Hyperband,
            "grid": kt.GridSearch}[name]

    class DtfTuner(base):
        def _populate_initial_space(self):
            """keras-tuner reloads a sweep only if this process's own tuner file (<tuner id>.json) exists, so a
            sweep begun with another --num_tuners (tuner0 vs chief) would start over; the sweep is the oracle's
            state: whoever serves it reloads it when it exists."""
            import tensorflow as tf

            if not self._is_worker() and tf.io.gfile.exists(self.oracle._get_oracle_fname()):
                self.oracle.reload()
            else:
                super()._populate_initial_space()

        def run_trial(self, trial, *args, **kwargs):
            self.hypermodel.trial_id = trial.trial_id
            return super().run_trial(trial, *args, **kwargs)

    return DtfTuner


def make_tuner(name, hypermodel, objective, direction, max_trials, executions_per_trial, tune_dir, strategy, seed,
               epochs):
    import keras_tuner as kt
    from absl import flags
    from keras_tuner.src import config as kt_config

    # keras-tuner prints the traceback of every failed trial; dtf prints one line (tracebacks with --verbosity=1)
    kt_config.DEBUG = flags.FLAGS["verbosity"].value >= 1
    common = dict(hypermodel=hypermodel, objective=kt.Objective(objective, direction),
                  directory=tune_dir, project_name=PROJECT, overwrite=False, seed=seed,
                  distribution_strategy=strategy, executions_per_trial=executions_per_trial,
                  # a diverged trial must not stop the sweep: never reach the consecutive-failure limit
                  max_consecutive_failed_trials=max_trials + 10, max_retries_per_trial=0)
    cls = _tuner_class(name)
    if name == "hyperband":
        common["max_consecutive_failed_trials"] = 10_000
        return cls(max_epochs=epochs, factor=3, **common)
    return cls(max_trials=max_trials, **common)


# ------------------------------------------------------------------------------------------------------- results


def collect_results(tuner, tune_dir: str, config) -> List[dict]:
    from dtf.optim import scaling

    rows = []
    for trial_id, trial in sorted(tuner.oracle.trials.items(), key=lambda kv: (len(kv[0]), kv[0])):
        values, info = trial.hyperparameters.values, _read_info(tune_dir, trial_id)
        gb = int(values.get("global_batch_size", info.get("global_batch_size") or config.global_batch_size or 64))
        base_lr = float(values.get("base_lr", config.base_lr))
        rule = values.get("lr_scaling", config.lr_scaling)
        peak = info.get("peak_lr") or scaling.scaled_lr(
            base_lr, gb * (config.gradient_accumulation_steps or 1), config.reference_batch_size, rule)
        status = str(trial.status).split(".")[-1].lower()
        if info.get("status") == "diverged":
            status = "diverged"
        rows.append({"trial": trial_id, "global_batch_size": gb, "base_lr": base_lr,
                     "warmup_epochs": float(values.get("warmup_epochs", config.warmup_epochs)), "lr_scaling": rule,
                     "peak_lr": peak, "objective": trial.score if trial.score is not None else "",
                     "epochs_run": info.get("epochs_run", ""),
                     "wall_time_s": round(info["wall_time_s"], 2) if "wall_time_s" in info else "",
                     "status": status, "tuner": info.get("tuner", "")})
    return rows


def write_results(rows: List[dict], tune_dir: str) -> bool:
    """Write results.csv unless it already holds exactly these rows (a finished sweep's rerun leaves it as it is);
    whether it was written."""
    import io

    import tensorflow as tf

    from dtf.experiment import atomic

    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=RESULT_COLUMNS)
    w.writeheader()
    w.writerows(rows)
    path = os.path.join(tune_dir, "results.csv")
    try:
        with tf.io.gfile.GFile(path) as f:
            if f.read() == text.getvalue():
                return False
    except tf.errors.NotFoundError:
        pass
    atomic.write_text(path, text.getvalue())
    return True


def format_table(rows: List[dict]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [RESULT_COLUMNS] + [[fmt(r[c]) for c in RESULT_COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(RESULT_COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


def best_row(rows: List[dict], direction: str) -> Optional[dict]:
    done = [r for r in rows if r["status"] == "completed" and r["objective"] != ""
            and math.isfinite(float(r["objective"]))]
    if not done:
        return None
    key = (lambda r: -float(r["objective"])) if direction == "max" else (lambda r: float(r["objective"]))
    return min(done, key=key)


def write_best_flags(best: dict, tune_dir: str, config) -> str:
    from dtf.experiment import atomic

    overrides = dict(global_batch_size=int(best["global_batch_size"]), per_replica_batch_size=None,
                     base_lr=float(best["base_lr"]), warmup_epochs=float(best["warmup_epochs"]),
                     lr_scaling=best["lr_scaling"], worker_hosts=None, task_index=None,
                     model_dir=os.path.join(tune_dir, "best"))
    if overrides["warmup_epochs"] and config.warmup_steps is not None:
        overrides["warmup_steps"] = None
    best_config = config.replace(**overrides)
    path = os.path.join(tune_dir, BEST_FLAGS)
    atomic.write_text(path, f"# dtf.tune best trial {best['trial']}: {best['objective']} "
                            f"(train it: python -m dtf.run --flagfile={path})\n" + best_config.to_flagfile())
    return path


def plot(rows: List[dict], tune_dir: str, objective: str) -> Optional[str]:
    import matplotlib
    import tensorflow as tf

    from dtf.experiment import atomic

    matplotlib.use("Agg")
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["objective"] != "" and math.isfinite(float(r["objective"]))]
    fig, ax = plt.subplots(figsize=(6, 4))
    if done:
        lrs = [float(r["peak_lr"]) for r in done]
        norm = mcolors.LogNorm(vmin=min(lrs), vmax=max(lrs) * (1.0001 if min(lrs) == max(lrs) else 1))
        sc = ax.scatter([r["global_batch_size"] for r in done], [float(r["objective"]) for r in done], c=lrs,
                        cmap="viridis", norm=norm, s=50, edgecolors="k")
        fig.colorbar(sc, ax=ax, label="peak LR")
        ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch size")
    ax.set_ylabel(objective)
    ax.set_title(f"dtf.tune: {len(done)} completed of {len(rows)} trials")
    fig.tight_layout()
    path = os.path.join(tune_dir, PLOT)
    with atomic.replacing(path) as tmp, tf.io.gfile.GFile(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)
    return path


def _check_signature(tune_dir: str, signature: dict, write: bool):
    import tensorflow as tf

    from dtf.base.errors import UserError
    from dtf.experiment import atomic

    sig_path = os.path.join(tune_dir, SPACE_FILE)
    if tf.io.gfile.exists(sig_path):
        old = _read_json(sig_path)
        if old != json.loads(json.dumps(signature)):
            raise UserError(f"--tune_dir={tune_dir} holds a sweep with a different space/tuner/objective "
                            f"({old}); use a new --tune_dir to start another sweep")
    elif write:
        atomic.write_json(sig_path, signature)  # another process never reads half a file


# ---------------------------------------------------------------------------------------------------------- main

_ARGV: List[str] = []


def _body(rest):
    from absl import flags

    from dtf.base.errors import UserError

    FLAGS = flags.FLAGS
    space = parse_space(FLAGS)
    tuner_name, objective = FLAGS.tuner, FLAGS.objective
    if tuner_name not in TUNERS:  # before importing TensorFlow: fail fast
        raise UserError(f"--tuner={tuner_name!r} is not valid; choose one of: {', '.join(TUNERS)}")
    direction = objective_direction(objective, FLAGS.objective_direction)
    role = distributed.role()
    if FLAGS.num_tuners < 0:
        raise UserError(f"--num_tuners={FLAGS.num_tuners} must be >= 0")
    if FLAGS.num_tuners and role is None:
        from dtf.cluster import procs

        procs.raise_stopped_on_signals()
        try:
            return distributed.launch(_ARGV, FLAGS.num_tuners)
        except errors.Stopped as stop:
            print(f"dtf.tune: got {signal.Signals(stop.signum).name}; stopped all processes", file=sys.stderr)
            return 128 + stop.signum

    from dtf.base import versions

    versions.load_tensorflow()  # quiet, version-checked, before anything else imports it
    from dtf.config import flags as dtf_flags
    from dtf.experiment import task as task_lib, train

    config = dtf_flags.config_from_flags()
    tune_dir = FLAGS.tune_dir
    cluster = train.resolve_cluster(config)
    if cluster.is_multi_worker:
        raise UserError("dtf.tune trains each trial on one host (one_device or mirrored); multi-worker trials are not "
                        "supported: unset TF_CONFIG/--worker_hosts and use --num_tuners=N for parallel trials")
    strategy = train.create_strategy(config)
    validate_space(space, config, strategy.num_replicas_in_sync, tuner_name, FLAGS.max_trials,
                   FLAGS.executions_per_trial)
    task = task_lib.from_config(config)
    check_against_data(space, config, strategy, cluster, task, objective)
    train.check_model_dir(tune_dir, "--tune_dir")
    _check_signature(tune_dir, _space_signature(space, FLAGS), write=role in (None, "chief"))

    hypermodel_class, objective_not_reported = _make_hypermodel_class()
    hypermodel = hypermodel_class(space, strategy, cluster, tune_dir, task, objective)
    tuner = make_tuner(tuner_name, hypermodel, objective, direction, FLAGS.max_trials, FLAGS.executions_per_trial, tune_dir,
                       strategy, config.seed, config.epochs)
    tuner.oracle.verbose = 0

    def search():
        import contextlib
        import io

        try:  # keras-tuner prints a progress display per trial; keep stdout for dtf's own table
            with data_service.running(config.data_service) as hypermodel.data_service:  # one service for all trials
                with contextlib.redirect_stdout(io.StringIO()):
                    tuner.search(verbose=0)
        except objective_not_reported as e:
            raise UserError(str(e)) from None

    start = time.time()
    if role not in (None, "chief"):  # a tuner worker: train the trials the chief hands out, write no results
        search()
        print(f"dtf.tune: {role} ran {len(hypermodel.trials_run)} trial(s) in {time.time() - start:.1f}s: "
              f"{', '.join(map(str, hypermodel.trials_run)) or 'none'}")
        return 0

    distributed.repair_reloaded_oracle(tuner.oracle)
    before = len(tuner.oracle.trials)
    if role == "chief":
        n = os.environ.get(distributed.NUM_TUNERS_ENV)
        expected = {f"tuner{i}" for i in range(int(n))} if n and n.isdigit() else None
        distributed.serve_oracle(tuner, expected)
    else:
        search()
    ran = len(tuner.oracle.trials) - before
    rows = collect_results(tuner, tune_dir, config)
    changed = write_results(rows, tune_dir)
    print(format_table(rows))
    print(f"dtf.tune: {ran} new trial(s) in {time.time() - start:.1f}s, {len(rows)} in total; "
          f"results in {os.path.join(tune_dir, 'results.csv')}" + ("" if changed else " (unchanged)"))
    import tensorflow as tf

    if changed or not tf.io.gfile.exists(os.path.join(tune_dir, PLOT)):
        plot(rows, tune_dir, objective)
    best = best_row(rows, direction)
    if best is None:
        raise UserError(f"no trial of the {len(rows)} completed (see {tune_dir}/results.csv); lower --tune_base_lr "
                        "or add warmup")
    path = os.path.join(tune_dir, BEST_FLAGS)
    if changed or not tf.io.gfile.exists(path):
        write_best_flags(best, tune_dir, config)
    print(f"dtf.tune: best trial {best['trial']}: {objective}={float(best['objective']):.4f} "
          f"(global batch {best['global_batch_size']}, base_lr {float(best['base_lr']):.4g}, peak LR "
          f"{float(best['peak_lr']):.4g}); train it: python -m dtf.run --flagfile={path}")
    return 0


def main(argv=None):
    _ARGV[:] = list(sys.argv if argv is None else argv)
    return cli.main("dtf.tune", _define, _body, argv, doc=__doc__)


if __name__ == "__main__":
    cli.exit(main())
