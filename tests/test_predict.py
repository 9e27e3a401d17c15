"""dtf.predict: ordered data-parallel inference equals one-device `model.predict` (same rows, same order, every example
once) on 4 mirrored replicas and on 2 workers with 1,001 examples; prediction files; one-line errors."""
import io
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import dtf
import tasks_for_predict
from dtf import predict
from dtf.inference import predictor as inference
from dtf.inference import prediction_files
from dtf.experiment import task as task_lib
from dtf.base.errors import UserError

TOL = 1e-5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = f"{os.path.abspath(tasks_for_predict.__file__)}:Classify"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved model with a custom layer, and one-device `model.predict` of the test split (the reference)."""
    folder = tmp_path_factory.mktemp("model")
    keras.utils.set_random_seed(3)
    model = tasks_for_predict.Classify().build_model()
    model.save(folder / "m.keras")
    x, _ = tasks_for_predict.examples(tasks_for_predict.NUM_TEST, 1)
    reference = model.predict(tasks_for_predict.inference_features(x), batch_size=32, verbose=0)
    return folder / "m.keras", reference, model.predict(x * 3.0, verbose=0)


@pytest.fixture(scope="module")
def mirrored(mirrored4):
    return mirrored4


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("global_batch, values", [(64, "logits"), (8, "probabilities"), (40, "argmax")])
def test_four_replicas_equal_one_device_predict_in_input_order(saved, mirrored, global_batch, values):
    """1,001 examples: 41 left over at 64; at 8 the last step has 1 example, so 3 of 4 replicas get empty batches."""
    path, reference, training_preprocessed = saved
    task = tasks_for_predict.Classify()
    model = inference.load_model(str(path), mirrored)
    result = inference.predict(model, mirrored, task_lib.split(task, "t", "test"), global_batch,
                               preprocess_batch=lambda b: task.preprocess_batch(b, training=False), values=values)
    out = result.outputs["output"]
    assert list(result.outputs) == ["output"] and result.num_replicas == 4 and result.num_examples == 1001
    if values == "argmax":
        assert out.shape == (1001,) and np.array_equal(out, reference.argmax(axis=1))
        return
    expected = reference if values == "logits" else softmax(reference)
    assert out.shape == (1001, 4)
    diff = float(np.max(np.abs(out - expected)))
    print(f"{values} at global batch {global_batch}: max |4 replicas - model.predict on 1 device| = {diff:.1e}")
    assert diff < TOL
    wrong = training_preprocessed if values == "logits" else softmax(training_preprocessed)
    assert np.max(np.abs(out - wrong)) > 1e-2  # the task's training preprocessing would give other outputs


def test_probabilities_of_a_softmax_model_are_its_outputs(mirrored):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    x = np.random.default_rng(0).normal(size=(10, 3)).astype("float32")
    split = dtf.datasets.from_dataset(tf.data.Dataset.from_tensor_slices(x))
    with mirrored.scope():
        model = keras.models.clone_model(model)
    out = inference.predict(model, mirrored, split, 4, values="probabilities").outputs["output"]
    assert np.max(np.abs(out - model.predict(x, verbose=0))) < TOL


def test_streamed_to_disk_equals_in_memory_and_leaves_no_files(saved, mirrored):
    path, reference, _ = saved
    task = tasks_for_predict.Classify()
    model = inference.load_model(str(path), mirrored)
    with inference.Rows(1001, "t test", "disk") as rows:
        inference.predict(model, mirrored, task_lib.split(task, "t", "test"), 64, rows=rows,
                          preprocess_batch=lambda b: task.preprocess_batch(b, training=False))
        directory = rows._dir
        assert os.listdir(directory) == ["0.bin"]
        assert np.max(np.abs(rows.arrays()["output"] - reference)) < TOL
        blocks = list(rows.chunks(300))
        assert [start for start, _ in blocks] == [0, 300, 600, 900] and len(blocks[-1][1]["output"]) == 101
    assert not os.path.exists(directory)


@pytest.mark.parametrize("store", ["memory", "disk", "none"])
def test_a_repeated_or_missing_position_is_an_error(store):
    out = np.arange(8, dtype=np.float32).reshape(4, 2)
    with inference.Rows(6, "d test", store) as rows:
        rows.put(np.array([2, 0, 1, 3]), [out], ["output"])
        with pytest.raises(UserError, match=r"^d test: example 1 came twice; its order must be the same on every "
                                            r"worker \(no unseeded shuffle"):
            rows.put(np.array([4, 1]), [out[:2]], ["output"])
        with pytest.raises(UserError, match="example 5 came twice"):
            rows.put(np.array([5, 5]), [out[:2]], ["output"])
        with pytest.raises(UserError, match="position 6 is outside its 6 examples"):
            rows.put(np.array([6]), [out[:1]], ["output"])
        with pytest.raises(UserError, match="2 of its 6 examples never came"):
            rows.check_complete()
        if store != "none":
            assert np.array_equal(rows.arrays()["output"][:4], out[[1, 2, 0, 3]])


# --- prediction files -----------------------------------------------------------------------------------------------

def outputs():
    rng = np.random.default_rng(0)
    return {"logits": rng.normal(size=(5, 3)).astype("float32"), "label": np.arange(5, dtype=np.int64) % 2}


def test_formats_round_trip_in_input_order(tmp_path):
    out = outputs()
    for ext in (".npz", ".csv", ".tfrecord"):
        prediction_files.write(str(tmp_path / f"p{ext}"), out)
    prediction_files.write(str(tmp_path / "p.npy"), {"output": out["logits"]})
    assert np.array_equal(np.load(tmp_path / "p.npy"), out["logits"])
    npz = np.load(tmp_path / "p.npz")
    assert np.array_equal(npz["id"], np.arange(5)) and np.array_equal(npz["logits"], out["logits"])
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "id,logits_0,logits_1,logits_2,label" and lines[2].startswith("1,")
    table = np.loadtxt(tmp_path / "p.csv", delimiter=",", skiprows=1)
    assert np.array_equal(table[:, 0], np.arange(5)) and np.array_equal(table[:, 1:4].astype("float32"), out["logits"])
    records = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(tmp_path / "p.tfrecord"))]
    assert [r.features.feature["id"].int64_list.value[0] for r in records] == list(range(5))
    assert list(records[3].features.feature["logits"].float_list.value) == out["logits"][3].tolist()
    assert list(records[3].features.feature["label"].int64_list.value) == [1]
    assert sorted(os.listdir(tmp_path)) == ["p.csv", "p.npy", "p.npz", "p.tfrecord"]  # no temporaries left


def test_formats_on_a_remote_filesystem_stream_from_disk(tmp_path, monkeypatch):
    """ram:// (TensorFlow's in-memory filesystem) stands for gs://: check, write and overwrite through tf.io.gfile,
    from rows on disk converted 2 at a time; nothing lands in the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prediction_files, "BLOCK_ROWS", 2)
    out = outputs()
    with inference.Rows(5, "t test", "disk") as rows:
        rows.put(np.array([4, 0, 2]), [out["logits"][[4, 0, 2]], out["label"][[4, 0, 2]]], ["logits", "label"])
        rows.put(np.array([3, 1]), [out["logits"][[3, 1]], out["label"][[3, 1]]], ["logits", "label"])
        for ext in (".npz", ".csv", ".tfrecord"):
            prediction_files.write(f"ram://preds/p{ext}", rows)
    with tf.io.gfile.GFile("ram://preds/p.npz", "rb") as f:
        npz = np.load(io.BytesIO(f.read()))
        assert np.array_equal(npz["id"], np.arange(5)) and np.array_equal(npz["logits"], out["logits"])
        assert np.array_equal(npz["label"], out["label"])
    with tf.io.gfile.GFile("ram://preds/p.csv") as f:
        table = np.loadtxt(io.StringIO(f.read()), delimiter=",", skiprows=1)
    assert np.array_equal(table[:, 0], np.arange(5)) and np.array_equal(table[:, 1:4].astype("float32"), out["logits"])
    records = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset("ram://preds/p.tfrecord")]
    assert [r.features.feature["id"].int64_list.value[0] for r in records] == list(range(5))
    prediction_files.write("ram://preds/p.npy", {"output": out["logits"]})
    with tf.io.gfile.GFile("ram://preds/p.npy", "rb") as f:
        assert np.array_equal(np.load(io.BytesIO(f.read())), out["logits"])
    with pytest.raises(UserError, match=r"^--output=ram://preds/p.npy exists; choose a new name or add --overwrite$"):
        prediction_files.check_target("ram://preds/p.npy", False)
    prediction_files.write("ram://preds/p.npy", {"output": out["label"]}, overwrite=True)
    with tf.io.gfile.GFile("ram://preds/p.npy", "rb") as f:
        assert np.array_equal(np.load(io.BytesIO(f.read())), out["label"])
    assert sorted(tf.io.gfile.listdir("ram://preds")) == ["p.csv", "p.npy", "p.npz", "p.tfrecord"]
    assert os.listdir(tmp_path) == []


