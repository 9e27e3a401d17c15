"""`DatasetSplit`: what every dtf dataset hands to the input pipeline, plus the generic (non-TFDS) sources.

The input pipeline shards by whole shards (files) when a split has at least as many as there are input pipelines, so
a split says how many examples each shard holds and how to read a subset of them for one `tf.distribute.InputContext`.
"""
import dataclasses
from typing import Callable, Optional, Sequence, Tuple

import tensorflow as tf

from dtf.base.errors import UserError

Reader = Callable[[Optional[tf.distribute.InputContext]], tf.data.Dataset]


@dataclasses.dataclass(frozen=True)
class DatasetSplit:
    """One split of a dataset, unbatched.

    `read(None)` is the whole split in a fixed order; `read(ctx)` is the shards `ctx.input_pipeline_id ::
    ctx.num_input_pipelines` only, so `sum(shard_lengths[i::n])` examples (valid when `num_shards >= n`).
    `input_shape`/`num_classes` are None for sources that do not know them (raw files, user datasets).
    """

    name: str
    split: str
    num_examples: int
    shard_lengths: Tuple[int, ...]
    read: Reader
    input_shape: Optional[Tuple[int, ...]] = None
    num_classes: Optional[int] = None

    @property
    def num_shards(self) -> int:
        return len(self.shard_lengths)

    @property
    def dataset(self) -> tf.data.Dataset:
        return self.read(None)


def to_image_label(image, label):
    """The one place dtf turns a stored example into model inputs: images as float32 in [0, 1], sparse int32 labels."""
    return tf.cast(image, tf.float32) / 255.0, tf.cast(label, tf.int32)


def count_examples(dataset: tf.data.Dataset) -> int:
    """The number of elements: the known cardinality, else one pass over the data (in C++, not Python)."""
    cardinality = int(dataset.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
        raise UserError("the input dataset is infinite (did it .repeat()?); give dtf one epoch of unbatched examples")
    if cardinality >= 0:
        return cardinality
    return int(dataset.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))


def from_dataset(dataset: tf.data.Dataset, name: str = "dataset") -> DatasetSplit:
    """A user's unbatched in-memory `tf.data.Dataset`: one shard, so more than one input pipeline shards it by
    records.

    Args:
        dataset: unbatched examples (counted once, here).
        name: shown in messages and summaries.
    """
    num_examples = count_examples(dataset)
    return DatasetSplit(name=name, split="", num_examples=num_examples, shard_lengths=(num_examples,),
                        read=lambda _: dataset)


def from_tfrecord_files(files: Sequence[str], cycle_length: int = 16) -> DatasetSplit:
    """TFRecord files of serialized records (the `preprocess` given to the pipeline parses them), in the given order.

    Counting the records reads every file once; the pipeline needs exact per-shard counts to give every input pipeline
    the same number of steps.

    Args:
        files: TFRecord paths on any TensorFlow filesystem; each file is a shard, so workers split them by file.
        cycle_length: files read in parallel, interleaved.
    """
    files = [str(f) for f in files]
    if not files:
        raise UserError("the list of input files is empty; give at least one TFRecord file")
    missing = [f for f in files if not tf.io.gfile.exists(f)]
    if missing:
        raise UserError(f"{len(missing)} input file(s) do not exist, e.g. {missing[0]}; check the paths")
    lengths = tuple(count_examples(tf.data.TFRecordDataset(f)) for f in files)

    def read(ctx: Optional[tf.distribute.InputContext]) -> tf.data.Dataset:
        mine = files if ctx is None else files[ctx.input_pipeline_id::ctx.num_input_pipelines]
        return tf.data.Dataset.from_tensor_slices(mine).interleave(
            tf.data.TFRecordDataset, cycle_length=min(cycle_length, len(mine)), block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE)  # order: the pipeline's `deterministic` option

    return DatasetSplit(name="tfrecord", split="", num_examples=sum(lengths), shard_lengths=lengths, read=read)
