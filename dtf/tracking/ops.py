"""What dtf writes to an MLflow run, as plain records ("ops") applied to a store now, or kept in the fallback file and
applied later by `dtf.tracking sync`: one format, one writer (`apply`).

An op is a JSON object: {"op": "batch", "metrics": [[key, value, timestamp_ms, step], ...], "params": {...},
"tags": {...}}, {"op": "artifact", "path": FILE, "artifact_dir": DIR}, {"op": "model", "path": MODEL_KERAS} or
{"op": "status", "status": "RUNNING|FINISHED|FAILED|KILLED"}. `apply` writes as it is told; what may be written is
decided before, against the run's `RunState`, so that nothing lands twice:
- a metric point is written only at a step past the last step that metric has in the run (MLflow keeps every point
  it is sent, so a resumed epoch logged again would show each step twice): a step is logged once, the first time
  training reaches it;
- a param keeps its first value (MLflow refuses a change); a rerun's other value becomes the tag
  `dtf.param_changed.NAME`;
- the model is logged once.
"""
import dataclasses
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

# MLflow's limits for one log_batch request (mlflow.utils.validation).
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100
MODEL_NAME = "model"  # the logged model's name: `runs:/RUN_ID/model`


def batch(points: Sequence[Tuple[str, float, int, int]] = (), params: Optional[Dict[str, str]] = None,
          tags: Optional[Dict[str, str]] = None) -> dict:
    return {"op": "batch", "metrics": [list(p) for p in points], "params": dict(params or {}),
            "tags": dict(tags or {})}


def artifact(path: str, artifact_dir: str = "") -> dict:
    return {"op": "artifact", "path": path, "artifact_dir": artifact_dir}


def model(path: str) -> dict:
    return {"op": "model", "path": path}


def status(value: str) -> dict:
    return {"op": "status", "status": value}


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclasses.dataclass
class RunState:
    """What a run already holds, for deciding what to write: each metric's last step, the params, whether its model
    is logged."""

    last_step: Dict[str, int] = dataclasses.field(default_factory=dict)
    params: Dict[str, str] = dataclasses.field(default_factory=dict)
    model_logged: bool = False

    def take_points(self, points: Sequence[Sequence]) -> List[list]:
        """The points of `points` ([key, value, timestamp, step]) past each key's last step, in order; they count as
        written from now on."""
        out = []
        for key, value, timestamp, step in points:
            if step > self.last_step.get(key, -1):
                self.last_step[key] = int(step)
                out.append([key, float(value), int(timestamp), int(step)])
        return out

    def take_params(self, params: Dict[str, str]) -> Tuple[Dict[str, str], Dict[str, str]]:
        """(params to log, tags to set): new params are logged; one with another value than the run's is a tag."""
        new, changed = {}, {}
        for name, value in params.items():
            value = str(value)[:6000]  # MLflow's limit for a param value
            if name not in self.params:
                new[name] = self.params[name] = value
            elif self.params[name] != value:
                changed[f"dtf.param_changed.{name}"] = value
        return new, changed

    def filter(self, op: dict) -> Optional[dict]:
        """`op` reduced to what the run does not hold yet (None: nothing left), counting it as written."""
        if op["op"] == "batch":
            params, changed = self.take_params(op.get("params", {}))
            out = batch(self.take_points(op.get("metrics", [])), params, {**op.get("tags", {}), **changed})
            return out if out["metrics"] or out["params"] or out["tags"] else None
        if op["op"] == "model":
            if self.model_logged:
                return None
            self.model_logged = True
        return op


def load_state(store, run) -> RunState:
    """The state of `run` (an mlflow Run) in `store`: one history read per metric it has."""
    state = RunState(params=dict(run.data.params))
    for key in run.data.metrics:
        history = store.call(f"reading the history of {key}", store.client.get_metric_history, run.info.run_id, key)
        state.last_step[key] = max((m.step for m in history), default=-1)
    outputs = getattr(run, "outputs", None)
    state.model_logged = bool(outputs is not None and getattr(outputs, "model_outputs", None))
    return state


def metric_points(values: Dict[str, float], step: int, timestamp: Optional[int] = None) -> List[list]:
    """[key, value, timestamp, step] for each number in `values` (NaN and inf included: MLflow keeps them)."""
    timestamp = now_ms() if timestamp is None else timestamp
    out = []
    for key, value in values.items():
        try:
            out.append([key, float(value), timestamp, int(step)])
        except (TypeError, ValueError):  # not a scalar (Keras logs hold only numbers; a task's callback may not)
            continue
    return out


def apply(store, run_id: str, op: dict, directory: str):
    """Write `op` to run `run_id` (each request with the store's retry budget); `directory` resolves relative paths."""
    client, kind = store.client, op["op"]
    if kind == "batch":
        from mlflow.entities import Metric, Param, RunTag

        metrics = [Metric(k, v, t, s) for k, v, t, s in op.get("metrics", [])]
        params = [Param(k, v) for k, v in op.get("params", {}).items()]
        tags = [RunTag(k, str(v)[:8000]) for k, v in op.get("tags", {}).items()]
        for i in range(0, max(len(params), len(tags)), MAX_PARAMS):
            store.call("logging params and tags", client.log_batch, run_id, params=params[i:i + MAX_PARAMS],
                       tags=tags[i:i + MAX_TAGS])
        for i in range(0, len(metrics), MAX_METRICS):
            store.call("logging metrics", client.log_batch, run_id, metrics=metrics[i:i + MAX_METRICS])
    elif kind == "artifact":
        path = local_copy(os.path.join(directory, op["path"]))
        store.call(f"uploading {op['path']}", client.log_artifact, run_id, path, op.get("artifact_dir") or None)
    elif kind == "model":
        from dtf.tracking import mlflow_model

        mlflow_model.log(store, run_id, os.path.join(directory, op["path"]))
    elif kind == "status":
        if op["status"] == "RUNNING":
            store.call("setting the run's status", client.update_run, run_id, status="RUNNING")
        else:
            store.call("ending the run", client.set_terminated, run_id, op["status"])
    else:
        raise ValueError(f"unknown tracking op {kind!r}")


def local_copy(path: str) -> str:
    """A local copy of `path` when it is on a remote TensorFlow filesystem (MLflow uploads local files only)."""
    if "://" not in path:
        return path
    import tempfile

    import tensorflow as tf

    local = os.path.join(tempfile.mkdtemp(prefix="dtf-artifact-"), os.path.basename(path))
    tf.io.gfile.copy(path, local, overwrite=True)
    return local
