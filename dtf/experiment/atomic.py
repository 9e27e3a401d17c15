"""Write-then-rename for every file dtf writes for resume or results, on any TensorFlow filesystem (`tf.io.gfile`:
local, gs://, s3:// and hdfs:// through plugins, ram://).

A reader sees either the old file or the whole new one, never a partial write: the data goes to a temporary name
next to the target (same directory, so the rename stays on one filesystem) and is renamed over it at the end. On a
local filesystem the rename is atomic (POSIX `rename`); an object store such as GCS publishes an object only once its
upload completes, and its rename is a copy of the finished object, so a reader still never sees half a file.
"""
import contextlib
import json
import os
import uuid

import tensorflow as tf

from dtf.base.errors import WriteFailed


def _temporary_name(path: str) -> str:
    """A unique hidden name next to `path` that keeps its suffix (Keras insists on `.keras` / `.weights.h5`)."""
    head, base = os.path.split(path)
    return os.path.join(head, f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{base}")


@contextlib.contextmanager
def writing(path: str):
    """A write under `path` that the environment refuses (permission denied, disk full, a file where a directory
    should be) becomes one line naming `path` (dtf.base.errors.WriteFailed), not a traceback."""
    try:
        yield
    except (OSError, tf.errors.OpError) as e:
        raise WriteFailed(f"cannot write {path}: {reason(e)}; make it writable (or free space) and rerun: the run "
                          "resumes from its last backup") from None


@contextlib.contextmanager
def replacing(path: str):
    """Yield a temporary path to write in full; on success it replaces `path`, on failure it is removed. The parent
    directory is made if missing (the checks before a run create nothing)."""
    if os.path.dirname(path):
        with writing(path):
            tf.io.gfile.makedirs(os.path.dirname(path))
    tmp = _temporary_name(path)
    try:
        with writing(path):
            yield tmp
            tf.io.gfile.rename(tmp, path, overwrite=True)
    except BaseException:
        with contextlib.suppress(Exception):
            if tf.io.gfile.exists(tmp):
                tf.io.gfile.remove(tmp)
        raise


def write_text(path: str, text: str):
    with replacing(path) as tmp, tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text)


def write_json(path: str, obj):
    write_text(path, json.dumps(obj, indent=2, default=float))


def unwritable(directory: str):
    """None when `directory` (on any TensorFlow filesystem) can be created and written, else why not. Nothing is
    left behind, not even the directory: a probe is made and removed in it, or in its nearest existing parent."""
    existing = directory
    while not tf.io.gfile.exists(existing):
        parent = os.path.dirname(existing.rstrip("/")) or "."
        if parent == existing or ("://" in existing and "://" not in parent):
            break  # a bucket or root that does not list as existing: let the probe say
        existing = parent
    probe = _temporary_name(os.path.join(existing, "write-check"))
    try:
        if tf.io.gfile.exists(existing) and not tf.io.gfile.isdir(existing):
            return f"{existing} is a file"
        tf.io.gfile.makedirs(probe)
        tf.io.gfile.rmtree(probe)
    except (OSError, tf.errors.OpError) as e:
        return reason(e)
    return None


def reason(error: BaseException) -> str:
    """What an OSError or a TensorFlow file error says went wrong, without the path (the caller names it)."""
    return getattr(error, "strerror", None) or getattr(error, "message", None) or str(error)


def is_temporary(name: str) -> bool:
    """True for a leftover of a write that was killed before its rename (safe to delete)."""
    return os.path.basename(name).startswith(".tmp-")
