"""dtf: data-parallel Keras training on TensorFlow — strategies, sharded input, LR scaling, tuning."""
import os as _os
import sys as _sys

from dtf import cli as _cli
from dtf import logs as _logs

if _cli.wants_debug(_sys.argv):  # `--verbosity=1` on a dtf command line: TF's own logs stay on
    _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
_logs.quiet_tensorflow()
with _logs.silenced_stderr():
    import tensorflow as _tf  # noqa: E402
import keras as _keras  # noqa: E402

from dtf.errors import UserError  # noqa: E402
from dtf.versions import check_versions as _check_versions  # noqa: E402

try:
    _check_versions(_tf.__version__, _keras.__version__)
except UserError as _e:
    raise ImportError(str(_e)) from None

from dtf import callbacks  # noqa: E402
from dtf import scaling  # noqa: E402,F401  (registers dtf's LR schedules, so `import dtf` loads saved models)
from dtf.cluster import ClusterInfo, build_tf_config, parse_tf_config  # noqa: E402
from dtf.data import distribute_dataset  # noqa: E402
from dtf.strategy import create_strategy, simulate_cpu_devices  # noqa: E402
from dtf.task import Task  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ClusterInfo", "Task", "UserError", "build_tf_config", "callbacks", "create_strategy",
           "distribute_dataset", "parse_tf_config", "simulate_cpu_devices"]