def test_existing_file_is_kept_unless_overwrite_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "p.npy"
    path.write_text("old")
    with pytest.raises(UserError, match=r"^--output=.*p.npy exists; choose a new name or add --overwrite$"):
        prediction_files.write(str(path), {"output": np.zeros(3)})

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(prediction_files, "_write_npy", broken)
    with pytest.raises(OSError, match="disk full"):
        prediction_files.write(str(path), {"output": np.zeros(3)}, overwrite=True)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["p.npy"]
    monkeypatch.undo()
    prediction_files.write(str(path), {"output": np.ones(3)}, overwrite=True)
    assert np.array_equal(np.load(path), np.ones(3))


@pytest.mark.parametrize("name, outputs_count, words", [
    ("p.parquet", 1, "unknown format '.parquet'; end the name in one of .npy, .npz, .csv, .tfrecord"),
    ("p", 1, "unknown format '(no extension)'"),
    ("p.npy", 2, "the model has 2 outputs and .npy holds one array; use .npz, .csv or .tfrecord"),
    ("a_file/p.csv", 1, "cannot write in"),
    ("a_dir.csv", 1, "is a directory"),
])
def test_bad_targets_are_refused_before_any_work(tmp_path, name, outputs_count, words):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_dir.csv").mkdir()
    with pytest.raises(UserError) as e:
        prediction_files.check_target(str(tmp_path / name), False, outputs_count)
    assert str(e.value).startswith(f"--output={tmp_path / name}") and words in str(e.value), str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["a_dir.csv", "a_file"]


