"""One MLflow tracking store as dtf talks to it: MLflow imported here only, and only once a store is used; its
URI made absolute (the record in model_dir and every process of a job mean the same store); MLflow's own HTTP retries
(7, over about 4 minutes, 120 s per request) replaced by dtf's one bounded retry budget per call; and errors
classified as transient (retried, then the caller falls back) or not (a one-line error).

No TensorFlow here: the commands check `--tracking_uri` before TensorFlow loads."""
import importlib.util
import logging
import os
import re
import time
from typing import Callable, Optional

from dtf.base.errors import TrackingUnavailable, UserError
from dtf.cluster import relay

INSTALL = "pip install -e '.[mlflow]'"
# Seconds dtf keeps retrying one call to the store (backoff FIRST_DELAY_S doubling up to MAX_DELAY_S) before it calls
# the store unavailable: at start a one-line error, mid-run the fallback file. Tests make it small.
RETRY_ENV = "DTF_TRACKING_RETRY_S"
DEFAULT_RETRY_S = 15.0
FIRST_DELAY_S, MAX_DELAY_S = 0.5, 4.0
# Defaults dtf gives MLflow (a value the user set wins): no retries of its own under dtf's, a 10 s request timeout,
# no "View run at" lines on stdout (dtf prints the run's link once), and its INFO lines (database migrations) quiet.
MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
              "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "MLFLOW_LOGGING_LEVEL": "WARNING"}
# MLflow error codes worth retrying: the server or the network, not the request (mlflow.protos.databricks_pb2).
TRANSIENT_CODES = frozenset({
    "INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "IO_ERROR", "SERVICE_UNDER_MAINTENANCE",
    "WORKSPACE_TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "ABORTED", "RESOURCE_EXHAUSTED",
    "REQUEST_LIMIT_EXCEEDED", "COULD_NOT_ACQUIRE_LOCK", "UNPARSEABLE_HTTP_ERROR"})
_BARE_SCHEMES = ("databricks", "databricks-uc", "uc")  # URIs MLflow takes without "://"


def require_mlflow():
    """A one-line UserError naming the extra when MLflow is not installed (checked without importing it)."""
    if importlib.util.find_spec("mlflow") is None:
        raise UserError(f"--tracking_uri needs MLflow, which is not installed here; install it with {INSTALL}",
                        arguments=("tracking_uri",))


def canonical(uri: str) -> str:
    """`uri` as dtf records and opens it: a local directory (a path or `file:` URI) as an absolute `file://` URI, a
    relative `sqlite:///path` made absolute; anything else as given."""
    uri = uri.strip()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if uri.startswith("file:"):
        path = uri[len("file:"):]
        path = path[len("//"):] if path.startswith("//") else path
        return "file://" + os.path.abspath(path)
    if "://" not in uri and uri.split(":")[0] not in _BARE_SCHEMES:
        return "file://" + os.path.abspath(uri)
    return uri.rstrip("/") if is_http(uri) else uri


def is_file_store(uri: str) -> bool:
    return canonical(uri).startswith("file://")


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def retry_budget_s() -> float:
    text = os.environ.get(RETRY_ENV)
    try:
        return max(0.0, float(text)) if text else DEFAULT_RETRY_S
    except ValueError:
        raise UserError(f"{RETRY_ENV}={text} must be a number of seconds") from None


def import_mlflow():
    """`mlflow`, imported with dtf's defaults in the environment (see MLFLOW_ENV)."""
    require_mlflow()
    for name, value in MLFLOW_ENV.items():
        os.environ.setdefault(name, value)
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)  # sqlite stores: a line per migration otherwise
    return mlflow


def transient(error: BaseException) -> bool:
    """True when `error` is the store or the network (retry, then fall back), False when it is the request."""
    code = getattr(error, "error_code", None)
    if isinstance(code, str) and code:
        return code in TRANSIENT_CODES
    module = type(error).__module__.split(".")[0]
    return isinstance(error, (OSError, TimeoutError)) or module in ("requests", "urllib3", "sqlalchemy")


def reason(error: BaseException) -> str:
    """What went wrong, in a few words on one line (MLflow's messages run to several lines of URL and traceback)."""
    text = str(error)
    for needle, short in (("Connection refused", "connection refused"), ("Name or service not known", "unknown host"),
                          ("timed out", "timed out"),
                          ("NewConnectionError", "cannot connect"), ("RemoteDisconnected", "the server hung up")):
        if needle in text:
            return short
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0].split(". ")[0] if lines else type(error).__name__
    return first[:200].rstrip(".")


