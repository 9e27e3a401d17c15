"""`python -m dtf.bench` measurements: dtf's overhead against hand-written tf.distribute, the input-pipeline
bottleneck, all-reduce cost, multi-worker scaling."""
from dtf.base.versions import load_tensorflow as _load_tensorflow

_load_tensorflow()  # TensorFlow the dtf way (quiet, version-checked) before any module here imports it
