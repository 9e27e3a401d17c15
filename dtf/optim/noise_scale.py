"""The gradient noise scale B_simple = tr(Σ) / |G|² (McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training", Appendix A), measured from gradients that data-parallel training computes anyway.

Each replica's micro-batch gradient is a small-batch estimate (B_small = per-replica batch) and the all-reduced,
accumulated gradient a large-batch one (B_big = effective batch). Since E|G_B|² = |G|² + tr(Σ)/B, two batch sizes give
unbiased estimates of both terms (`unbiased_estimates`). Their ratio is noisy and biased per step, so B_simple is the
ratio of the two exponential moving averages, as in the paper.

Cost per update: one squared norm of each micro-batch gradient and one of the all-reduced gradient (O(parameters)
flops each), and one scalar added to the all-reduce the update does anyway: no extra collective.
"""
import keras
from keras import ops

DEFAULT_EMA_DECAY = 0.99
LOG_KEYS = ("gradient_noise_scale", "gradient_norm_sq", "gradient_noise_trace")


def squared_norm(tensors):
    """Σ‖t‖² over a list of gradients (None skipped), as a float32 scalar."""
    return ops.sum(ops.stack([ops.sum(ops.square(ops.cast(ops.convert_to_tensor(t), "float32")))
                              for t in tensors if t is not None]))


def unbiased_estimates(small_sq, big_sq, b_small, b_big):
    """(|G|², tr Σ) from the mean squared norm of B_small-batch gradients and the squared norm of one B_big-batch
    gradient (McCandlish et al., eqs. A.2–A.3). Works on numbers and on tensors."""
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


class NoiseScaleEstimator:
    """EMAs of the unbiased |G|² and tr(Σ) estimates, kept in variables the owning optimizer creates and tracks.

    `batch_small` is the per-replica micro-batch; `ratio` = B_big / B_small = replicas × accumulation steps (≥ 2).
    """

    def __init__(self, add_variable, batch_small: int, ratio: int, ema_decay: float = DEFAULT_EMA_DECAY):
        self.b_small, self.b_big, self.decay = float(batch_small), float(batch_small * ratio), float(ema_decay)
        scalar = dict(shape=(), dtype="float32", initializer="zeros", aggregation="only_first_replica")
        self.g2_ema = add_variable(name="noise_g2_ema", **scalar)
        self.trace_ema = add_variable(name="noise_trace_ema", **scalar)
        self.updates = add_variable(name="noise_updates", **scalar)

    def update(self, small_sq, big_sq, ratio=None):
        """One update's measurement: the mean small-batch squared norm and the big-batch squared norm (of `ratio`
        small batches when not the usual: an epoch's last, shorter accumulation window)."""
        measured, b_big, decay = 1.0, self.b_big, self.decay
        if ratio is not None:  # one small batch (a last window of 1 on 1 replica) compares nothing: skipped
            measured = ops.cast(ratio >= 2, "float32")
            b_big = self.b_small * ops.maximum(ratio, 2.0)
            decay = ops.where(measured > 0, self.decay, 1.0)
        g2, trace = unbiased_estimates(small_sq, big_sq, self.b_small, b_big)
        self.g2_ema.assign(decay * self.g2_ema + (1.0 - decay) * g2)
        self.trace_ema.assign(decay * self.trace_ema + (1.0 - decay) * trace)
        self.updates.assign_add(measured)

    def values(self) -> dict:
        """The logged scalars: B_simple (bias corrections cancel in the ratio) and the bias-corrected EMAs."""
        n = float(self.updates.numpy())
        if n == 0:
            return {}
        correction = 1.0 - self.decay ** n
        g2, trace = float(self.g2_ema.numpy()) / correction, float(self.trace_ema.numpy()) / correction
        return dict(zip(LOG_KEYS, (trace / g2 if g2 else float("nan"), g2, trace)))


class NoiseScaleLogger(keras.callbacks.Callback):
    """Adds the optimizer's noise-scale scalars to each epoch's logs, so Keras's TensorBoard callback (listed after
    this one) writes them as `epoch_…` tags and they reach the history and summary.json."""

    def on_epoch_end(self, epoch, logs=None):
        optimizer = self.model.optimizer
        while getattr(optimizer, "noise_scale", None) is None and hasattr(optimizer, "inner_optimizer"):
            optimizer = optimizer.inner_optimizer  # e.g. inside the LossScaleOptimizer of mixed precision
        estimator = getattr(optimizer, "noise_scale", None)
        if logs is not None and estimator is not None:
            logs.update(estimator.values())
