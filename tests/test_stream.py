"""Streaming epochs (`--epoch_mode`, dtf.distribute.inputs): epochs shorter or longer than a pass are windows of one
stream of exact passes; a run killed in the middle of a later pass resumes the stream exactly; the mode is recorded in
flags.txt and summary.json and is part of the run's plan. (The ids per pass across mirrored × 4 and 2 workers are
checked by tests/test_data.py's probe.)"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dtf.base.errors import UserError
from dtf.experiment import rundir
from helpers import launch_env, model_weights

# 8192 synthetic examples at a global batch of 256: 32-step passes; 12-step epochs cross a pass boundary in epoch 3.
RUN = ["--dataset=synthetic", "--model=cnn", "--strategy=mirrored", "--num_cpu_devices=2", "--global_batch_size=256",
       "--steps_per_epoch=12", "--epochs=4", "--backup_every_steps=4", "--validation_freq=10", "--warmup_epochs=0",
       "--progress=none"]
PASS_STEPS, EPOCH_STEPS = 32, 12


def _start(model_dir, *extra):
    return subprocess.Popen([sys.executable, "-m", "dtf.run", *RUN, f"--model_dir={model_dir}", *extra],
                            cwd=os.path.dirname(model_dir), env=launch_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _backed_up_step(model_dir):
    try:
        with open(os.path.join(model_dir, "backup", "training_metadata.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):  # not written yet (it is replaced atomically, so never half)
        return -1
    return meta["epoch"] * EPOCH_STEPS + meta["steps_done"]


@pytest.mark.slow
def test_kill_in_the_middle_of_the_second_pass_resumes_the_stream_exactly(tmp_path):
    reference = _start(str(tmp_path / "reference"))
    out = reference.communicate(timeout=300)[0]
    assert reference.returncode == 0, out[-3000:]
    assert "12 steps per epoch, streamed over passes of 32" in out

    model_dir = str(tmp_path / "run")
    run = _start(model_dir)
    deadline = time.monotonic() + 240
    while _backed_up_step(model_dir) <= PASS_STEPS:  # a backup inside the second pass, past its first step
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[0][-3000:]
        time.sleep(0.005)
    run.send_signal(signal.SIGKILL)
    run.wait(30)
    killed_at = _backed_up_step(model_dir)
    assert PASS_STEPS < killed_at < 4 * EPOCH_STEPS, killed_at

    rerun = _start(model_dir)
    out = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, out[-3000:]
    epoch, step = divmod(killed_at, EPOCH_STEPS)
    assert f"resuming from the backup in {model_dir}/backup: epoch {epoch + 1}, step {step}" in out, out[-3000:]
    a, b = model_weights(model_dir), model_weights(str(tmp_path / "reference"))
    assert all(np.array_equal(x, y) for x, y in zip(a, b)), "the resumed stream trained on other batches"
    print(f"killed after the backup at global step {killed_at} (pass 2, step {killed_at - PASS_STEPS}); resumed run "
          f"== uninterrupted run, bit for bit")

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["epoch_mode"], summary["steps_per_pass"], summary["steps_per_epoch"]) == ("stream", 32, 12)
    assert "--epoch_mode=stream" in (tmp_path / "run" / "flags.txt").read_text().splitlines()

    # A backup from before --epoch_mode records no mode; its epochs were passes, so it is a pass plan's run.
    meta_path = tmp_path / "run" / "backup" / "training_metadata.json"
    meta = json.loads(meta_path.read_text())
    plan = dict(meta["plan"])
    del meta["plan"]["epoch_mode"]
    meta_path.write_text(json.dumps(meta))
    assert rundir.decide(model_dir, {**plan, "epoch_mode": "pass"}, 4, EPOCH_STEPS).action == "finished"
    with pytest.raises(UserError, match=r"--epoch_mode=stream \(was pass\)"):
        rundir.decide(model_dir, plan, 4, EPOCH_STEPS)
    meta_path.write_text(json.dumps({**meta, "plan": plan}))

    # The mode is part of the plan: the same dir with pass epochs is another run, refused in one line.
    other = _start(model_dir, "--epoch_mode=pass", "--epochs=5")
    out = other.communicate(timeout=300)[0]
    assert other.returncode == 2, out[-3000:]
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--epoch_mode=pass (was stream)" in errors[0] and "Traceback" not in out
