"""Learning-rate scaling, warmup + decay schedules and the optimizer factory.

One convention throughout: the **global** batch is the truth (dtf.config.batch_plan), and the peak
learning rate is computed from the global batch in one place (`scaled_lr`). Schedules count the optimizer's step
counter, i.e. optimizer updates (training batches / accumulation steps); epochs are converted to steps only in
`build_schedule`.
"""
import math
from typing import Optional, Sequence, Union

import keras
import tensorflow as tf
from keras import ops

from dtf.base.errors import UserError
from dtf.config.choices import LR_SCALING_RULES, OPTIMIZERS, SCHEDULES
from dtf.optim.accumulation import GradientAccumulation
from dtf.optim.lars import LARS

# Goyal et al. 2017 (and most ImageNet recipes) use SGD with momentum 0.9; Keras's SGD defaults to none. LARS too.
DEFAULT_SGD_MOMENTUM = 0.9


def _pick(name: str, valid: Sequence[str], flag: str) -> str:
    key = (name or "").strip().lower()
    if key not in valid:
        raise UserError(f"{flag}={name!r} is unknown; valid: {', '.join(valid)}")
    return key


# ---------------------------------------------------------------------------------------------------------------------
# Learning-rate scaling


def _check_scaling(base_lr: float, global_batch_size: int, reference_batch_size: int, rule: str) -> str:
    rule = _pick(rule, LR_SCALING_RULES, "--lr_scaling")
    if not (math.isfinite(base_lr) and base_lr > 0):
        raise UserError(f"--base_lr={base_lr} must be a finite number > 0")
    if reference_batch_size < 1:
        raise UserError(f"--reference_batch_size={reference_batch_size} must be >= 1 "
                        "(the global batch --base_lr was tuned for)")
    if global_batch_size < 1:
        raise UserError(f"--global_batch_size={global_batch_size} must be >= 1")
    return rule


def scaled_lr(base_lr: float, global_batch_size: int, reference_batch_size: int = 256, rule: str = "linear") -> float:
    """Peak LR for `global_batch_size`, given `base_lr` tuned at `reference_batch_size`.

    `linear` (Goyal et al. 2017, SGD) multiplies by k = global / reference, `sqrt` (Adam-type, LAMB paper) by sqrt(k),
    `none` keeps `base_lr`. With gradient accumulation pass the effective batch (global × accumulation steps).

    Args:
        base_lr: the LR tuned at `reference_batch_size` (finite, > 0).
        global_batch_size: the batch of one update, summed over all replicas.
        reference_batch_size: the global batch `base_lr` was tuned for.
        rule: linear, sqrt or none.

    Raises:
        UserError: a value out of range or an unknown rule.
    """
    rule = _check_scaling(base_lr, global_batch_size, reference_batch_size, rule)
    k = global_batch_size / reference_batch_size
    return {"linear": base_lr * k, "sqrt": base_lr * math.sqrt(k), "none": base_lr}[rule]


def explain_lr(base_lr: float, global_batch_size: int, reference_batch_size: int = 256, rule: str = "linear") -> str:
    """One log line saying where the peak LR came from, e.g. 'peak_lr=0.4 = base_lr 0.1 × (1024/256) [linear]'."""
    rule = _check_scaling(base_lr, global_batch_size, reference_batch_size, rule)
    peak = scaled_lr(base_lr, global_batch_size, reference_batch_size, rule)
    ratio = f"({global_batch_size}/{reference_batch_size})"
    factor = {"linear": f" × {ratio}", "sqrt": f" × sqrt{ratio}", "none": ""}[rule]
    return f"peak_lr={peak:.6g} = base_lr {base_lr:.6g}{factor} [{rule}]"


# ---------------------------------------------------------------------------------------------------------------------
# Schedules. All take the optimizer's integer step (a tensor inside tf.function) and return a float32 scalar.


def _step(step):
    return ops.cast(step, "float32")


@keras.saving.register_keras_serializable(package="dtf")
class Constant(keras.optimizers.schedules.LearningRateSchedule):
    """A fixed LR as a schedule, so warmup can wrap it like any decay."""

    def __init__(self, learning_rate: float):
        self.learning_rate = float(learning_rate)

    def __call__(self, step):
        return ops.convert_to_tensor(self.learning_rate, "float32")

    def get_config(self):
        return {"learning_rate": self.learning_rate}


