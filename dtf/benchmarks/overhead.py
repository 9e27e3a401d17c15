"""What dtf costs over hand-written Keras + tf.distribute (`python -m dtf.bench overhead`).

The same task model, training data and strategy object are trained twice per repeat, alternating after one warm-up fit
each: by dtf (`Experiment.build_model` + `Experiment.fit` with dtf.run's callbacks: backup, TensorBoard, training
scalars, the NaN check and the preemption watcher)
and by the script one writes from TensorFlow's tutorial (`experimental_distribute_dataset` of a shuffled, repeated,
batched dataset; `compile` with the task's loss and a constant LR; `fit`). Neither validates. The steady-state step
time of one fit is the time from the end of its first epoch to the end of its last, over the steps in between, so
per-epoch costs (backups, summaries) count and tracing/pipeline start-up does not.

With `parts`, dtf's fit is also timed without each of its callbacks in turn, without any, and with the progress bar
(`--progress=bar`, drawn to /dev/null): what each costs is its variant's difference from the whole.
"""
import os
import shutil
import statistics
import tempfile
import time
from typing import Callable, Dict

import keras
import tensorflow as tf

from dtf.distribute.strategy import strategy_name
from dtf.experiment import preemption
from dtf.experiment import progress as progress_lib
from dtf.experiment import task as task_lib

GOAL = 0.98  # dtf's examples/s over the hand-written script's


class EpochClock(keras.callbacks.Callback):
    """perf_counter() at every epoch end (listed last, so after the other callbacks' epoch-end work)."""

    def __init__(self):
        super().__init__()
        self.ends = []

    def on_epoch_end(self, epoch, logs=None):
        self.ends.append(time.perf_counter())


def steady_step_s(clock: EpochClock, steps_per_epoch: int) -> float:
    return (clock.ends[-1] - clock.ends[0]) / ((len(clock.ends) - 1) * steps_per_epoch)


def hand_written_model(exp) -> keras.Model:
    """The task's model compiled the tutorial way: its loss as is, the optimizer by name at dtf's peak LR."""
    keras.utils.set_random_seed(exp.config.seed)
    with exp.strategy.scope():
        model = exp.task.build_model()
        optimizer = keras.optimizers.get({"class_name": exp.config.optimizer,
                                          "config": {"learning_rate": exp.peak_lr}})
        model.compile(optimizer=optimizer, loss=exp.task.loss(), metrics=exp.task.metrics())
    return model


def hand_written_data(exp) -> tf.distribute.DistributedDataset:
    c = exp.config
    data = exp.train_split.read(None)
    if c.cache:
        data = data.cache()
    data = data.shuffle(c.shuffle_buffer, seed=c.seed).repeat().batch(exp.plan.global_batch_size, drop_remainder=True)
    if type(exp.task).preprocess_batch is not task_lib.Task.preprocess_batch:
        data = data.map(lambda *b: exp.task.preprocess_batch(b if len(b) > 1 else b[0], training=True))
    return exp.strategy.experimental_distribute_dataset(data.prefetch(tf.data.AUTOTUNE))


def callback_names(exp) -> list:
    """The names of the callbacks dtf.run's fit uses for `exp` (built in a throw-away directory)."""
    work = tempfile.mkdtemp(prefix="dtf-overhead-")
    try:
        built = exp.callbacks(os.path.join(work, "tb"), os.path.join(work, "backup"))
        return [type(cb).__name__ for cb in built] + [preemption.Preemption.__name__]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def compare(exp, repeats: int = 3, parts: bool = False) -> Dict:
    """Steady-state step times of dtf and of the hand-written script on `exp` (its config's epochs >= 2 and
    steps_per_epoch, no validation), alternating after a warm-up fit of each; with `parts`, also dtf's fit without
    each of its callbacks, without any, and with the progress bar (see the module doc)."""
    steps, epochs = exp.steps_per_epoch, exp.config.epochs
    dtf_model, hand_model = exp.build_model(), hand_written_model(exp)
    hand_data = hand_written_data(exp)
    work = tempfile.mkdtemp(prefix="dtf-overhead-")
    sink = open(os.devnull, "w")

    def dtf_fit(keep: Callable[[str], bool] = lambda name: True, progress: bool = False):
        def fit(run: int) -> float:
            del run
            clock, fresh = EpochClock(), tempfile.mkdtemp(dir=work)  # a backup left there would end the fit at once
            callbacks = exp.callbacks(os.path.join(fresh, "tb"), os.path.join(fresh, "backup"))
            stop = preemption.Preemption(exp.cluster, exp.config.preemption_grace_s)
            try:
                stop.attach(exp.steps_per_epoch, callbacks)
                callbacks = [cb for cb in [*callbacks, stop] if keep(type(cb).__name__)]
                bar = progress_lib.TrainingProgress("bar", exp.plan.global_batch_size, sink) if progress else None
                exp.fit(dtf_model, callbacks + [clock], verbose=0, progress=bar)
            finally:
                stop.close()
            return steady_step_s(clock, steps)

        return fit

    def hand_fit(run: int) -> float:
        del run
        clock = EpochClock()
        # shuffle=False: the pipeline shuffles; Keras ignores the flag for a dataset but warns when it is left True.
        hand_model.fit(hand_data, epochs=epochs, steps_per_epoch=steps, callbacks=[clock], verbose=0, shuffle=False)
        return steady_step_s(clock, steps)

    fits = {"dtf": dtf_fit(), "hand_written": hand_fit}
    added = {}  # part name -> +1: the variant adds it, -1: the variant leaves it out
    if parts:
        for name in dict.fromkeys(callback_names(exp)):
            fits[name], added[name] = dtf_fit(keep=lambda other, name=name: other != name), -1
        fits["the callbacks"], added["the callbacks"] = dtf_fit(keep=lambda name: False), -1
        fits["the progress bar"], added["the progress bar"] = dtf_fit(progress=True), +1
    runs = {name: [] for name in fits}
    try:
        for name, fit in fits.items():
            fit(-1)  # warm-up: traces the train step, starts the pipelines
        for run in range(repeats):
            for name, fit in fits.items():
                runs[name].append(fit(run))
    finally:
        sink.close()
        shutil.rmtree(work, ignore_errors=True)
    step_s = {name: statistics.median(values) for name, values in runs.items()}
    return {"dtf_step_ms": 1000 * step_s["dtf"], "hand_written_step_ms": 1000 * step_s["hand_written"],
            "ratio": step_s["hand_written"] / step_s["dtf"], "goal": GOAL,
            "parts": {name: {"variant_step_ms": 1000 * step_s[name],
                             "cost_ms": 1000 * sign * (step_s[name] - step_s["dtf"]),
                             "variant": f"dtf {'with' if sign > 0 else 'without'} {name}"}
                      for name, sign in added.items()},
            "runs_step_ms": {name: [1000 * v for v in values] for name, values in runs.items()},
            "steps_per_epoch": steps, "epochs_per_fit": epochs, "repeats": repeats,
            "global_batch_size": exp.plan.global_batch_size, "num_replicas": exp.plan.num_replicas,
            "strategy": strategy_name(exp.strategy)}
