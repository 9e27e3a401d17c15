"""`dtf.Task`: a user's own data, model, loss and metrics, trained with everything dtf gives its built-in models.

`--task=package.module:Attr` (or `path/to/file.py:Attr`) names a `Task` subclass (or an instance). dtf imports the
module before parsing flags, so a task's own absl flags work on the command line and in flagfiles, then calls
`datasets()` once, `build_model()` inside the strategy scope, and `loss()`/`metrics()` to compile. The built-in
datasets and models are one task too (`ImageClassification`, configured by `--dataset` and `--model`).
"""
import importlib
import os
import re
import sys
from typing import Dict, Optional, Tuple

from dtf import datasets as datasets_lib
from dtf.base.errors import UserError
from dtf.config import specs
from dtf.datasets import DatasetSplit, models

TRAIN = "train"
EVAL_SPLITS = ("validation", "test")  # a task's "validation" split wins over its "test" split
DEFAULT_DATASET = "shapes"
DEFAULT_MODEL = "cnn"
BUILTIN = "the built-in task"
# Dataset transformations after which elements are batches (tf.data class names, without the leading "_").
_BATCHING = ("BatchDataset", "ParallelBatchDataset", "PaddedBatchDataset", "RebatchDataset", "DenseToSparseBatch",
             "DenseToRaggedBatch", "GroupByWindowDataset", "WindowDataset")


class Task:
    """Subclass it in your own module; `datasets()` and `build_model()` are required, the rest optional.

    Give the task its parameters as absl flags defined in its module (`flags.DEFINE_integer(...)`): `dtf.run` and
    `dtf.tune` accept them on the command line and in flagfiles and write them to flags.txt.
    """

    def datasets(self) -> Dict[str, object]:
        """{"train": ..., "validation": ...} ("test" in place of "validation"; neither: no validation). Each is an
        UNBATCHED `tf.data.Dataset` of (features, label) examples — dtf shuffles, shards and batches it at the global
        batch — or a `dtf.datasets.DatasetSplit` (e.g. `from_tfrecord_files`: sharded by file across workers)."""
        raise NotImplementedError("a dtf.Task must define datasets()")

    def build_model(self):
        """An uncompiled keras.Model; dtf calls this inside the strategy scope after seeding, then compiles it."""
        raise NotImplementedError("a dtf.Task must define build_model()")

    def loss(self):
        """What `model.compile(loss=...)` takes. Return per-example losses from custom ones: dtf then reduces them
        over the global batch on any number of replicas (a loss that returns its batch mean is corrected too)."""
        import keras

        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def metrics(self):
        """What `model.compile(metrics=...)` takes."""
        return ["accuracy"]

    def preprocess_batch(self, batch, training: bool):
        """Applied in the input pipeline to every per-replica batch (the dataset's element structure, batched):
        vectorized parsing (`tf.io.parse_example`) or augmentation. Returns (features, label). Default: unchanged.

        Args:
            batch: one per-replica batch of the split's elements.
            training: True in the training pipeline, False for evaluation and prediction.
        """
        return batch

    def num_examples(self, split: str) -> Optional[int]:
        """The size of `split` when counting it (one pass over the data) is too slow; None: dtf counts. dtf needs
        exact sizes to give every replica the same number of steps; a wrong count stops the run with an error.

        Args:
            split: a key of `datasets()` ("train", "validation" or "test").
        """
        return None


# --------------------------------------------------------------------------------------------------- loading


def _import_module(spec: str, module_part: str):
    if specs.is_path(module_part):
        path = os.path.abspath(module_part)
        if not os.path.isfile(path):
            raise UserError(f"--task={spec}: no file {path}; give an existing .py file or a module on PYTHONPATH")
        folder, name = os.path.split(path[:-3] if path.endswith(".py") else path)
        if folder not in sys.path:
            sys.path.insert(0, folder)  # as for a script: the task's own sibling modules import too
        module = _import(spec, name)
        if os.path.abspath(getattr(module, "__file__", "")) != path:
            raise UserError(f"--task={spec}: another module named {name!r} is already imported "
                            f"({getattr(module, '__file__', 'built in')}); rename {os.path.basename(path)}")
        return module
    return _import(spec, module_part)


def _import(spec: str, name: str):
    from dtf.base import versions

    versions.load_tensorflow()  # quiet and version-checked before the task's module imports TensorFlow

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise UserError(f"--task={spec}: no module named {name!r}; put it on PYTHONPATH or give a path to a .py "
                            "file, e.g. --task=path/to/my_task.py:MyTask") from None
        raise UserError(f"--task={spec}: importing {name} failed: {e}") from None
    except Exception as e:  # the task's own code: SyntaxError, a flag that clashes with dtf's (DuplicateFlagError)
        message = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"--task={spec}: importing {name} failed: {type(e).__name__}: {message}") from None


