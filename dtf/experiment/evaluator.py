"""The side-car evaluator: scores each checkpoint the chief writes to model_dir/checkpoints once, on the eval split.

A TF_CONFIG `evaluator` task (or `dtf.run --mode=evaluate_continuously`) runs this instead of training. It never joins
the training collective (it runs on its own default strategy), so it can start, stop or lag without stalling the
workers. For every new checkpoint it writes the metrics at the checkpoint's training step (its optimizer's iterations)
to tensorboard/eval/ and to eval_results.json, copies the best one (--best_metric) to best.keras, and exits once
training has finished (the chief's summary.json is newer than every checkpoint) and the last checkpoint is scored;
restarted, it skips the checkpoints eval_results.json already has.
"""
import glob
import json
import os
import time
from typing import Callable, Dict, Optional

import keras
import tensorflow as tf

from dtf.base.errors import UserError
from dtf.base.logs import get_logger
from dtf.cluster import tf_config as cluster_lib
from dtf.experiment import atomic, task as task_lib, train

log = get_logger("dtf.experiment.evaluator")
RESULTS, BEST, EVAL_DIR = "eval_results.json", "best.keras", "eval"
POLL_S = 1.0
DEFAULT_TIMEOUT_S = 600.0
RUN_MARKS = ("tensorboard", "checkpoints", "summary.json")  # what a chief writes first (write_run_metadata) or last


def wait_for_run(model_dir: str, timeout_s: float = DEFAULT_TIMEOUT_S):
    """Return once model_dir holds a run (the chief writes tensorboard/ before training); say once what is awaited,
    and give up after `timeout_s` with a UserError (exit 2: a mistyped --model_dir, never restarted). Once a run is
    there, the evaluator waits for its checkpoints as long as training lasts."""
    deadline = time.monotonic() + timeout_s
    said = False
    while not any(os.path.exists(os.path.join(model_dir, mark)) for mark in RUN_MARKS):
        if time.monotonic() >= deadline:
            raise UserError(f"--model_dir={model_dir} holds no run after {timeout_s:g}s (no tensorboard/, checkpoints/ "
                            "or summary.json); check --model_dir, or start training first, or raise --eval_timeout_s")
        if not said:
            log.info(f"waiting up to {timeout_s:g}s (--eval_timeout_s) for a training run in {model_dir} "
                     "(its tensorboard/ or checkpoints/)")
            said = True
        time.sleep(POLL_S)


def _read(path: str) -> dict:
    if not os.path.exists(path):
        return {"checkpoints": {}, "best": None}
    with open(path) as f:
        return json.load(f)


def _write(path: str, results: dict):
    atomic.write_json(path, results)


def _checkpoints(model_dir: str):
    return sorted(glob.glob(os.path.join(model_dir, "checkpoints", "*.keras")))


def _training_finished(model_dir: str) -> bool:
    """The chief wrote summary.json after its last checkpoint (also true of a run that ended before the evaluator
    started: its checkpoints are scored, then the evaluator exits)."""
    summary = os.path.join(model_dir, "summary.json")
    return os.path.exists(summary) and all(os.path.getmtime(summary) >= os.path.getmtime(p)
                                           for p in _checkpoints(model_dir))


def evaluate_continuously(config, best_metric: str = "loss", direction: str = "min",
                          timeout_s: float = DEFAULT_TIMEOUT_S,
                          on_scores: Optional[Callable[[int, Dict[str, float]], None]] = None) -> dict:
    """Score checkpoints until training has finished; returns eval_results.json's content. The best checkpoint has
    the lowest (direction "min") or highest ("max") `best_metric`. on_scores(step, metrics) is called after each
    checkpoint is scored (dtf.tracking logs them)."""
    strategy = tf.distribute.get_strategy()
    exp = train.Experiment(config, strategy, cluster_lib.LOCAL)
    if exp.eval_split is None:
        raise UserError(f"{exp.task_label} has no validation or test split: nothing for the evaluator to score")
    wait_for_run(config.model_dir, timeout_s)
    results_path = os.path.join(config.model_dir, RESULTS)
    results = _read(results_path)
    writer = None  # made at the first score: nothing is written before the model is known to fit the data
    data_label = f"--task={config.task}" if config.task else f"--dataset={config.dataset or task_lib.DEFAULT_DATASET}"
    checked = False
    while True:
        finished = _training_finished(config.model_dir)
        pending = [p for p in _checkpoints(config.model_dir) if os.path.basename(p) not in results["checkpoints"]]
        scored = 0
        for path in pending:
            try:
                model = keras.saving.load_model(path)
            except Exception:  # still being written: next round
                if finished:
                    raise
                break
            if not checked:  # a model of other data: one line, not a traceback
                task_lib.check_model_accepts(model, exp.sample_batch()[0], f"{path} on {data_label}",
                                             "; give the --task or --dataset it was trained on")
                checked = True
            scored += 1
            metrics = model.evaluate(exp.eval_data().dataset, verbose=0, return_dict=True)
            step = int(model.optimizer.iterations.numpy())
            writer = writer or tf.summary.create_file_writer(os.path.join(config.model_dir, "tensorboard", EVAL_DIR))
            with writer.as_default(step=step):
                for name, value in metrics.items():
                    tf.summary.scalar(f"eval_{name}", value)
            writer.flush()
            name = os.path.basename(path)
            results["checkpoints"][name] = {"step": step, "metrics": metrics}
            if best_metric not in metrics:
                raise UserError(f"--best_metric={best_metric} is not a metric of this task; choose one of "
                                f"{', '.join(metrics)}")
            best, value = results["best"], metrics[best_metric]
            better = best is None or (value > best["value"] if direction == "max" else value < best["value"])
            if better:
                with atomic.replacing(os.path.join(config.model_dir, BEST)) as tmp:
                    tf.io.gfile.copy(path, tmp, overwrite=True)
                results["best"] = {"checkpoint": name, "metric": best_metric, "value": value, "step": step}
            _write(results_path, results)
            if on_scores is not None:
                on_scores(step, metrics)
            log.info(f"evaluated {name} at step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if finished and not pending:
            if writer is not None:
                writer.close()
            return results
        if not scored:
            time.sleep(POLL_S)
