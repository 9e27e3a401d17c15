"""Per-epoch examples/s and step time measure training steps only: Keras calls on_epoch_end after validating."""
import statistics
import time

import tensorflow as tf

import dtf
import tasks_for_tests
from dtf.cluster import tf_config as cluster_lib
from dtf.experiment import train
from dtf.config.config import Config
from dtf.experiment.summaries import TrainingScalars

VALIDATION_SLEEP_S = 0.01  # per validation example: 100 examples -> ~1 s per validation, several training epochs


def _sleep(x, y):
    time.sleep(VALIDATION_SLEEP_S)
    return x, y


class LongerEpochs(tasks_for_tests.Regression):
    """40 training steps an epoch (fewer make per-epoch rates noisy)."""

    def datasets(self):
        out = super().datasets()
        out["train"] = out["train"].repeat(4)
        return out


class SlowValidation(LongerEpochs):
    def datasets(self):
        out = super().datasets()
        out["validation"] = out["validation"].map(
            lambda x, y: tf.numpy_function(_sleep, [x, y], [tf.float32, tf.float32], stateful=True))
        out["validation"] = out["validation"].map(lambda x, y: (tf.ensure_shape(x, [tasks_for_tests.FEATURES]),
                                                                tf.ensure_shape(y, [1])))
        return out


def _epoch_rates(task, tmp_path):
    config = Config(global_batch_size=32, optimizer="sgd", base_lr=0.01, lr_scaling="none", epochs=3,
                    lr_schedule="constant", seed=1, model_dir=str(tmp_path))
    exp = train.Experiment(config, dtf.create_strategy("one_device"), cluster_lib.parse_tf_config(), task)
    model = exp.build_model()
    scalars = TrainingScalars(str(tmp_path / "train"), exp.plan.global_batch_size)
    start = time.perf_counter()
    history = exp.fit(model, [scalars], verbose=0)
    epoch_s = (time.perf_counter() - start) / config.epochs
    return history, epoch_s


def test_epoch_examples_per_sec_leaves_out_validation(tmp_path):
    fast, _ = _epoch_rates(LongerEpochs(), tmp_path / "fast")
    slow, slow_epoch_s = _epoch_rates(SlowValidation(), tmp_path / "slow")
    assert "val_loss" in slow and len(slow["examples_per_sec"]) == 3
    # The slow validation really costs: each epoch of that run took more than a validation's sleep.
    assert slow_epoch_s > 100 * VALIDATION_SLEEP_S
    fast_rate, slow_rate = (statistics.median(h["examples_per_sec"][1:]) for h in (fast, slow))
    ratio = slow_rate / fast_rate
    print(f"epoch examples/s: {fast_rate:.0f} (fast validation), {slow_rate:.0f} (slow validation), ratio {ratio:.2f}")
    # Counting the ~1 s validation would give ~0.05-0.1; noise on a shared machine stays well inside 0.3-3.
    assert 0.3 < ratio < 3
    step_ms = statistics.median(slow["step_time_ms"][1:])
    assert step_ms < 1000 * VALIDATION_SLEEP_S * 100 / 10  # a step is not charged a tenth of the validation