def resolve(spec: str):
    """The `Task` subclass or instance `spec` names, with its module imported (which defines the task's flags)."""
    module_part, sep, attr = (spec or "").strip().rpartition(":")
    if not sep or not module_part or not attr:
        raise UserError(f"--task={spec!r} must be package.module:Attr or path/to/file.py:Attr, e.g. "
                        "--task=my_tasks:HousePrices")
    module = _import_module(spec, module_part)
    if not hasattr(module, attr):
        found = sorted(k for k, v in vars(module).items() if _is_task(v) and v is not Task)
        raise UserError(f"--task={spec}: module {module.__name__} has no attribute {attr!r} (tasks in it: "
                        f"{', '.join(found) or 'none'})")
    value = getattr(module, attr)
    if not _is_task(value):
        raise UserError(f"--task={spec} is a {type(value).__name__}, not a dtf.Task subclass; define "
                        f"`class {attr}(dtf.Task)` with datasets() and build_model()")
    return value


def _is_task(value) -> bool:
    return isinstance(value, Task) or (isinstance(value, type) and issubclass(value, Task))


def load(spec: str) -> Task:
    """The task `spec` names, instantiated (after flags are parsed: a task may read its flags in __init__)."""
    import inspect

    value = resolve(spec)
    if not isinstance(value, type):
        return value
    try:
        inspect.signature(value).bind()
    except TypeError as e:
        raise UserError(f"--task={spec}: {value.__name__}() cannot be made without arguments ({e}); give its "
                        "parameters defaults, or make them the task module's own flags") from None
    return value()


def require(task: Task, label: str, *methods: str):
    """A UserError unless `task`'s class defines each of `methods` (the base class only raises NotImplementedError)."""
    missing = [f"{m}()" for m in methods if getattr(type(task), m) is getattr(Task, m)]
    if missing:
        raise UserError(f"{label}: {type(task).__name__} does not define {' or '.join(missing)}; a dtf.Task must "
                        "define datasets() (its splits) and build_model() (an uncompiled keras.Model)")


def from_config(config) -> Task:
    """The run's task: `--task`, else the built-in task of `--dataset`/`--model`."""
    if config.task:
        return load(config.task)
    return ImageClassification(config.dataset or DEFAULT_DATASET, config.model or DEFAULT_MODEL, config.data_dir)


# --------------------------------------------------------------------------------------------------- data checks


def _datasets(task: Task, label: str) -> dict:
    """`task.datasets()`, checked: a dict of known split names."""
    require(task, label, "datasets")
    out = task.datasets()
    if not isinstance(out, dict):
        raise UserError(f"{label}: datasets() returned a {type(out).__name__}; return a dict like "
                        "{'train': ..., 'validation': ...}")
    unknown = sorted(set(out) - {TRAIN, *EVAL_SPLITS})
    if unknown:
        raise UserError(f"{label}: datasets() returned unknown split(s) {', '.join(map(repr, unknown))}; use "
                        f"'{TRAIN}', 'validation' or 'test'")
    return out


def split(task: Task, label: str, name: Optional[str], flag: str = "--split") -> DatasetSplit:
    """One split of `task.datasets()` by name (None: the one a run evaluates on), checked like the training splits
    (for inference)."""
    out = _datasets(task, label)
    if name is None:
        name = next((s for s in EVAL_SPLITS if out.get(s) is not None), None)
        if name is None:
            raise UserError(f"{label} has no validation or test split; give {flag} (e.g. {flag}={TRAIN})")
    if out.get(name) is None:
        given = ", ".join(k for k, v in out.items() if v is not None) or "none"
        raise UserError(f"{flag}={name}: {label} has no {name!r} split (it has: {given}); choose one of those")
    return _as_split(task, label, name, out[name])


def splits(task: Task, label: str) -> Tuple[DatasetSplit, Optional[DatasetSplit]]:
    """(train, eval or None) from `task.datasets()`, checked: a dict with a train split of unbatched examples."""
    out = _datasets(task, label)
    if out.get(TRAIN) is None:
        returned = ", ".join(map(repr, out)) or "nothing"
        raise UserError(f"{label}: datasets() has no '{TRAIN}' split (it returned {returned}); add one to train on")
    eval_name = next((s for s in EVAL_SPLITS if out.get(s) is not None), None)
    return (_as_split(task, label, TRAIN, out[TRAIN]),
            _as_split(task, label, eval_name, out[eval_name]) if eval_name else None)


def _as_split(task: Task, label: str, name: str, value) -> DatasetSplit:
    import tensorflow as tf

    if isinstance(value, DatasetSplit):
        _check_unbatched(label, name, value.read(None))
        return value
    if not isinstance(value, tf.data.Dataset):
        raise UserError(f"{label}: datasets()[{name!r}] is a {type(value).__name__}; return a tf.data.Dataset of "
                        "(features, label) examples or a dtf.datasets.DatasetSplit")
    _check_unbatched(label, name, value)
    count = task.num_examples(name)
    if count is None:
        split = datasets_lib.from_dataset(value, name=label)
    else:
        if count < 1:
            raise UserError(f"{label}: num_examples({name!r}) returned {count}; return the split's size (>= 1)")
        split = datasets_lib.from_dataset(value.apply(tf.data.experimental.assert_cardinality(count)), name=label)
    if split.num_examples == 0:
        raise UserError(f"{label}: datasets()[{name!r}] is empty")
    return DatasetSplit(name=label, split=name, num_examples=split.num_examples, shard_lengths=split.shard_lengths,
                        read=split.read)


