"""One small training problem, trained identically under any strategy, for the equivalence tests.

Every replica sees exactly the global batches a single device sees: each input pipeline takes its slice of every
global batch, so N replicas must end with the single-device weights.
"""
import numpy as np
import tensorflow as tf
import keras

NUM_EXAMPLES, FEATURES, CLASSES = 192, 8, 3
GLOBAL_BATCH = 24  # divisible by 1, 2, 3 and 4 replicas
EPOCHS = 2


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(NUM_EXAMPLES, FEATURES)).astype("float32")
    y = (x[:, 0] + 2 * x[:, 1] > 0).astype("int32") + (x[:, 2] > 1).astype("int32")
    return x, y


def initial_weights():
    keras.utils.set_random_seed(1)
    return [w.copy() for w in model_fn().get_weights()]


def model_fn():
    return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(16, activation="tanh"),
                             keras.layers.Dense(CLASSES)])


def optimizer_fn(name):
    if name == "sgd":
        return keras.optimizers.SGD(0.1, momentum=0.9)
    return keras.optimizers.Adam(0.01)


def sliced_dataset(strategy, global_batch=GLOBAL_BATCH):
    """Global batches in order; pipeline i of n yields the i-th slice of each global batch."""
    x, y = data()

    def fn(ctx: tf.distribute.InputContext):
        per_replica = ctx.get_per_replica_batch_size(global_batch)
        per_pipeline = per_replica * (strategy.num_replicas_in_sync // ctx.num_input_pipelines)
        start = ctx.input_pipeline_id * per_pipeline
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch, drop_remainder=True)
        ds = ds.map(lambda a, b: (a[start:start + per_pipeline], b[start:start + per_pipeline]))
        return ds.unbatch().batch(per_replica, drop_remainder=True).repeat()

    return strategy.distribute_datasets_from_function(fn)


def compiled_model(strategy, optimizer_name):
    init = initial_weights()
    with strategy.scope():
        model = model_fn()
        model.set_weights(init)
        model.compile(optimizer_fn(optimizer_name),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def train(strategy, optimizer_name, epochs=EPOCHS, callbacks=()):
    """Train the shared problem under `strategy`; returns the final weights as numpy arrays and the history."""
    model = compiled_model(strategy, optimizer_name)
    history = model.fit(sliced_dataset(strategy), epochs=epochs, steps_per_epoch=NUM_EXAMPLES // GLOBAL_BATCH,
                        verbose=0, callbacks=list(callbacks))
    return model.get_weights(), history.history
