"""Prediction files by extension: .npy (one array), .npz (one array per output, plus `id`), .csv (an `id` column,
then one column per output value), .tfrecord (one tf.train.Example per input example: `id` and each output).

Row i is example i of the input order, and `id` is i. Files are written to a temporary name in the target directory
and renamed at the end, so a reader (or a failed run) never leaves half a file; an existing file is kept unless
`overwrite`.
"""
import os
from typing import Dict

import numpy as np

from dtf import atomic
from dtf.atomic import replacing
from dtf.errors import UserError

FORMATS = (".npy", ".npz", ".csv", ".tfrecord")
FLAG = "--output"


def format_of(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise UserError(f"{FLAG}={path}: unknown format {ext or '(no extension)'!r}; end the name in one of "
                        f"{', '.join(FORMATS)}")
    return ext


def check_target(path: str, overwrite: bool, num_outputs: int = 1):
    """Fail before any work if `path` cannot be written: bad format, an existing file, an unwritable directory, or
    a multi-output model for .npy. Creates the directory (nothing else is left behind)."""
    ext = format_of(path)
    if ext == ".npy" and num_outputs > 1:
        raise UserError(f"{FLAG}={path}: the model has {num_outputs} outputs and .npy holds one array; use .npz, "
                        ".csv or .tfrecord")
    if os.path.isdir(path):
        raise UserError(f"{FLAG}={path} is a directory; give a file name ending in {ext}")
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{FLAG}={path} exists; choose a new name or add --overwrite")
    directory = os.path.dirname(os.path.abspath(path))
    reason = atomic.unwritable(directory)
    if reason:
        raise UserError(f"{FLAG}={path}: cannot write in {directory} ({reason}); choose a directory you can write")


def write(path: str, outputs: Dict[str, np.ndarray], overwrite: bool = False):
    """Write `outputs` (by name, rows in input order) to `path` atomically, in the format its extension names."""
    check_target(path, overwrite, len(outputs))
    ext = format_of(path)
    with replacing(path) as tmp:
        if ext == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, next(iter(outputs.values())))
        elif ext == ".npz":
            with open(tmp, "wb") as f:
                np.savez(f, id=_ids(outputs), **outputs)
        elif ext == ".csv":
            _write_csv(tmp, outputs)
        else:
            _write_tfrecord(tmp, outputs)


def _ids(outputs) -> np.ndarray:
    return np.arange(len(next(iter(outputs.values()))), dtype=np.int64)


def _columns(name: str, array: np.ndarray):
    """One column per value of an example: `name` for a scalar, `name_0`, `name_1`, ... otherwise."""
    width = int(np.prod(array.shape[1:]))
    return [name] if array.ndim == 1 else [f"{name}_{j}" for j in range(width)]


def _write_csv(path: str, outputs):
    header, columns, formats = ["id"], [_ids(outputs)[:, None]], ["%d"]
    for name, array in outputs.items():
        names = _columns(name, array)
        header += names
        columns.append(array.reshape(len(array), -1))
        formats += ["%d" if np.issubdtype(array.dtype, np.integer) else "%.9g"] * len(names)  # float32 round-trips
    np.savetxt(path, np.hstack([c.astype(np.float64) for c in columns]), fmt=formats, delimiter=",",
               header=",".join(header), comments="")


def _write_tfrecord(path: str, outputs):
    import tensorflow as tf

    def feature(values: np.ndarray):
        if np.issubdtype(values.dtype, np.integer):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=values.ravel()))
        return tf.train.Feature(float_list=tf.train.FloatList(value=values.ravel()))

    with tf.io.TFRecordWriter(path) as writer:
        for i in range(len(_ids(outputs))):
            features = {"id": feature(np.array([i], np.int64))}
            features.update({name: feature(np.asarray(array[i])) for name, array in outputs.items()})
            writer.write(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())
