"""The one exit-status table every dtf command, the launcher, the sbatch script and the TFJob restart policy read.

| status | meaning | restarted? |
|---|---|---|
| 0 | done | no |
| 1 | crash (an unexpected exception, or any status not listed here) | yes, up to --max_restarts |
| 2 | user error: a bad flag, value or file, or a write the environment refused (permission denied, disk full); the message names it | never |
| 3 | diverged: the loss became NaN/inf (lower the LR, add warmup, clip) | never |
| 143 | preempted: on SIGTERM every worker stopped at one agreed step and the chief backed up there; the rerun resumes at that step | always (not counted as a restart) |

143 is what a shell reports for a process ended by SIGTERM (128 + 15), so a cluster manager that knows nothing of
dtf reads a preempted dtf job the way it reads any job it terminated, and Kubeflow's `restartPolicy: ExitCode`
(1–127 permanent, 128–255 retryable) retries it and never retries 2 or 3.
"""
OK = 0
CRASH = 1
USER_ERROR = 2
DIVERGED = 3
PREEMPTED = 143

NEVER_RESTART = (USER_ERROR, DIVERGED)

# Seconds a worker has from SIGTERM to agree on a step, back up and exit 143 (then it exits 143 without a backup):
# under Kubernetes' default terminationGracePeriodSeconds (30) and Slurm's default KillWait (30 s after scancel's
# SIGTERM); --signal=TERM@120 leaves more. The launcher waits a little longer for its workers before SIGKILL.
PREEMPTION_GRACE_S = 25.0
LAUNCHER_GRACE_S = PREEMPTION_GRACE_S + 5


def should_restart(status: int) -> bool:
    """True for a crash or a preemption; False for success, a user error or divergence."""
    return status not in (OK, *NEVER_RESTART)
