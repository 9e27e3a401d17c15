"""One MLflow run of a dtf run directory: the run id kept in the directory (so a rerun continues the run), what is
written to it (through dtf.tracking.ops, so nothing lands twice), its status from dtf's exit status, and the switch to
the fallback file when the store stops answering.

`DIRECTORY/mlflow_run.json` = {"runs": {TRACKING_URI: {"run_id": …, "experiment_id": …}}}, written atomically by the
one process that logs (a run's chief; a sweep's chief for its parent run, each trial's trainer for the trial): a
restarted, requeued or preempted run finds its run there and continues it (status RUNNING again). Keyed by the
canonical tracking URI, so the same directory tracked at another store starts a run there instead of looking for a
run id that store never had.

Status from dtf's exit status (dtf.base.exitcodes): 0 → FINISHED; preempted (143) or interrupted (130, another
signal) → KILLED, since a requeued run continues the same MLflow run and sets it RUNNING again; a crash (1), user
error (2) or divergence (3) → FAILED. The exit status is also the tag `dtf.exit_status`. A run killed outright
(SIGKILL, a preemption watchdog) sets nothing: it stays RUNNING until its rerun continues it.
"""
import contextlib
import json
import os
import time
from typing import Dict, Iterator, Optional

import tensorflow as tf

from dtf.base import exitcodes
from dtf.base.errors import INTERRUPTED, DtfError, Stopped, TrackingUnavailable
from dtf.base.logs import get_logger
from dtf.experiment import atomic
from dtf.tracking import fallback as fallback_lib, ops, store as store_lib

log = get_logger(__name__)

RECORD = "mlflow_run.json"
# Step-level points are sent at least this often (and at every epoch's end); a test sets it to 0 (send each at once).
FLUSH_ENV = "DTF_TRACKING_FLUSH_S"
FLUSH_EVERY_S = 15.0


def flush_every_s() -> float:
    try:
        return max(0.0, float(os.environ.get(FLUSH_ENV) or FLUSH_EVERY_S))
    except ValueError:
        return FLUSH_EVERY_S


def read_record(directory: str) -> dict:
    try:
        with tf.io.gfile.GFile(os.path.join(directory, RECORD)) as f:
            record = json.loads(f.read())
    except (tf.errors.NotFoundError, ValueError):
        return {"runs": {}}
    return record if isinstance(record.get("runs"), dict) else {"runs": {}}


def recorded(directory: str, uri: str) -> Optional[Dict[str, str]]:
    """{"run_id", "experiment_id"} of the run `directory` has at tracking URI `uri` (None: none yet)."""
    return read_record(directory)["runs"].get(store_lib.canonical(uri))


def write_record(directory: str, uri: str, run_id: str, experiment_id: str):
    record = read_record(directory)
    record["runs"][store_lib.canonical(uri)] = {"run_id": run_id, "experiment_id": experiment_id}
    atomic.write_json(os.path.join(directory, RECORD), record)


def exit_status_of(error: Optional[BaseException]) -> int:
    """The exit status a dtf command gives `error` (None: success), as dtf.base.errors.guard does."""
    if error is None:
        return exitcodes.OK
    if isinstance(error, DtfError):
        return error.exit_status
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(error, Stopped):
        return 128 + error.signum
    return exitcodes.CRASH


def mlflow_status(exit_status: int) -> str:
    if exit_status == exitcodes.OK:
        return "FINISHED"
    if exit_status == exitcodes.PREEMPTED or exit_status > 128:
        return "KILLED"
    return "FAILED"


