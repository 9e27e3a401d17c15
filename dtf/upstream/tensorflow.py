"""The private TensorFlow names dtf uses, each behind one function. Verified on TensorFlow 2.21.0, the only version
`dtf.base.versions.TENSORFLOW_RANGE` admits; tests/test_upstream.py fails when one of them changes shape."""
import tensorflow as tf
from tensorflow.python.data.ops import interleave_op
from tensorflow.python.eager import context


def parallel_interleave(inputs: tf.data.Dataset, make, *, buffer_output_elements: int,
                        prefetch_input_elements: int) -> tf.data.Dataset:
    """`inputs.interleave(make, cycle_length=1, num_parallel_calls=1, deterministic=True)` with the two knobs the
    public method hides: how many elements each input's dataset keeps ready, and how many next inputs are started
    early. `Dataset.interleave` builds this same class with both fixed (BUILD_NOTES "Versions": why dtf needs them).
    No upstream issue; the one public route, the deprecated `tf.data.experimental.parallel_interleave`, builds a
    legacy op (readers.ParallelInterleaveDataset) instead."""
    return interleave_op._ParallelInterleaveDataset(  # pylint: disable=protected-access
        inputs, make, cycle_length=1, block_length=1, num_parallel_calls=1,
        buffer_output_elements=buffer_output_elements, prefetch_input_elements=prefetch_input_elements,
        deterministic=True)


def dataset_inputs(dataset: tf.data.Dataset) -> list:
    """The datasets `dataset` reads from (`Dataset._inputs()`): the only way to walk a tf.data graph in Python
    (BUILD_NOTES "The Task API"). Private but unchanged since TF 2.0."""
    return dataset._inputs()  # pylint: disable=protected-access


def kv_set(key: str, value: str):
    """Write `key` in the coordination service's key-value store that MultiWorkerMirroredStrategy starts; raises
    tf.errors.AlreadyExistsError when another task wrote it first. No public API: TF's own
    PreemptionCheckpointHandler (failure_handling.py) uses this call (BUILD_NOTES "Graceful preemption")."""
    context.context().set_config_key_value(key, value)


def kv_get(key: str, timeout_ms: int) -> str:
    """Wait up to `timeout_ms` for `key` in the coordination service's key-value store (see `kv_set`); raises
    tf.errors.DeadlineExceededError when it does not appear in time."""
    return context.context().get_config_key_value(key, timeout_ms)


def wait_at_barrier(barrier_id: str, timeout_ms: int):
    """Block until every task of the cluster is at `barrier_id` (the coordination service's barrier; no public API).
    A worker that exits right after its last collective can leave a peer still reading that collective's buffers
    from it ("Connection reset by peer" in RecvBuf, seen in `dtf.bench scaling` on 4 loaded workers): workers that
    meet here after their results are in hand no longer need each other. Verified on TF 2.21.0."""
    context.context().wait_at_barrier(barrier_id, timeout_ms)


def supports_no_merge_call() -> bool:
    """Whether the current strategy runs a replica function without `merge_call` (then a cond may all-reduce in
    replica context). From `tf.__internal__`, the namespace TF keeps for Keras and tf_keras; no public equivalent."""
    return tf.__internal__.distribute.strategy_supports_no_merge_call()