@keras.saving.register_keras_serializable(package="dtf")
class StepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """`initial_lr × decay_rate^i` from step `boundaries[i-1]` on (inclusive: the decayed LR starts at the boundary,
    unlike Keras's `PiecewiseConstantDecay`, which switches one step later)."""

    def __init__(self, initial_lr: float, boundaries: Sequence[int], decay_rate: float = 0.1):
        self.initial_lr = float(initial_lr)
        self.boundaries = [int(b) for b in boundaries]
        self.decay_rate = float(decay_rate)

    def __call__(self, step):
        boundaries = ops.convert_to_tensor(self.boundaries, "float32")
        passed = ops.sum(ops.cast(ops.greater_equal(_step(step), boundaries), "float32"))
        return self.initial_lr * ops.power(ops.convert_to_tensor(self.decay_rate, "float32"), passed)

    def get_config(self):
        return {"initial_lr": self.initial_lr, "boundaries": list(self.boundaries), "decay_rate": self.decay_rate}


@keras.saving.register_keras_serializable(package="dtf")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from `warmup_start_lr` to `after(0)` over `warmup_steps`, then `after(step - warmup_steps)`.

    The wrapped schedule decays over the post-warmup steps only, as in Model Garden's `LinearWarmup`. The start
    defaults to 0, which suits every scaling rule; pass base_lr (= peak / k) for Goyal et al.'s gradual warmup.
    """

    def __init__(self, after: keras.optimizers.schedules.LearningRateSchedule, warmup_steps: int,
                 warmup_start_lr: Optional[float] = None):
        if int(warmup_steps) < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
        self.after = after
        self.warmup_steps = int(warmup_steps)
        self.warmup_start_lr = 0.0 if warmup_start_lr is None else float(warmup_start_lr)

    def __call__(self, step):
        step = _step(step)
        warmup = ops.cast(self.warmup_steps, "float32")
        peak = ops.cast(self.after(0), "float32")
        ramp = self.warmup_start_lr + (peak - self.warmup_start_lr) * step / warmup
        decayed = ops.cast(self.after(ops.maximum(step - warmup, 0.0)), "float32")
        return ops.where(step < warmup, ramp, decayed)

    def get_config(self):
        return {"after": keras.saving.serialize_keras_object(self.after), "warmup_steps": self.warmup_steps,
                "warmup_start_lr": self.warmup_start_lr}

    @classmethod
    def from_config(cls, config):
        config = dict(config, after=keras.saving.deserialize_keras_object(config["after"]))
        return cls(**config)


def build_schedule(name: str, peak_lr: float, total_steps: int, steps_per_epoch: int, warmup_epochs: float = 0,
                   warmup_steps: Optional[int] = None, warmup_start_lr: Optional[float] = None,
                   decay_boundaries_epochs: Sequence[float] = (), decay_rate: float = 0.1, final_lr: float = 0.0,
                   power: float = 1.0) -> keras.optimizers.schedules.LearningRateSchedule:
    """The LR schedule for a run: optional linear warmup, then `name` decaying from `peak_lr` to the last step.

    Steps are optimizer updates (the optimizer's counter): with gradient accumulation pass `updates()` of the batch
    counts, since dtf's accumulation counts updates, not micro-batches.
    Warmup is `warmup_steps`, or `warmup_epochs` × `steps_per_epoch` rounded. `decay_boundaries_epochs` (for `step`)
    count from the start of training and must fall after warmup and before the end. `final_lr` is where `cosine` and
    `polynomial` (`power`) end; `decay_rate` is the factor applied at each `step` boundary.

    Args:
        name: the decay after warmup: constant, cosine, step or polynomial.
        peak_lr: the LR reached at the end of warmup (`scaled_lr`).
        total_steps: optimizer updates in the whole run.
        steps_per_epoch: optimizer updates per epoch (converts the epoch arguments).
        warmup_epochs, warmup_steps: warmup length (steps win).
        warmup_start_lr: where the warmup ramp starts (default 0; a run starts at min(base_lr, peak_lr)).
        decay_boundaries_epochs, decay_rate, final_lr, power: the decay's shape (see above).
    """
    name = _pick(name, SCHEDULES, "--lr_schedule")
    if not (math.isfinite(peak_lr) and peak_lr > 0):
        raise UserError(f"--base_lr gives a peak learning rate of {peak_lr}; it must be a finite number > 0")
    if steps_per_epoch < 1 or total_steps < 1:
        raise UserError(f"training has {total_steps} steps, {steps_per_epoch} per epoch; both must be >= 1 (check "
                        "--epochs and the dataset size)")
    if warmup_steps is not None and warmup_epochs:
        raise UserError(f"give --warmup_epochs ({warmup_epochs}) or --warmup_steps ({warmup_steps}), not both")
    if warmup_steps is None:
        if warmup_epochs < 0:
            raise UserError(f"--warmup_epochs={warmup_epochs} must be >= 0")
        warmup, flag = int(round(warmup_epochs * steps_per_epoch)), f"--warmup_epochs={warmup_epochs}"
    else:
        if warmup_steps < 0:
            raise UserError(f"--warmup_steps={warmup_steps} must be >= 0")
        warmup, flag = int(warmup_steps), f"--warmup_steps={warmup_steps}"
    if warmup >= total_steps:
        raise UserError(f"{flag} is {warmup} steps but training has only {total_steps}; warmup must end before "
                        "training does: shorten the warmup or train longer")
    if warmup_start_lr is not None and not 0 <= warmup_start_lr <= peak_lr:
        raise UserError(f"--warmup_start_lr={warmup_start_lr} must be between 0 and the peak LR {peak_lr:g}")
    if name in ("cosine", "polynomial") and not 0 <= final_lr < peak_lr:
        raise UserError(f"--final_lr={final_lr} must be >= 0 and below the peak LR {peak_lr:g}")
    if name == "polynomial" and not power > 0:
        raise UserError(f"--lr_decay_power={power} must be > 0")
    if name == "step":
        if not decay_boundaries_epochs:
            raise UserError("--lr_schedule=step needs --lr_decay_boundaries (epochs at which to decay the LR)")
        if not 0 < decay_rate <= 1:
            raise UserError(f"--lr_decay_rate={decay_rate} must be in (0, 1]")
    elif decay_boundaries_epochs:
        raise UserError(f"--lr_decay_boundaries applies to --lr_schedule=step only, not {name!r}; remove it")

    decay_steps = total_steps - warmup
    if name == "constant":
        after = Constant(peak_lr)
    elif name == "cosine":
        after = keras.optimizers.schedules.CosineDecay(peak_lr, decay_steps, alpha=final_lr / peak_lr)
    elif name == "polynomial":
        after = keras.optimizers.schedules.PolynomialDecay(peak_lr, decay_steps, end_learning_rate=final_lr,
                                                           power=power)
    else:
        after = StepDecay(peak_lr, _boundary_steps(decay_boundaries_epochs, steps_per_epoch, warmup, total_steps),
                          decay_rate)
    return WarmupSchedule(after, warmup, warmup_start_lr) if warmup else after


def _boundary_steps(epochs: Sequence[float], steps_per_epoch: int, warmup: int, total_steps: int):
    """Epoch boundaries → steps counted from the end of warmup (where the wrapped schedule's step 0 is)."""
    given = ",".join(f"{e:g}" for e in epochs)
    steps = [int(round(e * steps_per_epoch)) for e in epochs]
    if steps != sorted(set(steps)):
        raise UserError(f"--lr_decay_boundaries={given} must be strictly increasing (at {steps_per_epoch} steps "
                        f"per epoch they are steps {','.join(map(str, steps))})")
    if steps[0] <= warmup or steps[-1] >= total_steps:
        raise UserError(f"--lr_decay_boundaries={given} (epochs) must fall after warmup ends (step {warmup}) and "
                        f"before training ends (step {total_steps}, epoch {total_steps / steps_per_epoch:g})")
    return [s - warmup for s in steps]


# ---------------------------------------------------------------------------------------------------------------------
# Optimizers

_CLASSES = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW,
            "lamb": keras.optimizers.Lamb, "lion": keras.optimizers.Lion, "rmsprop": keras.optimizers.RMSprop,
            "lars": LARS}
# Options beyond the common ones (learning rate, weight decay, clipping, accumulation) each optimizer takes.
_OWN_OPTIONS = {
    "sgd": ("momentum", "nesterov"),
    "adam": ("beta_1", "beta_2", "epsilon"),
    "adamw": ("beta_1", "beta_2", "epsilon"),
    "lamb": ("beta_1", "beta_2", "epsilon"),
    "lion": ("beta_1", "beta_2"),
    "rmsprop": ("momentum", "epsilon"),
    "lars": ("momentum", "nesterov", "trust_coefficient"),
}


def updates(batches: int, accumulation_steps: Optional[int]) -> int:
    """Optimizer updates in an epoch of `batches` training batches: each update takes `accumulation_steps` batches,
    and an epoch they do not divide ends with a shorter one (an update never straddles an epoch, so schedules in
    epochs stay exact: `dtf.optim.accumulation`)."""
    return -(-batches // (accumulation_steps or 1))


def _check_large_batch(steps: Optional[int], measure_noise_scale: bool, per_replica_batch_size: Optional[int]) -> int:
    """dtf's own accumulation (`dtf.optim.accumulation`) works under every strategy, unlike Keras's
    (keras-team/keras#20582, measured: Keras's fails while tracing under Mirrored and MultiWorkerMirrored). The noise
    scale compares two batch sizes, so it needs >= 2 replicas or accumulation."""
    steps = 1 if steps is None else steps
    if steps < 1:
        raise UserError(f"--gradient_accumulation_steps={steps} must be >= 1")
    if measure_noise_scale:
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas * steps < 2:
            raise UserError("--measure_noise_scale compares each replica's gradient with the all-reduced one, but "
                            f"this run has {replicas} replica and no accumulation; run on >= 2 replicas (e.g. "
                            "--strategy=mirrored --num_cpu_devices=2) or set --gradient_accumulation_steps >= 2")
        if not per_replica_batch_size or per_replica_batch_size < 1:
            raise ValueError("measure_noise_scale needs the per-replica batch size")
    return steps


def build_optimizer(name: str, learning_rate: Union[float, keras.optimizers.schedules.LearningRateSchedule], *,
                    momentum: Optional[float] = None, nesterov: bool = False, weight_decay: Optional[float] = None,
                    clipnorm: Optional[float] = None, global_clipnorm: Optional[float] = None,
                    clipvalue: Optional[float] = None, gradient_accumulation_steps: Optional[int] = None,
                    beta_1: Optional[float] = None, beta_2: Optional[float] = None,
                    epsilon: Optional[float] = None, trust_coefficient: Optional[float] = None,
                    measure_noise_scale: bool = False, per_replica_batch_size: Optional[int] = None,
                    steps_per_epoch: Optional[int] = None) -> keras.optimizers.Optimizer:
    """A Keras optimizer by name. Call it inside `strategy.scope()`: Keras binds the optimizer to the current strategy.

    Options that `name` does not take are rejected, not ignored; None means Keras's default, except SGD/LARS
    momentum, which defaults to `DEFAULT_SGD_MOMENTUM`. `weight_decay` is decoupled (w -= lr·wd·w) in every Keras 3
    optimizer, so it is accepted for all; for LARS it is the paper's coupled decay inside the trust ratio. AdamW keeps
    Keras's 0.004 when it is not given. With `gradient_accumulation_steps` > 1, `measure_noise_scale` (which needs
    the `per_replica_batch_size`) or a clip the optimizer is wrapped in `dtf.optim.accumulation.GradientAccumulation`,
    which clips the all-reduced gradient (Keras clips each replica's share), so N replicas train as one device does;
    `steps_per_epoch` (batches) ends each epoch's accumulation with the batches left.
    """
    name = _pick(name, OPTIMIZERS, "--optimizer")
    # None = not given (nesterov=False too), so only options the user set are checked and passed on.
    own = {"momentum": momentum, "nesterov": nesterov or None, "beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon,
           "trust_coefficient": trust_coefficient}
    wrong = [f"--{k}" for k, v in own.items() if v is not None and k not in _OWN_OPTIONS[name]]
    if wrong:
        raise UserError(f"--optimizer={name} does not take {', '.join(wrong)} (its own options: "
                        f"{', '.join('--' + o for o in _OWN_OPTIONS[name])}); remove them")
    if momentum is not None and not 0 <= momentum <= 1:
        raise UserError(f"--momentum={momentum} must be in [0, 1]")
    if trust_coefficient is not None and not trust_coefficient > 0:
        raise UserError(f"--trust_coefficient={trust_coefficient} must be > 0")
    clips = {"--clipnorm": clipnorm, "--global_clipnorm": global_clipnorm, "--clipvalue": clipvalue}
    given_clips = [f"{k}={v}" for k, v in clips.items() if v is not None]
    if len(given_clips) > 1:
        raise UserError(f"give at most one of --clipnorm, --global_clipnorm, --clipvalue; got {' '.join(given_clips)}")
    for flag, value in [*clips.items(), ("--weight_decay", weight_decay)]:
        if value is not None and not value >= 0:
            raise UserError(f"{flag}={value} must be >= 0")
    steps = _check_large_batch(gradient_accumulation_steps, measure_noise_scale, per_replica_batch_size)
    if name in ("sgd", "lars") and momentum is None:
        momentum = DEFAULT_SGD_MOMENTUM
    if not isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        learning_rate = float(learning_rate)  # Keras takes a float or a schedule, not an int

    options = dict(own, momentum=momentum, weight_decay=weight_decay)
    optimizer = _CLASSES[name](learning_rate=learning_rate, **{k: v for k, v in options.items() if v is not None})
    if steps == 1 and not measure_noise_scale and not given_clips:
        return optimizer
    return GradientAccumulation(optimizer, steps, per_replica_batch_size if measure_noise_scale else None,
                                clipnorm=clipnorm, global_clipnorm=global_clipnorm, clipvalue=clipvalue,
                                steps_per_epoch=steps_per_epoch)


def current_lr(optimizer: keras.optimizers.Optimizer) -> float:
    """The LR of the optimizer's next step (its schedule at its step counter, or its constant LR), for logging."""
    return float(ops.cast(optimizer.learning_rate, "float32"))  # cast: a constant LR is a Variable
