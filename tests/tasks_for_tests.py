"""Tasks written only against dtf's documented Task API (datasets / build_model / loss / metrics + module flags)."""
import keras
import numpy as np
import tensorflow as tf
from absl import flags
from keras import ops

import dtf

FEATURES, NUM_TRAIN, NUM_VALIDATION = 8, 320, 100

flags.DEFINE_enum("test_loss", "per_example", ["per_example", "mean", "sum"],
                  "How the task's loss reduces a batch: per-example values, or a scalar batch mean / sum.")
flags.DEFINE_integer("test_hidden", 16, "Hidden units.")
FLAGS = flags.FLAGS


def data(count: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, FEATURES)).astype("float32")
    y = np.tanh(x[:, :1] - 2 * x[:, 1:2]) + 0.5 * x[:, 2:3] + 0.05 * rng.normal(size=(count, 1))
    return x, y.astype("float32")


@keras.saving.register_keras_serializable(package="dtf_tests")
def scalar_mean_squared_error(y_true, y_pred):
    return ops.mean(ops.square(y_true - y_pred))


@keras.saving.register_keras_serializable(package="dtf_tests")
def scalar_sum_squared_error(y_true, y_pred):
    return ops.sum(ops.square(y_true - y_pred))


LOSSES = {"per_example": "mse", "mean": scalar_mean_squared_error, "sum": scalar_sum_squared_error}


class Regression(dtf.Task):
    """A small nonlinear regression; `loss_kind` picks how the loss reduces (default: the --test_loss flag)."""

    def __init__(self, loss_kind=None, hidden=None):
        # FLAGS["name"].value: the flag's default when flags were not parsed (a test building the task directly)
        self.loss_kind = loss_kind or FLAGS["test_loss"].value
        self.hidden = hidden or FLAGS["test_hidden"].value

    def datasets(self):
        return {"train": tf.data.Dataset.from_tensor_slices(data(NUM_TRAIN, 0)),
                "validation": tf.data.Dataset.from_tensor_slices(data(NUM_VALIDATION, 1))}

    def build_model(self):
        return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(self.hidden, activation="tanh"),
                                 keras.layers.Dense(1)])

    def loss(self):
        return LOSSES[self.loss_kind]

    def metrics(self):
        return ["mean_absolute_error"]
