"""Experiment tracking in MLflow (`--tracking_uri`, `--experiment_name`; the `mlflow` extra): the chief alone logs
a run's params, metrics at their optimizer step, model and status; a rerun continues its MLflow run (the run id is
kept in model_dir); a sweep is a parent run with a child per trial; a tracking server that goes away mid-run never
stops training (a local fallback file, uploaded later by `python -m dtf.tracking sync MODEL_DIR`).

Light: importing this package imports neither MLflow nor TensorFlow (the commands check `--tracking_uri` before
either loads); `store` imports MLflow when a store is first used, the other modules load TensorFlow."""
