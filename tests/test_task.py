"""The Task API in-process: loading `--task`, the checks on datasets() and the model, losses reduced the same on 1 and
4 replicas, task flags, and tuning objectives. End-to-end runs (examples, launcher, tuner) are in test_task_runs.py."""
import numpy as np
import pytest
import tensorflow as tf

import dtf
import tasks_for_tests
from dtf.cluster import tf_config as cluster_lib
from dtf.optim import losses
from dtf.tuning import objectives
from dtf.experiment import train
from dtf.experiment import task as task_lib
from dtf.config.config import Config
from dtf.config import specs
from dtf.base.errors import UserError
from helpers import max_weight_delta

TOL = 1e-5


def experiment(task, strategy, tmp_path, **overrides):
    config = Config(**{**dict(global_batch_size=32, optimizer="sgd", base_lr=0.05, lr_scaling="none", momentum=0.9,
                              epochs=1, lr_schedule="constant", seed=1, model_dir=str(tmp_path)), **overrides})
    return train.Experiment(config, strategy, cluster_lib.parse_tf_config(), task)


def trained_weights(task, strategy, tmp_path, **overrides):
    exp = experiment(task, strategy, tmp_path, **overrides)
    model = exp.build_model()
    exp.fit(model, [], verbose=0)
    return model.get_weights(), exp


@pytest.fixture(scope="module")
def strategies(mirrored4):
    return {"one": dtf.create_strategy("one_device"), "four": mirrored4}


# --- losses: the same gradients on 1 and 4 replicas, whatever the loss returns ----------------------------------------

@pytest.mark.parametrize("kind", ["per_example", "mean", "sum"])
def test_task_trains_the_same_on_one_device_and_four_replicas(strategies, tmp_path, kind):
    """10 SGD+momentum steps at global batch 32: one device vs MirroredStrategy on 4 logical CPUs (8 per replica)."""
    task = tasks_for_tests.Regression(kind)
    lr = 0.05 / 32 if kind == "sum" else 0.05  # a sum over 32 examples: 32× the gradient of their mean
    one, exp = trained_weights(task, strategies["one"], tmp_path / "one", base_lr=lr)
    four, _ = trained_weights(task, strategies["four"], tmp_path / "four", base_lr=lr)
    assert exp.steps_per_epoch == 10
    diff = max_weight_delta(one, four)
    print(f"loss {kind}: max |w(1 device) - w(4 replicas)| after 10 steps = {diff:.2e}")
    assert diff < TOL
    assert max_weight_delta(one, tasks_for_tests.Regression(kind).build_model().get_weights()) > 1e-3  # it did train


def test_scalar_mean_loss_is_off_by_the_replica_count_without_the_correction(strategies, tmp_path, monkeypatch):
    """What Keras does unaided: a loss that returns its batch mean gets 4× the gradients on 4 replicas."""
    task = tasks_for_tests.Regression("mean")
    # No validation: Keras's unaided batch mean of a replica's empty evaluation batch is NaN (ReplicaMean gives 0).
    one, _ = trained_weights(task, strategies["one"], tmp_path / "one", validation_freq=2)
    monkeypatch.setattr(losses, "for_replicas", lambda loss, *args, **kwargs: loss)
    four, _ = trained_weights(task, strategies["four"], tmp_path / "four", validation_freq=2)
    assert max_weight_delta(one, four) > 1e-3


def test_reduction_is_read_off_a_real_batch():
    y = tf.constant([[1.0], [2.0], [0.5], [3.0]])
    p = tf.constant([[0.0], [1.0], [1.5], [0.0]])
    assert losses.reduction("mse", y, p) == losses.PER_EXAMPLE
    assert losses.reduction(tasks_for_tests.scalar_mean_squared_error, y, p) == losses.MEAN
    assert losses.reduction(tasks_for_tests.scalar_sum_squared_error, y, p) == losses.SUM
    with pytest.raises(UserError, match="neither the batch mean nor the batch sum.*per-example"):
        losses.reduction(lambda t, q: tf.reduce_max(tf.abs(t - q)), y, p)


