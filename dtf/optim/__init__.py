"""Everything that turns gradients into updates: LR scaling rules and schedules, the optimizer factory, gradient
accumulation, LARS, replica-aware losses, the gradient noise scale.

Importing it registers dtf's schedules and losses with Keras's deserializer, so a saved dtf model loads."""
from dtf.base.versions import load_tensorflow as _load_tensorflow

_load_tensorflow()  # TensorFlow the dtf way (quiet, version-checked) before any module here imports it
from dtf.optim import losses, scaling  # noqa: E402,F401  (registration, see above)
