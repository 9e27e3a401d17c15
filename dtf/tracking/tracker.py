"""What a dtf command logs to MLflow with `--tracking_uri`: `Tracker.training` around a run's training (its chief
only: `dtf.experiment.train.run_experiment` takes the tracker and uses it on the chief), `Tracker.evaluator` for the
side-car evaluator's scores, `Tracker.prediction` around `dtf.predict` (dtf.tracking.sweep: `dtf.tune`).

A training run's MLflow run holds:
- params: the resolved flags (what flags.txt holds, a --task module's own flags by their names) and the layout
  (`layout.strategy`, `layout.num_workers`, `layout.num_replicas`, `layout.global_batch_size`,
  `layout.per_replica_batch_size`, `layout.peak_lr`, `layout.steps_per_epoch`);
- metrics at optimizer steps (dtf.tracking.callback): every epoch's train and validation metrics, `learning_rate`,
  `examples_per_sec`, `step_time_ms` and `epoch`; `learning_rate` also every --log_every_steps steps; the final
  evaluation's `val_*` and `wall_time_s` at the last step; the evaluator's `eval_*` at each checkpoint's step;
- artifacts: flags.txt, summary.json, and model.keras as the MLflow model `model` (dtf.tracking.mlflow_model);
- tags: `dtf.version`, `tensorflow.version`, `keras.version`, `python.version`, `mlflow.source.git.commit` and
  `dtf.git.dirty` when dtf runs from a git checkout, `dtf.model_dir`, `dtf.exit_status`; status by the exit status.
"""
import contextlib
import getpass
import json
import os
import platform
import subprocess
from typing import Callable, Dict, Iterator, List, Optional

import tensorflow as tf

from dtf.config.config import Config
from dtf.distribute import strategy as strategy_lib
from dtf.tracking import callback as callback_lib, fallback as fallback_lib, mlflow_run, store as store_lib

MAX_PREDICTIONS_BYTES = 64 << 20  # dtf.predict: a larger predictions file stays where it is (the tag dtf.output)


def run_params(resolved: Config) -> Dict[str, str]:
    """The resolved flags as params: {flag: value as flags.txt spells it}, a task module's flags by their own
    names."""
    from absl import flags

    params = {k: v for k, v in resolved.flag_values().items() if k != "task_flags"}
    for line in resolved.task_flags:
        name, assigned, value = line[2:].partition("=")
        if not assigned:  # a boolean, spelled --name or --noname
            negated = name not in flags.FLAGS and name.startswith("no") and name[2:] in flags.FLAGS
            name, value = (name[2:], "false") if negated else (name, "true")
        params[name] = value
    return params


def layout_params(exp) -> Dict[str, str]:
    """How this run was laid out (may differ between a run and its rerun: the global batch is the truth)."""
    return {"layout.strategy": strategy_lib.strategy_name(exp.strategy),
            "layout.num_workers": exp.cluster.num_workers, "layout.num_replicas": exp.plan.num_replicas,
            "layout.global_batch_size": exp.plan.global_batch_size,
            "layout.per_replica_batch_size": exp.plan.per_replica_batch_size, "layout.peak_lr": f"{exp.peak_lr:g}",
            "layout.steps_per_epoch": exp.steps_per_epoch}


