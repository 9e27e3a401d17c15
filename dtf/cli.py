"""What every dtf command-line tool shares: quiet TensorFlow unless asked, absl flag parsing with one-line errors
(exit 2, no traceback) for user mistakes, and `--helpfull`."""
import os
import sys
from typing import Callable, List

from dtf.exitcodes import USER_ERROR as EXIT_USAGE  # noqa: E402


def wants_debug(argv: List[str]) -> bool:
    """absl's --verbosity (-v) >= 1 shows TensorFlow's own logs; read before TensorFlow is imported."""
    for i, arg in enumerate(argv):
        for prefix in ("--verbosity=", "-v="):
            if arg.startswith(prefix):
                return arg[len(prefix):].lstrip("-").isdigit() and int(arg[len(prefix):]) >= 1
        if arg in ("--verbosity", "-v") and i + 1 < len(argv):
            return argv[i + 1].isdigit() and int(argv[i + 1]) >= 1
    return False


def fail(prog: str, message: str, code: int = EXIT_USAGE):
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.exit(code)


HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull")


def print_help(doc: str, task_modules=()):
    """The tool's doc, then its flags grouped by concern (dtf's groups and the --task module's, plus absl's
    --verbosity)."""
    from absl import flags

    print(doc.strip() + "\n")
    for module in flags.FLAGS.flags_by_module_dict():  # in definition order: strategy, cluster, data, ...
        if str(module).startswith("dtf") or module in task_modules:
            print(flags.FLAGS.module_help(module) + "\n")
    print("logging:\n  --verbosity: 1 (or -v 1) shows TensorFlow's own logs; default quiet.")


def main(prog: str, define: Callable[[List[str]], None], body: Callable[[List[str]], int], argv=None, doc: str = ""):
    """Define flags (`define(argv)`: a --task module's flags depend on the command line), parse them (absl:
    --flagfile, nesting, command line overrides the file), then run `body(rest_argv)`.

    A `UserError` or a flag error anywhere becomes one line on stderr and exit status 2."""
    argv = list(sys.argv if argv is None else argv)
    if wants_debug(argv):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
    from absl import flags

    from dtf import logs
    from dtf.errors import UserError

    try:
        define(argv)
    except UserError as e:
        fail(prog, str(e).replace("\n", " "))
    if set(HELP_FLAGS) & set(argv[1:]):
        from dtf.flags import task_spec

        spec = task_spec(argv)
        if spec:
            from dtf.task import module_name
        print_help(doc or prog, [module_name(spec)] if spec else ())
        return 0
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        fail(prog, str(e).replace("\n", " "))
    if flags.FLAGS["verbosity"].value >= 1:
        logs.set_verbosity("debug")
    try:
        if len(rest) > 1:
            raise UserError(f"unexpected argument(s) {' '.join(rest[1:])}; flags look like --name=value")
        return body(rest)
    except UserError as e:
        fail(prog, str(e).replace("\n", " "))
    except KeyboardInterrupt:
        fail(prog, "interrupted", 130)
