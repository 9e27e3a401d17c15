"""Private TensorFlow, Keras and keras-tuner names go through `dtf/upstream/` only (BUILD_NOTES "Private upstream
names"); each still has the shape dtf relies on, and the upstream bugs dtf works around still happen. When a canary
here fails, read its message: upstream changed or fixed something, and dtf's workaround should follow."""
import inspect
import os
import re
import subprocess
import sys
import tokenize

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "dtf")
UPSTREAM = os.path.join(PACKAGE, "upstream")

# What counts as a private upstream name in dtf's code (strings and comments are not code).
PRIVATE = [
    r"\bkeras_tuner\.src\b", r"\bkeras\.src\b", r"\btensorflow\.python\b", r"\btf\.__internal__\b",
    r"\b_retry_queue\b", r"\b_ordered_ids\b", r"\b_populate_next\b", r"\._compare\b", r"\boracle_chief\b",
    r"\b_populate_initial_space\b", r"\b_is_worker\b", r"\b_get_oracle_fname\b",
    r"\b_save_model\b", r"\b_current_epoch\b", r"\b_steps_done\b", r"\b_last_batch_seen\b", r"\b_initial_epoch\b",
    r"\b_symbolic_build\b", r"\b_all_reduce_sum_gradients\b",
    r"\binterleave_op\b", r"\b_ParallelInterleaveDataset\b", r"\._inputs\(", r"\b[gs]et_config_key_value\b",
    r"\bself\._(distribution_strategy|track_variable|get_variable_index|clip_gradients|variables|"
    r"trainable_variables|iterations)\b",
]
# Files allowed a pattern, and why.
SUBCLASS_OF_OPTIMIZER = ("a keras.optimizers.Optimizer subclass uses the state and helpers Keras's own optimizers "
                         "(and its LossScaleOptimizer) use; BUILD_NOTES 'Private upstream names'")
ALLOWED = {
    ("dtf/optim/accumulation.py", PRIVATE[-1]): SUBCLASS_OF_OPTIMIZER,
    ("dtf/optim/lars.py", PRIVATE[-1]): SUBCLASS_OF_OPTIMIZER,
}


def _code_lines(path):
    """The file's lines with every string and comment blanked out."""
    lines = open(path, encoding="utf-8").read().splitlines()
    with open(path, "rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type not in (tokenize.STRING, tokenize.COMMENT):
                continue
            (r0, c0), (r1, c1) = tok.start, tok.end
            for row in range(r0, r1 + 1):
                line = lines[row - 1]
                start, end = (c0 if row == r0 else 0), (c1 if row == r1 else len(line))
                lines[row - 1] = line[:start] + " " * (end - start) + line[end:]
    return lines


def _private_uses(root, skip=None):
    """[(relative path, line number, pattern)] of every private upstream name in the code under `root`."""
    found = []
    for folder, _, files in os.walk(root):
        if skip and os.path.commonpath([folder, skip]) == skip:
            continue
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, REPO)
                for number, line in enumerate(_code_lines(path), 1):
                    found += [(rel, number, p) for p in PRIVATE if re.search(p, line)]
    return found


def test_private_upstream_names_only_in_dtf_upstream():
    uses = [u for u in _private_uses(PACKAGE, skip=UPSTREAM) if (u[0], u[2]) not in ALLOWED]
    assert not uses, "private upstream names outside dtf/upstream (route them through it): " + "; ".join(
        f"{path}:{number} {pattern}" for path, number, pattern in uses)


def test_the_scan_sees_code_and_not_prose():
    """The scan finds what dtf/upstream uses (so it can find a stray one) and ignores docstrings/comments."""
    patterns = {p for _, _, p in _private_uses(UPSTREAM)}
    assert {r"\b_retry_queue\b", r"\binterleave_op\b", r"\bkeras\.src\b", r"\b[gs]et_config_key_value\b"} <= patterns
    assert not any(re.search(p, line) for p in PRIVATE
                   for line in _code_lines(os.path.join(PACKAGE, "tuning", "distributed.py")))


# ----------------------------------------------------------------------------------------------- keras-tuner version


