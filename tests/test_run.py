"""`python -m dtf.run` end to end: the default experiment, outputs, re-running flags.txt, TensorBoard through a real
server, one_device vs mirrored weights, multi-worker, and one-line errors for bad input."""
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from dtf.cluster.tf_config import free_ports
from helpers import max_weight_delta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_FLAGS = os.path.join(REPO, "experiments", "shapes_mirrored.flags")
QUICK = ["--epochs=2", "--steps_per_epoch=20", "--log_every_steps=5"]


def run(args, timeout=600, env=None, cwd=None):
    full_env = dict(os.environ, PYTHONPATH=REPO)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "dtf.run", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The embedded default experiment, shortened to 3 epochs."""
    model_dir = tmp_path_factory.mktemp("default") / "run"
    proc = run([f"--flagfile={DEFAULT_FLAGS}", f"--model_dir={model_dir}", "--epochs=3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model_dir, proc


def test_default_experiment_learns_and_writes_outputs(default_run):
    model_dir, proc = default_run
    summary = json.loads((model_dir / "summary.json").read_text())
    for key in ("dataset", "model", "strategy", "num_replicas", "num_workers", "global_batch_size",
                "per_replica_batch_size", "base_lr", "peak_lr", "warmup_epochs", "epochs", "steps_per_epoch",
                "final_metrics", "examples_per_sec", "wall_time_s", "versions"):
        assert key in summary, key
    assert summary["num_replicas"] == 4 and summary["global_batch_size"] == 128
    assert summary["per_replica_batch_size"] == 32
    assert summary["peak_lr"] == pytest.approx(0.003 * (128 / 64) ** 0.5)
    assert summary["final_metrics"]["val_accuracy"] > 0.6  # 6 classes: chance is 0.17
    assert (model_dir / "model.keras").exists() and (model_dir / "flags.txt").exists()
    assert "Traceback" not in proc.stderr and "cudart" not in proc.stderr
    assert "tensorboard --logdir" in proc.stdout


def test_flags_txt_reruns_to_the_same_result(default_run, tmp_path):
    model_dir, _ = default_run
    again = tmp_path / "again"
    proc = run([f"--flagfile={model_dir / 'flags.txt'}", f"--model_dir={again}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((model_dir / "summary.json").read_text())["final_metrics"]
    second = json.loads((again / "summary.json").read_text())["final_metrics"]
    assert second["val_loss"] == pytest.approx(first["val_loss"], abs=1e-5)
    assert second["val_accuracy"] == pytest.approx(first["val_accuracy"], abs=1e-6)


def test_tensorboard_server_shows_the_scalars(default_run):
    model_dir, _ = default_run
    port = free_ports(1)[0]
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", f"--logdir={model_dir / 'tensorboard'}",
                               "--host=127.0.0.1", f"--port={port}", "--load_fast=false"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline, tags = time.time() + 90, {}
        while time.time() < deadline:
            try:
                tags = json.load(urllib.request.urlopen(f"{base}/data/plugin/scalars/tags", timeout=5))
                if tags.get("train") and "epoch_learning_rate" in tags["train"]:
                    break
            except OSError:
                pass
            time.sleep(1)
        train_tags = set(tags.get("train", {}))
        assert {"learning_rate", "examples_per_sec", "step_time_ms", "epoch_learning_rate", "epoch_loss",
                "epoch_examples_per_sec",
                "epoch_accuracy"} <= train_tags, train_tags

        def points(run_name, tag):
            url = f"{base}/data/plugin/scalars/scalars?run={run_name}&tag={tag}"
            return json.load(urllib.request.urlopen(url, timeout=10))

        steps = 62  # shapes train 8000 // 128
        assert len(points("train", "epoch_loss")) == 3
        assert len(points("train", "epoch_learning_rate")) == 3
        assert len(points("train", "learning_rate")) == 3 * (steps // 10)
        assert len(points("validation", "epoch_accuracy")) == 3
        request = urllib.request.Request(f"{base}/data/plugin/hparams/experiment",
                                         data=json.dumps({"experimentName": ""}).encode(),
                                         headers={"Content-Type": "application/json"})
        hparams = {h["name"]: h for h in json.load(urllib.request.urlopen(request, timeout=10))["hparamInfos"]}
        assert {"global_batch_size", "base_lr", "lr_scaling", "strategy"} <= set(hparams)
    finally:
        server.kill()
        server.wait()


def test_one_device_equals_mirrored_at_the_same_global_batch(tmp_path):
    common = [f"--flagfile={DEFAULT_FLAGS}", "--model=mlp", "--global_batch_size=64", *QUICK]
    one = run([*common, "--strategy=one_device", "--num_cpu_devices=1", f"--model_dir={tmp_path / 'one'}"])
    four = run([*common, "--strategy=mirrored", "--num_cpu_devices=4", f"--model_dir={tmp_path / 'four'}"])
    assert one.returncode == 0, one.stderr[-2000:]
    assert four.returncode == 0, four.stderr[-2000:]
    assert max_weight_delta(tmp_path / "one" / "model.keras", tmp_path / "four" / "model.keras") < 1e-5


@pytest.mark.slow
def test_multi_worker_run_matches_single_device(tmp_path):
    from dtf.cluster import procs
    # batch sharding: the workers train on exactly the single-device batch sequence (the default file sharding
    # gives each worker its own files, a different but equally valid order).
    common = [f"--flagfile={DEFAULT_FLAGS}", "--model=mlp", "--global_batch_size=64", *QUICK,
              "--num_cpu_devices=1", "--input_sharding=batch"]
    single = run([*common, "--strategy=one_device", f"--model_dir={tmp_path / 'single'}"])
    assert single.returncode == 0, single.stderr[-2000:]
    env = dict(os.environ, PYTHONPATH=REPO)
    result = procs.run_local_workers([sys.executable, "-m", "dtf.run", *common, "--strategy=multi_worker",
                                      f"--model_dir={tmp_path / 'multi'}"], 2, env=env, cwd=str(tmp_path),
                                     timeout_s=600)
    assert result.ok, result.report()
    s1 = json.loads((tmp_path / "single" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert s2["num_workers"] == 2 and s2["num_replicas"] == 2 and s2["global_batch_size"] == 64
    for key in ("loss", "val_loss", "val_accuracy"):
        assert s2["final_metrics"][key] == pytest.approx(s1["final_metrics"][key], abs=1e-4), key
    assert max_weight_delta(tmp_path / "single" / "model.keras", tmp_path / "multi" / "model.keras") < 1e-5
    # Only the chief wrote: the model_dir holds exactly the chief's outputs.
    assert sorted(os.listdir(tmp_path / "multi")) == ["backup", "flags.txt", "model.keras", "summary.json",
                                                      "tensorboard"]


def test_checkpoints_every_n_epochs_and_no_stray_files(tmp_path):
    model_dir = tmp_path / "run"
    proc = run([f"--flagfile={DEFAULT_FLAGS}", "--model=mlp", "--strategy=one_device", "--num_cpu_devices=1",
                "--epochs=4", "--steps_per_epoch=5", "--warmup_epochs=0", "--checkpoint_every=2",
                f"--model_dir={model_dir}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(os.listdir(model_dir / "checkpoints")) == ["epoch_002.keras", "epoch_004.keras"]


# End to end through the real command line: a flag error (no TensorFlow loaded), an error found once TensorFlow
# and the data are up, a batch that does not fit the data, and a diverged run (its own status). The other bad-input
# cases are tested in process in tests/test_flags.py.
@pytest.mark.parametrize("args, words, status", [
    (["--no_such_flag=1"], ["Unknown command line flag 'no_such_flag'"], 2),
    (["--dataset=imagenet9"], ["imagenet9"], 2),
    (["--dataset=synthetic/8x8x1", "--model=mlp", "--global_batch_size=16384"],
     ["fewer than one global batch (--global_batch_size=16384); lower --global_batch_size to at most"], 2),
    (["--base_lr=1e6", "--optimizer=sgd", "--epochs=1", "--steps_per_epoch=5", "--lr_schedule=constant",
      "--warmup_epochs=0"],
     ["training diverged", "lower --base_lr, add --warmup_epochs, or set --global_clipnorm"], 3),
])
def test_bad_input_is_one_line_with_its_exit_status(tmp_path, args, words, status):
    model_dir = tmp_path / "run"
    proc = run([f"--flagfile={DEFAULT_FLAGS}", "--num_cpu_devices=1", "--strategy=one_device",
                f"--model_dir={model_dir}", *args], timeout=300)
    assert proc.returncode == status, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dtf.run: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert all(w in errors[0] for w in words), errors[0]
    assert "Traceback" not in proc.stderr
    assert not (model_dir / "summary.json").exists() and not (model_dir / "model.keras").exists()
