"""`--stop_at=val_accuracy>=0.9`: stop a run at the first validation that reaches its target, and record how many
optimizer updates and how many seconds of training (validation excluded) it took — the "steps to result" of Shallue
et al. 2018 that a sweep's steps_to:/seconds_to: objectives read from the run's summary."""
import time
from typing import Callable, List, Optional

import keras
import tensorflow as tf

from dtf.config.target import parse_target


class StopAtTarget(keras.callbacks.Callback):
    """Watches each validation's logs. Training seconds are the wall time of fit minus Keras's validation passes
    (measured from the on_test_begin/end hooks fit's validation calls); the steps are the optimizer's own counter, so
    a run resumed from a backup counts from step 0 of the run, not of this process. Seconds are this process's only."""

    def __init__(self, stop_at: str, every_steps: int = 0, eval_data: Optional[Callable] = None,
                 log_dir: Optional[str] = None):
        """every_steps: also validate every N optimizer steps (--validate_every_steps), on `eval_data()` (the
        experiment's evaluation input, built once when training begins). log_dir (the chief's): where the reached
        target's steps and seconds go as TensorBoard scalars, so the HParams dashboard shows them against the
        run's flags (a sweep's steps-to-result against the global batch)."""
        super().__init__()
        self._log_dir = log_dir
        self.target = parse_target(stop_at, "--stop_at")
        self.every_steps, self._eval_data, self._eval = every_steps, eval_data, None
        self.train_seconds = 0.0
        self.reached: Optional[dict] = None
        self.validations: List[list] = []  # [step, value] of each validation (a run's steps-to-result curve)
        self._since: Optional[float] = None

    def _pause(self):
        if self._since is not None:
            self.train_seconds += time.perf_counter() - self._since
            self._since = None

    def on_train_begin(self, logs=None):
        if self.every_steps and self._eval is None:
            self._eval = self._eval_data()
        self._since = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        """Every `every_steps` optimizer steps but an epoch's last: validate (every worker alike, so a multi-worker
        run stays in step), with the clock stopped. Keras's evaluate resets the compiled metrics, so they are reset
        again after it and the epoch's training metrics cover the steps since."""
        if not self.every_steps or self.reached is not None or self._eval is None:
            return
        if batch + 1 == self.params.get("steps"):
            return  # the epoch's last step: Keras validates right after it
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.every_steps or (self.validations and self.validations[-1][0] == step):
            return  # (an accumulation step leaves the counter where it was)
        self._pause()
        results = self.model.evaluate(self._eval.dataset, verbose=0, return_dict=True)
        self.model.reset_metrics()
        self._check(results.get(self.target.metric[len("val_"):]), step, None)
        if self.reached is None:
            self._since = time.perf_counter()

    def on_test_begin(self, logs=None):
        self._pause()

    def on_test_end(self, logs=None):
        if self.reached is None:
            self._since = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.target.metric)
        if value is not None:
            self._pause()  # the epoch's validation paused the clock already; this stops it if reached
            self._check(value, int(self.model.optimizer.iterations.numpy()), epoch + 1)
            if self.reached is None:
                self._since = time.perf_counter()

    def _check(self, value, step: int, epoch: Optional[int]):
        if value is None or self.reached is not None:
            return
        self.validations.append([step, float(value)])
        if self.target.reached(float(value)):
            self.reached = {"step": step, "train_seconds": round(self.train_seconds, 4), "value": float(value)}
            if epoch is not None:
                self.reached["epoch"] = epoch
            self.model.stop_training = True
            if self._log_dir is not None:
                writer = tf.summary.create_file_writer(self._log_dir)
                with writer.as_default(step=step), tf.summary.record_if(True):
                    tf.summary.scalar("stop_at/steps", step)
                    tf.summary.scalar("stop_at/train_seconds", self.reached["train_seconds"])
                writer.close()

    def on_train_end(self, logs=None):
        self._pause()

    def summary(self) -> dict:
        """The summary's "stop_at" entry: the target and, once reached, when."""
        out = {"target": str(self.target), "reached": self.reached is not None,
               "train_seconds": round(self.train_seconds, 4), "validations": self.validations}
        return {**out, **self.reached} if self.reached else out
