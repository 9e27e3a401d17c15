"""Keras 3 fixes so `fit`/`evaluate`/`predict`/`save` work under MultiWorkerMirroredStrategy (and evaluation of
small splits under MirroredStrategy).

Keras 3 (TF >= 2.16) ships two bugs that stop multi-worker training (keras-team/keras#20585,
tensorflow/tensorflow#72388, ray-project/ray#47464):

1. `TensorFlowTrainer._maybe_symbolic_build` calls `strategy.reduce("MEAN", batch)` on the whole nested PerReplica
   batch to get example shapes; CollectiveAllReduce cannot reduce a nest ("Attempt to convert a value (PerReplica…)").
   Under MirroredStrategy the reduce is an AddN, which fails whenever the replicas' first batches differ in size: an
   evaluation split smaller than one global batch leaves some replicas an empty batch ("Inputs to operation AddN …
   must have the same size and shape. Input 0: [10,8] != input 1: [0,8]").
   Fix: under any distribution strategy, build from the first local batch; only shapes and dtypes matter there.
2. `reduce_per_replica` reduces metric values with `strategy.reduce("MEAN", v, axis=0)` under multi-worker; loss and
   metrics are scalars ("Invalid reduction dimension 0 for input with 0 dimensions"), and for a non-scalar it would
   also average within the tensor. Fix: `axis=None`, i.e. the mean across replicas, as in the single-worker path.

The chief-aware file writing that Keras 3 also lacks lives in `dtf.experiment.callbacks`. Both patches are applied only
under the Keras versions in `dtf.base.versions.KERAS_RANGE` (checked at `import dtf`), the second is a no-op outside
multi-worker mode, and `apply()` is idempotent. Delete them when Keras fixes the issues above.

Below them, the other private Keras names dtf uses, each behind one function (verified on Keras 3.15.1; the table in
BUILD_NOTES.md "Private upstream names"; tests/test_upstream.py fails when one changes shape).
"""
import tensorflow as tf
from keras.src import tree
from keras.src.backend.tensorflow import trainer as tf_trainer
from keras.src.losses import loss as loss_module, losses as losses_module
from keras.src.utils import tracking

_ORIGINAL_SYMBOLIC_BUILD = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
_ORIGINAL_REDUCE_PER_REPLICA = tf_trainer.reduce_per_replica


def _is_multi_worker(strategy) -> bool:
    return tf_trainer._collective_all_reduce_multi_worker(strategy)  # pylint: disable=protected-access


def _first_local(value):
    if isinstance(value, tf.distribute.DistributedValues):
        return value.values[0]
    return value


def _reads_a_batch(model) -> bool:
    """Whether Keras's `_symbolic_build` uses the data batch: only while the model, its compiled metrics or its loss
    are unbuilt (Keras 3.15.1, trainers/trainer.py). Keras's TF trainer pulls one on every `fit` regardless, from an
    iterator it then destroys: the whole input pipeline starts (a shuffle-buffer fill, the next pass's prefetch) for
    nothing, and TensorFlow took minutes to destroy it in dtf.bench overhead (BUILD_NOTES "Streaming epochs")."""
    metrics, loss = model._compile_metrics, model._compile_loss
    return (not all(layer.built for layer in model._flatten_layers()) or (metrics is not None and not metrics.built)
            or (loss is not None and not loss.built))


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    if self._distribute_strategy is None:
        return _ORIGINAL_SYMBOLIC_BUILD(self, iterator=iterator, data_batch=data_batch)
    if iterator is not None and _reads_a_batch(self):
        for _, _, it in iterator:
            data_batch = tree.map_structure(_first_local, next(it))
            break
    with self.distribute_strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def reduce_per_replica(values, strategy, reduction):
    if reduction == "auto" and not isinstance(strategy, tf.distribute.TPUStrategy):
        reduction = "mean"
    if reduction == "mean" and _is_multi_worker(strategy):
        return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
    return _ORIGINAL_REDUCE_PER_REPLICA(values, strategy, reduction)


def apply():
    """Install the fixes (idempotent). `dtf.create_strategy` calls this for mirrored and multi_worker; users building
    their own strategy call it once before `model.fit`."""
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    tf_trainer.reduce_per_replica = reduce_per_replica


# Used as they are; none is exported by Keras.
# Divides a loss by the replica count as Keras divides its own per-example means (dtf.optim.losses.ReplicaMean;
# BUILD_NOTES "Upstream bugs": Keras leaves scalar losses undivided).
scale_loss_for_distribution = loss_module.scale_loss_for_distribution
# The Loss that `compile` makes of a plain loss function.
LossFunctionWrapper = losses_module.LossFunctionWrapper
# Keeps the lists an optimizer's `build` assigns out of Keras's tracking, as Keras's own base optimizer does.
no_automatic_dependency_tracking = tracking.no_automatic_dependency_tracking


def symbolic_build(model, data_batch):
    """Build `model`, its compiled metrics and optimizer from one batch without training, as `fit` does first
    (`Model._symbolic_build`): the metric names are known only after it. No public equivalent."""
    model._symbolic_build(data_batch=data_batch)  # pylint: disable=protected-access


def set_resume_epoch(model, epoch):
    """Set the epoch `fit` starts from, overriding its `initial_epoch` argument (None: use the argument). Keras's fit
    reads `Model._initial_epoch`, which only its BackupAndRestore sets; dtf's BackupAndRestore sets it the same way."""
    model._initial_epoch = epoch  # pylint: disable=protected-access


def hook_gradient_all_reduce(optimizer, hook):
    """Make `optimizer` call `hook(grads_and_vars)` where it all-reduces its gradients (TF backend,
    `_all_reduce_sum_gradients`) and return the original function for the hook to call. The one place that sees the
    gradient both before and after the all-reduce (dtf.optim.accumulation: clipping after it, the noise scale)."""
    original = optimizer._all_reduce_sum_gradients  # pylint: disable=protected-access
    optimizer._all_reduce_sum_gradients = hook  # pylint: disable=protected-access
    return original
