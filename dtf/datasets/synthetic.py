"""`synthetic`: random images of any shape, generated in memory, for throughput benchmarks without I/O.

Only a small pool of distinct images is kept (a 224x224x3 epoch would not fit in memory); example `i` is pool image
`i % POOL_SIZE`. Every example is its own shard, so any number of input pipelines shards it by index, for free.
"""
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from dtf.base.errors import UserError
from dtf.datasets.split import DatasetSplit, to_image_label

POOL_SIZE = 256
DEFAULT_SHAPE = (28, 28, 1)
DEFAULT_NUM_CLASSES = 10
DEFAULT_NUM_EXAMPLES = {"train": 8192, "test": 1024}


def parse_shape(text: str):
    """'32x32x3' -> (32, 32, 3)."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise UserError(f"synthetic shape {text!r} is not like HxWxC (e.g. synthetic/32x32x3)")
    return shape


def load(split: str, shape: Sequence[int] = DEFAULT_SHAPE, num_classes: int = DEFAULT_NUM_CLASSES,
         num_examples: Optional[int] = None, seed: int = 0) -> DatasetSplit:
    num_examples = num_examples if num_examples is not None else DEFAULT_NUM_EXAMPLES.get(split)
    if num_examples is None or num_examples < 1:
        raise UserError(f"synthetic split {split!r} needs num_examples >= 1 (defaults exist for "
                        f"{', '.join(DEFAULT_NUM_EXAMPLES)})")
    if num_classes < 2:
        raise UserError(f"synthetic num_classes must be >= 2, got {num_classes}")
    rng = np.random.default_rng([seed, split == "test"])
    images = tf.constant(rng.integers(0, 256, size=(POOL_SIZE, *shape), dtype=np.uint8))
    labels = tf.constant(rng.integers(0, num_classes, size=POOL_SIZE))

    def example(index):
        return to_image_label(images[index % POOL_SIZE], labels[index % POOL_SIZE])

    def read(ctx):
        indices = tf.data.Dataset.range(num_examples)
        if ctx is not None:
            indices = indices.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        return indices.map(example, num_parallel_calls=tf.data.AUTOTUNE)

    return DatasetSplit(name=f"synthetic/{'x'.join(map(str, shape))}", split=split, num_examples=num_examples,
                        shard_lengths=(1,) * num_examples, read=read, input_shape=tuple(shape),
                        num_classes=num_classes)
