"""The sbatch script on a real single-node Slurm (tests/slurm_cluster.py): submitted unchanged, its exit-status rules
(crash reruns, 2 never reruns, 143 requeues), a taken port reported by name, and dtf.run as 2 tasks on one node in two
concurrent jobs, each ending with the local launcher's weights.

Skipped with the reason when Slurm is not installed here; under CI (CI=true, where .ci/run installs it) that is a
failure instead, so a missing install step cannot pass unnoticed."""
import json
import os
import re
import subprocess
import sys

import pytest

from dtf.cluster.tf_config import free_ports
from helpers import REPO, SLURM_RUN, emit_slurm, max_weight_delta, slurm_env, submit

pytestmark = pytest.mark.slow


# Task 1 decides the step's status from the start count and the requeue count; task 0 succeeds.
STUB = """
import os, sys
start, requeues = int(os.environ["DTF_LAUNCH_RESTART"]), int(os.environ.get("SLURM_RESTART_COUNT") or 0)
print("start", start, "requeues", requeues, "TF_CONFIG", os.environ["TF_CONFIG"], flush=True)
plan = {STATUSES}
sys.exit(plan.get((requeues, start), 0) if os.environ["SLURM_PROCID"] == "1" else 0)
"""


# Task 1 diverges (exit 3) after a second; task 0 behaves like dtf on SIGTERM: it saves and exits 143.
DIVERGING = """
import os, signal, sys, time
def preempted(signum, frame):
    print("stopped by SIGTERM", flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, preempted)
if os.environ["SLURM_PROCID"] == "1":
    print("diverging", flush=True)
    time.sleep(1)
    sys.exit(3)
time.sleep(60)
"""


def _diverging(tmp_path):
    path = tmp_path / "diverging.py"
    path.write_text(DIVERGING)
    return path


def test_exit_statuses_rerun_requeue_and_taken_port(slurm, tmp_path):
    """Four jobs at once: crash → rerun (counted), then 143 → requeued → done; 2 → never rerun; a taken port →
    one line naming it; 3 on one task while Slurm stops the other (143) → 3, never rerun."""
    def stub(name, statuses):
        path = tmp_path / f"{name}.py"
        path.write_text(STUB.replace("{STATUSES}", repr(statuses)))
        return str(path)

    rerun = submit(slurm, emit_slurm("--num_workers=2", "--nodes=1", "--max_restarts=1",
                                     f"--output={tmp_path}/rerun.log", "--", "python",
                                     stub("rerun", {(0, 0): 1, (0, 1): 143})), tmp_path / "rerun.sbatch")
    usage = submit(slurm, emit_slurm("--num_workers=2", "--tasks_per_node=2", "--max_restarts=3",
                                     f"--output={tmp_path}/usage.log", "--", "python", stub("usage", {(0, 0): 2})),
                   tmp_path / "usage.sbatch")
    diverged = submit(slurm, emit_slurm("--num_workers=2", "--nodes=1", "--max_restarts=2",
                                        f"--output={tmp_path}/diverged.log", "--", "python", str(_diverging(tmp_path))),
                      tmp_path / "diverged.sbatch")
    port = free_ports(1)[0]  # free in the namespace too: any port is, it is private
    holder = slurm.start_in_ns([sys.executable, "-c", f"import socket, time; s = socket.socket(); "
                                f"s.bind(('0.0.0.0', {port})); s.listen(); print('held', flush=True); time.sleep(300)"],
                               "port_holder.out")
    try:
        log = os.path.join(slurm.dir, "port_holder.out")
        slurm._wait(lambda: open(log).read().startswith("held"), "the port holder")
        taken = submit(slurm, emit_slurm("--num_workers=2", "--nodes=1", f"--output={tmp_path}/taken.log", "--",
                                         "python", "-c", "import os; print('ran', os.environ['SLURM_PROCID'])"),
                       tmp_path / "taken.sbatch", env=slurm_env(slurm, DTF_SLURM_PORT=str(port)))
        jobs = slurm.wait_jobs([rerun, usage, taken, diverged], timeout_s=150)
        print("jobs:", {j: (v["SubmitTime"], v["StartTime"], v["EndTime"]) for j, v in jobs.items()})
    finally:
        holder.kill()

    log = (tmp_path / "rerun.log").read_text()
    assert jobs[rerun]["JobState"] == "COMPLETED" and jobs[rerun]["Restarts"] == "1", (jobs[rerun], log)
    assert "dtf: step failed with status 1; rerunning (restart 1 of 1)" in log
    assert f"dtf: step preempted (status 143); requeueing job {rerun}" in log
    # After the requeue the job ran once more, from scratch, and kept the log (--open-mode=append).
    starts = re.findall(r"^1: start (\d) requeues (\d)", log, re.M)
    assert starts == [("0", "0"), ("1", "0"), ("1", "1")], log
    ports = {json.dumps(json.loads(line)["cluster"]) for line in re.findall(r"TF_CONFIG (\{.*\})$", log, re.M)}
    assert len(ports) == 3, ports  # each start on its own ports

    log = (tmp_path / "usage.log").read_text()
    assert jobs[usage]["JobState"] == "FAILED" and jobs[usage]["ExitCode"] == "2:0", (jobs[usage], log)
    assert "not rerunning" in log and len(re.findall(r"^1: start", log, re.M)) == 1, log

    log = (tmp_path / "taken.log").read_text()
    assert jobs[taken]["JobState"] == "FAILED", log
    [line] = [l for l in log.splitlines() if "already in use" in l]
    assert re.match(rf"^\d: dtf\.backends\.slurm_task: error: port {port} on \S+ \(task \d of job {taken}\) is already in "
                    "use by another program", line), line
    assert "0: ran" not in log  # the task whose port was taken never started the command

    # srun said 143 (the chief, stopped by Slurm after task 1 diverged, "saved" and exited 143), but the step's
    # cause was the divergence: not requeued, not rerun.
    log = (tmp_path / "diverged.log").read_text()
    assert jobs[diverged]["JobState"] == "FAILED" and jobs[diverged]["ExitCode"] == "3:0", (jobs[diverged], log)
    assert jobs[diverged]["Restarts"] == "0" and len(re.findall(r"^1: diverging", log, re.M)) == 1, log
    assert "0: stopped by SIGTERM" in log and "not rerunning" in log


