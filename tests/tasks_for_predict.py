"""A classification task for dtf.predict tests: a custom (registered) layer, a test split of 1,001 examples (not a
multiple of any global batch the tests use) and a preprocess_batch that differs between training and inference."""
import keras
import numpy as np
import tensorflow as tf

import dtf

FEATURES, CLASSES, NUM_TEST = 6, 4, 1001


@keras.saving.register_keras_serializable(package="dtf_predict_tests")
class Scale(keras.layers.Layer):
    """A layer Keras cannot load unless this module is imported (as --task does)."""

    def __init__(self, factor=1.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


def examples(count: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, FEATURES)).astype("float32")
    return x, rng.integers(0, CLASSES, size=count).astype("int32")


def inference_features(x):
    """What preprocess_batch(training=False) makes of the features (the tests' one-device reference uses it)."""
    return x * 2.0


class Classify(dtf.Task):
    def datasets(self):
        return {"train": tf.data.Dataset.from_tensor_slices(examples(64, 0)),
                "test": tf.data.Dataset.from_tensor_slices(examples(NUM_TEST, 1))}

    def build_model(self):
        return keras.Sequential([keras.Input((FEATURES,)), Scale(0.5), keras.layers.Dense(16, activation="tanh"),
                                 keras.layers.Dense(CLASSES)])

    def preprocess_batch(self, batch, training):
        x, y = batch
        return (x * 3.0 if training else inference_features(x)), y
