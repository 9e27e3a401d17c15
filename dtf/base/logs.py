"""Keep TensorFlow's C++ and absl log noise out of user output unless asked for.

`quiet_tensorflow` must run before TensorFlow is imported: TF_CPP_MIN_LOG_LEVEL is read when the C++ runtime loads.
"""
import contextlib
import logging
import os
import sys

# 0 = everything ... 3 = fatal only. Measured on TF 2.21: level 2 still lets through the cuInit error line, so quiet
# means 3; C++ errors that matter reach the user as Python exceptions anyway.
_QUIET_CPP_LEVEL = "3"


def quiet_tensorflow():
    """Silence TF's C++ INFO/WARNING/ERROR lines (an explicit TF_CPP_MIN_LOG_LEVEL from the user wins)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", _QUIET_CPP_LEVEL)
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # oneDNN reorders float sums: runs would not compare exactly
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


@contextlib.contextmanager
def silenced_stderr():
    """Drop what C++ writes to fd 2 meanwhile: TF prints cudart/oneDNN banners at load time, before absl reads
    TF_CPP_MIN_LOG_LEVEL. Only when quiet is in force; Python exceptions are printed after the fd is restored."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") != _QUIET_CPP_LEVEL:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def wants_debug(argv) -> bool:
    """absl's --verbosity (-v) >= 1 shows TensorFlow's own logs; read from argv before TensorFlow is imported."""
    for i, arg in enumerate(argv):
        for prefix in ("--verbosity=", "-v="):
            if arg.startswith(prefix):
                return arg[len(prefix):].lstrip("-").isdigit() and int(arg[len(prefix):]) >= 1
        if arg in ("--verbosity", "-v") and i + 1 < len(argv):
            return argv[i + 1].isdigit() and int(argv[i + 1]) >= 1
    return False


def set_verbosity(level: str):
    """Apply `--verbosity`: 'info' (dtf's lines), 'debug' (dtf + TF's Python logs), 'warning', 'error'."""
    import absl.logging
    import tensorflow as tf

    absl.logging.set_verbosity(level)
    logging.getLogger("dtf").setLevel(getattr(logging, level.upper()))
    tf.get_logger().setLevel(logging.DEBUG if level == "debug" else logging.ERROR)


def get_logger(name: str) -> logging.Logger:
    """A `dtf.*` logger that prints one plain line per message to stderr."""
    root = logging.getLogger("dtf")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("dtf: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return logging.getLogger(name)
