"""Tasks with a known bottleneck, for the benchmark tests: a pipeline slowed on purpose, a heavy model on in-memory
data."""
import time

import keras
import numpy as np
import tensorflow as tf

import dtf

FEATURES = 32
INPUT_SLEEP_S = 0.002  # per training example: ~500 examples/s at most, whatever the machine


def _examples(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, FEATURES)).astype("float32")
    return x, (x[:, :1] > 0).astype("int32")


def _slow(x, y):
    time.sleep(INPUT_SLEEP_S)
    return x, y


class SlowInput(dtf.Task):
    """A tiny model behind a sequential map that sleeps on every example."""

    def datasets(self):
        slow = tf.data.Dataset.from_tensor_slices(_examples(512)).map(
            lambda x, y: tf.numpy_function(_slow, [x, y], [tf.float32, tf.int32], stateful=True))
        return {"train": slow.map(lambda x, y: (tf.ensure_shape(x, [FEATURES]), tf.ensure_shape(y, [1])))}

    def build_model(self):
        return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(2)])


class HeavyModel(dtf.Task):
    """Wide dense layers on examples already in memory."""

    def datasets(self):
        return {"train": tf.data.Dataset.from_tensor_slices(_examples(1024))}

    def build_model(self):
        return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(2048, activation="relu"),
                                 keras.layers.Dense(2048, activation="relu"), keras.layers.Dense(2)])
