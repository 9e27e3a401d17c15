"""Supported TensorFlow/Keras versions, checked when dtf first loads TensorFlow (`load_tensorflow`).

`dtf.upstream.keras` patches private Keras internals, so dtf refuses to run on versions it was not tested on rather
than patch blindly. Widen these ranges only after the equivalence tests pass on the new version (BUILD_NOTES.md).
"""
import os
import sys

from dtf.base.errors import UserError

TENSORFLOW_RANGE = ((2, 21), (2, 22))  # [min, max)
KERAS_RANGE = ((3, 15), (3, 16))
KERAS_TUNER_RANGE = ((1, 4), (1, 5))  # checked when dtf.upstream.keras_tuner is imported (dtf.tune)


def _major_minor(version: str) -> tuple:
    parts = version.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def _in_range(version: str, bounds) -> bool:
    low, high = bounds
    return low <= _major_minor(version) < high


def _fmt(bounds) -> str:
    (a, b), (c, d) = bounds
    return f">={a}.{b},<{c}.{d}"


def check_versions(tf_version: str, keras_version: str):
    """Raise UserError naming the installed and supported versions if either is outside the tested range."""
    problems = []
    if not _in_range(tf_version, TENSORFLOW_RANGE):
        problems.append(f"tensorflow {tf_version} (supported: {_fmt(TENSORFLOW_RANGE)})")
    if not _in_range(keras_version, KERAS_RANGE):
        problems.append(f"keras {keras_version} (supported: {_fmt(KERAS_RANGE)})")
    if problems:
        raise UserError(
            "dtf does not support " + " and ".join(problems)
            + "; install the supported versions with `pip install -e .` (see BUILD_NOTES.md)"
        )


def check_keras_tuner(version: str):
    """Raise UserError naming the installed and supported keras-tuner versions if it is outside the tested range:
    `dtf.upstream.keras_tuner` reaches into keras-tuner's private oracle state."""
    if not _in_range(version, KERAS_TUNER_RANGE):
        raise UserError(f"dtf does not support keras-tuner {version} (supported: {_fmt(KERAS_TUNER_RANGE)}); install "
                        "the supported versions with `pip install -e .` (see BUILD_NOTES.md)")


def load_tensorflow():
    """Import TensorFlow and Keras the dtf way: TF's C++ logs quiet (unless `--verbosity=1` is on the command line),
    its load-time banners hidden, and the versions checked (UserError outside the tested range). Cheap after the first
    call."""
    from dtf.base import logs

    if logs.wants_debug(sys.argv):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
    logs.quiet_tensorflow()
    with logs.silenced_stderr():
        import tensorflow
    import keras

    check_versions(tensorflow.__version__, keras.__version__)


def versions() -> dict:
    """Versions recorded in summaries and notes."""
    import platform

    import keras
    import tensorflow as tf

    out = {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__}
    for name in ("tensorflow_datasets", "keras_tuner"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out
