"""The side-car evaluator beside a 2-worker `dtf.launch`: every checkpoint scored exactly once, each score equal to
`model.evaluate` of that checkpoint loaded by itself, TensorBoard points at the checkpoints' training steps (read back
from a real TensorBoard server on 127.0.0.1), the best checkpoint kept."""
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request

import keras
import pytest

import tasks_for_tests
from dtf.cluster.tf_config import free_ports

TOL = 1e-5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH, EPOCHS = 10, 3  # 320 training examples at global batch 32


def _scalars(logdir, run_name, tag, count):
    """(step, value) points of one tag, read from a real TensorBoard server on loopback."""
    port = free_ports(1)[0]
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", f"--logdir={logdir}", "--host=127.0.0.1",
                               f"--port={port}", "--load_fast=false"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run={run_name}&tag={tag}"
    try:
        deadline, points = time.time() + 90, []
        while time.time() < deadline and len(points) < count:
            try:
                points = json.load(urllib.request.urlopen(url, timeout=5))
            except OSError:
                pass
            time.sleep(1)
        return [(step, value) for _, step, value in points]
    finally:
        server.kill()
        server.wait()


@pytest.mark.slow
def test_evaluator_beside_two_workers_scores_every_checkpoint_once(tmp_path):
    model_dir = tmp_path / "run"
    run = [sys.executable, "-m", "dtf.run", f"--task={os.path.abspath(tasks_for_tests.__file__)}:Regression",
           f"--epochs={EPOCHS}", "--checkpoint_every=1", f"--model_dir={model_dir}", "--global_batch_size=32",
           "--base_lr=0.05", "--lr_scaling=none", "--best_metric=mean_absolute_error"]
    proc = subprocess.run([sys.executable, "-m", "dtf.launch", "--num_workers=2", "--timeout=400",
                           f"--evaluator={shlex.join(run)}", "--", *run], capture_output=True, text=True,
                          timeout=450, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = sorted(os.listdir(model_dir / "checkpoints"))
    assert names == [f"epoch_{e:03d}.keras" for e in range(1, EPOCHS + 1)]
    for name in names:
        assert proc.stdout.count(f"[evaluator] dtf: evaluated {name} at step") == 1, proc.stdout[-3000:]
    assert "[evaluator] dtf: strategy=" not in proc.stdout  # it never built the workers' MultiWorkerMirroredStrategy
    results = json.loads((model_dir / "eval_results.json").read_text())
    assert sorted(results["checkpoints"]) == names
    assert [results["checkpoints"][n]["step"] for n in names] == [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)]

    x, y = tasks_for_tests.data(tasks_for_tests.NUM_VALIDATION, 1)
    for name in names:
        alone = keras.saving.load_model(model_dir / "checkpoints" / name).evaluate(x, y, verbose=0, return_dict=True)
        scored = results["checkpoints"][name]["metrics"]
        assert set(scored) == set(alone) and all(abs(scored[k] - alone[k]) < TOL for k in alone), (name, scored, alone)

    best = min(names, key=lambda n: results["checkpoints"][n]["metrics"]["mean_absolute_error"])
    assert results["best"]["checkpoint"] == best and results["best"]["metric"] == "mean_absolute_error"
    assert (model_dir / "best.keras").read_bytes() == (model_dir / "checkpoints" / best).read_bytes()

    points = _scalars(model_dir / "tensorboard", "eval", "eval_loss", len(names))
    assert [step for step, _ in points] == [results["checkpoints"][n]["step"] for n in names]
    assert all(abs(value - results["checkpoints"][n]["metrics"]["loss"]) < TOL for (_, value), n in zip(points, names))


def test_launch_gives_the_evaluator_its_own_task_in_every_tf_config():
    from dtf.cluster import tf_config as cluster_lib
    from dtf import launch

    configs = launch.tf_configs(["127.0.0.1:1", "127.0.0.1:2"], "127.0.0.1:3")
    infos = [cluster_lib.parse_tf_config(c) for c in configs]
    assert [(i.task_type, i.task_index, i.is_chief) for i in infos] == [
        ("worker", 0, True), ("worker", 1, False), ("evaluator", 0, False)]
    assert all(i.cluster["evaluator"] == ["127.0.0.1:3"] and i.num_workers == 2 for i in infos)


def test_launch_names_the_evaluator_as_such(capfd):
    """Two workers and an evaluator: the launcher says so, and names the third process 'evaluator' everywhere, also
    when it is the one that failed."""
    from dtf import launch

    worker = [sys.executable, "-c", "print('hello')"]
    evaluator = [sys.executable, "-c", "import sys; print('scored'); sys.exit(1)"]
    assert launch.launch(worker, 2, evaluator=evaluator, timeout_s=60) == 1
    out, err = capfd.readouterr()
    assert "launch: starting 2 worker(s) and an evaluator on 127.0.0.1:" in err, err
    assert "launch: evaluator pid" in err and "worker 2" not in err + out, err
    assert "[evaluator] scored" in out and "launch: evaluator (pid" in err and "died: exit code 1" in err, err


