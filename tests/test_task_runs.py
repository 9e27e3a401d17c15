"""User tasks end to end, as users run them: the README's example as written, the two examples, one device vs
mirrored vs 2 real workers (dtf.launch), a SIGKILLed worker resuming, dtf.tune on a regression objective, and
one-line errors for a bad --task."""
import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest

from helpers import Launcher, launch_to_success, max_weight_delta, model_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_TASK = f"{REPO}/tests/tasks_for_tests.py:Regression"


def run(module, args, cwd=REPO, timeout=600):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)


def summary(model_dir):
    return json.loads((model_dir / "summary.json").read_text())


def weights(path):
    import tasks_for_tests  # noqa: F401  (registers the task's losses)

    return model_weights(path)


def test_readme_task_example_runs_as_written(tmp_path):
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme[readme.index("## Your own model and data: `dtf.Task`"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    command = shlex.split(re.search(r"```bash\n(.*?)\n", section, re.S).group(1))
    assert code.startswith("# my_task.py") and command[:3] == ["python", "-m", "dtf.run"]
    (tmp_path / "my_task.py").write_text(code)
    proc = run("dtf.run", command[3:], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    model_dir = tmp_path / "runs" / "my_task"
    result = summary(model_dir)
    print(f"README task: val_accuracy={result['final_metrics']['val_accuracy']:.3f}")
    assert result["task"] == f"{tmp_path}/my_task.py:MyTask" and result["num_replicas"] == 2
    assert result["final_metrics"]["val_accuracy"] > 0.8  # 2 classes, chance 0.5
    flags_txt = (model_dir / "flags.txt").read_text()
    assert f"--task={tmp_path}/my_task.py:MyTask\n--hidden_units=64\n" in flags_txt


def test_tabular_regression_example_learns_and_records_its_flags(tmp_path):
    csv_path, model_dir = tmp_path / "houses.csv", tmp_path / "run"
    proc = run("dtf.run", ["--flagfile=experiments/tabular_regression.flags", "--epochs=4", f"--csv_path={csv_path}",
                           f"--model_dir={model_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(csv_path) as f:
        prices = np.array([float(row["price_k"]) for row in csv.DictReader(f)])
    cut = int(len(prices) * 0.8)
    baseline = float(np.mean(np.abs(prices[cut:] - prices[:cut].mean())))  # predict the training mean
    mae = summary(model_dir)["final_metrics"]["val_mean_absolute_error"]
    print(f"tabular regression: val MAE {mae:.2f} vs {baseline:.2f} predicting the mean")
    assert mae < 0.25 * baseline
    flags_txt = (model_dir / "flags.txt").read_text()
    for line in ("--task=examples.tabular_regression:HousePrices", f"--csv_path={csv_path}", "--hidden_units=64",
                 "--validation_fraction=0.2"):
        assert line + "\n" in flags_txt, line
    helped = run("dtf.run", ["--task=examples.tabular_regression:HousePrices", "--help"])
    assert helped.returncode == 0 and "--csv_path" in helped.stdout and "--hidden_units" in helped.stdout


RELOAD = """
import sys
sys.path.insert(0, os.path.join(REPO, "examples"))
import keras, numpy as np
import image_and_side_feature as example  # registers SmoothedCrossEntropy and QuadrantAccuracy
model = keras.models.load_model(os.path.join(OUT, "run", "model.keras"))
x, y = example.make_data(NUM_VALIDATION, seed=2)
print(json.dumps(model.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)))
"""


def test_two_input_example_with_custom_loss_and_metric_reloads(tmp_path, run_python):
    proc = run("dtf.run", ["--flagfile=experiments/image_and_side_feature.flags", "--epochs=2", "--num_train=1536",
                           "--num_validation=300", f"--model_dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = summary(tmp_path / "run")["final_metrics"]
    assert trained["val_accuracy"] > 0.5 and trained["val_quadrant_accuracy"] > 0.5  # 8 and 4 classes
    reloaded = json.loads(run_python(f"REPO = {REPO!r}\nNUM_VALIDATION = 300\n" + RELOAD).stdout.splitlines()[-1])
    print(f"two inputs: trained {trained}, reloaded {reloaded}")
    for key in ("loss", "accuracy", "quadrant_accuracy"):
        assert reloaded[key] == pytest.approx(trained[f"val_{key}"], abs=1e-4), key


# --- the documented-API test task: one device, mirrored ×4 and ×2, 2 real workers, and a SIGKILL ---------------------

COMMON = [f"--task={TEST_TASK}", "--test_hidden=16", "--global_batch_size=32", "--epochs=3", "--optimizer=sgd",
          "--momentum=0.9", "--base_lr=0.05", "--lr_scaling=none", "--warmup_steps=5", "--checkpoint_every=1",
          "--input_sharding=batch", "--backup_every_steps=5"]


def _dtf_run(model_dir, *extra):
    return [sys.executable, "-m", "dtf.run", *COMMON, *extra, f"--model_dir={model_dir}"]


@pytest.fixture(scope="module")
def task_runs(tmp_path_factory):
    """The test task at global batch 32 (10 steps/epoch, 3 epochs) under four layouts; epoch_001.keras holds the
    weights after 10 steps."""
    root = tmp_path_factory.mktemp("task_runs")
    for name, extra in (("one", ["--strategy=one_device", "--num_cpu_devices=1"]),
                        ("four", ["--strategy=mirrored", "--num_cpu_devices=4"]),
                        ("two", ["--strategy=mirrored", "--num_cpu_devices=2"])):
        proc = run("dtf.run", _dtf_run(root / name, *extra)[3:])
        assert proc.returncode == 0, proc.stderr[-3000:]
    launch_to_success(["--num_workers=2", "--timeout=300", "--", *_dtf_run(root / "workers")], root, 320)
    return root


@pytest.mark.slow
def test_task_matches_one_device_and_is_bit_exact_at_the_same_replica_count(task_runs):
    after_10 = {name: weights(task_runs / name / "checkpoints" / "epoch_001.keras")
                for name in ("one", "four", "workers")}
    four = max_weight_delta(after_10["four"], after_10["one"])
    workers = max_weight_delta(after_10["workers"], after_10["one"])
    final = max_weight_delta(weights(task_runs / "workers" / "model.keras"), weights(task_runs / "two" / "model.keras"))
    print(f"after 10 steps vs one device: mirrored×4 {four:.2e}, 2 workers {workers:.2e}; "
          f"after 3 epochs, 2 workers vs mirrored×2: {final:.2e}")
    assert four < 1e-5 and workers < 1e-5
    assert final == 0.0
    workers_summary = summary(task_runs / "workers")
    assert workers_summary["num_workers"] == 2 and workers_summary["task"] == TEST_TASK
    assert sorted(os.listdir(task_runs / "workers")) == ["backup", "checkpoints", "flags.txt", "model.keras",
                                                         "summary.json", "tensorboard"]


@pytest.mark.slow
def test_sigkilled_worker_resumes_the_task_to_the_uninterrupted_result(task_runs, tmp_path):
    killed_dir = tmp_path / "killed"
    launcher = Launcher(["--num_workers=2", "--max_restarts=1", "--timeout=300", "--", *_dtf_run(killed_dir)],
                        str(tmp_path))
    try:
        launcher.wait_for_mid_epoch_backup(killed_dir, epoch=1, timeout_s=240)  # the chief's first in epoch 2
        launcher.snapshot()
        os.kill(launcher.workers[1][1], signal.SIGKILL)
        assert launcher.wait(300) == 0, launcher.output
    finally:
        launcher.cleanup()
    resumed = re.search(r"resuming from the backup in .*: epoch 2, step (\d+)", launcher.output)
    assert resumed and 0 < int(resumed.group(1)) < 10, launcher.output
    diff = max_weight_delta(weights(killed_dir / "model.keras"), weights(task_runs / "workers" / "model.keras"))
    print(f"task resumed at epoch 2 step {resumed.group(1)}; max |Δw| vs uninterrupted = {diff:.2e}")
    assert diff < 1e-5
    assert launcher.leftovers() == []


# --- dtf.tune on a user task with a regression objective -----------------------------------------------------------

@pytest.mark.slow
def test_tune_task_on_a_regression_objective_and_train_the_best(tmp_path):
    tune_dir = tmp_path / "sweep"
    proc = run("dtf.tune", [f"--task={TEST_TASK}", "--test_hidden=8", "--global_batch_size=32", "--epochs=2",
                            "--optimizer=adam", "--lr_scaling=none", "--tune_base_lr=0.003,0.03", "--tuner=grid",
                            "--objective=val_mean_absolute_error", f"--tune_dir={tune_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tune_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["completed", "completed"]
    best = min(rows, key=lambda r: float(r["objective"]))  # inferred: an error is minimized
    best_flags = (tune_dir / "best.flags").read_text()
    assert f"--task={TEST_TASK}\n--test_hidden=8\n" in best_flags and f"--base_lr={best['base_lr']}" in best_flags
    again = run("dtf.run", [f"--flagfile={tune_dir / 'best.flags'}", f"--model_dir={tmp_path / 'best'}"])
    assert again.returncode == 0, again.stderr[-3000:]
    reached = summary(tmp_path / "best")["final_metrics"]["val_mean_absolute_error"]
    print(f"tune: best trial {best['trial']} val_mean_absolute_error={float(best['objective']):.5f}; "
          f"dtf.run on best.flags: {reached:.5f}")
    assert reached == pytest.approx(float(best["objective"]), abs=1e-4)
    (tmp_path / "sweep2").mkdir()
    wrong = run("dtf.tune", [f"--task={TEST_TASK}", "--global_batch_size=32", "--epochs=1", "--tune_base_lr=0.01",
                             "--objective=val_nope_error", f"--tune_dir={tmp_path / 'sweep2'}"])
    assert wrong.returncode == 2, wrong.stderr[-2000:]
    assert wrong.stderr.strip().splitlines()[-1].startswith(
        "dtf.tune: error: --objective=val_nope_error is not a metric this task's model reports; choose one of: "
        "loss, mean_absolute_error, val_loss, val_mean_absolute_error")


# --- bad input ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--task=no_such_task_module_dtf:T"], "--task=no_such_task_module_dtf:T: no module named"),
    ([f"--task={TEST_TASK}", "--model=mlp"], f"--task={TEST_TASK} replaces the built-in task"),
    (["--task=tests/tasks_for_tests.py:data"], "is a function, not a dtf.Task subclass"),
])
def test_bad_task_is_one_line_exit_2_and_writes_nothing(tmp_path, args, words):
    proc = run("dtf.run", [*args, f"--model_dir={tmp_path / 'out'}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("dtf.run: error: ") and words in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
