"""`python -m dtf.predict --model_dir=runs/x (or --model=m.keras) [--task=... or --dataset=...] --output=preds.csv`

Runs a trained model over a dataset split with data parallelism: any strategy (--strategy,
--num_cpu_devices; TF_CONFIG or `dtf.launch` for workers). The chief writes every example's prediction exactly once,
in input order (row/id i is example i of the split), to .npy, .npz, .csv (an `id` column first) or .tfrecord.
--output_values: the model's outputs as they are (logits), probabilities (softmax; sigmoid for one unit), or argmax
(the class). A --task module is imported first, so its custom layers and losses load and its preprocess_batch
(training=False) prepares the data. With --model_dir and neither --task nor --dataset, the run's own --task (and
its task flags) or --dataset/--data_dir come from the run's flags.txt; the default --split is the split the run
evaluated on (a task's validation split, else its test split; a built-in dataset's test split, else validation).
"""
import contextlib
import glob
import os
import sys
from typing import Optional

from dtf import cli
from dtf.base.errors import UserError
from dtf.base.logs import get_logger

log = get_logger("dtf.predict")  # at import, like dtf.launch: dtf's log keeps the process's own stderr

# Config fields predict shares with dtf.run: where it runs and what it reads (not how training goes).
SHARED = ("strategy", "num_cpu_devices", "num_gpus", "communication", "cross_device_ops", "num_packs",
          "cluster_timeout", "worker_hosts", "task_index", "cluster_resolver", "task", "dataset", "data_dir",
          "global_batch_size", "progress", "tracking_uri", "experiment_name")
# What --model_dir's flags.txt gives when the command line names no data (predict's --model is a file, not the run's).
RUN_DATA_FLAGS = ("task", "dataset", "data_dir")
PROGRESS_EVERY_S = 5.0
_taken_from_run = [""]  # what _define took from --model_dir's flags.txt, said once the run starts


def _define(argv):
    """Defines the flags; with --model_dir, first inserts the run's data flags into `argv` (cli.main parses it next)."""
    from absl import flags

    from dtf.config import flags as dtf_flags
    from dtf.inference import predictor as inference

    argv[:], _taken_from_run[0] = dtf_flags.with_run_data_flags(argv, RUN_DATA_FLAGS)
    dtf_flags.define_flags(names=SHARED)
    module = "dtf: predict"
    if "output" not in flags.FLAGS:
        flags.DEFINE_string("model", None, "A saved model (.keras) to run.", module_name=module)
        flags.DEFINE_string("model_dir", None, "A dtf run's --model_dir: its model.keras, else its newest "
                            "checkpoints/*.keras.", module_name=module)
        flags.DEFINE_string("split", None, "The split to predict: train, validation or test (default: the one the "
                            "run evaluated on: validation, else test; a built-in dataset's test, else validation).",
                            module_name=module)
        flags.DEFINE_string("output", None, "Where the chief writes predictions: .npy, .npz, .csv or .tfrecord.",
                            module_name=module)
        flags.DEFINE_boolean("overwrite", False, "Replace an existing --output.", module_name=module)
        flags.DEFINE_enum("output_values", "logits", inference.OUTPUT_VALUES, "logits: the model's outputs as they "
                          "are; probabilities: softmax (sigmoid for one unit); argmax: the class index.",
                          module_name=module)
    cli.define_task_flags(argv)


def model_path(model, model_dir) -> str:
    """The model file the flags name: --model, or --model_dir's model.keras, else its newest checkpoint."""
    if bool(model) == bool(model_dir):
        raise UserError("give --model=path.keras or --model_dir=a run's directory (one of them)")
    if model:
        if not os.path.isfile(model):
            raise UserError(f"--model={model}: no such file; give a saved .keras model")
        return model
    if not os.path.isdir(model_dir):
        raise UserError(f"--model_dir={model_dir}: no such directory; give the --model_dir of a dtf run")
    final = os.path.join(model_dir, "model.keras")
    checkpoints = sorted(glob.glob(os.path.join(model_dir, "checkpoints", "*.keras")))
    if os.path.isfile(final):
        return final
    if checkpoints:
        return checkpoints[-1]
    raise UserError(f"--model_dir={model_dir} has no model.keras and no checkpoints/*.keras; train it with --export "
                    "or --checkpoint_every, or give --model")


def _data(config, split_name: Optional[str]):
    """(split, preprocess_batch or None, label) from --task or --dataset; split_name None: the evaluation split."""
    from dtf import datasets
    from dtf.experiment import task as task_lib

    if config.task:
        task = task_lib.load(config.task)
        label = f"--task={config.task}"
        split = task_lib.split(task, label, split_name)
        overridden = type(task).preprocess_batch is not task_lib.Task.preprocess_batch
        return split, (lambda batch: task.preprocess_batch(batch, training=False)) if overridden else None, label
    dataset = config.dataset or task_lib.DEFAULT_DATASET
    label = f"--dataset={dataset}"
    if split_name is not None:
        return datasets.load(dataset, split_name, config.data_dir), None, label
    for name in ("test", "validation"):  # as the built-in task evaluates
        try:
            return datasets.load(dataset, name, config.data_dir), None, label
        except UserError:
            continue
    raise UserError(f"{label} has no test or validation split; give --split (e.g. --split=train)")


