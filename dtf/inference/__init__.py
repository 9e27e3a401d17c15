"""Distributed prediction with a saved model, and writing predictions to files."""
from dtf.base.versions import load_tensorflow as _load_tensorflow

_load_tensorflow()  # TensorFlow the dtf way (quiet, version-checked) before any module here imports it
from dtf.inference.predictor import Predictions, load_model, predict  # noqa: E402  (the API, as `dtf.inference` had it)

__all__ = ["Predictions", "load_model", "predict"]
