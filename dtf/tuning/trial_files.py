"""What a sweep keeps per trial in --tune_dir beside keras-tuner's own state: an info file (status, timing, peak LR) and
a Hyperband trial's final state. tune_dir I/O goes through tf.io.gfile (any TensorFlow filesystem) and
dtf.experiment.atomic (readers never see half a file)."""
import json
import os

TRIALS_DIR = "trial_info"
HYPERBAND_STATE = "hyperband_state.weights.h5"


def state_path(tune_dir, trial_id) -> str:
    """Where a Hyperband trial's final weights and optimizer state are kept (next to its model_dir files)."""
    return os.path.join(tune_dir, "trials", str(trial_id), HYPERBAND_STATE)


def write_info(tune_dir, trial_id, info):
    import tensorflow as tf

    from dtf.experiment import atomic

    path = os.path.join(tune_dir, TRIALS_DIR)
    tf.io.gfile.makedirs(path)
    atomic.write_json(os.path.join(path, f"{trial_id}.json"), info)


def read_json(path: str):
    import tensorflow as tf

    with tf.io.gfile.GFile(path) as f:
        return json.loads(f.read())


def read_info(tune_dir, trial_id) -> dict:
    """The trial's info, or {} when it never wrote one (e.g. it was still running when the sweep was killed)."""
    import tensorflow as tf

    try:
        return read_json(os.path.join(tune_dir, TRIALS_DIR, f"{trial_id}.json"))
    except (tf.errors.OpError, ValueError):
        return {}
