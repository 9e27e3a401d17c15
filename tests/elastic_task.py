"""A Task whose examples carry their id, and whose model appends the ids of every batch it trains on to a file (one
per process, in $ELASTIC_IDS_DIR): the ids trained on, exactly, whatever the strategy (the input pipeline reads ahead,
so only the train step knows what was trained on). On a first start (DTF_LAUNCH_RESTART unset or 0) each step also
takes $ELASTIC_STEP_S seconds, so a test can stop it mid-epoch; a restarted job runs at full speed."""
import json
import os
import threading
import time

import keras
import numpy as np
import tensorflow as tf

import dtf

NUM_TRAIN = 132  # at a global batch of 12: 11-step passes on 1, 2 or 3 input pipelines
WEIGHTS = np.array([[0.5, -1.0, 0.25], [1.5, 0.5, -0.5], [-1.0, 0.75, 1.0], [0.25, -0.5, 2.0]], np.float32)
STEP_S = float(os.environ.get("ELASTIC_STEP_S", "0")) if os.environ.get("DTF_LAUNCH_RESTART", "0") == "0" else 0.0
_lock = threading.Lock()


def _example(i):
    x = tf.sin(tf.cast(i, tf.float32) * tf.constant([1.0, 2.0, 3.0, 4.0]))
    return tf.concat([x, [tf.cast(i, tf.float32)]], 0), tf.tanh(tf.linalg.matvec(WEIGHTS, x, transpose_a=True))


def _record(ids):
    directory = os.environ.get("ELASTIC_IDS_DIR")
    if directory:
        task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
        with _lock, open(os.path.join(directory, f"ids-{task.get('index', 0)}-{os.getpid()}.txt"), "a") as f:
            f.write(" ".join(str(int(i)) for i in ids.numpy()) + "\n")
        time.sleep(STEP_S)
    return np.int64(0)


@keras.saving.register_keras_serializable(package="dtf_tests")
class RecordIds(keras.layers.Layer):
    """Drops the id column; in training, appends the batch's ids to this process's file first."""

    def call(self, x, training=None):
        if training:
            done = tf.py_function(_record, [tf.cast(x[:, -1], tf.int64)], tf.int64)
            with tf.control_dependencies([done]):
                x = tf.identity(x)
        return x[:, :-1]

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] - 1)


class IdTask(dtf.Task):
    def datasets(self):
        return {"train": tf.data.Dataset.range(NUM_TRAIN).map(_example)}

    def build_model(self):
        return keras.Sequential([keras.Input((5,)), RecordIds(), keras.layers.Dense(8, activation="tanh"),
                                 keras.layers.Dense(3)])

    def loss(self):
        return "mse"


def trained_ids(directory):
    """{worker index: [ids of each step, in order]} from the files `_record` wrote (one line per replica batch)."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith("ids-"):
            with open(os.path.join(directory, name)) as f:
                out.setdefault(name, []).extend([int(i) for i in line.split()] for line in f if line.strip())
    return out
