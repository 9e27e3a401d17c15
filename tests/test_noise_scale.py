"""The gradient noise scale (dtf.optim.noise_scale) on linear regression with Gaussian noise, where it is known in
closed form; and `--measure_noise_scale` end to end (summary.json, TensorBoard, the one-replica error).

Problem: x ~ N(0, I_d), y = x·w* + ε with ε ~ N(0, σ²), loss (x·w − y)², weights held at w = w* + δ (LR 0). The
per-example gradient is 2(x xᵀδ − xε), so |G|² = 4|δ|² and tr(Σ) = 4((d+1)|δ|² + σ²d):
B_simple = d + 1 + σ²d/|δ|².
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import dtf
import keras
import tensorflow as tf

from dtf.optim import accumulation
from dtf.optim import noise_scale
from dtf.optim import scaling
from keras import ops

D, SIGMA2, GLOBAL_BATCH = 4, 1.0, 32
CLOSED_FORM = D + 1 + SIGMA2 * D  # |δ|² = 1
STEPS = {4: 300, 2: 600}  # the 2-replica estimate is noisier (B_big / B_small = 2): measure longer
EMA = 0.999  # ≈ the mean over the run (bias-corrected), so the test checks the estimator, not EMA noise


def estimate(strategy, accumulation_steps=1, steps=300, seed=0):
    rng = np.random.default_rng(seed)
    micro = GLOBAL_BATCH // accumulation_steps
    n = steps * GLOBAL_BATCH
    x = rng.normal(size=(n, D)).astype("float32")
    w_star = rng.normal(size=(D, 1)).astype("float32")
    y = x @ w_star + rng.normal(scale=np.sqrt(SIGMA2), size=(n, 1)).astype("float32")
    per_replica = micro // strategy.num_replicas_in_sync
    with strategy.scope():
        model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(1, use_bias=False)])
        model.set_weights([w_star + np.full((D, 1), 1 / np.sqrt(D), "float32")])  # |δ|² = 1
        model.compile(accumulation.GradientAccumulation(keras.optimizers.SGD(0.0), accumulation_steps,
                                                        noise_scale_batch=per_replica, noise_scale_ema=EMA),
                      loss="mse")
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(micro), epochs=1, verbose=0, shuffle=False)
    return model.optimizer.noise_scale.values()


def test_unbiased_estimates_formula():
    # E|G_B|² = |G|² + tr/B with |G|² = 2, tr = 16: B=4 → 6, B=16 → 3.
    assert noise_scale.unbiased_estimates(6.0, 3.0, 4, 16) == pytest.approx((2.0, 16.0))


def test_mirrored_4_replicas_within_20_percent_of_closed_form(mirrored4):
    values = estimate(mirrored4, steps=STEPS[4])
    assert values["gradient_noise_scale"] == pytest.approx(CLOSED_FORM, rel=0.2)
    assert values["gradient_norm_sq"] == pytest.approx(4.0, rel=0.2)
    assert values["gradient_noise_trace"] == pytest.approx(4 * CLOSED_FORM, rel=0.2)
    # One device accumulating 4 micro-batches of 8 measures the same two batch sizes on the same data.
    accumulated = estimate(dtf.create_strategy("one_device"), accumulation_steps=4, steps=STEPS[4])
    assert accumulated == pytest.approx(values, rel=1e-4)


def test_mirrored_with_accumulation_within_20_percent(mirrored4):
    values = estimate(mirrored4, accumulation_steps=2, steps=STEPS[4])  # B_small 4, B_big 32
    assert values["gradient_noise_scale"] == pytest.approx(CLOSED_FORM, rel=0.2)


TWO_REPLICAS = """
import dtf, test_noise_scale as t
strategy = dtf.create_strategy("mirrored", num_cpu_devices=2)
assert strategy.num_replicas_in_sync == 2
json.dump(t.estimate(strategy, steps=t.STEPS[2]), open(os.path.join(OUT, "two.json"), "w"))
"""


def test_two_and_four_replicas_agree(run_python, tmp_path, mirrored4):
    run_python(TWO_REPLICAS)
    two = json.loads((tmp_path / "two.json").read_text())["gradient_noise_scale"]
    four = estimate(mirrored4, steps=STEPS[4], seed=1)["gradient_noise_scale"]
    assert two == pytest.approx(CLOSED_FORM, rel=0.2)
    assert two == pytest.approx(four, rel=0.2)


WORKERS = """
import dtf, test_noise_scale as t
strategy = dtf.create_strategy()  # multi_worker from TF_CONFIG
assert strategy.num_replicas_in_sync == 2
json.dump(t.estimate(strategy, steps=t.STEPS[2]), open(os.path.join(OUT, f"w{TASK}.json"), "w"))
"""


@pytest.mark.slow
def test_two_workers_within_20_percent(run_workers, tmp_path):
    run_workers(WORKERS, 2)
    values = [json.loads((tmp_path / f"w{task}.json").read_text()) for task in range(2)]
    assert values[0] == values[1]  # every worker holds the same estimate
    assert values[0]["gradient_noise_scale"] == pytest.approx(CLOSED_FORM, rel=0.2)


def test_one_replica_without_accumulation_is_a_user_error():
    with pytest.raises(dtf.UserError, match=r"--measure_noise_scale .* run on >= 2 replicas .* "
                                            r"--gradient_accumulation_steps >= 2"):
        scaling.build_optimizer("sgd", 0.1, measure_noise_scale=True, per_replica_batch_size=8)
    opt = scaling.build_optimizer("sgd", 0.1, gradient_accumulation_steps=2, measure_noise_scale=True,
                                  per_replica_batch_size=8)
    assert opt.noise_scale_batch == 8


def test_cli_rejects_noise_scale_on_one_replica(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dtf.run", "--strategy=one_device", "--dataset=synthetic",
                           "--model=mlp", "--epochs=1", "--measure_noise_scale", f"--model_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert "--measure_noise_scale" in lines[-1] and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_run_logs_the_noise_scale(tmp_path, mirrored4):
    from dtf.config import config as config_lib
    from dtf.experiment import train

    config = config_lib.Config(dataset="synthetic", model="mlp", strategy="mirrored", num_cpu_devices=4,
                               global_batch_size=64, epochs=2, steps_per_epoch=6, measure_noise_scale=True,
                               model_dir=str(tmp_path), export=False)
    summary = train.run_experiment(config, mirrored4)
    assert summary["gradient_noise_scale"] > 0 and np.isfinite(summary["gradient_noise_scale"])
    assert len(summary["history"]["gradient_noise_scale"]) == 2
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["gradient_noise_scale"] == pytest.approx(summary["gradient_noise_scale"])
    events = [os.path.join(root, f) for root, _, files in os.walk(tmp_path / "tensorboard") for f in files
              if "tfevents" in f]
    tags = {v.tag for path in events for e in tf.compat.v1.train.summary_iterator(path) for v in e.summary.value}
    assert "epoch_gradient_noise_scale" in tags


def test_logger_finds_the_estimator_inside_loss_scaling():
    """Under mixed precision Keras wraps dtf's optimizer in a LossScaleOptimizer; the logger looks inside."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    wrapper = accumulation.GradientAccumulation(keras.optimizers.SGD(0.1), 2, noise_scale_batch=4,
                                                noise_scale_ema=0.5)
    model.compile(keras.optimizers.LossScaleOptimizer(wrapper), loss="mse")
    wrapper.build(model.trainable_variables)
    wrapper.noise_scale.update(6.0, 3.0)  # B_small 4, B_big 8: |G|² = 0, tr = 24
    wrapper.noise_scale.update(7.0, 4.0)  # |G|² = 1, tr = 24
    logs = {}
    logger = noise_scale.NoiseScaleLogger()
    logger.set_model(model)
    logger.on_epoch_end(0, logs)
    # EMA 0.5, bias-corrected over 2 updates: |G|² = (0.25·0 + 0.5·1) / 0.75, tr = 24.
    assert logs == pytest.approx({"gradient_noise_scale": 36.0, "gradient_norm_sq": 2 / 3, "gradient_noise_trace": 24.0})


def test_a_last_window_of_one_small_batch_measures_nothing():
    """An epoch's last accumulation window may hold a single micro-batch on one replica: nothing to compare, so the
    EMAs and the update count stay; a window of 2 is measured at its own B_big."""
    estimator = noise_scale.NoiseScaleEstimator(lambda **kw: keras.Variable(**kw), 8, ratio=4)
    estimator.update(ops.convert_to_tensor(2.0), ops.convert_to_tensor(1.0), ratio=ops.convert_to_tensor(1.0))
    assert float(estimator.updates.numpy()) == 0 and float(estimator.g2_ema.numpy()) == 0
    estimator.update(ops.convert_to_tensor(2.0), ops.convert_to_tensor(1.5), ratio=ops.convert_to_tensor(2.0))
    g2, trace = noise_scale.unbiased_estimates(2.0, 1.5, 8, 16)  # |G|² = 1, tr = 8
    assert float(estimator.updates.numpy()) == 1
    assert estimator.values()["gradient_noise_scale"] == pytest.approx(trace / g2)