def test_replica_mean_is_zero_on_an_empty_batch_and_round_trips():
    import keras

    loss = losses.ReplicaMean(tasks_for_tests.scalar_mean_squared_error)
    assert float(loss(tf.zeros((0, 1)), tf.zeros((0, 1)))) == 0.0  # a replica's empty evaluation batch: not NaN
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    y, p = tf.constant([[1.0], [3.0]]), tf.constant([[0.0], [0.0]])
    assert float(again(y, p)) == pytest.approx(5.0)


# --- loading --task -------------------------------------------------------------------------------------------------

TASK_MODULE = '''
import dtf

class Good(dtf.Task):
    def datasets(self):
        return {}

not_a_task = len
'''


@pytest.fixture
def task_files(tmp_path):
    """Task modules under names unique to the test (a module name is imported once per process)."""
    tag = tmp_path.name.replace("-", "_")
    for kind, text in (("a", TASK_MODULE), ("broken", "import some_package_that_is_not_installed_dtf\n"),
                       ("syntax", "def oops(:\n")):
        (tmp_path / f"user_tasks_{kind}_{tag}.py").write_text(text)
    return tmp_path, tag


@pytest.mark.parametrize("spec, words", [
    ("no_colon", "must be package.module:Attr"),
    ("no_such_module_dtf_xyz:Task", "no module named 'no_such_module_dtf_xyz'"),
    ("{dir}/missing.py:Task", "no file"),
    ("{dir}/user_tasks_a_{tag}.py:Nope", "has no attribute 'Nope' (tasks in it: Good)"),
    ("{dir}/user_tasks_a_{tag}.py:not_a_task", "is a builtin_function_or_method, not a dtf.Task subclass"),
    ("{dir}/user_tasks_broken_{tag}.py:Task",
     "importing user_tasks_broken_{tag} failed: No module named 'some_package_that_is_not_installed_dtf'"),
    ("{dir}/user_tasks_syntax_{tag}.py:Task", "importing user_tasks_syntax_{tag} failed: SyntaxError"),
])
def test_bad_task_specs_name_the_flag_and_the_fix(task_files, spec, words):
    folder, tag = task_files
    spec, words = spec.format(dir=folder, tag=tag), words.format(tag=tag)
    with pytest.raises(UserError) as e:
        task_lib.load(spec)
    message = str(e.value)
    assert message.startswith(f"--task={spec}") or message.startswith(f"--task='{spec}'"), message
    assert words in message and "\n" not in message


def test_a_path_spec_loads_and_is_made_absolute(task_files, monkeypatch):
    folder, tag = task_files
    monkeypatch.chdir(folder)
    assert isinstance(task_lib.load(f"user_tasks_a_{tag}.py:Good"), dtf.Task)
    assert specs.canonical_spec(f"user_tasks_a_{tag}.py:Good") == f"{folder}/user_tasks_a_{tag}.py:Good"
    (folder / "other").mkdir()
    (folder / "other" / f"user_tasks_a_{tag}.py").write_text(TASK_MODULE)
    with pytest.raises(UserError, match="another module named .* is already imported"):
        task_lib.load(f"other/user_tasks_a_{tag}.py:Good")
    assert specs.canonical_spec("pkg.mod:Good") == "pkg.mod:Good"


def test_task_with_built_in_dataset_or_model_is_refused():
    with pytest.raises(UserError, match=r"--task=m:T replaces the built-in task that --model=mlp configures"):
        Config(task="m:T", model="mlp")


# --- datasets() and the model are checked before training -------------------------------------------------------------

class Custom(dtf.Task):
    def __init__(self, splits, model=None):
        self._splits, self._model = splits, model

    def datasets(self):
        return self._splits

    def build_model(self):
        return self._model() if self._model else tasks_for_tests.Regression("per_example").build_model()

    def loss(self):
        return "mse"


def _examples():
    return tf.data.Dataset.from_tensor_slices(tasks_for_tests.data(64, 0))


