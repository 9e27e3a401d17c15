"""dtf's exceptions, each carrying the exit status the command-line tools give it (the table in dtf.exitcodes).

A message names the Python arguments it is about (`global_batch_size=100 is not divisible…`) and lists them in
`arguments`; a command-line tool shows the same message with each one spelled as its flag (`--global_batch_size=100`)
through `as_flags`, so one message serves both audiences.
"""
import re
from typing import Mapping, Sequence, Union

from dtf import exitcodes


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
