"""Ordered data-parallel inference: a model over a dataset on any strategy, every example exactly once, in input order.

Keras's `model.predict` under MultiWorkerMirroredStrategy returns only this worker's part, in an order it does not
document, so outputs cannot be matched back to inputs. Here every example carries its position in the split's order
(`DatasetSplit.read(None)`) through `dtf.data.distribute_dataset` (evaluation mode: no shuffle, the last partial batch
kept, empty batches on idle replicas), each step gathers (position, output) from all replicas of all workers, and the
rows are put back in input order by position, so padding can neither duplicate nor drop an example.
"""
import dataclasses
import re
import time
from typing import Callable, Dict, Optional

import keras
import numpy as np
import tensorflow as tf

from dtf import data as data_lib
from dtf.datasets import DatasetSplit
from dtf.errors import UserError

OUTPUT_VALUES = ("logits", "probabilities", "argmax")  # logits: the model's outputs as they are


@dataclasses.dataclass(frozen=True)
class Predictions:
    """Outputs by name ("output" for a single-output model), row i for example i of the input order."""

    outputs: Dict[str, np.ndarray]
    num_examples: int
    num_replicas: int
    seconds: float

    @property
    def examples_per_sec(self) -> float:
        return self.num_examples / max(self.seconds, 1e-9)


def output_names(outputs) -> list:
    """Names of a model's (possibly nested) outputs, in `tf.nest.flatten` order."""
    paths = [path for path, _ in keras.tree.flatten_with_path(outputs)]
    return ["/".join(map(str, path)) or "output" for path in paths]


def _transform(values: str, already_probabilities: bool) -> Callable:
    """Logits to the requested values: softmax (sigmoid for one unit) or the class index (logit > 0 for one unit)."""
    def one(t):
        binary = t.shape[-1] == 1
        if values == "probabilities" and not already_probabilities:
            return tf.sigmoid(t) if binary else tf.nn.softmax(t, axis=-1)
        if values == "argmax":
            threshold = 0.5 if already_probabilities else 0.0
            return tf.cast(t[..., 0] > threshold, tf.int64) if binary else tf.argmax(t, axis=-1)
        return t
    return lambda outputs: tf.nest.map_structure(one, outputs)


def outputs_probabilities(model: keras.Model) -> bool:
    """Whether the model's last layer already applies softmax/sigmoid (then `probabilities` is its output)."""
    activation = getattr(model.layers[-1], "activation", None) if getattr(model, "layers", None) else None
    return activation in (keras.activations.softmax, keras.activations.sigmoid)


def load_model(path: str, strategy):
    """The saved model, built in the strategy's scope (its variables on every replica), without its optimizer."""
    try:
        with strategy.scope():
            return keras.saving.load_model(path, compile=False)
    except (ValueError, TypeError, KeyError, OSError) as e:
        unknown = re.search(r"Could not locate (class|function) '[^']+'", str(e))  # buried in a config dump
        reason = unknown.group(0) if unknown else next(
            (line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UserError(f"cannot load the model {path}: {reason}; if it uses custom layers, give the --task that "
                        "defines (and registers) them") from None


def _indexed(split: DatasetSplit):
    """The split as (position, example) pairs, one strided share per input pipeline. The known size keeps the
    shares' cardinalities known, so `distribute_dataset` does not count them by reading."""
    def read(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        data = split.read(None).apply(tf.data.experimental.assert_cardinality(split.num_examples)).enumerate()
        return data.shard(ctx.num_input_pipelines, ctx.input_pipeline_id) if ctx.num_input_pipelines > 1 else data
    return read


def _features_batch(preprocess_batch: Optional[Callable]):
    """(position, element) batches to (position, features): the task's preprocessing, then labels dropped."""
    def fn(batch):
        position, element = batch
        if preprocess_batch is not None:
            element = preprocess_batch(element)
        x, _, _ = keras.utils.unpack_x_y_sample_weight(element)
        return position, x
    return fn


def predict(model: keras.Model, strategy: tf.distribute.Strategy, split: DatasetSplit, global_batch_size: int, *,
            preprocess_batch: Optional[Callable] = None, values: str = "logits",
            on_step: Optional[Callable[[int, float], None]] = None) -> Predictions:
    """`model` (built or loaded in `strategy.scope()`) on every example of `split`, sharded over all replicas.

    Every worker must call this (each step gathers across workers); every worker gets the full, ordered result.
    preprocess_batch: the task's `preprocess_batch(batch, training=False)`. values: one of OUTPUT_VALUES.
    on_step(examples done, seconds): progress after each step.
    """
    if values not in OUTPUT_VALUES:
        raise UserError(f"--output_values={values!r} is not valid; choose one of: {', '.join(OUTPUT_VALUES)}")
    data = data_lib.distribute_dataset(strategy, _indexed(split), global_batch_size, training=False,
                                       preprocess_batch=_features_batch(preprocess_batch))
    transform = _transform(values, outputs_probabilities(model))

    def replica_step(position, x):
        return position, transform(model(x, training=False))

    @tf.function
    def step(iterator):
        position, out = strategy.run(replica_step, args=next(iterator))
        return tf.nest.map_structure(lambda v: strategy.gather(v, axis=0), (position, out))

    positions, chunks = [], []
    iterator = iter(data.dataset)
    start = time.perf_counter()
    done = 0
    for _ in range(data.steps_per_epoch):
        position, out = step(iterator)
        positions.append(position.numpy())
        chunks.append([t.numpy() for t in tf.nest.flatten(out)])
        done += len(positions[-1])
        if on_step:
            on_step(done, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    order = np.argsort(np.concatenate(positions), kind="stable")
    position = np.concatenate(positions)[order]
    if not np.array_equal(position, np.arange(split.num_examples)):
        raise UserError(f"{split.name} {split.split}: the workers saw {len(np.unique(position))} distinct positions "
                        f"for {split.num_examples} examples; its order must be the same on every worker (no unseeded "
                        "shuffle or random sampling in the data)")
    names = output_names(out)
    outputs = {name: np.concatenate([c[i] for c in chunks])[order] for i, name in enumerate(names)}
    return Predictions(outputs=outputs, num_examples=split.num_examples, num_replicas=strategy.num_replicas_in_sync,
                       seconds=seconds)