def git_tags() -> Dict[str, str]:
    """MLflow's git commit tag (and whether the checkout has local changes) when dtf runs from a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.exists(os.path.join(root, ".git")):
        return {}
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        changes = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if commit.returncode or changes.returncode:
        return {}
    return {"mlflow.source.git.commit": commit.stdout.strip(), "dtf.git.dirty": str(bool(changes.stdout.strip()))}


def version_tags(source: str) -> Dict[str, str]:
    import keras

    from dtf import __version__

    tags = {"dtf.version": __version__, "tensorflow.version": tf.__version__, "keras.version": keras.__version__,
            "python.version": platform.python_version(), "mlflow.source.name": source}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (some containers)
        pass
    return {**tags, **git_tags()}


class Tracker:
    """--tracking_uri and --experiment_name of one command. Constructing it only checks that MLflow is installed;
    `check` (before anything is written) that the store answers."""

    def __init__(self, uri: str, experiment_name: str = "dtf", source: str = "dtf",
                 store: Optional[store_lib.Store] = None):
        store_lib.require_mlflow()
        self.uri, self.experiment_name, self.source = uri, experiment_name, source
        self._store = store  # made on first use, unless the caller made (and checked) it already

    @classmethod
    def from_config(cls, config: Config, source: str, store: Optional[store_lib.Store] = None) -> Optional["Tracker"]:
        """The tracker --tracking_uri asks for, or None."""
        return cls(config.tracking_uri, config.experiment_name, source, store) if config.tracking_uri else None

    @property
    def store(self) -> store_lib.Store:
        if self._store is None:
            self._store = store_lib.Store(self.uri)
        return self._store

    def check(self):
        """A one-line error (exit 2) unless the store answers (a server is up, a database opens)."""
        self.store.check(self.experiment_name)

    def open(self, directory: str, run_name: str, **kwargs) -> mlflow_run.TrackedRun:
        return mlflow_run.TrackedRun.open(self.store, directory, self.experiment_name, run_name=run_name,
                                          tags={**version_tags(self.source), **kwargs.pop("tags", {})}, **kwargs)

    @contextlib.contextmanager
    def training(self, exp, resolved: Config) -> Iterator[List]:
        """Around one run's training on its chief, after the run holds model_dir: opens (or continues) the run,
        logs params, yields the callbacks to train with; at the end logs the outputs and the status."""
        model_dir = exp.config.model_dir
        run = self.open(model_dir, os.path.basename(os.path.normpath(model_dir)),
                        tags={"dtf.model_dir": _absolute(model_dir)})
        run.log_params({**run_params(resolved), **layout_params(exp)})
        with mlflow_run.ending(run):
            yield [callback_lib.MlflowMetrics(run, exp.config.log_every_steps)]
            log_outputs(run, exp.config.export)

    def evaluator(self, model_dir: str) -> Callable[[int, Dict[str, float]], None]:
        """on_scores(step, metrics) for the side-car evaluator: `eval_<metric>` at the checkpoint's step, into the run
        that model_dir records (the chief records it before training; scores are held back until it is there)."""
        held, attached = [], []

        def on_scores(step: int, metrics: Dict[str, float]):
            held.append((step, metrics))
            if not attached:
                run = mlflow_run.TrackedRun.attach(self.store, model_dir, fallback_lib.name_for("evaluator"))
                if run is None:
                    return
                attached.append(run)
            for step_, scores in held:
                attached[0].metrics({f"eval_{k}": v for k, v in scores.items()}, step_)
            held.clear()
            attached[0].flush()

        return on_scores

    @contextlib.contextmanager
    def prediction(self, output: str, params: Dict[str, str], model_dir: Optional[str] = None):
        """Around dtf.predict on the chief: a run of its own (named after the output), tagged with the MLflow run of
        `model_dir` when that is tracked here; yields it to log the results; ends it by the outcome."""
        directory = os.path.dirname(os.path.abspath(output)) if "://" not in output else os.path.dirname(output)
        source = mlflow_run.recorded(model_dir, self.uri) if model_dir else None
        tags = {"dtf.output": output, **({"dtf.source_run_id": source["run_id"]} if source else {})}
        run = self.open(directory, f"predict {os.path.basename(output)}", tags=tags, resume=False, record=False,
                        fallback_name=fallback_lib.name_for(f"predict-{os.path.basename(output)}"))
        run.log_params(params)
        with mlflow_run.ending(run):
            yield run

    @staticmethod
    def log_prediction(run: mlflow_run.TrackedRun, result, output: str):
        """dtf.predict's numbers (at step 0) and, up to MAX_PREDICTIONS_BYTES, the predictions file itself."""
        run.metrics({"examples_per_sec": result.examples_per_sec, "num_examples": result.num_examples,
                     "seconds": result.seconds}, 0)
        run.flush()
        if tf.io.gfile.exists(output) and tf.io.gfile.stat(output).length <= MAX_PREDICTIONS_BYTES:
            run.artifact(output if "://" in output else os.path.abspath(output), "predictions")


def log_outputs(run: mlflow_run.TrackedRun, export: bool):
    """A finished run's outputs: the final evaluation at the last step, flags.txt, summary.json and the model."""
    summary_path = os.path.join(run.directory, "summary.json")
    try:
        with tf.io.gfile.GFile(summary_path) as f:
            summary = json.loads(f.read())
    except (tf.errors.NotFoundError, ValueError):
        summary = {}
    final = {k: v for k, v in summary.get("final_metrics", {}).items() if k.startswith("val_")}
    run.metrics({**final, "wall_time_s": summary.get("wall_time_s", 0.0)}, run.last_step)
    run.flush()
    run.artifact("flags.txt")
    run.artifact("summary.json")
    if export:
        run.model("model.keras")


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)