class TrackedRun:
    """Writes to one MLflow run; `open` finds or creates it. Metric points are buffered and sent at `flush` (an
    epoch's end, and every FLUSH_EVERY_S); every write goes through the store's retry budget, and once that is
    spent, to the fallback file for the rest of the process (one warning). A write the store refuses (not a
    transient error) is dropped with a warning: tracking never stops a run."""

    def __init__(self, store: store_lib.Store, directory: str, run_id: str, experiment_id: str,
                 state: ops.RunState, fallback_name: str = fallback_lib.NAME, falling_back: bool = False):
        self.store, self.directory, self.run_id, self.experiment_id = store, directory, run_id, experiment_id
        self.state = state
        self.fallback = fallback_lib.Fallback(directory, fallback_name)
        self.falling_back = falling_back
        self._buffer, self._flushed_at, self._warned = [], time.monotonic(), set()

    @classmethod
    def open(cls, store: store_lib.Store, directory: str, experiment_name: str, *, run_name: str,
             tags: Dict[str, str], parent_run_id: Optional[str] = None, fallback_name: str = fallback_lib.NAME,
             resume: bool = True, record: bool = True) -> "TrackedRun":
        """The run `directory` records at this store (resume=True), continued: what a fallback file of it holds is
        uploaded first, then its status is RUNNING again. Otherwise a new run in `experiment_name` (a child of
        `parent_run_id`), recorded in `directory` (unless record=False: a run nothing continues). Reads the store:
        call it after `store.check`."""
        falling_back = _upload_pending(store, directory, fallback_name)
        mine = recorded(directory, store.uri) if resume else None
        run = _existing_run(store, mine["run_id"]) if mine else None
        if run is None:
            experiment_id = store.experiment_id(experiment_name)
            if parent_run_id:
                tags = {**tags, "mlflow.parentRunId": parent_run_id}
            run = store.call("creating the run", store.client.create_run, experiment_id, run_name=run_name,
                             tags=tags)
            if record:
                write_record(directory, store.uri, run.info.run_id, experiment_id)
            log.info(f"MLflow: logging to run {run.info.run_id}: {store.run_url(experiment_id, run.info.run_id)}")
            return cls(store, directory, run.info.run_id, experiment_id, ops.RunState(), fallback_name, falling_back)
        tracked = cls(store, directory, run.info.run_id, run.info.experiment_id, ops.load_state(store, run),
                      fallback_name, falling_back)
        log.info(f"MLflow: continuing run {run.info.run_id} ({run.info.status} until now): "
                 f"{store.run_url(run.info.experiment_id, run.info.run_id)}")
        tracked.set_tags({k: v for k, v in tags.items() if k != "mlflow.runName"})
        tracked.set_status("RUNNING")
        return tracked

    @classmethod
    def attach(cls, store: store_lib.Store, directory: str, fallback_name: str) -> Optional["TrackedRun"]:
        """Another writer of the run `directory` records (the side-car evaluator beside a run's chief): its status is
        left alone, its writes fall back to a file of its own. None while the directory records no run."""
        mine = recorded(directory, store.uri)
        run = _existing_run(store, mine["run_id"]) if mine else None
        if run is None:
            return None
        falling_back = _upload_pending(store, directory, fallback_name)
        run = store.call("reading the run", store.client.get_run, run.info.run_id)
        return cls(store, directory, run.info.run_id, run.info.experiment_id, ops.load_state(store, run),
                   fallback_name, falling_back)

    # --- what is written
    def metrics(self, values: Dict[str, float], step: int):
        """Buffer `values` at `step` (each metric's steps only go forward: a step it has is not sent again)."""
        self._buffer += self.state.take_points(ops.metric_points(values, step))

    def flush(self, every_s: Optional[float] = None):
        """Send the buffered points (with every_s: only when the last send is that old)."""
        if not self._buffer or (every_s is not None and time.monotonic() - self._flushed_at < every_s):
            return
        points, self._buffer, self._flushed_at = self._buffer, [], time.monotonic()
        self._write(ops.batch(points))

    def log_params(self, params: Dict[str, str]):
        self._write_filtered(ops.batch(params={k: str(v) for k, v in params.items()}))

    def set_tags(self, tags: Dict[str, str]):
        self._write_filtered(ops.batch(tags={k: str(v) for k, v in tags.items()}))

    def artifact(self, path: str, artifact_dir: str = ""):
        """Upload `path` (relative to the run's directory) if it exists."""
        if tf.io.gfile.exists(os.path.join(self.directory, path)):
            self._write(ops.artifact(path, artifact_dir))

    def model(self, path: str):
        """Log the Keras model at `path` (relative to the directory) as the run's MLflow model, once."""
        if tf.io.gfile.exists(os.path.join(self.directory, path)):
            self._write_filtered(ops.model(path))

    def set_status(self, status: str):
        self._write(ops.status(status))

    def end(self, error: Optional[BaseException] = None):
        """Flush, then end the run with the status of `error`'s exit status (None: FINISHED)."""
        status = exit_status_of(error)
        self.flush()
        self.set_tags({"dtf.exit_status": str(status)})
        self.set_status(mlflow_status(status))

    @property
    def last_step(self) -> int:
        return max(self.state.last_step.values(), default=0)

    # --- how
    def _write_filtered(self, op: dict):
        op = self.state.filter(op)
        if op is not None:
            self._write(op)

    def _write(self, op: dict):
        if not self.falling_back:
            try:
                ops.apply(self.store, self.run_id, op, self.directory)
                return
            except TrackingUnavailable as e:
                self.falling_back = True
                log.warning(f"MLflow: {e.as_flags()}; training goes on, logging to {self.fallback.path} instead; "
                            f"upload it later with: python -m dtf.tracking sync {self.directory}")
            except Exception as e:  # noqa: BLE001  (refused by the store, or a bug: never stop training for it)
                if op["op"] not in self._warned:
                    self._warned.add(op["op"])
                    log.warning(f"MLflow refused a {op['op']} write to run {self.run_id} "
                                f"({type(e).__name__}: {store_lib.reason(e)}); dropped, training goes on")
                return
        self.fallback.append({"tracking_uri": self.store.uri, "experiment_id": self.experiment_id,
                              "run_id": self.run_id, "op": op})


@contextlib.contextmanager
def ending(run: TrackedRun) -> Iterator[TrackedRun]:
    """Ends `run` when the block does: FINISHED, or by the exit status of the exception leaving it."""
    try:
        yield run
    except BaseException as e:
        run.end(e)
        raise
    run.end()


def _existing_run(store: store_lib.Store, run_id: str):
    """The run `run_id` if the store has it and it is not deleted (else None, with a warning: a new run starts)."""
    try:
        run = store.call("reading the recorded run", store.client.get_run, run_id)
    except store.mlflow.exceptions.MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        log.warning(f"MLflow: the run {run_id} recorded in {RECORD} is {'deleted' if run else 'not'} at "
                    f"{store.given}; starting a new run")
        return None
    return run


def _upload_pending(store: store_lib.Store, directory: str, fallback_name: str) -> bool:
    """Upload a fallback file an earlier process of this run left (before anything new is written, so the run's
    points stay in step order). True when that failed: the new writes then go to the same file."""
    path = os.path.join(directory, fallback_name)
    if not fallback_lib.read_lines(path):
        return False
    try:
        counts = fallback_lib.sync_file(path, stores={store.uri: store})
    except DtfError as e:
        log.warning(f"MLflow: could not upload {path} ({e.as_flags()}); appending to it")
        return True
    log.info(f"MLflow: uploaded {path} first ({counts['metrics']} metric point(s))")
    return False
