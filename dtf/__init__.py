"""dtf: data-parallel Keras training on TensorFlow — strategies, sharded input, LR scaling, tuning.

`import dtf` is light: TensorFlow loads (quietly, version-checked, with dtf's LR schedules registered so saved dtf
models load) the first time a name that needs it is used, e.g. `dtf.create_strategy` or `from dtf import callbacks`.
The command-line tools' `--help`, flag errors and the launcher's `--dry_run`/`--emit` never load it.
"""
import importlib as _importlib
import importlib.util as _importlib_util

from dtf.errors import DtfError, TrainingDiverged, UserError

__version__ = "0.1.0"

# Public name -> module defining it (a module maps to itself). Everything here needs TensorFlow except dtf.cluster.
_EXPORTS = {
    "ClusterInfo": "dtf.cluster", "build_tf_config": "dtf.cluster", "parse_tf_config": "dtf.cluster",
    "callbacks": "dtf.callbacks", "scaling": "dtf.scaling",
    "create_strategy": "dtf.strategy", "simulate_cpu_devices": "dtf.strategy",
    "distribute_dataset": "dtf.data", "Task": "dtf.task",
}
# Submodules that never import TensorFlow; any other `from dtf import <submodule>` loads it the dtf way first.
_LIGHT = {"batch_study", "bench", "choices", "cli", "cluster", "config", "data_service", "errors", "exitcodes", "flags", "launch",
          "logs", "manifests", "netns", "objectives", "procs", "ray", "run", "slurm", "slurm_task", "tune",
          "tune_distributed", "versions"}

__all__ = ["ClusterInfo", "DtfError", "Task", "TrainingDiverged", "UserError", "build_tf_config", "callbacks",
           "create_strategy", "distribute_dataset", "parse_tf_config", "scaling", "simulate_cpu_devices"]


def _needs_tensorflow(module: str) -> bool:
    return module.split(".")[1] not in _LIGHT


def __getattr__(name: str):
    """Import what `name` needs on first use (PEP 562); TensorFlow through `versions.load_tensorflow`."""
    module = _EXPORTS.get(name, f"dtf.{name}")
    if name not in _EXPORTS and _importlib_util.find_spec(module) is None:
        raise AttributeError(f"module 'dtf' has no attribute {name!r}")
    if _needs_tensorflow(module):
        from dtf import versions

        try:
            versions.load_tensorflow()
        except UserError as e:
            raise ImportError(str(e)) from None
    value = _importlib.import_module(module)
    if module.rsplit(".", 1)[1] != name:
        value = getattr(value, name)
    globals()[name] = value
    return value
