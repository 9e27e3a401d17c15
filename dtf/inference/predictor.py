"""Ordered data-parallel inference: a model over a dataset on any strategy, every example exactly once, in input order.

Keras's `model.predict` under MultiWorkerMirroredStrategy returns only this worker's part, in an order it does not
document, so outputs cannot be matched back to inputs. Here every example carries its position in the split's order
(`DatasetSplit.read(None)`) through `dtf.distribute.inputs.distribute_dataset` (evaluation mode: no shuffle, the last
partial batch kept, empty batches on idle replicas), each step gathers (position, output) from all replicas of all
workers, and each row is stored at its position (`Rows`: in memory, or in files on local disk so a large split needs
O(batch) memory), so padding can neither duplicate nor drop an example: a repeated or missing position is an error.
"""
import dataclasses
import os
import re
import shutil
import tempfile
import time
from typing import Callable, Dict, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from dtf import optim  # noqa: F401  (registers dtf's schedules and losses: saved dtf models load)
from dtf.base.errors import UserError
from dtf.datasets import DatasetSplit
from dtf.distribute import inputs as data_lib

OUTPUT_VALUES = ("logits", "probabilities", "argmax")  # logits: the model's outputs as they are


@dataclasses.dataclass(frozen=True)
class Predictions:
    """Outputs by name ("output" for a single-output model) in `rows`, row i for example i of the input order."""

    rows: "Rows"
    num_examples: int
    num_replicas: int
    seconds: float

    @property
    def outputs(self) -> Dict[str, np.ndarray]:
        return self.rows.arrays()

    @property
    def examples_per_sec(self) -> float:
        return self.num_examples / max(self.seconds, 1e-9)


class Rows:
    """Every example's outputs, stored at its position as the gathered batches arrive; each position exactly once.

    store="memory" keeps them in arrays. store="disk" writes each output to a raw file in a temporary local directory
    (removed by `close`) at each row's offset and reads it back in blocks, so a large split costs disk, not memory:
    O(batch) plus one byte per example for the exactly-once check. store="none" only checks (a worker that writes
    nothing). `what` names the data in errors."""

    STORES = ("memory", "disk", "none")

    def __init__(self, num_examples: int, what: str, store: str = "memory"):
        assert store in self.STORES, store
        self.num_examples, self.what, self._store = num_examples, what, store
        self._dir = tempfile.mkdtemp(prefix="dtf-predict-") if store == "disk" else None
        self._seen = np.zeros(num_examples, np.bool_)
        self._arrays: Dict[str, np.ndarray] = {}  # in memory
        self._files: Dict[str, tuple] = {}  # on disk: name -> (fd, row shape, dtype)

    @property
    def names(self) -> list:
        return list(self._files or self._arrays)

    def put(self, positions: np.ndarray, outputs: Sequence[np.ndarray], names: Sequence[str]):
        """Store one gathered batch: row j of each output at example `positions[j]`."""
        outside = positions[(positions < 0) | (positions >= self.num_examples)]
        if outside.size:
            raise self._error(f"position {int(outside[0])} is outside its {self.num_examples} examples")
        unique, counts = np.unique(positions, return_counts=True)
        twice = unique[(counts > 1) | self._seen[unique]]
        if twice.size:
            raise self._error(f"example {int(twice[0])} came twice")
        self._seen[positions] = True
        if self._store == "none":
            return
        if not self.names:
            self._create(outputs, names)
        if self._dir is None:
            for name, out in zip(names, outputs):
                self._arrays[name][positions] = out
            return
        order = np.argsort(positions, kind="stable")
        positions = positions[order]
        breaks = [0, *(np.flatnonzero(np.diff(positions) != 1) + 1), len(positions)]  # runs of consecutive rows
        for name, out in zip(names, outputs):
            fd, _, dtype = self._files[name]
            out = np.ascontiguousarray(out[order], dtype)
            row_bytes = out[0].nbytes if len(out) else 0
            for start, end in zip(breaks[:-1], breaks[1:]):
                os.pwrite(fd, out[start:end].tobytes(), int(positions[start]) * row_bytes)

    def _create(self, outputs, names):
        for name, out in zip(names, outputs):
            if self._dir is None:
                self._arrays[name] = np.empty((self.num_examples, *out.shape[1:]), out.dtype)
            else:
                fd = os.open(os.path.join(self._dir, f"{len(self._files)}.bin"), os.O_RDWR | os.O_CREAT, 0o600)
                os.ftruncate(fd, self.num_examples * out.dtype.itemsize * int(np.prod(out.shape[1:])))  # sparse
                self._files[name] = (fd, out.shape[1:], out.dtype)

    def check_complete(self):
        """Raise unless every example arrived."""
        missing = self.num_examples - int(np.count_nonzero(self._seen))
        if missing:
            raise self._error(f"{missing} of its {self.num_examples} examples never came")

    def _error(self, what_happened: str) -> UserError:
        return UserError(f"{self.what}: {what_happened}; its order must be the same on every worker (no unseeded "
                         "shuffle or random sampling in the data)")

    def row_info(self, name: str) -> tuple:
        """(shape of one row, dtype) of an output."""
        if self._dir is None:
            return self._arrays[name].shape[1:], self._arrays[name].dtype
        return self._files[name][1:]

    def chunks(self, size: int = 4096):
        """(first row, {name: rows}) for consecutive blocks of at most `size` rows, in input order."""
        for start in range(0, self.num_examples, size):
            count = min(size, self.num_examples - start)
            yield start, {name: self._read(name, start, count) for name in self.names}

    def _read(self, name: str, start: int, count: int) -> np.ndarray:
        if self._dir is None:
            return self._arrays[name][start:start + count]
        fd, shape, dtype = self._files[name]
        row_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        data = os.pread(fd, count * row_bytes, start * row_bytes)
        return np.frombuffer(data, dtype).reshape(count, *shape)

    def arrays(self) -> Dict[str, np.ndarray]:
        """Every output whole, in memory (for small results and tests)."""
        return {name: self._read(name, 0, self.num_examples) for name in self.names}

    def close(self):
        """Drop the rows and their files."""
        for fd, _, _ in self._files.values():
            os.close(fd)
        self._files, self._arrays = {}, {}
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
            on_step: Optional[Callable[[int, float], None]] = None, rows: Optional[Rows] = None) -> Predictions:
    """`model` (built or loaded in `strategy.scope()`) on every example of `split`, sharded over all replicas.

    Every worker must call this (each step gathers across workers) and gets the full, ordered result, in `rows`
    (default: a new in-memory Rows; pass Rows(..., store="disk") for a large split). preprocess_batch: the task's
    `preprocess_batch(batch, training=False)`. values: one of OUTPUT_VALUES. on_step(examples done, seconds): progress
    after each step.
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

    rows = rows if rows is not None else Rows(split.num_examples, f"{split.name} {split.split}")
    iterator = iter(data.dataset)
    start = time.perf_counter()
    done, names = 0, None
    for _ in range(data.steps_per_epoch):
        position, out = step(iterator)
        names = names or output_names(out)
        rows.put(position.numpy(), [t.numpy() for t in tf.nest.flatten(out)], names)
        done += int(position.shape[0])
        if on_step:
            on_step(done, time.perf_counter() - start)
    rows.check_complete()
    return Predictions(rows=rows, num_examples=split.num_examples, num_replicas=strategy.num_replicas_in_sync,
                       seconds=time.perf_counter() - start)
