"""dtf's exceptions, each carrying the exit status the command-line tools give it (the table in dtf.base.exitcodes).

A message names the Python arguments it is about (`global_batch_size=100 is not divisible…`) and lists them in
`arguments`; a command-line tool shows the same message with each one spelled as its flag (`--global_batch_size=100`)
through `as_flags`, so one message serves both audiences. `guard` is the one path from an exception to a line and an
exit status that every dtf command takes.
"""
import re
import sys
from typing import Callable, Mapping, Sequence, Union

from dtf.base import exitcodes


class DtfError(Exception):
    """An error dtf reports on one line (no traceback) with its own exit status."""

    exit_status = exitcodes.CRASH

    def __init__(self, message: str, *, arguments: Union[Sequence[str], Mapping[str, str]] = ()):
        """`arguments`: the argument names the message uses, or {argument: flag} where the flag is named differently."""
        super().__init__(message)
        self.arguments = dict(arguments) if isinstance(arguments, Mapping) else {a: a for a in arguments}

    def as_flags(self) -> str:
        """The message with every argument it names spelled as the flag a command-line user typed."""
        text = str(self).replace("\n", " ")
        for name, flag in self.arguments.items():
            text = re.sub(rf"(?<![\w-]){re.escape(name)}\b", f"--{flag}", text)
        return text


class UserError(DtfError, ValueError):
    """Bad input from the user (a flag, a value, a file). The message names the input and the fix. Never retried."""

    exit_status = exitcodes.USER_ERROR


class WriteFailed(DtfError, OSError):
    """The environment refused one of dtf's writes (permission denied, disk full): the message names the path. Not
    retried (status 2): a rerun fails the same way until someone fixes the path, then resumes from the backup."""

    exit_status = exitcodes.USER_ERROR


class TrainingDiverged(DtfError, ArithmeticError):
    """The loss became NaN/inf (a bad learning rate or warmup): not a crash, and rerunning the same job cannot help."""

    exit_status = exitcodes.DIVERGED


class Preempted(DtfError):
    """The job was preempted: it stopped at a step every worker reached and backed up there (or, when the workers
    could not agree in time, without a new backup). Exit 143: the rerun resumes."""

    exit_status = exitcodes.PREEMPTED


class PortTaken(DtfError):
    """This task's worker port is already bound by another program (or job) on this node: a crash, so the script
    reruns the step on other ports."""

    exit_status = exitcodes.CRASH

    def __init__(self, port: int, host: str, environ: Mapping[str, str], port_env: str):
        super().__init__(f"port {port} on {host} (task {environ['SLURM_PROCID']} of job "
                         f"{environ.get('SLURM_JOB_ID', '?')}) is already in use by another program; the job script "
                         f"reruns the step on other ports while --max_restarts allows, or set "
                         f"{port_env}=<a free port> for the job")


class TrackingUnavailable(UserError):
    """The MLflow tracking store (--tracking_uri) did not answer within dtf's retry budget. Before a run starts that is
    a user error (start the server or fix the URI; nothing is written); once it trains, dtf catches it and logs to a
    local fallback file instead (dtf.tracking), so it never stops training."""


class Stopped(BaseException):
    """SIGINT/SIGTERM to a process that runs a group: a BaseException so that it unwinds through `run_group`, which
    then stops every process of the group."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def report(prog: str, error: DtfError) -> int:
    """Print `error` as one line naming flags (not Python arguments); return its exit status."""
    sys.stderr.write(f"{prog}: error: {error.as_flags()}\n")
    return error.exit_status


def guard(prog: str, body: Callable[[], int]) -> int:
    """Run `body()`; a dtf error is reported on one line with its status, Ctrl-C is status 130. Anything else is a
    crash and keeps its traceback (status 1)."""
    try:
        return body()
    except DtfError as e:
        return report(prog, e)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return INTERRUPTED
