"""dtf's gradient accumulation: a wrapper around any Keras optimizer that works under every tf.distribute strategy.

Why not Keras's own (`gradient_accumulation_steps=`): it runs the update, whose all-reduce is a `merge_call`, inside an
`ops.cond` in replica context, which tf.distribute rejects under Mirrored and MultiWorkerMirrored
(keras-team/keras#20582). Here each replica adds its micro-batch gradient to replica-local (sync-on-read) variables,
with no communication, and on every k-th micro-batch the wrapped optimizer runs on the mean from inside a cond taken in
*cross-replica* context (the pattern Keras's own LossScaleOptimizer uses), so its one all-reduce per update happens
where tf.distribute allows it. k micro-batches of global batch B then give the update of one batch of k·B.

Windows never straddle an epoch: given the epoch's length in micro-batches, an epoch whose length k does not divide
ends with a shorter window, applied as the mean of its r < k micro-batches (the update of one batch of r·B), as the
last partial batch of an epoch would be. So every example of an epoch counts in that epoch, the model evaluated and
saved at an epoch's end holds no pending gradients, and LR schedules in epochs stay exact (ceil(steps / k) updates
per epoch). Keras's own accumulation (`iterations % k`) lets windows run across epochs instead.

The wrapper is also the one place that sees each replica's gradient before the all-reduce and the all-reduced one
after it, so it hosts the gradient-noise-scale measurement (`dtf.optim.noise_scale`) and gradient clipping, with or
without accumulation. Keras clips in `apply`, i.e. each replica's share before the all-reduce (base_optimizer.py `apply`
→ `_clip_gradients`, then tensorflow/optimizer.py `_backend_update_step` → `_all_reduce_sum_gradients`), so a clip that
binds would change training with the replica count; here the all-reduced gradient is clipped, as on one device.
"""
import keras
import tensorflow as tf
from keras import ops

from dtf.optim import noise_scale as noise_lib
from dtf.upstream import keras as keras_upstream, tensorflow as tf_upstream


