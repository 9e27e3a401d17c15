"""Tabular regression from a CSV file: four named numeric feature columns → a house price; MSE loss, MAE metric.

    python -m dtf.run --flagfile=experiments/tabular_regression.flags

The CSV is generated on first use at --csv_path (a real CSV with the same header trains as is). Features stay named
all the way into the model (a dict of inputs), and are normalized with statistics of the training rows only.
"""
import os

import keras
import numpy as np
import tensorflow as tf
from absl import flags

import dtf

FEATURES = ("area_m2", "rooms", "age_years", "distance_km")
LABEL = "price_k"

flags.DEFINE_string("csv_path", "runs/data/houses.csv", f"CSV with columns {', '.join(FEATURES)}, {LABEL} "
                    "(generated there when missing).")
flags.DEFINE_integer("csv_rows", 4000, "Rows to generate when --csv_path is missing.")
flags.DEFINE_float("validation_fraction", 0.2, "Share of the rows (the last ones) held out for validation.")
flags.DEFINE_integer("hidden_units", 64, "Units in each of the two hidden layers.")
FLAGS = flags.FLAGS


def write_csv(path: str, rows: int, seed: int = 0):
    """Synthetic houses: the price depends on every column, partly nonlinearly, plus noise. Written atomically,
    so workers that generate it at the same time never read half a file."""
    rng = np.random.default_rng(seed)
    area = rng.uniform(30, 250, rows)
    rooms = np.clip(np.round(area / 35 + rng.normal(0, 0.7, rows)), 1, 8)
    age = rng.uniform(0, 80, rows)
    distance = rng.uniform(0.5, 30, rows)
    price = (2.5 * area + 12 * rooms - 1.2 * age - 4 * distance + 80 * np.exp(-distance / 4)
             + rng.normal(0, 15, rows))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    np.savetxt(tmp, np.column_stack([area, rooms, age, distance, price]), delimiter=",", fmt="%.3f",
               header=",".join((*FEATURES, LABEL)), comments="")
    os.replace(tmp, path)


def read_csv(path: str):
    """({column: float32 array of shape [rows, 1]}, labels [rows, 1]) from a CSV with a header row."""
    table = np.genfromtxt(path, delimiter=",", names=True, dtype="float32")
    return {name: table[name][:, None] for name in FEATURES}, table[LABEL][:, None]


class HousePrices(dtf.Task):
    def __init__(self):
        if not os.path.exists(FLAGS.csv_path):
            write_csv(FLAGS.csv_path, FLAGS.csv_rows)
        features, labels = read_csv(FLAGS.csv_path)
        n_train = int(len(labels) * (1 - FLAGS.validation_fraction))
        self.train = ({k: v[:n_train] for k, v in features.items()}, labels[:n_train])
        self.validation = ({k: v[n_train:] for k, v in features.items()}, labels[n_train:])

    def datasets(self):
        return {"train": tf.data.Dataset.from_tensor_slices(self.train),
                "validation": tf.data.Dataset.from_tensor_slices(self.validation)}

    def build_model(self):
        inputs = {name: keras.Input((1,), name=name) for name in FEATURES}
        x = keras.layers.Concatenate()([inputs[name] for name in FEATURES])
        columns = np.concatenate([self.train[0][name] for name in FEATURES], axis=1)
        x = keras.layers.Normalization(mean=columns.mean(0), variance=columns.var(0))(x)
        for _ in range(2):
            x = keras.layers.Dense(FLAGS.hidden_units, activation="relu")(x)
        return keras.Model(inputs, keras.layers.Dense(1)(x), name="house_prices")

    def loss(self):
        return keras.losses.MeanSquaredError()

    def metrics(self):
        return [keras.metrics.MeanAbsoluteError()]