@pytest.mark.parametrize("value, words", [("", "--evaluator is empty"),
                                          ("'unclosed", "is not a shell-quoted command")])
def test_bad_evaluator_command_is_one_line_exit_2(capsys, value, words):
    from dtf import launch

    assert launch.main(["dtf.launch", "--num_workers=2", f"--evaluator={value}", "--", "python"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dtf.launch: error: ") and len(err.splitlines()) == 1 and words in err, err


def test_finished_run_is_scored_once_and_a_restart_scores_nothing_again(tmp_path):
    """`--mode=evaluate_continuously` on a run that already ended: it scores its checkpoints and returns; run again,
    it finds them in eval_results.json and writes nothing new."""
    from dtf.experiment import evaluator
    from dtf.experiment import train
    from dtf.config.config import Config

    config = Config(task=f"{os.path.abspath(tasks_for_tests.__file__)}:Regression", epochs=2, checkpoint_every=1,
                    global_batch_size=32, base_lr=0.05, lr_scaling="none", model_dir=str(tmp_path), strategy="default")
    train.run_experiment(config)
    results = evaluator.evaluate_continuously(config, "mean_absolute_error", "min")
    assert [c["step"] for c in results["checkpoints"].values()] == [10, 20]
    written = (tmp_path / "eval_results.json").read_text()
    assert json.loads(written) == json.loads(json.dumps(results))
    assert evaluator.evaluate_continuously(config, "mean_absolute_error", "min") == json.loads(written)
    assert (tmp_path / "eval_results.json").read_text() == written


EVALUATOR_SCRIPT = r'''
import contextlib, io, json, sys
from absl import flags
from dtf import run
results = []
for argv in json.loads(sys.argv[1]):
    flags.FLAGS.unparse_flags()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run.main(["dtf.run", "--mode=evaluate_continuously", *argv])
    results.append([code, err.getvalue()])
print(json.dumps(results))
'''


def test_evaluator_with_only_model_dir_reads_the_run(tmp_path):
    """`--mode=evaluate_continuously --model_dir=RUN` alone takes the run's --task and task flags from its
    flags.txt: the task module is imported (the checkpoints' registered custom loss loads) and the scores equal the
    evaluator's with that task given. Another --dataset is one line naming it, and writes nothing."""
    import shutil

    from absl import flags

    from dtf.experiment import evaluator
    from dtf.experiment import train
    from dtf.config.config import Config

    run, other = tmp_path / "run", tmp_path / "other"
    config = Config(task=f"{os.path.abspath(tasks_for_tests.__file__)}:Regression", task_flags=("--test_loss=mean",),
                    epochs=2, checkpoint_every=1, global_batch_size=32, base_lr=0.05, lr_scaling="none",
                    model_dir=str(run), strategy="default")
    flags.FLAGS["test_loss"].value = "mean"  # what --test_loss=mean does to the task (flags are not parsed here)
    try:
        train.run_experiment(config)
        shutil.copytree(run, other)
        shutil.copytree(run, tmp_path / "reference")
        files = sorted(p for p in other.rglob("*"))
        reference = evaluator.evaluate_continuously(config.replace(model_dir=str(tmp_path / "reference")))
    finally:
        flags.FLAGS["test_loss"].value = "per_example"
    assert "--test_loss=mean" in (run / "flags.txt").read_text()
    cases = [[f"--model_dir={run}"], [f"--model_dir={other}", "--dataset=synthetic"]]
    proc = subprocess.run([sys.executable, "-c", EVALUATOR_SCRIPT, json.dumps(cases)], capture_output=True,
                          text=True, timeout=240, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (alone, alone_err), (wrong, wrong_err) = json.loads(proc.stdout.splitlines()[-1])
    assert alone == 0, alone_err
    scored = json.loads((run / "eval_results.json").read_text())
    assert list(scored["checkpoints"]) == list(reference["checkpoints"]) == ["epoch_001.keras", "epoch_002.keras"]
    for name, result in scored["checkpoints"].items():
        assert result["step"] == reference["checkpoints"][name]["step"]
        for metric, value in reference["checkpoints"][name]["metrics"].items():
            assert result["metrics"][metric] == pytest.approx(value, abs=TOL), (name, metric)
    assert wrong == 2 and wrong_err.count("\n") == 1 and "Traceback" not in wrong_err, wrong_err
    assert wrong_err.startswith(f"dtf.run: error: {other}/checkpoints/epoch_001.keras on --dataset=synthetic: the "
                                "model does not accept the data: features (") and \
        wrong_err.endswith("model inputs (None, 8); give the --task or --dataset it was trained on\n"), wrong_err
    assert sorted(p for p in other.rglob("*")) == files  # nothing written
