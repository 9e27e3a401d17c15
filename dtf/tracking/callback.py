"""The Keras callback that logs a run's metrics to its MLflow run, on the chief only (only the chief has a
TrackedRun: dtf.tracking.tracker).

Steps are the optimizer's: each epoch's logs (train and validation metrics, and the learning rate, examples/s and step
time that dtf.experiment.summaries.TrainingScalars adds) at the optimizer steps done when the epoch ends, plus the
learning rate every --log_every_steps steps, so the points line up with TensorBoard's step-level scalars and with the
side-car evaluator's scores (at their checkpoints' optimizer steps) whatever the batch, accumulation or resume point.
Listed after TrainingScalars, so an epoch's logs already hold its scalars.
"""
import keras

from dtf.optim import scaling
from dtf.tracking import mlflow_run

EPOCH = "epoch"  # also logged at each epoch's end: the (1-based) epoch that step ends


class MlflowMetrics(keras.callbacks.Callback):
    def __init__(self, run: mlflow_run.TrackedRun, every_n_steps: int = 10):
        super().__init__()
        self.run, self.every = run, every_n_steps
        self.flush_every_s = mlflow_run.flush_every_s()
        self._batches = 0

    def _step(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if self._batches % self.every == 0:
            self.run.metrics({"learning_rate": scaling.current_lr(self.model.optimizer)}, self._step())
            self.run.flush(every_s=self.flush_every_s)

    def on_epoch_end(self, epoch, logs=None):
        self.run.metrics({**(logs or {}), EPOCH: epoch + 1}, self._step())
        self.run.flush()

    def on_train_end(self, logs=None):
        self.run.flush()
