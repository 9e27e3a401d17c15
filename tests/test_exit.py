"""Every process exits when its work is done: resumed runs exit right after their summary, and inputs that would
make a process wait (an absurd --num_cpu_devices, an evaluator on a directory with no run) say so and stop."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, _env

EXIT_AFTER_DONE_S = 10.0
SMALL_RUN = ["--dataset=shapes", "--model=mlp", "--global_batch_size=64", "--epochs=2", "--steps_per_epoch=6",
             "--warmup_epochs=0", "--backup_every_steps=2", "--seed=3", "--progress=epoch"]


def _run(model_dir, kill=None, timeout_s=300.0):
    """One `dtf.run`; kill=(signal, seconds after the first backup) stops it there. Returns (status, seconds from its
    last line — 'dtf: outputs in', or 'already holds this run' when the killed run had finished — to its exit, or
    None)."""
    proc = subprocess.Popen([sys.executable, "-m", "dtf.run", *SMALL_RUN, f"--model_dir={model_dir}"], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = []
    reader = threading.Thread(target=lambda: done.extend(time.monotonic() for line in proc.stdout
                                                          if line.startswith("dtf: outputs in")
                                                          or "already holds this run, finished" in line))
    reader.start()
    try:
        if kill:
            backup = os.path.join(model_dir, "backup", "training_metadata.json")
            deadline = time.monotonic() + timeout_s
            while not os.path.exists(backup) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(kill[1])
            if proc.poll() is None:
                proc.send_signal(kill[0])
        status = proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join()
    return status, (time.monotonic() - done[0]) if done else None


@pytest.mark.slow
def test_ten_kill_and_resume_cycles_each_exit_within_seconds_of_the_summary(tmp_path):
    """Killed (SIGKILL or SIGTERM, at different points after a backup), then rerun: each rerun resumes, writes its
    summary and exits within EXIT_AFTER_DONE_S; every one ends with the validation metrics of an uninterrupted run
    (the last epoch's training metrics average only the steps after a mid-epoch resume). A SIGTERM that lands after
    training, while the run evaluates or exports, ends it by the default handler (-15 here, 143 in a shell): the rerun
    then exports from the last backup."""
    status, linger = _run(tmp_path / "reference")
    assert status == 0 and linger is not None and linger <= EXIT_AFTER_DONE_S, (status, linger)
    reference = json.loads((tmp_path / "reference" / "summary.json").read_text())["final_metrics"]
    lingers = []
    for cycle in range(10):
        model_dir = tmp_path / f"cycle{cycle}"
        sig = signal.SIGKILL if cycle % 2 else signal.SIGTERM
        first, _ = _run(model_dir, kill=(sig, 0.4 * (cycle // 2)))
        assert first in (0, -signal.SIGKILL, -signal.SIGTERM, 143), first
        status, linger = _run(model_dir)
        lingers.append(linger)
        assert status == 0 and linger is not None and linger <= EXIT_AFTER_DONE_S, (cycle, status, lingers)
        summary = json.loads((model_dir / "summary.json").read_text())
        metrics = {k: v for k, v in summary["final_metrics"].items() if k.startswith("val_")}
        assert metrics and metrics == pytest.approx({k: reference[k] for k in metrics}, rel=1e-6), (cycle, summary)
    print("seconds from the done line to exit:", [round(s, 2) for s in lingers])


def test_absurd_num_cpu_devices_is_one_line_exit_2_before_tensorflow(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dtf.run", "--num_cpu_devices=100000", f"--model_dir={tmp_path / 'out'}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    err = proc.stderr
    assert proc.returncode == 2 and err.startswith("dtf.run: error: --num_cpu_devices=100000 ") and "at most 256" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and not (tmp_path / "out").exists()


def test_evaluator_on_a_directory_without_a_run_says_what_it_waits_for_once_then_gives_up(tmp_path):
    missing = tmp_path / "typo"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dtf.run", "--mode=evaluate_continuously", "--eval_timeout_s=2",
                           "--dataset=shapes", "--model=mlp", f"--model_dir={missing}"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and time.monotonic() - start >= 2, proc
    out = proc.stdout + proc.stderr
    lines = [line for line in out.splitlines() if line.strip()]
    assert sum("waiting up to 2s" in line and str(missing) in line for line in lines) == 1, out
    errors = [line for line in lines if "error" in line]
    assert errors == [lines[-1]] and lines[-1].startswith(f"dtf.run: error: --model_dir={missing} holds no run "
                                                          "after 2s") and "--eval_timeout_s" in lines[-1], out
    assert "Traceback" not in out and not missing.exists()