@pytest.mark.parametrize("splits, words", [
    ([1, 2], "datasets() returned a list; return a dict"),
    ({"validation": None}, "has no 'train' split (it returned 'validation')"),
    ({"train": None, "val": None}, "unknown split(s) 'val'; use 'train', 'validation' or 'test'"),
    ({"train": np.zeros(3)}, "datasets()['train'] is a ndarray; return a tf.data.Dataset"),
    ({"train": "batched"}, "datasets()['train'] is batched (it ends in BatchDataset)"),
    ({"train": "batched_then_mapped"}, "is batched (it ends in BatchDataset)"),
    ({"train": "csv_batched"}, "is batched"),
    ({"train": "examples", "validation": "padded"}, "datasets()['validation'] is batched (it ends in PaddedBatch"),
])
def test_bad_datasets_are_one_line_errors(splits, words, tmp_path):
    made = {"batched": lambda: _examples().batch(8),
            "batched_then_mapped": lambda: _examples().batch(8).map(lambda x, y: (x * 2, y)),
            "csv_batched": lambda: _csv_dataset(tmp_path),
            "examples": _examples,
            "padded": lambda: _examples().padded_batch(8)}
    if isinstance(splits, dict):
        splits = {k: made[v]() if isinstance(v, str) else v for k, v in splits.items()}
    with pytest.raises(UserError) as e:
        task_lib.splits(Custom(splits), "--task=m:T")
    assert str(e.value).startswith("--task=m:T: ") and words in str(e.value), str(e.value)


def _csv_dataset(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("a,b\n1,2\n3,4\n")
    return tf.data.experimental.make_csv_dataset(str(path), batch_size=2, label_name="b", num_epochs=1)


def test_unbatched_again_is_accepted_and_counts_come_from_the_hook():
    class Counted(Custom):
        def num_examples(self, split):
            return 64 if split == "train" else None

    unknown_size = _examples().filter(lambda x, y: True)  # cardinality unknown: dtf would count it
    train_split, eval_split = task_lib.splits(Counted({"train": unknown_size, "test": _examples().batch(4).unbatch()}),
                                              "t")
    assert train_split.num_examples == 64 and eval_split.num_examples == 64 and eval_split.split == "test"


def test_model_that_does_not_take_the_data_names_both_shapes(strategies, tmp_path):
    import keras

    def wrong_width():
        return keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])

    exp = experiment(Custom({"train": _examples()}, wrong_width), strategies["one"], tmp_path)
    with pytest.raises(UserError) as e:
        exp.build_model()
    message = str(e.value)
    assert message.startswith("task Custom: the model does not accept the data: features (32, 8), model inputs "
                              "(None, 5) (Input 0 with name 'None' of layer 'dense"), message
    assert "\n" not in message


@pytest.mark.parametrize("features, words", [
    ([["a", "b", "c"]], "features (1, 3) of dtype string, model inputs (None, 3) (Cast string to float is not "
                        "supported); fix it"),
    ([[[0.5, 0.25]]], "features (1, 1, 2), model inputs (None, 3); fix it"),  # Keras's reason quotes the values
])
def test_model_data_mismatch_is_one_line_without_tensor_values(features, words):
    import keras
    import tensorflow as tf

    from dtf.experiment import task as task_lib

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(UserError) as e:
        task_lib.check_model_accepts(model, tf.constant(features), "--dataset=d", "; fix it")
    assert str(e.value) == f"--dataset=d: the model does not accept the data: {words}"


def test_build_model_must_return_a_keras_model(strategies, tmp_path):
    exp = experiment(Custom({"train": _examples()}, lambda: "not a model"), strategies["one"], tmp_path)
    with pytest.raises(UserError, match=r"build_model\(\) returned a str; return a keras.Model"):
        exp.build_model()


