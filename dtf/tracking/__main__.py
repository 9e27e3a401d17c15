"""`python -m dtf.tracking sync DIRECTORY [--tracking_uri=URI]`: upload what runs under DIRECTORY (a model_dir, or a
dtf.tune --tune_dir with its trials) logged to their local fallback files while their MLflow tracking store did not
answer, to the runs they belong to (at the store each file records, or at --tracking_uri when the store moved).

Each file's writes are applied in order and what its run already holds is skipped (a metric's step it has, a param, the
model), then the file is renamed `….jsonl.synced`: syncing twice writes nothing twice. A store that does not answer
is an error (status 2) and the file stays for the next try.
"""
import sys

from absl import flags

from dtf.base import exitcodes
from dtf.base.errors import UserError, guard

FLAGS = flags.FlagValues()
flags.DEFINE_string("tracking_uri", None, "Upload to this MLflow tracking store instead of the one each fallback "
                    "file records (the same store at a new address).", flag_values=FLAGS)
COMMANDS = ("sync",)


def _main(argv) -> int:
    if {"-h", "--help", "--helpfull"} & set(argv[1:]):
        print(__doc__ + "\nFlags:\n" + FLAGS.get_help())
        return exitcodes.OK
    FLAGS.unparse_flags()
    try:
        args = FLAGS(argv)[1:]
    except flags.Error as e:
        raise UserError(str(e)) from None
    if len(args) != 2 or args[0] not in COMMANDS:
        raise UserError("usage: python -m dtf.tracking sync DIRECTORY [--tracking_uri=URI]")
    from dtf.tracking import store

    store.require_mlflow()
    from dtf.base import versions

    versions.load_tensorflow()  # the files may be on any TensorFlow filesystem; a logged model loads with Keras
    import tensorflow as tf

    from dtf.tracking import fallback

    directory = args[1]
    if not tf.io.gfile.isdir(directory):
        raise UserError(f"{directory}: no such directory; give the --model_dir (or --tune_dir) of a run")
    lines = fallback.sync(directory, FLAGS.tracking_uri)
    for line in lines:
        print(f"dtf.tracking: {line}")
    if not lines:
        print(f"dtf.tracking: nothing to sync under {directory} (no mlflow_fallback*.jsonl)")
    return exitcodes.OK


def main(argv=None) -> int:
    return guard("dtf.tracking", lambda: _main(list(sys.argv if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