def _check_fit(model, split, preprocess_batch, model_label: str, data_label: str):
    """The model's outputs on two real examples, or a UserError naming both the model and the data."""
    import keras

    from dtf.experiment import task as task_lib

    batch = next(iter(split.read(None).take(2).batch(2)))
    x, _, _ = keras.utils.unpack_x_y_sample_weight(preprocess_batch(batch) if preprocess_batch else batch)
    return task_lib.check_model_accepts(model, x, f"{model_label} on {data_label} --split={split.split}",
                                        "; give the --task or --dataset it was trained on")


def _tracker(config, cluster):
    """The --tracking_uri tracker on the chief, checked before anything is written (None: not tracked here)."""
    if not config.tracking_uri or not cluster.is_chief:
        return None
    from dtf.tracking.tracker import Tracker

    tracker = Tracker.from_config(config, "dtf.predict")
    tracker.check()
    return tracker


def _body(rest):
    from absl import flags

    from dtf.base import versions

    if flags.FLAGS.tracking_uri:
        from dtf.tracking import store

        store.require_mlflow()  # a missing `mlflow` extra is one line, before TensorFlow loads
    versions.load_tensorflow()  # quiet, version-checked, before anything else imports it
    from dtf.config.config import Config
    from dtf.distribute import strategy as strategy_lib
    from dtf.experiment import progress as progress_lib, train
    from dtf.inference import prediction_files, predictor as inference

    FLAGS = flags.FLAGS
    if _taken_from_run[0]:
        log.info(f"the run's data: {_taken_from_run[0]}")
    config = Config(**{name: FLAGS[name].value for name in SHARED})
    if not FLAGS.output:
        raise UserError("--output is required, e.g. --output=preds.csv (or .npy, .npz, .tfrecord)")
    path = model_path(FLAGS.model, FLAGS.model_dir)
    cluster = train.resolve_cluster(config)
    tracker = _tracker(config, cluster)
    if cluster.is_chief:
        prediction_files.check_target(FLAGS.output, FLAGS.overwrite)
    strategy = train.create_strategy(config)
    model = inference.load_model(path, strategy)
    split, preprocess_batch, data_label = _data(config, FLAGS.split)
    sample = _check_fit(model, split, preprocess_batch, path, data_label)
    if cluster.is_chief:
        prediction_files.check_target(FLAGS.output, FLAGS.overwrite, len(inference.output_names(sample)))
    global_batch = config.global_batch_size or train.DEFAULT_GLOBAL_BATCH
    mode = progress_lib.resolve(config.progress, sys.stdout) if cluster.is_chief else "none"
    bar = progress_lib.Bar(split.num_examples, sys.stdout, "predict ") if mode == "bar" else None
    shown = [0.0]

    def progress(done, seconds):
        if bar is not None:
            bar.update(done, done, seconds)
        elif mode == "epoch" and (seconds - shown[0] >= PROGRESS_EVERY_S or done == split.num_examples):
            shown[0] = seconds
            log.info(f"predicted {done}/{split.num_examples} examples ({100 * done // split.num_examples}%), "
                     f"{progress_lib.rate(done, seconds)}")

    tracking = tracker.prediction(FLAGS.output, dict(
        model=path, data=data_label, split=split.split, output_values=FLAGS.output_values,
        global_batch_size=global_batch, strategy=strategy_lib.strategy_name(strategy),
        num_replicas=strategy.num_replicas_in_sync, num_workers=cluster.num_workers),
        FLAGS.model_dir) if tracker else contextlib.nullcontext()
    # The chief streams each gathered batch to local disk, then converts it to --output; the others only check.
    with tracking as run, inference.Rows(split.num_examples, f"{split.name} {split.split}",
                                         "disk" if cluster.is_chief else "none") as rows:
        result = inference.predict(model, strategy, split, global_batch, preprocess_batch=preprocess_batch,
                                   values=FLAGS.output_values, on_step=progress, rows=rows)
        if cluster.is_chief:
            prediction_files.write(FLAGS.output, rows, overwrite=FLAGS.overwrite)
        if run is not None:
            tracker.log_prediction(run, result, FLAGS.output)
    if cluster.is_chief:
        summary = (f"dtf.predict: {result.num_examples} examples in {result.seconds:.2f}s: "
                   f"{result.examples_per_sec:.0f} examples/s on {result.num_replicas} replica(s) "
                   f"({strategy_lib.strategy_name(strategy)}, {cluster.num_workers} worker(s)), global batch {global_batch}; "
                   f"wrote {FLAGS.output_values} to {FLAGS.output}")
        if bar is not None:
            bar.finish(summary)  # replaces the bar
        else:
            print(summary)
    return 0


def main(argv=None):
    return cli.main("dtf.predict", _define, _body, argv, doc=__doc__)


if __name__ == "__main__":
    cli.exit(main())
