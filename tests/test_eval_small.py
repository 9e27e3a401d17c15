"""Evaluation of a split smaller than one global batch under mirrored × 4: some replicas get empty batches. Keras's
symbolic build reduced the first batch across replicas and crashed on the unequal shapes (an AddN error); dtf builds
from the first local batch (`dtf.upstream.keras`). Results must equal one-device evaluation."""
import pytest

import dtf
import equiv_common as eq
import tensorflow as tf

from dtf.distribute import inputs as data

GLOBAL_BATCH = 512  # 128 per replica: more than the split below holds
TOL = 1e-5


def split(n):
    x, y = eq.data()
    return tf.data.Dataset.from_tensor_slices((x[:n], y[:n]))


def one_device_eval(weights, n):
    one = dtf.create_strategy("one_device")
    model = eq.compiled_model(one, "sgd")
    model.set_weights(weights)
    return model.evaluate(split(n).batch(GLOBAL_BATCH), verbose=0, return_dict=True)


@pytest.mark.parametrize("n", [10, 130])  # 10: replicas 1-3 empty; 130: replica 0 full, replica 1 partial, 2-3 empty
def test_evaluate_small_split_matches_one_device(mirrored4, n):
    model = eq.compiled_model(mirrored4, "sgd")
    d = data.distribute_dataset(mirrored4, split(n), GLOBAL_BATCH, training=False)
    assert d.steps_per_epoch == 1
    got = model.evaluate(d.dataset, verbose=0, return_dict=True)
    want = one_device_eval(model.get_weights(), n)
    assert got.keys() == want.keys()
    for k in want:
        assert abs(got[k] - want[k]) < TOL, (k, got[k], want[k])


def test_validation_during_fit_on_small_split(mirrored4):
    model = eq.compiled_model(mirrored4, "sgd")
    val = data.distribute_dataset(mirrored4, split(10), GLOBAL_BATCH, training=False)
    history = model.fit(eq.sliced_dataset(mirrored4), epochs=2, steps_per_epoch=2, validation_data=val.dataset,
                        verbose=0).history
    assert len(history["val_loss"]) == 2  # both validations ran (the second on a fresh pass over the split)
    want = one_device_eval(model.get_weights(), 10)
    assert abs(history["val_loss"][-1] - want["loss"]) < TOL
    assert abs(history["val_accuracy"][-1] - want["accuracy"]) < TOL
