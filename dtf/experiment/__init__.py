"""One training run: the Task API, the Experiment that trains it, its callbacks (backup, preemption, summaries,
progress), the run directory's rerun rules, atomic files, the side-car evaluator."""
from dtf.base.versions import load_tensorflow as _load_tensorflow

_load_tensorflow()  # TensorFlow the dtf way (quiet, version-checked) before any module here imports it
from dtf import optim  # noqa: E402,F401  (registers dtf's schedules and losses: a run's saved model loads anywhere)
