"""`dtf.tune --trial_workers=N --parallel_trials=K`: each trial is a `dtf.run` job of N worker processes started by
dtf's launcher (`python -m dtf.launch --num_workers=N --max_restarts=R -- python -m dtf.run --flagfile=<trial>`), K
of them at once.

The tuner process keeps keras-tuner's oracle in-process and asks it for trials from K threads (the Oracle's
create/update/end_trial are `@synchronized`; dtf adds one lock so its own saves never interleave), so nothing
listens on the network. A trial *is* a run: its flagfile is the sweep's Config with the trial's values
(`config_from_flags`, as in dtf.run), its model_dir is TUNE_DIR/trials/<id>, and the launcher gives it what any
multi-worker job has: its own TF_CONFIG and ports in a private network namespace, sharding, chief-only outputs,
restarts from the chief's backup (a preempted worker, 143, restarts uncounted; 2 and 3 never). The objective is read
from the chief's summary.json.

Where a trial's job runs (--backend): `local`, dtf's launcher as above; `ray`, the launcher's Ray Train backend
(`dtf.launch --backend=ray [--address=...]`: a Ray Train worker group, restarts by Ray Train's FailureConfig, the
flagfile path made absolute since Ray's workers run in Ray's own session directory); `slurm`, inside the Slurm job
that `dtf.tune --emit=slurm` writes: an `srun --ntasks=N --exact` step of dtf's Slurm task wrapper
(`dtf.backends.slurm_task`, which sets TF_CONFIG) with its own first port (DTF_SLURM_PORT) per trial slot and
attempt, rerun here by dtf's exit-status table; a preempted step (143: the job is being preempted or is near its
time limit) stops the sweep with 143, and the script requeues the job, which resumes the sweep.

How a trial ends, by the launcher's exit status: 0 completed; 3 diverged (recorded, objective none, the sweep goes
on); 2 a user error: the sweep stops at once with the trial's one-line message (the other trials are stopped with
SIGTERM so they back up); anything else (a crash after --max_trial_restarts restarts) failed, and the sweep goes
on. A trial that prints nothing for --trial_timeout_s is stopped (SIGTERM, then its workers back up) and recorded as
stalled. If the tuner process dies, each launcher gets SIGTERM (PR_SET_PDEATHSIG) and its workers back up; the rerun
resumes the oracle and runs the unfinished trials again from their backups, and a trial whose job had finished
(its summary.json is there) is not run again.
"""
import ctypes
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

from dtf.base import exitcodes
from dtf.base.errors import UserError
from dtf.tuning import trial_files
from dtf.tuning.objectives import speed_objective, speed_score

BACKENDS = ("local", "ray", "slurm")
FLAGFILE = "{trial_id}.flags"  # beside the trial's model_dir in TUNE_DIR/trials/
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)
_RUN_ERROR = "dtf.run: error: "
_RESTARTED = "launch: restarting all"
_STEP_STATUS = re.compile(r"^ *\d+: dtf\.backends\.slurm_task: exited with status ([1-9]\d*)$")
IDLE_WAIT_S = 1.0  # the oracle has no trial to give yet (e.g. Bayesian waits for running ones): ask again after


def sweep_sbatch(argv: List[str], workers: int, parallel: int) -> str:
    """The sbatch script of `dtf.tune ... --emit=slurm`: this sweep, unchanged, as one Slurm job (see the module
    doc). Slurm options beyond the tasks (time, partition, output, gres) go on sbatch's command line."""
    from dtf.tuning.distributed import strip_flag

    args = strip_flag(strip_flag(argv, "emit"), "backend")
    return "\n".join([
        "#!/bin/bash",
        "#SBATCH --job-name=dtf-tune",
        f"#SBATCH --ntasks={workers * parallel}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "# Written by `python -m dtf.tune --emit=slurm`; submit it unchanged with sbatch (add --time, --partition,",
        "# --gres or --output on sbatch's command line). The tuner runs here, on the batch host: Keras Tuner's",
        f"# oracle lives in its process and listens on no port. Each trial is an srun step of {workers} task(s),",
        f"# {parallel} at a time, its lines prefixed [trial ID] and the task number. A preempted sweep exits 143 and",
        "# is requeued; the rerun of this script resumes it (finished trials kept, running ones from their backups).",
        "set -u",
        shlex.join(["python", "-m", "dtf.tune", *args, "--backend=slurm"]),
        "status=$?",
        f'if [ "$status" -eq {exitcodes.PREEMPTED} ]; then',
        '  echo "dtf: sweep preempted (status $status); requeueing job $SLURM_JOB_ID" >&2',
        '  scontrol requeue "$SLURM_JOB_ID" && exit $status',
        "fi",
        "exit $status"]) + "\n"


