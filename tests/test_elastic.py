"""Elastic resume (issue 23, dtf.experiment.elastic): a 3-worker run stopped by SIGTERM at a mid-epoch step resumes on
2 workers, or on mirrored × 4 in one process, at the same global batch: every id of the interrupted epoch is trained
on exactly once (recorded by the train step itself, tests/elastic_task.py), with --input_sharding=batch the weights
match the uninterrupted 3-worker run, and the change shows in summary.json, TensorBoard and the progress line. A
global-batch change on resume is refused in one line (exit 2). The data layer's rest-of-pass for files and records
sharding, including layouts whose passes differ in length, is checked in-process.
"""
import collections
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import elastic_task
from helpers import (Launcher, PipelineStrategy, launch_env, max_weight_delta, model_weights, parse_id, write_id_files,
                     write_script)
from dtf.distribute import inputs

EPOCH = elastic_task.NUM_TRAIN // 12  # steps per epoch (one pass) at the global batch of 12
RUN = ["python", "-m", "dtf.run", f"--task={os.path.abspath(elastic_task.__file__)}:IdTask", "--global_batch_size=12",
       "--epochs=2", "--backup_every_steps=2", "--warmup_epochs=0", "--base_lr=1", "--progress=epoch",
       "--cluster_timeout=60"]


@contextlib.contextmanager
def _ids_to(directory):
    """Processes started inside record their trained ids in `directory` (elastic_task reads ELASTIC_IDS_DIR)."""
    os.makedirs(directory, exist_ok=True)
    os.environ["ELASTIC_IDS_DIR"] = str(directory)
    try:
        yield
    finally:
        del os.environ["ELASTIC_IDS_DIR"]


def _launch(args, cwd, ids_dir, step_s="0"):
    with _ids_to(ids_dir):
        os.environ["ELASTIC_STEP_S"] = step_s
        try:
            return Launcher(list(args), str(cwd))
        finally:
            del os.environ["ELASTIC_STEP_S"]


def _finish(launcher, timeout_s=240) -> str:
    try:
        assert launcher.wait(timeout_s) == 0, launcher.output
        return launcher.output
    finally:
        launcher.cleanup()


def _stopped_mid_epoch(tmp, sharding):
    """3 workers, SIGTERM to the launcher (passed on: an agreed stop) once the backup is mid-way through epoch 2."""
    model_dir = tmp / "run"
    job = _launch(["--num_workers=3", "--timeout=200", "--", *RUN, f"--model_dir={model_dir}",
                   f"--input_sharding={sharding}"], tmp, tmp / "ids-before", step_s="0.25")
    try:
        job.wait_for_mid_epoch_backup(model_dir, epoch=1, timeout_s=180)
        job.proc.send_signal(15)
        assert job.wait(60) == 143, job.output
    finally:
        job.cleanup()
    meta = json.loads((model_dir / "backup" / "training_metadata.json").read_text())
    assert meta["epoch"] == 1 and 0 < meta["steps_done"] < EPOCH, meta
    assert (meta["layout"]["workers"], meta["layout"]["replicas"]) == (3, 3)
    return model_dir, meta["steps_done"]