def test_preprocess_batch_sees_per_replica_batches_of_serialized_records(strategies, tmp_path):
    """TFRecord files parsed per batch (`tf.io.parse_example`), the case the hook is for: sharded by file, and the
    hook knows training from evaluation."""
    x, y = tasks_for_tests.data(96, 0)
    files = []
    for shard in range(2):
        path = str(tmp_path / f"part-{shard}.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for i in range(shard, 96, 2):
                writer.write(tf.train.Example(features=tf.train.Features(feature={
                    "x": tf.train.Feature(float_list=tf.train.FloatList(value=x[i])),
                    "y": tf.train.Feature(float_list=tf.train.FloatList(value=y[i]))})).SerializeToString())
        files.append(path)
    seen = []

    class Records(Custom):
        def preprocess_batch(self, batch, training):
            seen.append((tuple(batch.shape), training))
            parsed = tf.io.parse_example(batch, {"x": tf.io.FixedLenFeature([8], tf.float32),
                                                 "y": tf.io.FixedLenFeature([1], tf.float32)})
            return parsed["x"], parsed["y"]

        def loss(self):
            return "mse"

        def metrics(self):
            return ["mae"]

    split = dtf.datasets.from_tfrecord_files(files)
    weights, exp = trained_weights(Records({"train": split, "validation": split}), strategies["four"], tmp_path)
    assert exp.train_split.num_shards == 2 and exp.train_split.num_examples == 96
    assert ((8,), True) in seen and ((None,), False) in seen  # per-replica training batch: 32 / 4 replicas
    assert np.isfinite(exp.evaluate(exp.build_model())["loss"])


def test_a_task_without_an_eval_split_trains_without_validation(strategies, tmp_path):
    exp = experiment(Custom({"train": _examples()}), strategies["one"], tmp_path, epochs=2)
    model = exp.build_model()
    history = exp.fit(model, [], verbose=0)
    assert len(history["loss"]) == 2 and not any(k.startswith("val_") for k in history)
    assert exp.evaluate(model) == {}


# --- task flags -----------------------------------------------------------------------------------------------------

def test_task_spec_is_found_in_nested_flagfiles(tmp_path):
    from dtf.config import flags as dtf_flags

    (tmp_path / "inner.flags").write_text("--task=pkg.inner:T\n")
    (tmp_path / "outer.flags").write_text(f"--epochs=2\n--flagfile={tmp_path / 'inner.flags'}\n")
    assert dtf_flags.task_spec(["prog", f"--flagfile={tmp_path / 'outer.flags'}"]) == "pkg.inner:T"
    assert dtf_flags.task_spec(["prog", f"--flagfile={tmp_path / 'outer.flags'}", "--task", "a.b:C"]) == "a.b:C"
    assert dtf_flags.task_spec(["prog", "--flagfile=/no/such/file"]) is None  # the real parse reports it


def test_task_flags_are_recorded_in_the_config_and_flagfile():
    from absl import flags
    from absl.testing import flagsaver

    from dtf.config import flags as dtf_flags

    dtf_flags.define_flags()
    spec = f"{tasks_for_tests.__file__}:Regression"
    with flagsaver.flagsaver():
        flags.FLAGS(["prog", f"--task={spec}", "--test_hidden=7", "--test_loss=sum"])
        config = dtf_flags.config_from_flags()
    assert config.task_flags == ("--test_hidden=7", "--test_loss=sum")
    assert "# --- task\n" in config.to_flagfile() and "--test_hidden=7\n--test_loss=sum\n" in config.to_flagfile()


# --- tuning objectives ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective, given, direction", [
    ("val_loss", "auto", "min"), ("val_mean_absolute_error", "auto", "min"), ("val_accuracy", "auto", "max"),
    ("val_auc", "auto", "max"), ("val_r2_score", "max", "max"), ("val_accuracy", "min", "min"),
])
def test_objective_direction(objective, given, direction):
    assert objectives.objective_direction(objective, given) == direction


def test_objective_without_a_direction_is_refused():
    with pytest.raises(UserError, match="--objective=val_r2_score: cannot tell.*--objective_direction=min"):
        objectives.objective_direction("val_r2_score")
    with pytest.raises(UserError, match="--objective_direction='up' is not valid"):
        objectives.objective_direction("val_loss", "up")
