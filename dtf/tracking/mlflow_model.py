"""A run's model.keras as an MLflow Keras model (`runs:/RUN_ID/model`, `models:/m-…`) that `mlflow.pyfunc.load_model`
serves in a process without dtf: it is logged without its optimizer and loss (loaded with compile=False), so loading
it needs none of dtf's registered schedules or losses; a --task model's own layers need the task's module importable
where it is loaded, as for `keras.saving.load_model`."""
import importlib
import os

import keras
import numpy as np
import tensorflow as tf

from dtf.tracking import ops


def signature(model: keras.Model):
    """A tensor signature from the model's own input and output shapes (batch dimension open), or None for a model
    with several inputs or outputs (MLflow then infers nothing and serves it anyway)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    inputs, outputs = getattr(model, "inputs", None) or [], getattr(model, "outputs", None) or []
    if len(inputs) != 1 or len(outputs) != 1:
        return None

    def spec(tensor):
        return Schema([TensorSpec(np.dtype(keras.backend.standardize_dtype(tensor.dtype)),
                                  (-1, *[-1 if d is None else int(d) for d in tensor.shape[1:]]))])

    return ModelSignature(inputs=spec(inputs[0]), outputs=spec(outputs[0]))


def _import_task(model_dir: str):
    """Import the --task module flags.txt names, so that its layers deserialize (dtf.tracking sync, in a process of
    its own)."""
    try:
        with tf.io.gfile.GFile(os.path.join(model_dir, "flags.txt")) as f:
            specs = [line.strip()[len("--task="):] for line in f if line.startswith("--task=")]
    except tf.errors.NotFoundError:
        return
    if specs:
        from dtf.experiment import task as task_lib

        task_lib.resolve(specs[-1])


def log(store, run_id: str, path: str):
    """Log the Keras model at `path` to run `run_id` of `store` as its model named `model`."""
    from mlflow.models import Model

    importlib.import_module("dtf.experiment")  # registers dtf's schedules and losses: a dtf model.keras loads

    _import_task(os.path.dirname(path))
    local = ops.local_copy(path)
    model = keras.saving.load_model(local, compile=False)
    run = store.call("reading the run", store.client.get_run, run_id)
    mlflow = store.mlflow
    # MLflow's Model.log files the model under the *active* experiment (experiment 0 unless set), not its run's; and
    # `runs:/RUN_ID/model` only finds a model filed under the run's own experiment (BUILD_NOTES.md).
    mlflow.set_tracking_uri(store.connect_uri)
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
    requirements = [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"]  # no inference subprocess
    store.call("logging the model", Model.log, artifact_path=None, name=ops.MODEL_NAME, flavor=mlflow.keras,
               run_id=run_id, model=model, signature=signature(model), pip_requirements=requirements)
