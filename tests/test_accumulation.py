"""dtf's gradient accumulation (dtf.optim.accumulation) equals one device at the effective batch, under one_device,
mirrored × 4 (in process) and 2 real workers, with SGD+momentum and Adam and a warmup + cosine schedule that counts
optimizer updates. Equivalence is checked over 10 updates (the equivalence horizon: design.md)."""
import json

import numpy as np
import pytest

import dtf
import equiv_common as eq
import keras
import tensorflow as tf

from dtf.optim import accumulation
from dtf.optim import scaling
from helpers import max_weight_delta

EFFECTIVE_BATCH, UPDATES, TOL = 64, 10, 1e-5
PEAK_LR = {"sgd": 0.1, "adam": 0.01}


def schedule(opt):
    return scaling.build_schedule("cosine", PEAK_LR[opt], total_steps=UPDATES, steps_per_epoch=5, warmup_steps=3)


def train(strategy, opt, steps, **options):
    """UPDATES updates at the effective batch, as `steps` micro-batches of EFFECTIVE_BATCH / steps each."""
    init = eq.initial_weights()
    with strategy.scope():
        model = eq.model_fn()
        model.set_weights(init)
        model.compile(scaling.build_optimizer(opt, schedule(opt), gradient_accumulation_steps=steps, **options),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(eq.sliced_dataset(strategy, EFFECTIVE_BATCH // steps), epochs=1, steps_per_epoch=UPDATES * steps,
              verbose=0)
    assert int(model.optimizer.iterations.numpy()) == UPDATES  # updates, not micro-batches
    return model.get_weights()


@pytest.fixture(scope="module")
def single_device():
    one = dtf.create_strategy("one_device")
    return {opt: train(one, opt, 1) for opt in ("sgd", "adam")}


def test_reference_trains(single_device):
    for opt, weights in single_device.items():
        assert max_weight_delta(weights, eq.initial_weights()) > 1e-2, opt


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_one_device_accumulation_matches_the_effective_batch(single_device, opt):
    weights = train(dtf.create_strategy("one_device"), opt, 4)  # 4 × 16
    assert max_weight_delta(weights, single_device[opt]) < TOL


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_mirrored_accumulation_matches_one_device(single_device, mirrored4, opt):
    assert mirrored4.num_replicas_in_sync == 4
    weights = train(mirrored4, opt, 2)  # 4 replicas × 2 steps × 8
    assert max_weight_delta(weights, single_device[opt]) < TOL


def test_mirrored_accumulation_with_weight_decay(mirrored4):
    """Keras's decoupled weight decay runs inside the update, once per update. (Clipping is not compared: Keras clips
    each replica's share before the all-reduce, so under Mirrored it differs from one device even without
    accumulation; BUILD_NOTES.md.)"""
    reference = train(dtf.create_strategy("one_device"), "sgd", 1, weight_decay=0.05)
    assert max_weight_delta(train(mirrored4, "sgd", 2, weight_decay=0.05), reference) < TOL


WORKER = """
import numpy as np
import dtf, test_accumulation as t
strategy = dtf.create_strategy()  # multi_worker from TF_CONFIG
assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
for opt in ("sgd", "adam"):
    np.savez(os.path.join(OUT, f"w_{opt}_{TASK}.npz"), *t.train(strategy, opt, 2))  # 2 workers × 2 steps × 16
"""


@pytest.mark.slow
def test_multi_worker_accumulation_matches_one_device(single_device, run_workers, tmp_path):
    run_workers(WORKER, 2)
    for opt in ("sgd", "adam"):
        for task in range(2):
            with np.load(tmp_path / f"w_{opt}_{task}.npz") as f:
                weights = [f[f"arr_{i}"] for i in range(len(f.files))]
            assert max_weight_delta(weights, single_device[opt]) < TOL, (opt, task)


def test_saved_model_keeps_the_wrapper_and_its_state(tmp_path):
    x = np.random.default_rng(0).normal(size=(12, 3)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(scaling.build_optimizer("adam", schedule("adam"), gradient_accumulation_steps=2), loss="mse")
    model.fit(x, np.zeros((12, 2), "float32"), batch_size=4, verbose=0)  # 3 micro-batches: 1 update + 1 pending
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    opt = loaded.optimizer
    assert isinstance(opt, accumulation.GradientAccumulation) and opt.steps == 2
    assert isinstance(opt.inner_optimizer, keras.optimizers.Adam)
    assert opt.inner_optimizer._learning_rate.get_config() == schedule("adam").get_config()  # noqa
    assert int(opt.iterations.numpy()) == 1 and int(opt._iterations.numpy()) == 3  # pylint: disable=protected-access
    pending = [a.numpy() for a in model.optimizer._accumulators]  # pylint: disable=protected-access
    assert np.abs(pending[0]).max() > 0
    for got, want in zip(opt._accumulators, pending):  # pylint: disable=protected-access
        np.testing.assert_array_equal(got.numpy(), want)


def test_interrupted_accumulation_resumes_exactly_on_mirrored(mirrored4, tmp_path):
    """Saved mid-accumulation on 4 replicas (3 micro-batches of k=2), reloaded and continued == uninterrupted: the
    replica-local accumulators are saved as their sum and restored split evenly."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 5)).astype("float32"), rng.normal(size=(64, 2)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)

    def compiled():
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
        model.compile(scaling.build_optimizer("adam", 0.01, gradient_accumulation_steps=2), loss="mse")
        return model

    with mirrored4.scope():
        whole, part = compiled(), compiled()
    whole.fit(data, epochs=1, verbose=0)
    part.fit(data.take(3), epochs=1, verbose=0)
    part.save(tmp_path / "m.keras")
    with mirrored4.scope():
        resumed = keras.saving.load_model(tmp_path / "m.keras")
    resumed.fit(data.skip(3), epochs=1, verbose=0)
    assert int(resumed.optimizer.iterations.numpy()) == 2
    assert max_weight_delta(resumed.get_weights(), part.get_weights()) > 1e-4  # the 4th batch completed an update
    assert max_weight_delta(resumed.get_weights(), whole.get_weights()) < 1e-6


def test_experiment_schedule_counts_updates(tmp_path):
    from dtf.config import config as config_lib
    from dtf.experiment import train

    config = config_lib.Config(dataset="synthetic", model="mlp", strategy="one_device", global_batch_size=32,
                               steps_per_epoch=8, epochs=3, warmup_epochs=1, lr_schedule="constant",
                               gradient_accumulation_steps=4, model_dir=str(tmp_path))
    exp = train.Experiment(config, dtf.create_strategy("one_device"), train.resolve_cluster(config))
    assert exp.effective_batch == 128 and exp.peak_lr == pytest.approx(0.05)  # 0.1 × 128 / 256
    schedule = exp.schedule()
    assert schedule.warmup_steps == 2  # one epoch = 8 batches = 2 updates
    three = train.Experiment(config.replace(gradient_accumulation_steps=3), dtf.create_strategy("one_device"),
                             train.resolve_cluster(config))
    assert three.schedule().warmup_steps == 3  # 3 + 3 + a last window of 2


def test_schedule_steps_are_updates():
    assert scaling.updates(40, 4) == 10 and scaling.updates(40, None) == 40
    assert scaling.updates(40, 3) == 14 and scaling.updates(2, 4) == 1  # each epoch ends with the batches left


def test_an_epoch_ends_with_a_shorter_window(mirrored4):
    """k=4 does not divide an epoch of 6 micro-batches of 16: each epoch is one update of 64 examples and one of the
    32 left, as one device trains on batches of 64, 32, 64, 32 (also on 4 replicas, and with a clip)."""
    x, y = eq.data()
    ends = [0, 64, 96, 160, 192]
    for clip in ({}, {"global_clipnorm": 0.05}):
        init = eq.initial_weights()
        reference = eq.model_fn()
        reference.set_weights(init)
        reference.compile(scaling.build_optimizer("sgd", 0.1, **clip),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        for start, end in zip(ends, ends[1:]):
            reference.train_on_batch(x[start:end], y[start:end])
        for strategy in (dtf.create_strategy("one_device"), mirrored4):
            with strategy.scope():
                model = eq.model_fn()
                model.set_weights(init)
                model.compile(scaling.build_optimizer("sgd", 0.1, gradient_accumulation_steps=4, steps_per_epoch=6,
                                                      **clip),
                              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            model.fit(eq.sliced_dataset(strategy, 16), epochs=2, steps_per_epoch=6, verbose=0)
            assert int(model.optimizer.iterations.numpy()) == 4
            assert max_weight_delta(model.get_weights(), reference.get_weights()) < TOL, (strategy, clip)


def test_keras_own_accumulation_is_not_used():
    opt = scaling.build_optimizer("sgd", 0.1, gradient_accumulation_steps=3)
    assert isinstance(opt, accumulation.GradientAccumulation) and opt.steps == 3
    assert opt.inner_optimizer.gradient_accumulation_steps is None
    assert type(scaling.build_optimizer("sgd", 0.1, gradient_accumulation_steps=1)) is keras.optimizers.SGD
    assert json.loads(json.dumps(keras.saving.serialize_keras_object(opt)))["registered_name"] == \
        "dtf>GradientAccumulation"
