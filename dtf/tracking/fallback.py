"""The local fallback: what a run could not write to its tracking store, kept in its directory and uploaded later.

When the store stops answering mid-run (dtf.tracking.store's retry budget spent once), every later write of that run
goes to `DIRECTORY/mlflow_fallback.jsonl` instead (the side-car evaluator's to `mlflow_fallback.evaluator.jsonl`):
one JSON object per line, {"tracking_uri", "experiment_id", "run_id", "op"} with an op of dtf.tracking.ops, in the
order written. The file is rewritten whole through a temporary name at each append (dtf.experiment.atomic), so a kill
never leaves half a line. `python -m dtf.tracking sync DIRECTORY` (and a rerun of the run, before it logs anything)
applies each file's ops in order, skipping what the run already holds (dtf.tracking.ops.RunState), then renames the
file to `….jsonl.synced`: syncing twice writes nothing twice.
"""
import collections
import json
import os
from typing import Dict, List, Optional

import tensorflow as tf

from dtf.base.logs import get_logger
from dtf.experiment import atomic
from dtf.tracking import ops, store as store_lib

log = get_logger(__name__)

PREFIX, SUFFIX, SYNCED = "mlflow_fallback", ".jsonl", ".synced"
NAME = PREFIX + SUFFIX


def name_for(role: str = "") -> str:
    """The fallback file of a writer: the run's own (""), or another writer's beside it (e.g. "evaluator")."""
    return f"{PREFIX}.{role}{SUFFIX}" if role else NAME


class Fallback:
    """One fallback file: its entries in memory, the file rewritten atomically at each `append`."""

    def __init__(self, directory: str, name: str = NAME):
        self.path = os.path.join(directory, name)
        self._lines = read_lines(self.path)

    def exists(self) -> bool:
        return bool(self._lines)

    def append(self, entry: dict):
        self._lines.append(json.dumps(entry))
        atomic.write_text(self.path, "\n".join(self._lines) + "\n")

    def reload(self):
        self._lines = read_lines(self.path)


def read_lines(path: str) -> List[str]:
    try:
        with tf.io.gfile.GFile(path) as f:
            return [line for line in f.read().splitlines() if line.strip()]
    except tf.errors.NotFoundError:
        return []


def pending(directory: str) -> List[str]:
    """Every fallback file under `directory` (a run's model_dir, or a sweep's tune_dir with its trials) not synced."""
    found = []
    for folder, _, files in tf.io.gfile.walk(directory):
        found += [os.path.join(folder, f) for f in files if f.startswith(PREFIX) and f.endswith(SUFFIX)]
    return sorted(found)


def sync_file(path: str, uri: Optional[str] = None, stores: Optional[Dict[str, store_lib.Store]] = None) -> dict:
    """Apply the ops of fallback file `path` to their runs (at `uri` instead of the recorded store, when given), then
    rename it `….synced`. Returns counts {"runs", "ops" written, "metrics" points written, "skipped" points the runs
    had}; raises TrackingUnavailable (the file is kept: rerun later) when a store does not answer."""
    stores = {} if stores is None else stores
    groups = collections.OrderedDict()
    for number, line in enumerate(read_lines(path), 1):
        try:
            entry = json.loads(line)
            groups.setdefault((uri or entry["tracking_uri"], entry["run_id"]), []).append(entry["op"])
        except (ValueError, KeyError, TypeError):
            log.warning(f"{path}:{number} is not a fallback record; skipped")
    counts = {"runs": len(groups), "ops": 0, "metrics": 0, "skipped": 0}
    for (target, run_id), entries in groups.items():
        store = stores.get(target) or stores.setdefault(target, store_lib.Store(target))
        run = store.call("reading the run", store.client.get_run, run_id)
        state = ops.load_state(store, run)
        for op in entries:
            sent = state.filter(op) or {}
            written = len(sent.get("metrics", ()))
            if sent:
                ops.apply(store, run_id, sent, os.path.dirname(path))
                counts["ops"] += 1
            counts["metrics"] += written
            counts["skipped"] += len(op.get("metrics", ())) - written
    tf.io.gfile.rename(path, path + SYNCED, overwrite=True)
    return counts


def sync(directory: str, uri: Optional[str] = None) -> List[str]:
    """Sync every pending fallback file under `directory`; one line per file for the user."""
    lines, stores = [], {}
    for path in pending(directory):
        counts = sync_file(path, uri, stores)
        lines.append(f"{path}: {counts['ops']} write(s) to {counts['runs']} run(s), {counts['metrics']} metric "
                     f"point(s); {counts['skipped']} point(s) the run(s) had already")
    return lines