def test_keras_tuner_range():
    from dtf.base import versions
    from dtf.base.errors import UserError

    versions.check_keras_tuner("1.4.8")
    for bad in ("1.5.0", "1.3.9", "2.0.0"):
        with pytest.raises(UserError, match=rf"dtf does not support keras-tuner {bad} \(supported: >=1\.4,<1\.5\)"):
            versions.check_keras_tuner(bad)


BAD_KERAS_TUNER = ("import importlib.metadata as m, runpy\n"
                   "real = m.version\n"
                   "m.version = lambda name: '9.9.0' if name == 'keras-tuner' else real(name)\n"
                   "runpy.run_module('dtf.tune', run_name='__main__', alter_sys=True)\n")


def test_dtf_tune_refuses_an_unsupported_keras_tuner_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-c", BAD_KERAS_TUNER, "--tuner=grid", "--tune_base_lr=0.01",
                           "--epochs=1", f"--tune_dir={tmp_path / 'tune'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "dtf.tune: error: dtf does not support keras-tuner 9.9.0 (supported: >=1.4,<1.5); install the supported "
        "versions with `pip install -e .` (see BUILD_NOTES.md)"]


# ----------------------------------------------------------------------------------------------- canaries: names


def test_tensorflow_private_names_keep_their_shape():
    import tensorflow as tf
    from tensorflow.python.data.ops import interleave_op
    from tensorflow.python.eager import context

    from dtf.upstream import tensorflow as tf_upstream

    params = inspect.signature(interleave_op._ParallelInterleaveDataset).parameters
    assert {"buffer_output_elements", "prefetch_input_elements", "deterministic"} <= set(params)
    assert callable(context.context().set_config_key_value) and callable(context.context().get_config_key_value)
    assert callable(context.context().wait_at_barrier)  # tensorflow.wait_at_barrier (dtf.bench's last meeting)
    assert tf_upstream.supports_no_merge_call() in (True, False)
    source = tf.data.Dataset.range(6)
    assert tf_upstream.dataset_inputs(source.batch(2)) == [source]
    interleaved = tf_upstream.parallel_interleave(source, lambda i: tf.data.Dataset.from_tensors(i).repeat(2),
                                                  buffer_output_elements=2, prefetch_input_elements=1)
    assert [int(x) for x in interleaved] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_keras_private_names_keep_their_shape():
    import keras

    from dtf.upstream import keras as keras_upstream

    optimizer = keras.optimizers.SGD()
    for name in ("_all_reduce_sum_gradients", "_clip_gradients", "_get_variable_index", "_track_variable"):
        assert callable(getattr(optimizer, name)), name
    for name in ("_distribution_strategy", "_variables", "_trainable_variables", "_iterations"):
        assert hasattr(optimizer, name), name
    assert callable(keras_upstream.scale_loss_for_distribution)
    assert issubclass(keras_upstream.LossFunctionWrapper, keras.losses.Loss)
    assert callable(keras_upstream.no_automatic_dependency_tracking)
    assert callable(keras.Model._symbolic_build)


def test_a_built_model_is_not_fed_a_batch_to_build_it():
    """The symbolic-build patch pulls a batch only while Keras's `_symbolic_build` would read it (model, compiled
    metrics or loss unbuilt): once a model has trained, a `fit` under a strategy no longer starts and destroys an
    extra input pipeline."""
    import keras
    import numpy as np
    import tensorflow as tf

    from dtf.upstream import keras as keras_upstream

    keras_upstream.apply()  # as dtf.create_strategy does
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile("sgd", "mse", metrics=["mae"])
    assert keras_upstream._reads_a_batch(model)  # metrics and loss are built by the first batch
    started = []  # one entry per iterator over the dataset: its first element passes the counter once
    batches = tf.data.Dataset.from_tensors((np.zeros((4, 2), "float32"), np.zeros((4, 1), "float32"))).repeat()
    counter = tf.data.Dataset.from_tensors(0).map(
        lambda i: tf.numpy_function(lambda v: started.append(1) or v, [i], tf.int32))
    data = counter.flat_map(lambda _: batches)
    model.fit(data, steps_per_epoch=2, epochs=1, verbose=0)
    assert len(started) == 2 and not keras_upstream._reads_a_batch(model)  # the probe, then training
    model.fit(data, steps_per_epoch=2, epochs=1, verbose=0)
    assert len(started) == 3  # training only


