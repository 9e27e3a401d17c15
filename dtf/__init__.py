"""dtf: data-parallel Keras training on TensorFlow — strategies, sharded input, LR scaling, tuning.

The tree is the architecture: `base`, `config`, `cluster` and `backends` never import TensorFlow; `distribute`,
`optim`, `datasets`, `experiment`, `inference` and `benchmarks` load it the dtf way (quiet, version-checked) when first
imported; `tuning`, `tracking` (MLflow) and `upstream` load it where they need it; the commands
(`python -m dtf.run|launch|tune|predict|bench|batch_study`) sit on top. `import dtf` is light: a public name loads
what it needs the first time it is used, e.g. `dtf.create_strategy` or `from dtf import callbacks`.
"""
import importlib as _importlib
import importlib.abc as _importlib_abc
import importlib.util as _importlib_util
import sys as _sys

from dtf.base.errors import DtfError, TrainingDiverged, UserError

__version__ = "0.1.0"

# Public name -> module defining it (a module maps to itself).
_EXPORTS = {
    "ClusterInfo": "dtf.cluster", "build_tf_config": "dtf.cluster", "parse_tf_config": "dtf.cluster",
    "callbacks": "dtf.experiment.callbacks", "scaling": "dtf.optim.scaling",
    "create_strategy": "dtf.distribute.strategy", "simulate_cpu_devices": "dtf.distribute.strategy",
    "distribute_dataset": "dtf.distribute.inputs", "Task": "dtf.experiment.task",
}
# Modules by the names they had before dtf was grouped into packages (issue 21), so code written against those names
# (`dtf.train.run_experiment`, `from dtf.callbacks import BackupAndRestore`, `dtf.ray.fit`) keeps working.
_MOVED = {
    "errors": "base.errors", "exitcodes": "base.exitcodes", "logs": "base.logs", "versions": "base.versions",
    "choices": "config.choices", "flags": "config.flags", "procs": "cluster.procs", "netns": "cluster.netns",
    "slurm": "backends.slurm", "slurm_task": "backends.slurm_task", "manifests": "backends.tfjob",
    "ray": "backends.ray", "strategy": "distribute.strategy", "data": "distribute.inputs",
    "data_service": "cluster.data_service", "scaling": "optim.scaling", "accumulation": "optim.accumulation",
    "lars": "optim.lars", "losses": "optim.losses", "noise_scale": "optim.noise_scale", "train": "experiment.train",
    "task": "experiment.task", "callbacks": "experiment.callbacks", "preemption": "experiment.preemption",
    "summaries": "experiment.summaries", "progress": "experiment.progress", "evaluator": "experiment.evaluator",
    "rundir": "experiment.rundir", "atomic": "experiment.atomic", "models": "datasets.models",
    "tune_distributed": "tuning.distributed", "objectives": "tuning.objectives",
    "prediction_files": "inference.prediction_files", "bench_scaling": "benchmarks.scaling",
    "bottleneck": "benchmarks.bottleneck", "overhead": "benchmarks.overhead", "allreduce": "benchmarks.allreduce",
}

__all__ = ["ClusterInfo", "DtfError", "Task", "TrainingDiverged", "UserError", "build_tf_config", "callbacks",
           "create_strategy", "distribute_dataset", "parse_tf_config", "scaling", "simulate_cpu_devices"]


class _MovedModule(_importlib_abc.MetaPathFinder, _importlib_abc.Loader):
    """`import dtf.<old name>` gives the module at its new place (one object under both names)."""

    def find_spec(self, fullname, path=None, target=None):
        old = fullname[len("dtf."):] if fullname.startswith("dtf.") else None
        return _importlib_util.spec_from_loader(fullname, self) if old in _MOVED else None

    def create_module(self, spec):
        return _importlib.import_module("dtf." + _MOVED[spec.name[len("dtf."):]])

    def exec_module(self, module):
        """The module ran at its new place already."""


_sys.meta_path.append(_MovedModule())


def __getattr__(name: str):
    """Import what `name` needs on first use (PEP 562); a package that needs TensorFlow loads it the dtf way, and a
    version outside the supported range is an ImportError that says so in one line."""
    module = _EXPORTS.get(name) or (f"dtf.{_MOVED[name]}" if name in _MOVED else f"dtf.{name}")
    if name not in _EXPORTS and name not in _MOVED and _importlib_util.find_spec(module) is None:
        raise AttributeError(f"module 'dtf' has no attribute {name!r}")
    try:
        value = _importlib.import_module(module)
    except UserError as e:
        raise ImportError(str(e)) from None
    if module.rsplit(".", 1)[1] != name and name in _EXPORTS:
        value = getattr(value, name)
    globals()[name] = value
    return value
