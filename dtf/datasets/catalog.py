"""Any TFDS catalog dataset (`mnist`, `cifar10`, `mnist:3.0.1`, ...) already prepared in the data_dir.

Loaded with downloads off: a machine without internet gets a UserError naming the command that prepares the data
elsewhere, never a hang on a download.
"""
import os

import tensorflow_datasets as tfds

from dtf.base.errors import UserError
from dtf.datasets import tfds_reader
from dtf.datasets.split import DatasetSplit


def load(name: str, split: str, data_dir: str, valid_names) -> DatasetSplit:
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f"unknown dataset {name!r}; valid: {', '.join(valid_names)}, folder:/path/to/images, or a "
                        f"TFDS name prepared in {data_dir} (found there: {', '.join(_prepared(data_dir)) or 'none'})") \
            from None
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    features = builder.info.features
    if image_key not in features or label_key not in features or \
            not isinstance(features[label_key], tfds.features.ClassLabel):
        raise UserError(f"TFDS dataset {name!r} is not image classification (supervised keys "
                        f"{builder.info.supervised_keys}); dtf trains (image, class label) datasets")
    if None in features[image_key].shape:
        raise UserError(f"TFDS dataset {name!r} has images of varying size {features[image_key].shape}; dtf batches "
                        "fixed-size images: resize a copy into an image folder and use folder:/path")
    return tfds_reader.read_split(builder, split, name, image_key=image_key, label_key=label_key)


def _prepared(data_dir: str):
    """Dataset folders in `data_dir` (how TFDS lays them out: data_dir/name/[config/]version)."""
    if not os.path.isdir(data_dir):
        return []
    return sorted(d for d in os.listdir(data_dir)
                  if not d.startswith(".") and d != "downloads" and os.path.isdir(os.path.join(data_dir, d)))