def _die_with_tuner():
    """In the launcher child: SIGTERM when the tuner process dies, so its workers back up and stop."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def trial_overrides(values: dict, base_config, tune_dir: str, trial_id: str, objective: str) -> dict:
    """The Config fields a trial changes: its hyperparameters, its model_dir, and for a speed objective the target it
    stops at."""
    out = {field: values[field] for field in ("global_batch_size", "base_lr", "warmup_epochs", "lr_scaling")
           if field in values}
    if "global_batch_size" in out:
        out["global_batch_size"] = int(out["global_batch_size"])
        out["per_replica_batch_size"] = None
    if "warmup_epochs" in out:
        out["warmup_epochs"] = float(out["warmup_epochs"])
        if out["warmup_epochs"] and base_config.warmup_steps is not None:
            out["warmup_steps"] = None
    speed = speed_objective(objective)
    if speed:
        out["stop_at"] = str(speed[1])
    out.update(model_dir=os.path.join(tune_dir, "trials", str(trial_id)), worker_hosts=None, task_index=None)
    return out


class TrialJobs:
    """Runs a sweep's trials as launcher jobs; see the module doc."""

    def __init__(self, oracle, tune_dir: str, objective: str, workers: int, parallel: int, max_restarts: int,
                 timeout_s: Optional[float], backend: str = "local", address: Optional[str] = None):
        self.oracle, self.tune_dir, self.objective = oracle, tune_dir, objective
        self.workers, self.parallel, self.max_restarts, self.timeout_s = workers, parallel, max_restarts, timeout_s
        self.backend, self.address = backend, address
        self.preempted = False  # a Slurm step was preempted: the sweep stops with 143 and the job is requeued
        self.lock = threading.Lock()  # the oracle's calls and saves, and the printed lines
        self.stopping = threading.Event()
        self.user_error: Optional[str] = None
        self.failure: Optional[BaseException] = None  # what ended a trial thread unexpectedly
        self.running: Dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------------------------------------ one trial

    def flagfile(self, trial) -> str:
        """Write the trial's dtf.run flagfile (atomically) and return its path."""
        from dtf.config import flags as dtf_flags
        from dtf.experiment import atomic

        speed = speed_objective(self.objective)
        base = dtf_flags.config_from_flags(**({"stop_at": str(speed[1])} if speed else {}))
        config = dtf_flags.config_from_flags(**trial_overrides(
            trial.hyperparameters.values, base, self.tune_dir, trial.trial_id, self.objective))
        path = os.path.join(self.tune_dir, "trials", FLAGFILE.format(trial_id=trial.trial_id))
        atomic.write_text(path, config.to_flagfile())
        return path

    def command(self, flagfile: str) -> List[str]:
        """The trial's job: the launcher (local or Ray), or one Slurm step of its tasks."""
        # absolute: Ray's workers run in Ray's session directory (a remote tune_dir's URL stays as it is)
        run = ["-m", "dtf.run", f"--flagfile={flagfile if '://' in flagfile else os.path.abspath(flagfile)}"]
        if self.backend == "slurm":
            return ["srun", f"--ntasks={self.workers}", "--exact", "--label", "--kill-on-bad-exit=1", "python", "-m",
                    "dtf.backends.slurm_task", "--", "python", *run]
        ray = []
        if self.backend == "ray":
            ray = ["--backend=ray"] + ([f"--address={self.address}"] if self.address else [])
        return [sys.executable, "-m", "dtf.launch", *ray, f"--num_workers={self.workers}",
                f"--max_restarts={self.max_restarts}", "--", sys.executable, *run]

    def _print(self, trial_id: str, line: str):
        with self.lock:
            print(f"[trial {trial_id}] {line}", flush=True)

    def _start(self, trial_id: str, command: List[str], env: dict) -> Optional[subprocess.Popen]:
        with self.lock:  # no new job once the sweep is stopping: its SIGTERMs went out already
            if self.stopping.is_set():
                return None
            proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    preexec_fn=_die_with_tuner)
            self.running[trial_id] = proc
        return proc

    def run_job(self, trial_id: str, flagfile: str, slot: int) -> Optional[dict]:
        """Run the trial's job to its end: {"returncode", "restarts", "error", "stalled"}; None if the sweep was
        stopping before it started. Slurm steps are rerun here, by dtf's exit-status table."""
        env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "DTF_LAUNCH_RESTART")}
        if self.backend != "slurm":
            return self._run_once(trial_id, self.command(flagfile), env)
        restarts = attempt = 0
        while True:
            step_env = dict(env, DTF_LAUNCH_RESTART=str(attempt), DTF_SLURM_PORT=str(self._slurm_port(slot, attempt)))
            job = self._run_once(trial_id, self.command(flagfile), step_env)
            if job is None or not exitcodes.should_restart(job["returncode"]) or job["stalled"]:
                return job and dict(job, restarts=restarts)
            if job["returncode"] == exitcodes.PREEMPTED:
                return dict(job, restarts=restarts)
            if restarts >= self.max_restarts or self.stopping.is_set():
                return dict(job, restarts=restarts)
            restarts, attempt = restarts + 1, attempt + 1
            self._print(trial_id, f"dtf.tune: step failed with status {job['returncode']}; rerunning it from its "
                                  f"backup (restart {restarts} of {self.max_restarts})")

    def _slurm_port(self, slot: int, attempt: int) -> int:
        """The first port of a trial step: the job's own block (dtf.cluster.tf_config.slurm_port), moved by one block
        per trial slot and by `parallel` blocks per attempt, so concurrent steps and reruns never share ports."""
        from dtf.cluster import tf_config as cluster_lib

        environ = {k: v for k, v in os.environ.items() if k not in (cluster_lib.SLURM_PORT_ENV, "DTF_LAUNCH_RESTART")}
        first = (cluster_lib.slurm_port(environ) - cluster_lib.SLURM_PORT_LOW) // cluster_lib.SLURM_PORT_STRIDE
        block = (first + 1 + slot + self.parallel * attempt) % cluster_lib.SLURM_PORT_SLOTS
        return cluster_lib.SLURM_PORT_LOW + block * cluster_lib.SLURM_PORT_STRIDE

    def _run_once(self, trial_id: str, command: List[str], env: dict) -> Optional[dict]:
        proc = self._start(trial_id, command, env)
        if proc is None:
            return None
        lines: "queue.Queue[Optional[str]]" = queue.Queue()

        def read():
            for line in proc.stdout:
                lines.put(line.rstrip("\n"))
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        restarts, error, stalled, first_failed = 0, None, False, None
        while True:
            try:
                line = lines.get(timeout=self.timeout_s)
            except queue.Empty:
                if not stalled:  # once: the job now has its grace period to back up and stop
                    stalled = True
                    self._print(trial_id, f"dtf.tune: no output for --trial_timeout_s={self.timeout_s:g}; stopping it")
                    proc.send_signal(signal.SIGTERM)
                continue
            if line is None:
                break
            if _RESTARTED in line:
                restarts += 1
            m = _STEP_STATUS.match(line)
            if m and first_failed is None:  # a Slurm step's status is that of the task that failed first
                first_failed = int(m.group(1))
            if _RUN_ERROR in line and error is None:
                error = line[line.index(_RUN_ERROR) + len(_RUN_ERROR):]
            self._print(trial_id, line)
        returncode = proc.wait()
        returncode = first_failed if first_failed is not None else 128 - returncode if returncode < 0 else returncode
        with self.lock:
            self.running.pop(trial_id, None)
        return {"returncode": returncode, "restarts": restarts, "error": error, "stalled": stalled}

    def score(self, summary: dict) -> dict:
        """The trial's objective from the chief's summary, and for a speed objective whether the target was reached
        and the score the oracle gets (see `speed_score`)."""
        speed = speed_objective(self.objective)
        if speed is None:
            metrics = summary.get("final_metrics", {})
            if self.objective not in metrics:
                raise UserError(f"--objective={self.objective} is not a metric of this run; it reports: "
                                f"{', '.join(sorted(metrics))}")
            return {"objective": float(metrics[self.objective])}
        stop_at = summary.get("stop_at", {})
        steps = len(summary.get("history", {}).get("loss", [])) * summary.get("steps_per_epoch", 0)
        value, oracle_value = speed_score(speed[0], stop_at, steps)
        return {"objective": value, "oracle_score": oracle_value, "reached": bool(stop_at.get("reached"))}

    def run_trial(self, trial, slot: int = 0) -> Optional[dict]:
        """Run one trial and return its info (written to trial_info/); None when the sweep stopped before it ended
        (it stays running in the oracle, so a rerun resumes it from its backup)."""
        import tensorflow as tf

        trial_id = trial.trial_id
        flagfile = self.flagfile(trial)
        model_dir = os.path.join(self.tune_dir, "trials", str(trial_id))
        summary_path = os.path.join(model_dir, "summary.json")
        start = time.time()
        info = {"trial": trial_id, "num_workers": self.workers}
        if tf.io.gfile.exists(summary_path):  # the job had finished when the tuner was killed: do not train it again
            self._print(trial_id, f"dtf.tune: its run in {model_dir} finished already; reading its summary")
            job = {"returncode": exitcodes.OK, "restarts": 0, "error": None, "stalled": False}
        else:
            self._print(trial_id, f"dtf.tune: {self.workers} worker(s): {' '.join(self.command(flagfile))}")
            job = self.run_job(trial_id, flagfile, slot)
            if job is None:
                return None
        info.update(restarts=job["restarts"], wall_time_s=time.time() - start)
        status = job["returncode"]
        if job["stalled"]:
            info.update(status="stalled", message=f"no output for --trial_timeout_s={self.timeout_s:g}")
        elif status == exitcodes.USER_ERROR:
            self.stop(job["error"] or f"trial {trial_id} failed with a user error (exit status 2); see its output")
            return None
        elif self.stopping.is_set() and status in (exitcodes.PREEMPTED, 128 + signal.SIGTERM):
            return None  # stopped by the sweep: it resumes from its backup on the rerun
        elif status == exitcodes.PREEMPTED and self.backend == "slurm":
            self.preempted = True  # the job is being preempted: stop, the script requeues it
            self.stop()
            return None
        elif status == exitcodes.DIVERGED:
            info.update(status="diverged", message=job["error"] or "training diverged")
        elif status != exitcodes.OK:
            info.update(status="failed", message=f"exit status {status} after {job['restarts']} restart(s)")
        else:
            summary = trial_files.read_json(summary_path)
            info.update(status="completed", peak_lr=summary["peak_lr"], global_batch_size=summary["global_batch_size"],
                        num_workers=summary["num_workers"], epochs_run=len(summary.get("history", {}).get("loss", [])),
                        **self.score(summary))
            if "stop_at" in summary:
                info["stop_at"] = summary["stop_at"]
        return info

    # ------------------------------------------------------------------------------------------------ the sweep

    def stop(self, message: Optional[str] = None):
        """Stop the sweep: SIGTERM every running job (its workers back up) and start no other."""
        with self.lock:
            if message is not None and self.user_error is None:
                self.user_error = message
            self.stopping.set()
            for proc in self.running.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)

    def _end(self, trial, info: dict):
        from keras_tuner.engine.trial import TrialStatus

        with self.lock:
            trial_files.write_info(self.tune_dir, trial.trial_id, info)
            if info["status"] == "completed":
                score = info.get("oracle_score", info["objective"])
                self.oracle.update_trial(trial.trial_id, {self.objective: score})
                trial.status = TrialStatus.COMPLETED
            else:
                trial.status, trial.message = TrialStatus.FAILED, info.get("message")
            self.oracle.end_trial(trial)
            # keras-tuner saves oracle.json before it drops the trial from the ongoing ones: save again, or a tuner
            # killed now would run this finished trial again after a reload
            self.oracle.save()
        shown = info["status"] + (f", {self.objective}={info['objective']:g}" if "objective" in info else "")
        self._print(trial.trial_id, f"dtf.tune: trial {trial.trial_id} ended: {shown}")

    def _slot(self, slot: int):
        try:
            self._trials(slot)
        except BaseException as e:  # noqa: B902 -- reported by run() in the main thread
            with self.lock:
                self.failure = self.failure or e
            self.stop()

    def _trials(self, slot: int):
        from keras_tuner.engine.trial import TrialStatus

        tuner_id = f"trials{slot}"
        while not self.stopping.is_set():
            with self.lock:
                trial = self.oracle.create_trial(tuner_id)
            if trial.status == TrialStatus.STOPPED:
                return
            if trial.status != TrialStatus.RUNNING:
                time.sleep(IDLE_WAIT_S)
                continue
            info = self.run_trial(trial, slot)
            if info is None:
                return
            self._end(trial, info)

    def run(self):
        """Run the sweep's trials, `parallel` at a time, until the oracle has no more; UserError for a trial's
        user error (after the other jobs stopped)."""
        slots = [threading.Thread(target=self._slot, args=(i,), name=f"trials{i}", daemon=True)
                 for i in range(self.parallel)]
        for t in slots:
            t.start()
        try:
            for t in slots:
                while t.is_alive():
                    t.join(timeout=0.5)  # short joins: the main thread takes SIGTERM/SIGINT (Stopped) meanwhile
        except BaseException:
            self.stop()
            for t in slots:
                t.join()
            raise
        if self.failure is not None:
            raise self.failure
        if self.user_error is not None:
            raise UserError(self.user_error)
