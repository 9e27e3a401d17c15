"""Two inputs in a dict — a 16×16 image and a numeric side feature — with a custom per-example loss class and a
custom metric; the saved model.keras reloads with both (they are registered Keras serializables).

    python -m dtf.run --flagfile=experiments/image_and_side_feature.flags

Label = which quadrant of the image holds the bright blob (4) × whether the side feature is positive (2): 8 classes,
so the model must read both inputs. `QuadrantAccuracy` scores the image half of the label alone.
"""
import keras
import numpy as np
import tensorflow as tf
from absl import flags
from keras import ops

import dtf

SIDE, NUM_CLASSES, QUADRANTS = 16, 8, 4

flags.DEFINE_integer("num_train", 4000, "Generated training examples.")
flags.DEFINE_integer("num_validation", 800, "Generated validation examples.")
flags.DEFINE_float("label_smoothing", 0.1, "Smoothing of SmoothedCrossEntropy (0: plain cross-entropy).")
FLAGS = flags.FLAGS


def make_data(count: int, seed: int):
    """({"image": [count, 16, 16, 1], "side": [count, 1]}, labels [count]) — deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    quadrant = rng.integers(0, QUADRANTS, count)
    half = SIDE // 2
    cy = (quadrant // 2) * half + rng.uniform(2, half - 2, count)
    cx = (quadrant % 2) * half + rng.uniform(2, half - 2, count)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] + 0.5
    blob = np.exp(-((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2) / 4.0)
    image = (blob + rng.normal(0, 0.3, blob.shape)).astype("float32")[..., None]
    side = (rng.choice([-1.0, 1.0], count) * rng.uniform(0.2, 2.0, count)).astype("float32")[:, None]
    labels = (quadrant + QUADRANTS * (side[:, 0] > 0)).astype("int32")
    return {"image": image, "side": side}, labels


@keras.saving.register_keras_serializable(package="dtf_examples")
class SmoothedCrossEntropy(keras.losses.Loss):
    """Cross-entropy on logits against labels smoothed toward uniform; per example (shape [batch]), so dtf reduces
    it over the global batch on any number of replicas."""

    def __init__(self, num_classes: int, smoothing: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.smoothing = num_classes, smoothing

    def call(self, y_true, y_pred):
        target = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), self.num_classes)
        target = target * (1 - self.smoothing) + self.smoothing / self.num_classes
        return -ops.sum(target * ops.log_softmax(y_pred, axis=-1), axis=-1)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "smoothing": self.smoothing}


@keras.saving.register_keras_serializable(package="dtf_examples")
class QuadrantAccuracy(keras.metrics.Metric):
    """Accuracy of the predicted quadrant alone (label % 4), whatever the side feature says."""

    def __init__(self, name="quadrant_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.correct = self.add_variable(shape=(), initializer="zeros", name="correct")
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        truth = ops.cast(ops.reshape(y_true, (-1,)), "int32") % QUADRANTS
        guess = ops.cast(ops.argmax(y_pred, axis=-1), "int32") % QUADRANTS
        self.correct.assign_add(ops.sum(ops.cast(ops.equal(truth, guess), self.dtype)))
        self.total.assign_add(ops.cast(ops.shape(truth)[0], self.dtype))

    def result(self):
        return ops.divide_no_nan(self.correct, self.total)

    def reset_state(self):
        self.correct.assign(0.0)
        self.total.assign(0.0)


class ImageAndSideFeature(dtf.Task):
    def datasets(self):
        return {"train": tf.data.Dataset.from_tensor_slices(make_data(FLAGS.num_train, seed=1)),
                "validation": tf.data.Dataset.from_tensor_slices(make_data(FLAGS.num_validation, seed=2))}

    def build_model(self):
        image = keras.Input((SIDE, SIDE, 1), name="image")
        side = keras.Input((1,), name="side")
        x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(image)
        x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.Dense(32, activation="relu")(keras.layers.Flatten()(x))
        s = keras.layers.Dense(8, activation="relu")(side)
        x = keras.layers.Dense(32, activation="relu")(keras.layers.Concatenate()([x, s]))
        return keras.Model({"image": image, "side": side}, keras.layers.Dense(NUM_CLASSES)(x),
                           name="image_and_side_feature")

    def loss(self):
        return SmoothedCrossEntropy(NUM_CLASSES, FLAGS.label_smoothing)

    def metrics(self):
        return ["accuracy", QuadrantAccuracy()]
