"""What every dtf command-line tool shares: the one error path (a dtf error anywhere becomes one line
`prog: error: …` with its exit status from dtf.base.exitcodes, no traceback), absl flag parsing, and `--help` with the
exit-status table. Nothing here imports TensorFlow: `--help` and flag errors stay instant."""
import os
import sys
from typing import Callable, List, Sequence

from dtf.base import exitcodes, logs
from dtf.base.errors import UserError, guard
from dtf.config import specs

HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull")


def exit_status_help() -> str:
    """The exit-status table of dtf.base.exitcodes (its docstring is the one source), for `--help`."""
    rows = [line.strip("|").split("|") for line in exitcodes.__doc__.splitlines()
            if line.startswith("| ") and not line.startswith("| status")]
    return "exit status:\n" + "\n".join(f"  {s.strip():>4}  {m.strip()}; restarted: {r.strip()}" for s, m, r in rows)


def print_help(doc: str, task_modules: Sequence[str] = ()):
    """The tool's doc, then its flags grouped by concern (dtf's groups and the --task module's, plus absl's
    --verbosity)."""
    from absl import flags

    print(doc.strip() + "\n")
    for module in flags.FLAGS.flags_by_module_dict():  # in definition order: strategy, cluster, data, ...
        if str(module).startswith("dtf") or module in task_modules:
            print(flags.FLAGS.module_help(module) + "\n")
    print("logging:\n  --verbosity: 1 (or -v 1) shows TensorFlow's own logs; default quiet.\n")
    print(exit_status_help())


def define_task_flags(argv: Sequence[str]):
    """Import the --task module named in `argv` before the command line is parsed, which defines its flags."""
    from dtf.config.flags import task_spec

    spec = task_spec(argv)
    if spec:
        from dtf.experiment import task as task_lib  # loads TensorFlow: only when there is a task to import

        task_lib.resolve(spec)


def parse_flags(argv: Sequence[str], flag_values=None) -> List[str]:
    """absl parsing (--flagfile, nesting, command line overrides the file); a bad flag is a UserError."""
    from absl import flags

    flag_values = flag_values or flags.FLAGS
    try:
        return flag_values(list(argv))
    except flags.CantOpenFlagFileError as e:  # absl's text: "ERROR:: Unable to open flagfile: [Errno 2] ...: 'x'"
        cause = e.__context__
        if isinstance(cause, OSError) and cause.filename:
            where = "" if os.path.isabs(cause.filename) else f" (read relative to {os.getcwd()})"
            raise UserError(f"--flagfile={cause.filename}: {cause.strerror.lower()}{where}; give the path of an "
                            "existing flagfile") from None
        raise UserError(str(e).replace("ERROR:: ", "")) from None
    except flags.Error as e:
        raise UserError(str(e)) from None


def main(prog: str, define: Callable[[List[str]], None], body: Callable[[List[str]], int], argv=None,
         doc: str = "") -> int:
    """Define the flags (`define(argv)`: a --task module's own flags depend on the command line), parse them, run
    `body(rest_argv)`, all behind the one error path (`guard`)."""
    argv = list(sys.argv if argv is None else argv)
    if logs.wants_debug(argv):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")

    def run() -> int:
        from absl import logging  # noqa: F401  (defines --verbosity; TensorFlow is not there yet to import it)
        from absl import flags

        define(argv)
        if set(HELP_FLAGS) & set(argv[1:]):
            from dtf.config.flags import task_spec

            spec = task_spec(argv)  # its module is imported already (define), and TensorFlow with it
            print_help(doc or prog, [specs.module_name(spec)] if spec else ())
            return exitcodes.OK
        rest = parse_flags(argv)
        if flags.FLAGS["verbosity"].value >= 1:
            logs.set_verbosity("debug")
        if len(rest) > 1:
            raise UserError(f"unexpected argument(s) {' '.join(rest[1:])}; flags look like --name=value")
        return body(rest)

    return guard(prog, run)


def exit(status: int):
    """End a dtf command with `status`, like sys.exit. One that is done (0) or preempted (dtf.experiment.preemption) has
    written and closed everything it will (its results atomically; TensorBoard writers close at the end of training):
    once TensorFlow is loaded it exits at once, skipping TensorFlow's teardown, which adds nothing but waiting. Measured
    (BUILD_NOTES.md, "Exit"): destroying the input iterators Keras leaves alive (per-device iterators of pipelines
    that work ahead) took 1.5-10 s each, serially, so a run lingered 12 s to minutes after its summary and once never
    exited; a preempted run's coordination-service shutdown waits for every peer (6 s past the grace period with a
    frozen peer), after the watchdog can no longer run (Python is finalizing)."""
    if status in (0, exitcodes.PREEMPTED) and "tensorflow" in sys.modules:  # --help etc. exit normally
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
