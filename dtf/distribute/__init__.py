"""tf.distribute plumbing: strategy creation, per-replica input pipelines (exactly-once sharding), the tf.data
service."""
from dtf.base.versions import load_tensorflow as _load_tensorflow

_load_tensorflow()  # TensorFlow the dtf way (quiet, version-checked) before any module here imports it