def test_fit_starts_at_the_resume_epoch():
    """`set_resume_epoch` overrides fit's `initial_epoch` (Keras reads `Model._initial_epoch`)."""
    import keras
    import numpy as np

    from dtf.upstream import keras as keras_upstream

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x, y = np.zeros((4, 2), "float32"), np.zeros((4, 1), "float32")
    keras_upstream.set_resume_epoch(model, 2)
    assert len(model.fit(x, y, epochs=3, verbose=0).history["loss"]) == 1
    keras_upstream.set_resume_epoch(model, None)
    assert len(model.fit(x, y, epochs=3, verbose=0).history["loss"]) == 3


def test_keras_tuner_private_names_keep_their_shape():
    import keras_tuner as kt

    from dtf.upstream import keras_tuner as kt_upstream

    assert callable(kt.Tuner._populate_initial_space) and callable(kt.Tuner._is_worker)
    assert callable(kt.Oracle._get_oracle_fname) and callable(kt.oracles.GridSearchOracle._compare)
    assert {"CreateTrial", "EndTrial"} <= set(dir(kt_upstream.OracleServicer))
    from keras_tuner.src import config

    assert hasattr(config, "DEBUG")


def test_keras_tuner_state_files_are_written_atomically(tmp_path):
    """The oracle's state goes through the patched utils.save_json: a whole file, renamed into place, no leftovers."""
    import json
    from keras_tuner.src import utils

    from dtf.upstream import keras_tuner as kt_upstream

    assert utils.save_json is kt_upstream._save_json_atomically
    oracle = _grid_oracle(tmp_path)
    assert _run_trial(oracle) == 1
    oracle.save()
    files = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_file())
    assert files == ["oracle.json"], files
    assert json.loads((tmp_path / "sweep" / "oracle.json").read_text())["ongoing_trials"] == {}


# ----------------------------------------------------------------------------------------------- canaries: bugs


def _grid_oracle(directory):
    import keras_tuner as kt

    hp = kt.HyperParameters()
    hp.Choice("a", [1, 2, 3, 4])
    oracle = kt.oracles.GridSearchOracle(objective=kt.Objective("score", "max"), max_trials=10, hyperparameters=hp)
    oracle._set_project_dir(str(directory), "sweep")
    oracle.verbose = 0
    return oracle


def _run_trial(oracle):
    """Run one trial as a Tuner would; its value of `a`, or the oracle's status when it gives none."""
    trial = oracle.create_trial("tuner0")
    if trial.status != "RUNNING":
        return trial.status
    oracle.update_trial(trial.trial_id, {"score": float(trial.hyperparameters.values["a"])})
    trial.status = "COMPLETED"
    oracle.end_trial(trial)
    return trial.hyperparameters.values["a"]


def test_keras_tuner_still_loses_grid_order_on_reload(tmp_path):
    """keras-tuner 1.4.8: a reloaded sweep re-queues its finished trial and GridSearch fails with a KeyError
    (keras-team/keras-tuner#1055)."""
    assert _run_trial(_grid_oracle(tmp_path)) == 1
    reloaded = _grid_oracle(tmp_path)
    reloaded.reload()
    assert "00" in reloaded._retry_queue, (
        "upstream fixed the re-queued finished trial: drop that repair in dtf/upstream/keras_tuner.py "
        "(repair_reloaded_oracle)")
    try:
        [_run_trial(reloaded) for _ in range(4)]
    except KeyError:
        return
    pytest.fail("upstream fixed keras-team/keras-tuner#1055: remove _rebuild_grid_order in dtf/upstream/keras_tuner.py")


def test_repaired_grid_sweep_resumes_where_it_stopped(tmp_path):
    from dtf.upstream import keras_tuner as kt_upstream

    assert _run_trial(_grid_oracle(tmp_path)) == 1
    reloaded = _grid_oracle(tmp_path)
    reloaded.reload()
    kt_upstream.repair_reloaded_oracle(reloaded)
    assert [_run_trial(reloaded) for _ in range(4)] == [2, 3, 4, "STOPPED"]
