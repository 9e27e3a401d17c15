"""Losses that reduce over the global batch the same way on any number of replicas.

Keras 3.15 divides a loss by the replica count only when its `call` returns per-example values
(`sum_over_batch_size`: sum / local batch / replicas = the global-batch mean). A `call` that returns a scalar passes
through unscaled (`losses/loss.py: reduce_values`): a batch *sum* is then right (the all-reduce adds the local sums),
but a batch *mean* is added up over N replicas, N× the one-device gradient. `for_replicas` tells the three apart on a
real batch and wraps a scalar mean in `ReplicaMean`; a scalar that is neither a mean nor a sum is refused.
"""
import keras
from keras import ops

from dtf.base.errors import UserError
from dtf.base.logs import get_logger
from dtf.upstream import keras as keras_upstream

log = get_logger(__name__)

PER_EXAMPLE, MEAN, SUM = "per-example", "batch mean", "batch sum"
_TOLERANCE = 1e-3


@keras.saving.register_keras_serializable(package="dtf")
class ReplicaMean(keras.losses.Loss):
    """A loss whose `call` returns its batch mean, divided by the replica count as Keras divides its own means.

    A replica whose evaluation batch is empty (the partial last batch split over replicas) contributes 0, not NaN."""

    def __init__(self, loss, name=None, **kwargs):
        self.loss = as_loss(keras.saving.deserialize_keras_object(loss) if isinstance(loss, dict) else loss)
        super().__init__(name=name or self.loss.name, reduction=None, **kwargs)

    def __call__(self, y_true, y_pred, sample_weight=None):
        value = self.loss(y_true, y_pred, sample_weight)
        rows = ops.shape(keras.tree.flatten(y_pred)[0])[0]
        return keras_upstream.scale_loss_for_distribution(ops.where(rows > 0, value, ops.zeros_like(value)))

    def get_config(self):
        return {"loss": keras.saving.serialize_keras_object(self.loss), "name": self.name}


def as_loss(loss) -> keras.losses.Loss:
    """Any `compile(loss=...)` value (a Loss, a name, a function) as the Loss object Keras would make of it."""
    if isinstance(loss, keras.losses.Loss):
        return loss
    fn = keras.losses.get(loss)
    if isinstance(fn, keras.losses.Loss):
        return fn
    return keras_upstream.LossFunctionWrapper(fn, name=getattr(fn, "__name__", None))


def reduction(loss, y_true, y_pred, label: str = "loss") -> str:
    """How `loss` reduces over the batch, from its raw `call` on a real batch: per-example values, or a scalar that
    equals the mean (or the sum) of its values on the two halves of the batch. `y_true`/`y_pred` need >= 2 rows."""
    loss = as_loss(loss)

    def raw(rows):
        def part(x):
            return ops.convert_to_tensor(x[rows], dtype=loss.dtype)  # as Loss.__call__ converts

        return loss.call(keras.tree.map_structure(part, y_true), keras.tree.map_structure(part, y_pred))

    half = int(keras.tree.flatten(y_pred)[0].shape[0]) // 2
    whole = raw(slice(0, 2 * half))
    if len(whole.shape) > 0:
        return PER_EXAMPLE
    whole, first, second = float(whole), float(raw(slice(0, half))), float(raw(slice(half, 2 * half)))
    for kind, expected in ((MEAN, (first + second) / 2), (SUM, first + second)):
        if abs(whole - expected) <= _TOLERANCE * max(abs(whole), abs(expected)) and first != second:
            return kind
    raise UserError(f"{label}: loss {loss.name!r} returns a scalar that is neither the batch mean nor the batch sum "
                    f"of its values (halves of a batch: {first:g} and {second:g}, the whole batch: {whole:g}), so dtf "
                    "cannot reduce it over the global batch; return per-example losses (shape [batch]) from it")


def for_replicas(loss, y_true, y_pred, label: str = "loss"):
    """`loss` (or a dict/list of them, matched to the model's outputs) ready for `compile` on any replica count."""
    if isinstance(loss, dict):
        return {k: v if v is None else for_replicas(v, y_true[k], y_pred[k], label) for k, v in loss.items()}
    if isinstance(loss, (list, tuple)):
        return [v if v is None else for_replicas(v, y, p, label) for v, y, p in zip(loss, y_true, y_pred)]
    kind = reduction(loss, y_true, y_pred, label)
    if kind != PER_EXAMPLE:
        log.info(f"{label}: loss {as_loss(loss).name!r} returns its {kind}; "
                 + ("dtf divides it by the replica count so the gradients equal one device's" if kind == MEAN
                    else "summed over replicas that is the global-batch sum, as on one device"))
    return ReplicaMean(loss) if kind == MEAN else loss