class Store:
    """An MlflowClient on `uri` (canonical) with dtf's retry budget around each call (`call`)."""

    def __init__(self, uri: str, retry_s: Optional[float] = None):
        self.given, self.uri = uri, canonical(uri)
        self.connect_uri = relay.route(self.uri)  # inside dtf.launch's private network: its relay to the server
        if is_file_store(self.uri):  # MLflow 3.7+ refuses its file store unless asked; a directory is what was asked
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.mlflow = import_mlflow()
        self.retry_s = retry_budget_s() if retry_s is None else retry_s
        self.checked = False
        try:
            self.client = self.mlflow.MlflowClient(tracking_uri=self.connect_uri)
        except self.mlflow.exceptions.MlflowException as e:
            raise self._not_a_store(e) from None

    def _not_a_store(self, error) -> UserError:
        return UserError(f"tracking_uri={self.given} is not a tracking store MLflow can open ({reason(error)}); give "
                         "http(s)://HOST:PORT of a server, sqlite:///PATH or a directory", arguments=("tracking_uri",))

    def call(self, what: str, fn: Callable, *args, **kwargs):
        """`fn(*args, **kwargs)`, retried with backoff while it fails transiently, for up to the retry budget; then
        TrackingUnavailable (`what` says what was being done). Other errors are raised as they are."""
        deadline, delay = time.monotonic() + self.retry_s, FIRST_DELAY_S
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001  (classified right here)
                if not transient(e):
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    error = TrackingUnavailable(
                        f"tracking_uri={self.given} did not answer ({what}: {reason(e)}; retried for "
                        f"{self.retry_s:g}s, {RETRY_ENV})", arguments=("tracking_uri",))
                    error.detail = f"{reason(e)}; retried for {self.retry_s:g}s"
                    raise error from None
                time.sleep(min(delay, left))
                delay = min(2 * delay, MAX_DELAY_S)

    def check(self, experiment_name: str):
        """Before anything is written: the store answers a read (a server is up, a database opens). A one-line
        UserError naming --tracking_uri otherwise. Once is enough per store."""
        if self.checked:
            return
        try:
            experiment = self.call("a first read", self.client.get_experiment_by_name, experiment_name)
        except TrackingUnavailable as e:
            fix = "start the MLflow server or fix --tracking_uri" if is_http(self.uri) else "fix --tracking_uri"
            raise TrackingUnavailable(f"tracking_uri={self.given} is not reachable ({e.detail}); {fix} (nothing was "
                                      "written)", arguments=("tracking_uri",)) from None
        except self.mlflow.exceptions.MlflowException as e:
            raise self._not_a_store(e) from None
        if experiment is not None and experiment.lifecycle_stage == "deleted":
            raise UserError(f"experiment_name={experiment_name} is a deleted MLflow experiment at {self.given}; "
                            "restore it (mlflow experiments restore) or choose another --experiment_name",
                            arguments=("experiment_name",))
        self.checked = True

    def experiment_id(self, name: str) -> str:
        """The id of experiment `name`, created if missing (another process may create it at the same time)."""
        for _ in range(2):
            experiment = self.call("reading the experiment", self.client.get_experiment_by_name, name)
            if experiment is not None:
                return experiment.experiment_id
            try:
                return self.call("creating the experiment", self.client.create_experiment, name,
                                 artifact_location=self.artifact_root(name))
            except self.mlflow.exceptions.MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
        raise UserError(f"experiment_name={name}: MLflow neither finds nor creates it at {self.given}",
                        arguments=("experiment_name",))

    def artifact_root(self, experiment_name: str) -> Optional[str]:
        """Where a new experiment's artifacts go: next to a sqlite database (MLflow's default, ./mlruns, depends on
        the directory each process happens to run in); elsewhere the store's own choice (None)."""
        if not self.uri.startswith("sqlite:///"):
            return None
        folder = os.path.dirname(self.uri[len("sqlite:///"):].split("?")[0])
        return "file://" + os.path.join(folder, "mlartifacts", re.sub(r"[^\w.-]", "_", experiment_name))

    def run_url(self, experiment_id: str, run_id: str) -> str:
        """Where a person sees the run: its page on a server, else the store and the run id."""
        if is_http(self.uri):
            return f"{self.uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        return f"{self.uri} (run {run_id})"
