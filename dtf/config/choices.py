"""The valid values of dtf's string options (and the cluster-timeout default), in a module without TensorFlow: the
flags and Config read them, so `--help` and flag errors never load TensorFlow. The modules that act on them
(strategy, data, scaling) import them from here."""

STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker")
COMMUNICATIONS = ("auto", "ring", "nccl")
CROSS_DEVICE_OPS = ("nccl", "hierarchical_copy", "reduce_to_one")
# Seconds a multi-worker process waits for every other worker to come up before failing (TF's default is forever).
DEFAULT_CLUSTER_TIMEOUT_S = 180

SHARDINGS = ("auto", "batch")
# What a training epoch is (dtf.distribute.inputs.resolve_epoch_mode): auto, a window of a stream of passes, or a pass.
EPOCH_MODES = ("auto", "stream", "pass")

LR_SCALING_RULES = ("linear", "sqrt", "none")
SCHEDULES = ("constant", "cosine", "step", "polynomial")
OPTIMIZERS = ("sgd", "adam", "adamw", "lamb", "lion", "rmsprop", "lars")
