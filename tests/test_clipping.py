"""Clipping under data parallelism: dtf clips the all-reduced gradient (`dtf.optim.accumulation`), so with a clip that
binds mirrored × 4 trains as one device does at the same global batch. Keras alone clips each replica's share before the
all-reduce, which the last test shows gives different weights. Equivalence is checked over 8 updates (the equivalence
horizon: design.md)."""
import pytest

import dtf
import equiv_common as eq
import keras

from dtf.optim import accumulation
from dtf.optim import scaling
from helpers import max_weight_delta

BATCH, UPDATES, TOL = 48, 8, 1e-5
CLIPS = {"global_clipnorm": 0.05, "clipnorm": 0.02, "clipvalue": 0.005}  # all far below the gradients' sizes


def train(strategy, optimizer_fn, steps=1):
    init = eq.initial_weights()
    with strategy.scope():
        model = eq.model_fn()
        model.set_weights(init)
        model.compile(optimizer_fn(), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(eq.sliced_dataset(strategy, BATCH // steps), epochs=1, steps_per_epoch=UPDATES * steps, verbose=0)
    return model.get_weights()


def dtf_sgd(steps=1, **clip):
    return lambda: scaling.build_optimizer("sgd", 0.5, gradient_accumulation_steps=steps, **clip)


@pytest.fixture(scope="module")
def one_device():
    return dtf.create_strategy("one_device")


@pytest.mark.parametrize("clip", sorted(CLIPS))
def test_clip_binds_and_mirrored_matches_one_device(one_device, mirrored4, clip):
    option = {clip: CLIPS[clip]}
    reference = train(one_device, dtf_sgd(**option))
    unclipped = train(one_device, dtf_sgd())
    assert max_weight_delta(reference, unclipped) > 1e-2  # the clip binds
    assert max_weight_delta(train(mirrored4, dtf_sgd(**option)), reference) < TOL


def test_one_device_clipping_is_keras_clipping(one_device):
    keras_sgd = lambda: keras.optimizers.SGD(0.5, momentum=scaling.DEFAULT_SGD_MOMENTUM, global_clipnorm=0.05)  # noqa
    assert max_weight_delta(train(one_device, dtf_sgd(global_clipnorm=0.05)), train(one_device, keras_sgd)) < TOL


def test_accumulation_clips_the_effective_batch_gradient(one_device, mirrored4):
    reference = train(one_device, dtf_sgd(global_clipnorm=0.05))
    assert max_weight_delta(train(mirrored4, dtf_sgd(2, global_clipnorm=0.05), steps=2), reference) < TOL


def test_keras_clipping_depends_on_the_replica_count(one_device, mirrored4):
    keras_sgd = lambda: keras.optimizers.SGD(0.5, momentum=scaling.DEFAULT_SGD_MOMENTUM, global_clipnorm=0.05)  # noqa
    assert max_weight_delta(train(mirrored4, keras_sgd), train(one_device, keras_sgd)) > 1e-3


def test_the_wrapper_refuses_an_inner_clip():
    with pytest.raises(ValueError, match="inner optimizer would clip before the all-reduce"):
        accumulation.GradientAccumulation(keras.optimizers.SGD(0.1, clipnorm=1.0))


def test_clip_round_trips_through_the_config():
    wrapper = scaling.build_optimizer("adam", 0.01, global_clipnorm=2.0)
    again = accumulation.GradientAccumulation.from_config(wrapper.get_config())
    assert (again.global_clipnorm, again.inner_optimizer.global_clipnorm, again.steps) == (2.0, None, 1)


@pytest.mark.parametrize("clip", sorted(CLIPS))
def test_each_clip_flag_reaches_the_experiments_optimizer(one_device, clip, tmp_path):
    """--clipnorm, --global_clipnorm and --clipvalue are Config fields (so flags) that the Experiment passes on."""
    from dtf.config import config as config_lib
    from dtf.experiment import train

    config = config_lib.Config(dataset="synthetic", model="mlp", strategy="one_device", global_batch_size=32,
                               steps_per_epoch=2, epochs=1, model_dir=str(tmp_path), **{clip: CLIPS[clip]})
    optimizer = train.Experiment(config, one_device, train.resolve_cluster(config)).build_model().optimizer
    assert isinstance(optimizer, accumulation.GradientAccumulation) and getattr(optimizer, clip) == CLIPS[clip]
