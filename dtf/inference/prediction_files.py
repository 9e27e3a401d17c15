"""Prediction files by extension: .npy (one array), .npz (one array per output, plus `id`), .csv (an `id` column,
then one column per output value), .tfrecord (one tf.train.Example per input example: `id` and each output).

Row i is example i of the input order, and `id` is i. Files are written through tf.io.gfile (local paths, gs:// and
the other TensorFlow filesystems, like model_dir) block by block from the stored rows, so writing costs O(block)
memory, to a temporary name next to the target that is renamed at the end (dtf.experiment.atomic): a reader (or a failed
run) never leaves half a file; an existing file is kept unless `overwrite`.
"""
import io
import os
import zipfile
from typing import Dict

import numpy as np
import tensorflow as tf

from dtf.base.errors import UserError
from dtf.experiment import atomic
from dtf.experiment.atomic import replacing

FORMATS = (".npy", ".npz", ".csv", ".tfrecord")
FLAG = "--output"
BLOCK_ROWS = 4096  # rows converted at a time


def format_of(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise UserError(f"{FLAG}={path}: unknown format {ext or '(no extension)'!r}; end the name in one of "
                        f"{', '.join(FORMATS)}")
    return ext


def _directory(path: str) -> str:
    return os.path.dirname(path) if "://" in path else os.path.dirname(os.path.abspath(path))


def check_target(path: str, overwrite: bool, num_outputs: int = 1):
    """Fail before any work if `path` cannot be written: bad format, an existing file, an unwritable directory, or
    a multi-output model for .npy. Creates the directory (nothing else is left behind)."""
    ext = format_of(path)
    if ext == ".npy" and num_outputs > 1:
        raise UserError(f"{FLAG}={path}: the model has {num_outputs} outputs and .npy holds one array; use .npz, "
                        ".csv or .tfrecord")
    if tf.io.gfile.isdir(path):
        raise UserError(f"{FLAG}={path} is a directory; give a file name ending in {ext}")
    if tf.io.gfile.exists(path) and not overwrite:
        raise UserError(f"{FLAG}={path} exists; choose a new name or add --overwrite")
    directory = _directory(path)
    reason = atomic.unwritable(directory)
    if reason:
        raise UserError(f"{FLAG}={path}: cannot write in {directory} ({reason}); choose a directory you can write")


class _Arrays:
    """Whole arrays by name, read like `dtf.inference.predictor.Rows` (names, num_examples, row_info, chunks)."""

    def __init__(self, outputs: Dict[str, np.ndarray]):
        self._outputs = {name: np.asarray(array) for name, array in outputs.items()}
        self.names = list(self._outputs)
        self.num_examples = len(next(iter(self._outputs.values())))

    def row_info(self, name: str):
        return self._outputs[name].shape[1:], self._outputs[name].dtype

    def chunks(self, size: int):
        for start in range(0, self.num_examples, size):
            yield start, {name: array[start:start + size] for name, array in self._outputs.items()}


def write(path: str, outputs, overwrite: bool = False):
    """Write `outputs` (arrays by name, or a `dtf.inference.predictor.Rows`; rows in input order) to `path` atomically,
    in the format its extension names."""
    rows = _Arrays(outputs) if isinstance(outputs, dict) else outputs
    check_target(path, overwrite, len(rows.names))
    ext = format_of(path)
    with replacing(path) as tmp:
        if ext == ".tfrecord":
            _write_tfrecord(tmp, rows)
            return
        with tf.io.gfile.GFile(tmp, "wb") as f:
            if ext == ".npy":
                _write_npy(f, rows, rows.names[0])
            elif ext == ".npz":
                _write_npz(f, rows)
            else:
                _write_csv(f, rows)


def _write_npy(f, rows, name: str):
    shape, dtype = rows.row_info(name)
    np.lib.format.write_array_header_1_0(f, {"shape": (rows.num_examples, *shape), "fortran_order": False,
                                             "descr": np.lib.format.dtype_to_descr(dtype)})  # as np.save writes
    for _, block in rows.chunks(BLOCK_ROWS):
        f.write(np.ascontiguousarray(block[name]).tobytes())


class _Counting(io.RawIOBase):
    """A write-only, unseekable stream that counts its bytes: zipfile then streams its members (data descriptors)
    and needs no Tell(), which some TensorFlow filesystems lack."""

    def __init__(self, f):
        super().__init__()
        self._f, self._written = f, 0

    def writable(self):
        return True

    def tell(self):
        return self._written

    def write(self, data):
        self._f.write(bytes(data))
        self._written += len(data)
        return len(data)


def _write_npz(f, rows):
    with zipfile.ZipFile(_Counting(f), "w", allowZip64=True) as archive:
        with archive.open("id.npy", "w", force_zip64=True) as member:
            _write_npy(member, _Arrays({"id": _ids(rows)}), "id")
        for name in rows.names:
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                _write_npy(member, rows, name)


def _ids(rows, start: int = 0, count: int = None) -> np.ndarray:
    return np.arange(start, start + (rows.num_examples if count is None else count), dtype=np.int64)


def _columns(name: str, shape):
    """One column per value of an example: `name` for a scalar, `name_0`, `name_1`, ... otherwise."""
    return [name] if not shape else [f"{name}_{j}" for j in range(int(np.prod(shape)))]


def _write_csv(f, rows):
    header, formats = ["id"], ["%d"]
    for name in rows.names:
        shape, dtype = rows.row_info(name)
        names = _columns(name, shape)
        header += names
        formats += ["%d" if np.issubdtype(dtype, np.integer) else "%.9g"] * len(names)  # float32 round-trips
    text = io.TextIOWrapper(io.BufferedWriter(_Counting(f), 1 << 20), encoding="utf-8", newline="\n")
    text.write(",".join(header) + "\n")
    for start, block in rows.chunks(BLOCK_ROWS):
        count = len(next(iter(block.values())))
        columns = [_ids(rows, start, count)[:, None]] + [block[name].reshape(count, -1) for name in rows.names]
        np.savetxt(text, np.hstack([c.astype(np.float64) for c in columns]), fmt=formats, delimiter=",")
    text.flush()  # not closed: that would close `f` before its rename


def _write_tfrecord(path: str, rows):
    def feature(values: np.ndarray):
        if np.issubdtype(values.dtype, np.integer):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=values.ravel()))
        return tf.train.Feature(float_list=tf.train.FloatList(value=values.ravel()))

    with tf.io.TFRecordWriter(path) as writer:
        for start, block in rows.chunks(BLOCK_ROWS):
            for j in range(len(next(iter(block.values())))):
                features = {"id": feature(np.array([start + j], np.int64))}
                features.update({name: feature(np.asarray(block[name][j])) for name in rows.names})
                writer.write(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())
