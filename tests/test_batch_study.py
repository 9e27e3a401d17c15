"""dtf.batch_study at tiny size: the table, CSV and plot come out of a real ladder of runs, and bad input is one line."""
import csv
import re
import subprocess
import sys

import pytest

import dtf
from dtf import batch_study


def study(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "dtf.batch_study", "--dataset=digits", "--model=mlp",
                           "--strategy=mirrored", "--num_cpu_devices=2", "--optimizer=sgd", "--base_lr=0.2",
                           "--reference_batch_size=32", "--epochs=2", f"--study_dir={tmp_path}",
                           *args], capture_output=True, text=True, timeout=600)


def test_tiny_study_writes_table_csv_and_plot(tmp_path):
    proc = study(tmp_path, "--batches=32,128", "--rules=none,linear_warmup,lars", "--target_accuracy=0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["global_batch_size"], r["rule"]) for r in rows] == [
        ("32", "none"), ("32", "linear_warmup"), ("32", "lars"), ("128", "none"), ("128", "linear_warmup"),
        ("128", "lars")]
    peak = {(r["global_batch_size"], r["rule"]): float(r["peak_lr"]) for r in rows}
    assert peak[("128", "none")] == pytest.approx(0.2) and peak[("128", "linear_warmup")] == pytest.approx(0.8)
    assert peak[("32", "lars")] == peak[("128", "lars")] == pytest.approx(0.3)
    assert all(float(r["gradient_noise_scale"]) > 0 for r in rows)  # 2 replicas: measured on every run
    assert max(float(r["val_accuracy"]) for r in rows) > 0.5  # digits: chance is 0.1
    for r in rows:  # steps to target = the first epoch reaching it × that run's steps per epoch
        if r["epochs_to_target"]:
            assert int(r["steps_to_target"]) % int(r["epochs_to_target"]) == 0
    table = (tmp_path / "table.md").read_text()
    assert "| global_batch_size | rule |" in table and "B_noise (gradient noise scale) " in table
    png = (tmp_path / "batch_scaling.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 10_000


def test_first_reaching():
    assert batch_study.first_reaching([0.1, 0.6, 0.9], 0.5) == 2
    assert batch_study.first_reaching([0.1, 0.2], 0.5) is None


@pytest.mark.parametrize("args, words", [
    (([], ["none"], 0.5), "--batches is required"),
    ((["32", "x"], ["none"], 0.5), "--batches=32,x must be integers"),
    ((["32"], ["cubic"], 0.5), "--rules=cubic must be some of"),
    ((["32"], ["none"], 2.0), "--target_accuracy=2.0 must be in (0, 1]"),
])
def test_bad_input_names_the_flag(args, words):
    from dtf.config import config as config_lib

    with pytest.raises(dtf.UserError, match=re.escape(words)):
        batch_study._check(config_lib.Config(), *args)


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    proc = study(tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].endswith("--batches is required: the global batch sizes to train, "
                                                         "e.g. --batches=64,128,256")
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("batches, words", [
    ([32, 34], "--batches=32,34: 34 is not divisible by the 4 replicas; use multiples of 4"),
    ([32, 4000], "--batches=32,4000: global batch 4000: the training data has 1437 examples, fewer than one global "
                 "batch (--batches=4000); lower --batches to at most"),
])
def test_the_whole_grid_is_checked_before_any_run(mirrored4, tmp_path, batches, words):
    """A bad batch late in the ladder stops the study before its first run trains or writes anything."""
    from dtf.config import config as config_lib

    config = config_lib.Config(dataset="digits", model="mlp", epochs=1)
    with pytest.raises(dtf.UserError) as e:
        batch_study.run_study(config, batches, ["none", "linear"], 0.5, str(tmp_path / "study"), strategy=mirrored4)
    assert e.value.as_flags().startswith(words), e.value.as_flags()
    assert not (tmp_path / "study").exists()