def _check_unbatched(label: str, name: str, dataset):
    """Fail on a dataset whose last batching transformation is not undone by an unbatch: dtf batches itself."""
    from dtf.upstream import tensorflow as tf_upstream

    pending = [dataset]
    while pending:
        current = pending.pop()
        kind = type(current).__name__.lstrip("_")
        if kind.startswith("UnbatchDataset"):
            continue
        if kind.startswith(_BATCHING):
            raise UserError(f"{label}: datasets()[{name!r}] is batched (it ends in {kind}); return unbatched "
                            "examples: dtf batches them into the global batch (--global_batch_size) itself")
        pending.extend(tf_upstream.dataset_inputs(current))


def check_model_accepts(model, features, label: str, fix: str = ""):
    """The model's output on one real batch, or a UserError naming the data's and the model's input shapes and
    dtypes (then `fix`, what to do about it)."""
    import tensorflow as tf

    try:
        return model(features, training=False)
    except (ValueError, TypeError, KeyError, tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as e:
        reason = _reason(e)
        raise UserError(f"{label}: the model does not accept the data: features {_shapes(features)}"
                        f"{_dtypes(features)}, model inputs {_model_inputs(model)}"
                        f"{f' ({reason})' if reason else ''}{fix}") from None


def loss_for_replicas(loss, labels, predictions, label: str):
    """`dtf.optim.losses.for_replicas` on one real batch, with a loss Keras does not know, or one that cannot take the
    labels and the model's outputs (e.g. 3 outputs for 5 classes), refused on one line naming both shapes."""
    import tensorflow as tf

    from dtf.optim import losses

    try:
        losses.as_loss(loss)
    except (ValueError, TypeError) as e:
        raise UserError(f"{label}: loss() returned {loss!r}, which is not a Keras loss ({_reason(e)})") from None
    try:
        return losses.for_replicas(loss, labels, predictions, label)
    except UserError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, tf.errors.OpError) as e:
        raise UserError(f"{label}: the loss does not accept the labels and the model's outputs: labels "
                        f"{_shapes(labels)}, model outputs {_shapes(predictions)}{_why(e)}; make build_model()'s "
                        "outputs match the labels") from None


def _why(error: Exception) -> str:
    reason = _reason(error)
    return f" ({reason})" if reason else ""


def _reason(error: Exception) -> str:
    """The line of a Keras error that says what is wrong (not its "Exception encountered when calling" header), or
    "" when that line quotes tensor values (the shapes already say it)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line and not line.startswith("Exception encountered")]
    reason = lines[0] if lines else type(error).__name__
    reason = re.sub(r"\s*\[Op:\w+\].*$", "", re.sub(r"\{\{[^}]*\}\}\s*", "", reason))  # TF's op decorations
    return "" if re.search(r"\[\[|\[-?\d+\.\d|tf\.Tensor\(|array\(", reason) else reason


def _dtypes(structure) -> str:
    """" of dtype D" when every feature has one dtype D other than float32 (a dtype mismatch is then visible)."""
    import keras

    dtypes = {keras.backend.standardize_dtype(t.dtype) for t in keras.tree.flatten(structure)}
    return f" of dtype {dtypes.pop()}" if len(dtypes) == 1 and dtypes != {"float32"} else ""


def _shapes(structure):
    import keras

    return keras.tree.map_structure(lambda t: tuple(t.shape), structure)


def _model_inputs(model):
    for attribute in ("input", "inputs"):  # a functional model's structure (e.g. a dict); a Sequential's list
        try:
            inputs = getattr(model, attribute)
        except (AttributeError, ValueError):
            continue
        if inputs is not None:
            shapes = _shapes(inputs)
            return shapes[0] if isinstance(shapes, list) and len(shapes) == 1 else shapes
    return "not declared (subclassed model)"


# --------------------------------------------------------------------------------------------------- built-in


class ImageClassification(Task):
    """dtf's built-in task: a named dataset (`--dataset`) and model (`--model`), cross-entropy on logits, accuracy."""

    def __init__(self, dataset: str = DEFAULT_DATASET, model: str = DEFAULT_MODEL, data_dir: Optional[str] = None):
        self.dataset, self.model, self.data_dir = dataset, model, data_dir
        self._train = None

    def datasets(self):
        out = {TRAIN: datasets_lib.load(self.dataset, TRAIN, self.data_dir)}
        self._train = out[TRAIN]
        for split in ("test", "validation"):  # test first, as dtf always validated its built-in datasets
            try:
                out[split] = datasets_lib.load(self.dataset, split, self.data_dir)
                break
            except UserError:
                continue
        return out

    def build_model(self):
        if self._train is None:
            self.datasets()
        return models.build_model(self.model, self._train.input_shape, self._train.num_classes)
