"""LARS: SGD with momentum and a layer-wise trust ratio (You, Gitman & Ginsburg 2017, "Large Batch Training of
Convolutional Networks"), the standard optimizer for SGD-style training beyond the batch sizes where linear scaling +
warmup holds.

Per variable w with gradient g (as in TF Model Garden's `LARS` and tf.contrib's `LARSOptimizer`):
    g ← g + wd·w
    trust = η‖w‖/‖g‖ (1 when either norm is 0)
    v ← m·v + lr·trust·g ;  w ← w − v        (Nesterov: w ← w − (m·v + lr·trust·g))
Biases and normalization scales/offsets (every variable with ≤ 1 dimension) get neither weight decay nor the trust
ratio, as in the paper's reference setups and common implementations; this needs no layer names, so it holds for any
user model.
"""
import keras
from keras import ops


@keras.saving.register_keras_serializable(package="dtf")
class LARS(keras.optimizers.Optimizer):
    """`trust_coefficient` is η (0.001 in the paper); `weight_decay` is LARS's own coupled decay, inside the trust
    ratio (not Keras's decoupled one)."""

    def __init__(self, learning_rate=0.1, momentum: float = 0.9, trust_coefficient: float = 0.001,
                 weight_decay: float = 0.0, nesterov: bool = False, name="lars", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum, self.trust_coefficient = float(momentum), float(trust_coefficient)
        self.lars_weight_decay, self.nesterov = float(weight_decay or 0.0), bool(nesterov)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._velocities = self.add_optimizer_variables(var_list, "velocity")

    @staticmethod
    def adapts(variable) -> bool:
        """Whether `variable` gets weight decay and the trust ratio (not biases or normalization parameters)."""
        return len(variable.shape) > 1

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = ops.cast(gradient, variable.dtype)
        v = self._velocities[self._get_variable_index(variable)]
        if self.adapts(variable):
            if self.lars_weight_decay:
                g = g + self.lars_weight_decay * variable
            w_norm, g_norm = ops.norm(ops.reshape(variable, [-1])), ops.norm(ops.reshape(g, [-1]))
            trust = ops.where(ops.logical_and(w_norm > 0, g_norm > 0),
                              self.trust_coefficient * w_norm / ops.maximum(g_norm, 1e-30), 1.0)
            lr = lr * ops.cast(trust, variable.dtype)
        self.assign(v, self.momentum * v + lr * g)
        step = self.momentum * v + lr * g if self.nesterov else v
        self.assign_sub(variable, step)

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, trust_coefficient=self.trust_coefficient,
                      weight_decay=self.lars_weight_decay, nesterov=self.nesterov)
        return config