def test_two_concurrent_jobs_each_match_the_local_launcher(slurm, tmp_path):
    """The same dtf.run as 2 tasks on one node, twice at once (no port collision), and under `python -m dtf.launch`:
    one cluster per job, the same final weights and metrics."""
    jobs = {}
    for name in ("a", "b"):
        script = emit_slurm("--num_workers=2", "--nodes=1", "--tasks_per_node=2", f"--job_name=dtf-{name}",
                            f"--output={tmp_path}/{name}.log", "--", *SLURM_RUN, f"--model_dir={tmp_path}/{name}")
        jobs[name] = submit(slurm, script, tmp_path / f"{name}.sbatch")
    local = subprocess.run([sys.executable, "-m", "dtf.launch", "--num_workers=2", "--timeout=300", "--",
                            *SLURM_RUN, f"--model_dir={tmp_path}/local"], capture_output=True, text=True, timeout=330,
                           env=dict(os.environ, PYTHONPATH=REPO), cwd=str(tmp_path))
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    ended = slurm.wait_jobs(list(jobs.values()), timeout_s=300)

    clusters = {}
    for name, job_id in jobs.items():
        log = (tmp_path / f"{name}.log").read_text()
        assert ended[job_id]["JobState"] == "COMPLETED", log[-3000:]
        [workers] = re.findall(r"^0: dtf\.backends\.slurm_task: 2 worker\(s\): (\S+) \(task 0 is the chief\)$", log, re.M)
        clusters[name] = workers.split(",")
        assert re.search(r"^0: ", log, re.M) and re.search(r"^1: ", log, re.M)  # task-prefixed lines
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["num_workers"] == 2 and summary["num_replicas"] == 2
        assert sorted(os.listdir(tmp_path / name)) == sorted(os.listdir(tmp_path / "local"))  # chief-only outputs
    # Both jobs ran at the same time on the one node, on different ports.
    a, b = ended[jobs["a"]], ended[jobs["b"]]
    assert a["StartTime"] < b["EndTime"] and b["StartTime"] < a["EndTime"], (a, b)
    assert not set(clusters["a"]) & set(clusters["b"]), clusters
    assert all(w.startswith("localhost:") for w in clusters["a"] + clusters["b"])

    def metrics(name):  # the model's metrics, not its speed
        final = json.loads((tmp_path / name / "summary.json").read_text())["final_metrics"]
        return {k: v for k, v in final.items() if "loss" in k or "accuracy" in k}

    reference = metrics("local")
    assert {"loss", "val_loss", "val_accuracy"} <= set(reference)
    for name in jobs:
        assert metrics(name) == pytest.approx(reference, abs=1e-6), name
        diff = max_weight_delta(tmp_path / name, tmp_path / "local")
        print(f"slurm job {name}: max |Δw| vs dtf.launch = {diff:.2e}")
        assert diff < 1e-6


def test_evaluator_step_scores_every_checkpoint_once(slurm, tmp_path):
    """--evaluator with --emit=slurm: the evaluator runs as its own step beside the 2 workers, scores each epoch's
    checkpoint exactly once and the job completes only after eval_results.json has them all."""
    model_dir = tmp_path / "run"
    run = [*SLURM_RUN, "--checkpoint_every=1", f"--model_dir={model_dir}"]
    script = emit_slurm("--num_workers=2", "--nodes=1", "--tasks_per_node=2", f"--output={tmp_path}/eval.log",
                        f"--evaluator={' '.join(run)}", "--", *run)
    job = submit(slurm, script, tmp_path / "eval.sbatch")
    ended = slurm.wait_jobs([job], timeout_s=300)
    log = (tmp_path / "eval.log").read_text()
    assert ended[job]["JobState"] == "COMPLETED", log[-3000:]
    names = sorted(os.listdir(model_dir / "checkpoints"))
    assert names == ["epoch_001.keras", "epoch_002.keras"], names
    for name in names:
        assert len(re.findall(rf"^evaluator: .*evaluated {name} at step", log, re.M)) == 1, log[-3000:]
    results = json.loads((model_dir / "eval_results.json").read_text())
    assert sorted(results["checkpoints"]) == names
    assert [results["checkpoints"][n]["step"] for n in names] == [10, 20]
    assert "evaluator: dtf: evaluated 2 checkpoint(s)" in log
    assert not re.search(r"^evaluator: .*strategy=", log, re.M)  # it never joined the workers' collective