def test_model_dir_gives_its_model_else_its_newest_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    for name in ("epoch_001.keras", "epoch_002.keras"):
        (tmp_path / "checkpoints" / name).write_text("")
    assert predict.model_path(None, str(tmp_path)) == str(tmp_path / "checkpoints" / "epoch_002.keras")
    (tmp_path / "model.keras").write_text("")
    assert predict.model_path(None, str(tmp_path)) == str(tmp_path / "model.keras")


# --- the command line -------------------------------------------------------------------------------------------------

def run_predict(args, timeout=240, prefix=()):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, *prefix, "-m", "dtf.predict", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)


def test_cli_with_a_user_task_on_four_replicas_writes_csv_in_input_order(saved, tmp_path):
    path, reference, _ = saved
    out = tmp_path / "preds.csv"
    proc = run_predict([f"--task={TASK}", f"--model={path}", "--strategy=mirrored", "--num_cpu_devices=4",
                        "--global_batch_size=64", f"--output={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = np.loadtxt(out, delimiter=",", skiprows=1)
    assert np.array_equal(table[:, 0], np.arange(1001))  # no duplicate, no missing row
    assert np.max(np.abs(table[:, 1:] - reference)) < TOL
    assert "dtf: predicted 1001/1001 examples (100%)" in proc.stderr and "examples/s" in proc.stderr
    assert "examples/s on 4 replica(s) (mirrored, 1 worker(s))" in proc.stdout
    assert "Traceback" not in proc.stderr and os.listdir(tmp_path) == ["preds.csv"]


TERMINAL_SCRIPT = r'''
import sys
class Terminal:  # stdout as on a terminal
    def __init__(self, stream):
        self.stream = stream
    def isatty(self):
        return True
    def __getattr__(self, name):
        return getattr(self.stream, name)
sys.stdout = Terminal(sys.stdout)
from dtf import predict
sys.exit(predict.main(["dtf.predict", *sys.argv[1:]]))
'''


def test_cli_on_a_terminal_shows_a_bar_that_ends_in_the_summary(saved, tmp_path):
    path, reference, _ = saved
    out = tmp_path / "preds.npy"
    proc = subprocess.run([sys.executable, "-c", TERMINAL_SCRIPT, f"--task={TASK}", f"--model={path}",
                           "--global_batch_size=100", f"--output={out}"], capture_output=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=240)  # bytes: text mode reads \r as \n
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, stderr[-3000:]
    draws = [d.rstrip() for d in stdout.split("\r") if d]
    assert re.fullmatch(r"predict \[[=>.]{30}\] \d+/1001 - [\d,]+ examples/s", draws[0]), draws
    assert draws[-2].startswith("predict [==============================] 1001/1001 - "), draws  # always drawn at the end
    assert draws[-1].startswith("dtf.predict: 1001 examples in ") and stdout.endswith("\n")
    assert "predicted 1001/1001" not in stderr  # the bar replaces the log lines
    assert np.max(np.abs(np.load(out) - reference)) < TOL


ERRORS_SCRIPT = r'''
import contextlib, io, json, os, sys
from absl import flags
from dtf import predict
results = []
for argv in json.loads(sys.argv[1]):
    flags.FLAGS.unparse_flags()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = predict.main(["dtf.predict", *argv])
        except SystemExit as e:
            code = e.code
    results.append([code, err.getvalue()])
print(json.dumps(results))
'''


def test_bad_input_is_one_line_exit_2_and_writes_nothing(saved, tmp_path):
    path, _, _ = saved
    narrow = tmp_path / "narrow.keras"
    keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)]).save(narrow)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "taken.csv").write_text("keep")
    (tmp_path / "empty_run").mkdir()
    out = f"--output={out_dir / 'p.csv'}"
    cases = [  # in one interpreter: the first case runs before any --task module registered the custom layer
        (["--dataset=synthetic", f"--model={path}", out],
         "cannot load the model .*m.keras: Could not locate class .Scale.; if it uses custom layers, give the --task"),
        ([f"--task={TASK}", f"--model={path}"], "--output is required"),
        ([f"--task={TASK}", f"--model={path}", f"--output={out_dir / 'p.parquet'}"], "unknown format '.parquet'"),
        ([f"--task={TASK}", f"--model={path}", f"--output={out_dir / 'taken.csv'}"],
         "taken.csv exists; choose a new name or add --overwrite"),
        ([f"--task={TASK}", f"--model={tmp_path / 'none.keras'}", out], "none.keras: no such file"),
        ([f"--task={TASK}", f"--model_dir={tmp_path / 'empty_run'}", out],
         r"has no model.keras and no checkpoints/\*\.keras"),
        ([f"--task={TASK}", out], "give --model=path.keras or --model_dir"),
        ([f"--task={TASK}", f"--model={narrow}", out],
         f"{narrow} on --task={TASK} --split=test: the model does not accept the data: features \\(2, 6\\), model "
         "inputs \\(None, 5\\)"),
        ([f"--task={TASK}", f"--model={path}", "--split=validation", out],
         "--split=validation: --task=.* has no 'validation' split \\(it has: train, test\\)"),
        ([f"--task={TASK}", f"--model={path}", "--output_values=classes", out], "--output_values"),
    ]
    proc = subprocess.run([sys.executable, "-c", ERRORS_SCRIPT, json.dumps([a for a, _ in cases])],
                          capture_output=True, text=True, timeout=240, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (args, words), (code, err) in zip(cases, json.loads(proc.stdout.splitlines()[-1])):
        assert code == 2, (args, err)
        assert err.startswith("dtf.predict: error: ") and err.count("\n") == 1, (args, err)
        assert re.search(words, err), (words, err)
    assert os.listdir(out_dir) == ["taken.csv"] and (out_dir / "taken.csv").read_text() == "keep"


@pytest.mark.slow
def test_two_workers_via_launch_equal_one_device_predict(saved, tmp_path):
    """Global batch 1000 over 2 workers: the 1,001 examples take 2 steps, and worker 1 is idle in the second."""
    path, reference, _ = saved
    out = tmp_path / "preds.npy"
    proc = run_predict([f"--task={TASK}", f"--model={path}", "--global_batch_size=1000", f"--output={out}"],
                       prefix=("-m", "dtf.launch", "--num_workers=2", "--timeout=240", "--", sys.executable))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "examples/s on 2 replica(s) (multi_worker, 2 worker(s))" in proc.stdout
    predictions = np.load(out)
    assert predictions.shape == (1001, 4)
    diff = float(np.max(np.abs(predictions - reference)))
    print(f"2 workers: max |dtf.predict - model.predict on 1 device| = {diff:.1e}")
    assert diff < TOL
    assert os.listdir(tmp_path) == ["preds.npy"]  # the chief's file only


def test_model_dir_alone_reads_the_run_task_and_evaluation_split(tmp_path):
    """A run trained with --task: `--model_dir` alone imports that task (its custom layer loads, its inference
    preprocessing applies) and predicts its evaluation split, exactly as with --task and --split given; other data
    is one line naming --dataset, and writes nothing."""
    from dtf.experiment import train
    from dtf.config.config import Config

    run = tmp_path / "run"
    train.run_experiment(Config(task=TASK, epochs=1, steps_per_epoch=2, global_batch_size=32, strategy="default",
                                model_dir=str(run)))
    cases = [[f"--model_dir={run}", f"--output={tmp_path / 'alone.npy'}"],  # first: no task imported yet
             [f"--model_dir={run}", f"--task={TASK}", "--split=test", f"--output={tmp_path / 'given.npy'}"],
             [f"--model_dir={run}", "--dataset=synthetic", f"--output={tmp_path / 'other.npy'}"]]
    proc = subprocess.run([sys.executable, "-c", ERRORS_SCRIPT, json.dumps(cases)], capture_output=True, text=True,
                          timeout=240, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (alone, alone_err), (given, given_err), (other, other_err) = json.loads(proc.stdout.splitlines()[-1])
    assert alone == 0 and given == 0, alone_err + given_err
    assert f"the run's data: --task={TASK} (from {run / 'flags.txt'})" in proc.stderr  # dtf's log (its own stream)
    predictions = np.load(tmp_path / "alone.npy")
    assert predictions.shape == (tasks_for_predict.NUM_TEST, tasks_for_predict.CLASSES)
    assert np.array_equal(predictions, np.load(tmp_path / "given.npy"))
    assert other == 2 and other_err.count("\n") == 1 and "Traceback" not in other_err, other_err
    assert re.fullmatch(rf"dtf.predict: error: {re.escape(str(run))}/model.keras on --dataset=synthetic --split=test: "
                        r"the model does not accept the data: features \(2, [\d, ]+\), model inputs \(None, 6\); "
                        r"give the --task or --dataset it was trained on\n", other_err), other_err
    assert not (tmp_path / "other.npy").exists()


def test_run_data_flags_come_from_flags_txt_unless_the_command_line_names_the_data(tmp_path):
    """The run's --task (or --dataset) and its task's own flags go ahead of the command line (which wins); dtf flags
    other than the data's stay the command's; naming --task or --dataset takes nothing from the run."""
    from absl import flags

    from dtf.config import flags as dtf_flags

    (tmp_path / "flags.txt").write_text("# --- task\n--task=t.py:T\n--hidden_units=64\n--nouse_bias\n# --- data\n"
                                        "--global_batch_size=32\n--strategy=mirrored\n--nodeterministic\n")
    fresh = flags.FlagValues()
    argv = ["prog", f"--model_dir={tmp_path}", "--hidden_units=8"]
    taken, note = dtf_flags.with_run_data_flags(argv, ("task", "dataset", "data_dir"), fresh)
    assert taken == ["prog", "--task=t.py:T", "--hidden_units=64", "--nouse_bias", *argv[1:]]
    assert note == f"--task=t.py:T --hidden_units=64 --nouse_bias (from {tmp_path / 'flags.txt'})"
    for named in ("--dataset=digits", "--task=u.py:U"):
        assert dtf_flags.with_run_data_flags([*argv, named], ("task",), fresh) == ([*argv, named], "")
    assert dtf_flags.with_run_data_flags(["prog", f"--model_dir={tmp_path / 'none'}"], ("task",), fresh) == \
        (["prog", f"--model_dir={tmp_path / 'none'}"], "")


def test_run_data_flags_are_read_from_a_remote_model_dir():
    """A run on gs:// (here `ram://`, TensorFlow's in-memory filesystem) gives its data flags like a local one."""
    import tensorflow as tf
    from absl import flags

    from dtf.config import flags as dtf_flags

    model_dir = "ram://dtf-test/flags-run"
    tf.io.gfile.makedirs(model_dir)
    with tf.io.gfile.GFile(f"{model_dir}/flags.txt", "w") as f:
        f.write("--dataset=digits\n--data_dir=/data\n--global_batch_size=32\n")
    argv = ["prog", f"--model_dir={model_dir}"]
    assert dtf_flags.with_run_data_flags(argv, ("dataset", "data_dir"), flags.FlagValues()) == (
        ["prog", "--dataset=digits", "--data_dir=/data", *argv[1:]], f"--dataset=digits --data_dir=/data (from "
        f"{model_dir}/flags.txt)")
    missing = ["prog", "--model_dir=ram://dtf-test/no-run"]
    assert dtf_flags.with_run_data_flags(missing, ("dataset",), flags.FlagValues()) == (missing, "")