@keras.saving.register_keras_serializable(package="dtf")
class GradientAccumulation(keras.optimizers.Optimizer):
    """Apply `inner_optimizer` every `steps` micro-batches to the mean of their gradients, and at the end of each
    epoch of `steps_per_epoch` micro-batches (if given) to the mean of those left; optionally measure the gradient
    noise scale (`noise_scale_batch` = the per-replica micro-batch size) and clip the all-reduced gradient
    (`clipnorm`, `global_clipnorm`, `clipvalue`: Keras's meanings, given here instead of to the inner optimizer).

    `iterations` and the learning rate are the inner optimizer's, so LR schedules count updates, not micro-batches.
    """

    def __init__(self, inner_optimizer, steps: int = 1, noise_scale_batch=None,
                 noise_scale_ema: float = noise_lib.DEFAULT_EMA_DECAY, clipnorm=None, global_clipnorm=None,
                 clipvalue=None, steps_per_epoch=None, name=None):
        super().__init__(learning_rate=0.0, clipnorm=clipnorm, global_clipnorm=global_clipnorm, clipvalue=clipvalue,
                         name=name)
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if inner_optimizer.gradient_accumulation_steps or inner_optimizer.use_ema:
            raise ValueError("the inner optimizer must not accumulate gradients or keep an EMA itself")
        if inner_optimizer.clipnorm or inner_optimizer.global_clipnorm or inner_optimizer.clipvalue:
            raise ValueError("give the clipping to the wrapper: the inner optimizer would clip before the all-reduce")
        self.inner_optimizer = inner_optimizer
        self.steps = int(steps)
        self.steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)
        self.noise_scale_batch = None if noise_scale_batch is None else int(noise_scale_batch)
        self.noise_scale_ema = float(noise_scale_ema)
        self.noise_scale = None
        if self.noise_scale_batch or self.clipnorm or self.global_clipnorm or self.clipvalue:
            # Hook where Keras's TF optimizer all-reduces, to see the all-reduced gradient.
            self._inner_all_reduce = keras_upstream.hook_gradient_all_reduce(inner_optimizer, self._all_reduce_hook)

    @keras_upstream.no_automatic_dependency_tracking
    def build(self, var_list):
        replicas = self._distribution_strategy.num_replicas_in_sync
        self._accumulators = []
        if self.steps > 1:
            self._accumulators = [self._local_variable(v.shape, v.dtype, "gradient_accumulator") for v in var_list]
        if self.noise_scale_batch:
            if replicas * self.steps < 2:
                raise ValueError("measuring the gradient noise scale needs >= 2 replicas or accumulation steps")
            self._small_sq = self._local_variable((), "float32", "noise_small_sq")
            self.noise_scale = noise_lib.NoiseScaleEstimator(self.add_variable, self.noise_scale_batch,
                                                             replicas * self.steps, self.noise_scale_ema)
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    def _local_variable(self, shape, dtype, name):
        """A per-replica variable: replica-context writes stay local; reading it in cross-replica context (saving)
        sums the replicas, and restoring splits the sum evenly, which keeps an interrupted accumulation exact."""
        variable = keras.Variable(initializer="zeros", shape=shape, dtype=dtype, trainable=False, name=name,
                                  aggregation="sum", synchronization="on_read")
        self._track_variable(variable)
        return variable

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
        tvs = list(trainable_variables or self._trainable_variables)
        first = ops.equal(self._window_position(), 0)
        if self.noise_scale is not None:  # the replica's own gradient of its micro-batch (Keras scaled it by 1/n)
            replicas = self._distribution_strategy.num_replicas_in_sync
            local = noise_lib.squared_norm([None if g is None else g * replicas for g in grads])
            self._small_sq.assign(ops.where(first, local, self._small_sq + local))
        if self.steps == 1:
            self.inner_optimizer.apply(grads, tvs)
        else:
            for g, v in zip(grads, tvs):
                if g is not None:
                    acc = self._accumulators[self._get_variable_index(v)]
                    g = ops.cast(ops.convert_to_tensor(g), acc.dtype)
                    acc.assign(ops.where(first, g, acc + g))
            self._apply_every_k(grads, tvs)
        self._iterations.assign_add(1)

    def _window_position(self):
        """This micro-batch's index in its window (windows restart at each epoch)."""
        in_epoch = self._iterations % self.steps_per_epoch if self.steps_per_epoch else self._iterations
        return in_epoch % self.steps

    def _window_size(self):
        """Micro-batches in this window so far; at its last micro-batch, the window's size."""
        return ops.cast(self._window_position() + 1, "float32")

    def _window_ends(self):
        last = ops.equal(self._window_position(), self.steps - 1)
        if self.steps_per_epoch:
            last = ops.logical_or(last, ops.equal(self._iterations % self.steps_per_epoch, self.steps_per_epoch - 1))
        return last

    def _apply_every_k(self, grads, tvs):
        has_grad = [g is not None for g in grads]

        def update():
            size = self._window_size()
            mean = [self._accumulators[self._get_variable_index(v)] / ops.cast(size, v.dtype) if has else None
                    for has, v in zip(has_grad, tvs)]
            self.inner_optimizer.apply(mean, tvs)

        is_update = self._window_ends
        if tf_upstream.supports_no_merge_call():
            ops.cond(is_update(), update, lambda: None)
            return

        def cross_replica(distribution):
            # The inner optimizer all-reduces via merge_call: allowed inside this cond, not inside a replica-context
            # one. Every replica reads the same counter, so all take the same branch.
            ops.cond(is_update(), lambda: distribution.extended.call_for_each_replica(update), lambda: None)

        tf.distribute.get_replica_context().merge_call(cross_replica)

    def _all_reduce_hook(self, grads_and_vars):
        """The inner optimizer's all-reduce; with the noise scale, this replica's summed small-batch squared norms
        ride along as one more value and one measurement is taken from the two norms (of the unclipped gradient);
        then the all-reduced gradient is clipped."""
        grads_and_vars = list(grads_and_vars)
        if self.noise_scale is None:
            reduced = self._inner_all_reduce(grads_and_vars)
        else:
            # On a gradient's device: tf.distribute derives the all-reduce destination from it (a variable read has
            # none under MultiWorkerMirroredStrategy: "destinations can not be empty").
            with tf.device(next(g for g, _ in grads_and_vars if g is not None).device):
                small = tf.identity(self._small_sq.value)
            reduced = self._inner_all_reduce(grads_and_vars + [(small, self._small_sq)])
            small_total = reduced.pop()[0]
            ratio = self._distribution_strategy.num_replicas_in_sync * self._window_size()  # B_big / B_small
            self.noise_scale.update(small_total / ratio, noise_lib.squared_norm([g for g, _ in reduced]), ratio)
        variables = [v for _, v in reduced]
        return list(zip(self._clip_gradients([g for g, _ in reduced]), variables))

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        return {"name": self.name, "steps": self.steps, "noise_scale_batch": self.noise_scale_batch,
                "noise_scale_ema": self.noise_scale_ema, "clipnorm": self.clipnorm,
                "global_clipnorm": self.global_clipnorm, "clipvalue": self.clipvalue,
                "steps_per_epoch": self.steps_per_epoch,
                "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer)}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("inner_optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)
