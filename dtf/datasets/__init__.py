"""Datasets by name, all offline: `load(name, split, data_dir=None, **params) -> DatasetSplit`.

Names: `shapes[/28x28x1|/32x32x3]` and `digits` (TFDS builders shipped with dtf, built into the data_dir on first use),
`synthetic[/HxWxC]` (in memory; params shape, num_classes, num_examples, seed), `folder:/path` (an image folder), or
any TFDS name already prepared in the data_dir. The data_dir defaults to $DTF_DATA_DIR, else TFDS's default.
"""
from typing import Optional

from dtf.base.versions import load_tensorflow as _load_tensorflow

_load_tensorflow()  # TensorFlow the dtf way (quiet, version-checked) before any module here imports it

from dtf.base.errors import UserError
from dtf.datasets import catalog, digits, folder, shapes, synthetic
from dtf.datasets.split import DatasetSplit, from_dataset, from_tfrecord_files
from dtf.datasets.tfds_reader import resolve_data_dir

FOLDER_PREFIX = "folder:"


def _shapes(config, split, data_dir):
    config = config or shapes.DEFAULT_CONFIG
    if config not in shapes.configs():
        raise UserError(f"unknown shapes config {config!r}; valid: {', '.join(shapes.configs())}")
    return shapes.load(split, data_dir, config)


def _digits(config, split, data_dir):
    if config:
        raise UserError(f"dataset 'digits' has no configs, got 'digits/{config}'; use 'digits'")
    return digits.load(split, data_dir)


def _synthetic(config, split, data_dir, **params):
    del data_dir  # in memory
    if config:
        params["shape"] = synthetic.parse_shape(config)
    return synthetic.load(split, **params)


_LOADERS = {"shapes": _shapes, "digits": _digits, "synthetic": _synthetic}


def names():
    """dtf's own dataset names, with their configs."""
    return ["shapes"] + [f"shapes/{c}" for c in shapes.configs()] + ["digits", "synthetic", "synthetic/HxWxC"]


def load(name: str, split: str = "train", data_dir: Optional[str] = None, **params) -> DatasetSplit:
    """One split of a dataset by name.

    Args:
        name: shapes[/config], digits, synthetic[/HxWxC], folder:/path, or a TFDS name prepared in `data_dir`.
        split: train, validation or test (what the dataset has).
        data_dir: where TFDS data lives; default $DTF_DATA_DIR, else TFDS's default.
        **params: for `synthetic` only: shape, num_classes, num_examples, seed.

    Raises:
        UserError: an unknown name or split, or parameters for a dataset that takes none.
    """
    name = (name or "").strip()
    if not name:
        raise UserError(f"no dataset name given; valid: {', '.join(names())}, folder:/path, or a prepared TFDS name")
    if params and not name.startswith("synthetic"):
        raise UserError(f"dataset {name!r} takes no parameters, got {', '.join(params)}")
    if name.startswith(FOLDER_PREFIX):
        return folder.load(name[len(FOLDER_PREFIX):], split)
    base, _, config = name.partition("/")
    if base in _LOADERS:
        return _LOADERS[base](config, split, resolve_data_dir(data_dir), **params)
    return catalog.load(name, split, resolve_data_dir(data_dir), names())


__all__ = ["DatasetSplit", "from_dataset", "from_tfrecord_files", "load", "names", "resolve_data_dir"]