def _resume(tmp, model_dir, sharding, *layout):
    """Rerun the same command on another layout: ("launch", N) workers, or ("mirrored", 4) in one process."""
    command = [*RUN, f"--model_dir={model_dir}", f"--input_sharding={sharding}"]
    if layout[0] == "launch":
        return _finish(_launch([f"--num_workers={layout[1]}", "--timeout=200", "--", *command], tmp, tmp / "ids-after"))
    with _ids_to(tmp / "ids-after"):
        proc = subprocess.run([sys.executable, *command[1:], "--strategy=mirrored", f"--num_cpu_devices={layout[1]}"],
                              cwd=tmp, env=launch_env(ELASTIC_STEP_S="0"), capture_output=True, text=True,
                              timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _ids_of_interrupted_epoch(tmp):
    """The ids the train steps of epoch 2 trained on: the first run's after its epoch 1, then all of the rerun's."""
    before = elastic_task.trained_ids(tmp / "ids-before")
    assert len(before) == 3, before.keys()
    first_epoch = collections.Counter(i for lines in before.values() for line in lines[:EPOCH] for i in line)
    assert sorted(first_epoch) == list(range(elastic_task.NUM_TRAIN)) and set(first_epoch.values()) == {1}
    after = elastic_task.trained_ids(tmp / "ids-after")
    return collections.Counter([i for lines in before.values() for line in lines[EPOCH:] for i in line]
                               + [i for lines in after.values() for line in lines for i in line])


def _check_ids_once(tmp, label):
    seen = _ids_of_interrupted_epoch(tmp)
    assert sorted(seen) == list(range(elastic_task.NUM_TRAIN)), sorted(set(range(elastic_task.NUM_TRAIN)) - set(seen))
    assert set(seen.values()) == {1}, {i: n for i, n in seen.items() if n != 1}
    print(f"{label}: the interrupted epoch trained on {len(seen)} ids, each once")


_REBUILT = "the {} steps left of pass 2 are rebuilt from the old layout's 3 share(s) by records"


def _check_outputs(model_dir, out, stop_step, new_workers, new_replicas):
    step = EPOCH + stop_step
    line = f"step {step}: 3 → {new_workers} workers (3 → {new_replicas} replicas)"
    assert re.search(rf"elastic: resuming at global step {step} on {new_workers} worker\(s\) × {new_replicas} "
                     r"replica\(s\) \(the backup was written on 3 worker\(s\) × 3 replica\(s\)\)", out), out[-3000:]
    assert f"epoch 2/2: {EPOCH - stop_step} steps in" in out and f"layout changed at {line}" in out, out[-3000:]
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["layout_changes"] == [{"step": step, "from": {"workers": 3, "replicas": 3},
                                          "to": {"workers": new_workers, "replicas": new_replicas}}]
    by_layout = summary["examples_per_sec_by_layout"]
    assert [(x["workers"], x["replicas"], x["from_step"], x["steps"]) for x in by_layout] == [
        (3, 3, 0, step), (new_workers, new_replicas, step, EPOCH - stop_step)], by_layout
    assert all(x["examples_per_sec"] > 0 for x in by_layout)
    events = (model_dir / "tensorboard" / "train").iterdir()
    points = [(e.step, v.tag, float(tf.make_ndarray(v.tensor))) for path in events
              for e in tf.compat.v1.train.summary_iterator(str(path)) for v in e.summary.value
              if v.tag in ("layout/workers", "layout/replicas")]
    assert (step, "layout/workers", new_workers) in points and (0, "layout/workers", 3) in points, points
    print(f"layout change in the outputs: {line}; examples/s by layout "
          f"{[round(x['examples_per_sec']) for x in by_layout]}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 3-worker run with --input_sharding=batch."""
    tmp = tmp_path_factory.mktemp("reference")
    _finish(_launch(["--num_workers=3", "--timeout=200", "--", *RUN, f"--model_dir={tmp / 'run'}",
                     "--input_sharding=batch"], tmp, tmp / "ids"))
    return tmp / "run"


@pytest.mark.slow
def test_3_workers_to_2_with_batch_sharding_matches_the_uninterrupted_run(reference, tmp_path):
    model_dir, stop_step = _stopped_mid_epoch(tmp_path, "batch")
    out = _resume(tmp_path, model_dir, "batch", "launch", 2)
    _check_ids_once(tmp_path, f"batch sharding, 3 → 2 workers at epoch 2 step {stop_step}")
    _check_outputs(model_dir, out, stop_step, 2, 2)
    assert "the global batch sequence is the uninterrupted run's (--input_sharding=batch)" in out
    diff = max_weight_delta(model_weights(model_dir), model_weights(reference))
    print(f"3 → 2 workers, --input_sharding=batch: max |Δw| vs the uninterrupted 3-worker run = {diff:.1e}")
    assert diff <= 1e-5


@pytest.fixture(scope="module")
def stopped_by_records(tmp_path_factory):
    """A 3-worker run by records (the default sharding of this one-file task) stopped mid-epoch: its model_dir and
    the ids its train steps recorded, copied by each test that resumes it."""
    tmp = tmp_path_factory.mktemp("stopped")
    model_dir, stop_step = _stopped_mid_epoch(tmp, "auto")
    return tmp, stop_step


def _copy_of(stopped, tmp_path):
    tmp, stop_step = stopped
    for name in ("run", "ids-before"):
        shutil.copytree(tmp / name, tmp_path / name)
    return tmp_path / "run", stop_step


@pytest.mark.slow
def test_3_workers_to_2_by_records_trains_the_rest_of_the_pass_once(stopped_by_records, tmp_path):
    model_dir, stop_step = _copy_of(stopped_by_records, tmp_path)
    out = _resume(tmp_path, model_dir, "auto", "launch", 2)
    _check_ids_once(tmp_path, f"records sharding, 3 → 2 workers at epoch 2 step {stop_step}")
    _check_outputs(model_dir, out, stop_step, 2, 2)
    assert _REBUILT.format(EPOCH - stop_step) in out


@pytest.mark.slow
def test_3_workers_to_mirrored_4_by_records_and_a_global_batch_change_is_refused(stopped_by_records, tmp_path):
    model_dir, stop_step = _copy_of(stopped_by_records, tmp_path)
    refused = subprocess.run([sys.executable, *RUN[1:], f"--model_dir={model_dir}", "--global_batch_size=24"],
                             cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=120)
    errors = [line for line in (refused.stdout + refused.stderr).splitlines() if "error:" in line]
    assert refused.returncode == 2 and len(errors) == 1, refused.stdout + refused.stderr
    assert "--global_batch_size=24 (was 12)" in errors[0] and "Traceback" not in refused.stderr
    print(f"a global-batch change on resume: exit 2, {errors[0]!r}")
    out = _resume(tmp_path, model_dir, "auto", "mirrored", 4)
    _check_ids_once(tmp_path, f"records sharding, 3 workers → mirrored × 4 at epoch 2 step {stop_step}")
    _check_outputs(model_dir, out, stop_step, 1, 4)
    assert _REBUILT.format(EPOCH - stop_step) in out


# Worker slot 2 of 3 always crashes at once (as one whose host is gone would); any other slot works a moment and ends.
SLOT_2_FAILS = """
import json, os, sys, time
config = json.loads(os.environ["TF_CONFIG"])
if len(config["cluster"]["worker"]) == 3 and config["task"]["index"] == 2:
    sys.exit(1)
time.sleep(1)
print("trained on", len(config["cluster"]["worker"]), "workers", flush=True)
"""


def test_min_workers_continues_without_a_slot_that_keeps_failing(start_launcher, tmp_path):
    job = start_launcher("--num_workers=3", "--min_workers=2", "--max_restarts=3", "--timeout=120", "--",
                         sys.executable, write_script(tmp_path, "slot2.py", SLOT_2_FAILS))
    assert job.wait(120) == 0, job.output
    out = job.output
    assert len(re.findall(r"launch: worker 2 \(pid \d+, [\d.:]+\) died: exit code 1", out)) == 2, out
    assert "launch: restarting all 3 worker(s) on new ports (restart 1 of 3)" in out
    assert ("launch: worker 2 crashed within 60s of 2 starts in a row: restarting on 2 worker(s) instead of 3 "
            "(--min_workers=2; restart 2 of 3)") in out, out
    assert "[worker 1] trained on 2 workers" in out and "launch: all 2 worker(s) finished in" in out
    assert re.search(r"finished in [\d.]+s \(2 restart\(s\)\)", out), out
    assert job.leftovers() == []
    print("--min_workers: " + next(line for line in out.splitlines() if "instead of" in line))


def test_min_workers_is_checked(tmp_path):
    for args, message in [(["--num_workers=2", "--min_workers=3"], "--min_workers must be between 1 and "
                           "--num_workers=2, got 3"),
                          (["--num_workers=2", "--min_workers=1", "--emit=slurm"], "--min_workers does not apply to "
                           "--emit=slurm; for Slurm give a node range, e.g. --nodes=1-2")]:
        proc = subprocess.run([sys.executable, "-m", "dtf.launch", *args, "--", sys.executable], env=launch_env(),
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"dtf.launch: error: {message}"]


# --- the data layer: the rest of a pass on another layout, by files and by records --------------------------------

def _steps(strategy, source, n, **kw):
    """Every global step's ids, from each pipeline's batches as `distribute_dataset` makes them."""
    data = inputs.distribute_dataset(strategy, source, 12, preprocess=parse_id, **kw)
    local = strategy.num_replicas_in_sync // strategy.pipelines
    per = [[b[1].numpy().tolist() for b in ds.take(n * local)] for ds in data.dataset]
    return data, [sum((sum(p[t * local:(t + 1) * local], []) for p in per), []) for t in range(n)]


def test_rest_of_a_pass_on_another_layout_is_every_remaining_example_once(tmp_path):
    """Files (8 files of 12: 6-step passes on 3 pipelines, 8-step on 2) and records (1 file): stopped at step 2 of pass
    1, the rest on the new layout trains every example of the pass not yet trained on once, then whole passes (cut at
    the epoch with epochs that are passes, as without a change; streamed when the epoch is longer than a pass)."""
    by_files = write_id_files(str(tmp_path / "files"), [12] * 8)
    by_records = write_id_files(str(tmp_path / "records"), [96])
    for mode, source, old_n, new_n, new_replicas in [  # (3 workers by records → 2, or → 1 × 4: the end-to-end tests)
            ("pass", by_files, 3, 2, 2), ("pass", by_files, 2, 3, 3), ("stream", by_files, 3, 1, 4),
            ("pass", by_records, 2, 3, 3)]:
        old = PipelineStrategy(old_n, old_n)
        ref, _ = _steps(old, source, 0)
        passes = ref.steps_per_pass
        whole = sum(_steps(old, source, passes, initial_epoch=1, steps_per_epoch=passes, epoch_mode=mode)[1], [])
        first = sum(_steps(old, source, 2, initial_epoch=1, steps_per_epoch=passes, epoch_mode=mode)[1], [])
        carry = inputs.Carry(step=passes + 2, pass_number=1, skip=2, steps=passes - 2,
                             old=inputs.Layout(old_n, old_n, ref.sharding, passes))
        new, after = _steps(PipelineStrategy(new_n, new_replicas), source, passes - 2 + 16, initial_epoch=1,
                            initial_step=2, steps_per_epoch=passes, epoch_mode=mode, carry=carry)
        assert all(len(batch) == 12 for batch in after)
        rest = sum(after[:passes - 2], [])
        seen = collections.Counter(first + rest)
        assert sorted(seen) == sorted(whole) and set(seen.values()) == {1}, (ref.sharding, old_n, new_n)
        read = inputs.steps_read(inputs.reading_mode(mode, passes, new.steps_per_pass), passes, new.steps_per_pass)
        later = after[passes - 2:]
        for k in range(0, len(later) - read + 1, read):  # later passes: no example twice
            ids = sum(later[k:k + read], [])
            assert len(set(ids)) == len(ids) == read * 12
        print(f"{mode} epochs, {ref.sharding}: {old_n} → {new_n} pipelines ({passes} → {new.steps_per_pass}-step "
              f"passes): {len(seen)} ids of the interrupted pass once; then {read}-step passes")


def test_stream_position_after_a_layout_change():
    carry = inputs.Carry(step=8, pass_number=1, skip=2, steps=4, old=inputs.Layout(3, 3, "files", 6))
    assert inputs.stream_position("pass", 6, 8, 1, 2, carry) == (6, 1, 0, True)
    assert inputs.stream_position("pass", 6, 8, 1, 5, carry) == (6, 1, 3, True)
    assert inputs.stream_position("pass", 6, 8, 2, 0, carry) == (6, 2, 0, False)
    assert inputs.stream_position("stream", 6, 8, 2, 1, carry) == (8, 2, 1, False)  # epoch 2 = steps 12..: carry ends
    assert inputs.stream_position("stream", 8, 6, 2, 0, carry) == (6, 2, 4, False)
    with pytest.raises(ValueError):
        inputs.stream_position("pass", 6, 8, 1, 1, carry)
    assert np.array_equal(inputs.stream_position("stream", 6, 8, 1, 2), (8, 1, 0, False))
    # One-pass epochs kept from the first layout (6 steps) stream over another layout's 8-step passes (nothing of a
    # pass is dropped); an explicit pass epoch shorter than the pass is cut, as without a change; a longer one streams.
    assert inputs.reading_mode("pass", 6, 8, one_pass_epochs=True) == "stream"
    assert inputs.reading_mode("pass", 6, 6, one_pass_epochs=True) == "pass"
    assert inputs.reading_mode("pass", 6, 8) == "pass" and inputs.reading_mode("pass", 8, 6) == "stream"


def test_a_resumed_run_keeps_the_epochs_of_the_layout_it_started_on(tmp_path):
    """One-pass epochs of another layout (here 250 steps; this one's pass is 256) keep their length, so the step
    count, plan and schedule stay; the input streams over this layout's passes. A fresh run takes its own again."""
    import dtf
    from dtf.config import config as config_lib
    from dtf.experiment import train

    config = config_lib.Config(dataset="synthetic", model="mlp", strategy="one_device", global_batch_size=32,
                               epochs=3, model_dir=str(tmp_path))
    exp = train.Experiment(config, dtf.create_strategy("one_device"), train.resolve_cluster(config))
    plan = exp.rerun_plan()
    assert (exp.steps_per_pass, exp.steps_per_epoch, exp.epoch_mode, exp.reading_mode) == (256, 256, "pass", "pass")
    exp.set_epochs({"steps_per_epoch": 250, "epoch_mode": "pass"})
    assert (exp.steps_per_epoch, exp.total_steps, exp.epoch_mode, exp.reading_mode) == (250, 750, "pass", "stream")
    assert exp.rerun_plan() == plan and exp.layout_record()["steps_read"] == 256
    exp.set_epochs()
    assert (exp.steps_per_epoch, exp.reading_mode) == (256, "pass")
