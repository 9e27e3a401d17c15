"""MLflow tracking (dtf.tracking, `--tracking_uri`) against a real `mlflow server` on 127.0.0.1 (sqlite backend) and
a file store: a 2-worker `dtf.launch` job (and its side-car evaluator) is one run with its metrics at their optimizer
steps; a SIGKILLed and a SIGTERM-preempted run continue their run with no step twice and none missing; a 4-trial sweep
is a parent with 4 children; the logged model serves through `mlflow.pyfunc` in a process without dtf and predicts
like model.keras; a server killed mid-run leaves training alone and its fallback syncs afterwards, idempotently; an
unreachable server at start is one line, exit 2, nothing written. Plus the pieces in process: dedupe, status mapping,
URIs, the fallback file, the relay into dtf.launch's private network namespace."""
import csv
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from dtf.cluster.tf_config import free_ports
from helpers import REPO, launch_env

mlflow = pytest.importorskip("mlflow")  # the `mlflow` extra (.ci/run installs it)

RETRY_S = "2"  # dtf's retry budget per call in these tests (default 15 s)
SERVER_TIMEOUT_S = 120
# Every process these tests start: dtf importable, MLflow's telemetry off (no network here), a short retry budget.
ENV = launch_env(DTF_TRACKING_RETRY_S=RETRY_S, MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_ALLOW_FILE_STORE="true")
SMALL = ["--dataset=synthetic", "--model=mlp", "--global_batch_size=32", "--input_sharding=batch", "--seed=3",
         "--progress=epoch"]


# --- a real MLflow server ---------------------------------------------------------------------------------------

def start_server(directory, port=None):
    """`mlflow server` on 127.0.0.1 with a sqlite backend in `directory` (its artifacts there too); (process, uri)
    once /health answers."""
    port = port or free_ports(1)[0]
    log = open(directory / f"server-{port}.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
         "--artifacts-destination", str(directory / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], cwd=directory, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true"))
    uri, deadline = f"http://127.0.0.1:{port}", time.monotonic() + SERVER_TIMEOUT_S
    while True:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                return proc, uri
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            pytest.fail("mlflow server did not start:\n" + (directory / f"server-{port}.log").read_text()[-3000:])
        time.sleep(0.3)


def stop_server(proc, sig=signal.SIGTERM):
    """Stop the server and the workers it started (its own process group)."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(15)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, uri = start_server(tmp_path_factory.mktemp("mlflow"))
    yield uri
    stop_server(proc)


def client(uri):
    return mlflow.MlflowClient(uri)


def only_run(uri, experiment):
    """The one run of `experiment` (fails unless there is exactly one)."""
    exp = client(uri).get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} at {uri}"
    runs = client(uri).search_runs([exp.experiment_id])
    assert len(runs) == 1, [(r.info.run_id, r.info.run_name) for r in runs]
    return runs[0]


def steps(uri, run_id, key):
    return [m.step for m in client(uri).get_metric_history(run_id, key)]


def assert_each_step_once(uri, run):
    for key in run.data.metrics:
        found = steps(uri, run.info.run_id, key)
        assert len(found) == len(set(found)), (key, sorted(found))


def recorded_run_id(model_dir):
    record = json.loads((model_dir / "mlflow_run.json").read_text())
    [entry] = record["runs"].values()
    return entry["run_id"]


def dtf(module, *args, cwd, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


# --- a 2-worker launch with an evaluator: one run; its model; a prediction run ----------------------------------

EPOCHS, STEPS = 3, 10


@pytest.fixture(scope="module")
def launched(server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launch")
    model_dir = tmp / "run"
    run = [sys.executable, "-m", "dtf.run", *SMALL, f"--epochs={EPOCHS}", f"--steps_per_epoch={STEPS}",
           "--checkpoint_every=1", f"--model_dir={model_dir}", f"--tracking_uri={server}",
           "--experiment_name=launch"]
    proc = subprocess.run([sys.executable, "-m", "dtf.launch", "--num_workers=2", "--timeout=400",
                           f"--evaluator={shlex.join(run)}", "--", *run], capture_output=True, text=True,
                          timeout=450, cwd=tmp, env=ENV)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    return model_dir, proc


@pytest.mark.slow
def test_a_two_worker_launch_is_one_run_with_its_metrics_at_their_optimizer_steps(server, launched):
    model_dir, proc = launched
    run = only_run(server, "launch")  # neither worker 1 nor the evaluator started a run of its own
    assert run.info.run_id == recorded_run_id(model_dir) and run.info.status == "FINISHED"
    ends = [STEPS * e for e in range(1, EPOCHS + 1)]  # each epoch's optimizer steps
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "examples_per_sec", "learning_rate", "epoch"):
        assert steps(server, run.info.run_id, key) == ends, key
    history = json.loads((model_dir / "summary.json").read_text())["history"]
    logged = client(server).get_metric_history(run.info.run_id, "val_loss")
    assert [m.value for m in logged] == pytest.approx(history["val_loss"], rel=1e-6)
    # The evaluator's scores at its checkpoints' steps, equal to what it wrote in eval_results.json.
    results = json.loads((model_dir / "eval_results.json").read_text())["checkpoints"]
    scored = {r["step"]: r["metrics"]["loss"] for r in results.values()}
    logged = {m.step: m.value for m in client(server).get_metric_history(run.info.run_id, "eval_loss")}
    assert sorted(logged) == ends and logged == pytest.approx(scored, rel=1e-6)
    params, tags = run.data.params, run.data.tags
    assert params["layout.num_workers"] == "2" and params["layout.num_replicas"] == "2"
    assert params["layout.strategy"] == "multi_worker" and params["layout.per_replica_batch_size"] == "16"
    assert params["global_batch_size"] == "32" and params["epochs"] == str(EPOCHS) and params["dataset"] == "synthetic"
    flags_txt = {line[2:].split("=", 1)[0]: line.split("=", 1)[1] for line in (model_dir / "flags.txt").read_text()
                 .splitlines() if line.startswith("--") and "=" in line}
    assert {k: params[k] for k in flags_txt} == flags_txt  # every resolved flag, as flags.txt spells it
    assert tags["dtf.exit_status"] == "0" and tags["keras.version"] and tags["tensorflow.version"]
    assert tags["dtf.version"] and ("mlflow.source.git.commit" in tags) == os.path.exists(os.path.join(REPO, ".git"))
    names = {a.path for a in client(server).list_artifacts(run.info.run_id)}
    assert {"flags.txt", "summary.json"} <= names
    assert (proc.stdout + proc.stderr).count("MLflow: logging to run") == 1, proc.stdout[-3000:]


PYFUNC = """
import importlib.abc, sys
class NoDtf(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "dtf":
            raise ImportError("no dtf here")
sys.meta_path.insert(0, NoDtf())
import mlflow, numpy as np
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
np.save(sys.argv[4], model.predict(np.load(sys.argv[3])))
"""


@pytest.mark.slow
def test_the_logged_model_serves_through_pyfunc_without_dtf_and_predicts_like_model_keras(server, launched,
                                                                                          tmp_path):
    import keras

    model_dir, _ = launched
    run_id = recorded_run_id(model_dir)
    keras_model = keras.saving.load_model(model_dir / "model.keras", compile=False)
    x = np.random.RandomState(0).rand(5, *keras_model.inputs[0].shape[1:]).astype("float32")
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-c", PYFUNC, server, f"runs:/{run_id}/model", str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in ENV.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = np.load(tmp_path / "y.npy")
    assert served.shape == (5, 10)
    np.testing.assert_allclose(served, keras_model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_predict_is_a_run_of_its_own_linked_to_the_training_run(server, launched, tmp_path):
    model_dir, _ = launched
    proc = dtf("dtf.predict", f"--model_dir={model_dir}", f"--output={tmp_path / 'preds.csv'}",
               f"--tracking_uri={server}", "--experiment_name=predictions", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run(server, "predictions")
    assert run.info.status == "FINISHED" and run.data.tags["dtf.source_run_id"] == recorded_run_id(model_dir)
    assert run.data.metrics["num_examples"] == 1024 and run.data.params["output_values"] == "logits"
    assert [a.path for a in client(server).list_artifacts(run.info.run_id, "predictions")] == [
        "predictions/preds.csv"]
    assert not (tmp_path / "mlflow_run.json").exists()  # a prediction is not continued: no record


# --- kills and preemption: the same run, every step once --------------------------------------------------------

def _metadata(model_dir):
    try:
        return json.loads((model_dir / "backup" / "training_metadata.json").read_text())
    except (OSError, ValueError):
        return {}


def _start(model_dir, uri, experiment, epochs=3, steps_per_epoch=20, **env):
    """dtf.run logging the LR at every step and sending each point at once (so a kill lands after points the
    backup it resumes from has not reached)."""
    return subprocess.Popen(
        [sys.executable, "-m", "dtf.run", *SMALL, f"--epochs={epochs}", f"--steps_per_epoch={steps_per_epoch}",
         "--backup_every_steps=5", "--log_every_steps=1", "--validation_freq=1", f"--model_dir={model_dir}",
         f"--tracking_uri={uri}", f"--experiment_name={experiment}"], cwd=model_dir.parent,
        env={**ENV, "DTF_TRACKING_FLUSH_S": "0", **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc, until, timeout_s=150):
    deadline = time.monotonic() + timeout_s
    while not until():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.slow
def test_a_killed_and_a_preempted_run_continue_their_run_with_every_step_once(server, tmp_path):
    model_dir, experiment = tmp_path / "run", "resume"
    first = _start(model_dir, server, experiment)
    # SIGKILL in epoch 1 once the server holds LR points past the last backup: the rerun trains those steps again.
    _wait(first, lambda: _metadata(model_dir).get("steps_done", 0) >= 10)
    run_id = recorded_run_id(model_dir)
    _wait(first, lambda: max(steps(server, run_id, "learning_rate") or [0]) % 5 in (2, 3))
    first.kill()
    first.wait(30)
    killed_at, backed_up = max(steps(server, run_id, "learning_rate")), _metadata(model_dir)["steps_done"]
    assert client(server).get_run(run_id).info.status == "RUNNING"  # nothing could end it

    second = _start(model_dir, server, experiment)
    _wait(second, lambda: _metadata(model_dir).get("epoch") == 1 and _metadata(model_dir).get("steps_done", 0) > 0)
    second.send_signal(signal.SIGTERM)
    assert second.wait(60) == 143
    out = second.stdout.read()
    assert f"continuing run {run_id}" in out, out[-3000:]
    preempted = client(server).get_run(run_id)
    assert preempted.info.status == "KILLED" and preempted.data.tags["dtf.exit_status"] == "143"

    third = _start(model_dir, server, experiment)
    assert third.wait(150) == 0, third.stdout.read()[-3000:]
    run = only_run(server, experiment)  # no second run
    assert run.info.run_id == recorded_run_id(model_dir) == run_id and run.info.status == "FINISHED"
    assert_each_step_once(server, run)
    assert steps(server, run_id, "learning_rate") == list(range(1, 61))  # none twice, none missing
    assert steps(server, run_id, "loss") == [20, 40, 60] and steps(server, run_id, "epoch") == [20, 40, 60]
    assert run.data.tags["dtf.exit_status"] == "0"
    print(f"SIGKILL with LR logged to step {killed_at}, backup at step {backed_up}: the rerun trained "
          f"{killed_at - backed_up} logged step(s) again and logged none twice; then SIGTERM → KILLED → FINISHED")


# --- a sweep: a parent and its children (a file store) -------------------------------------------------------

@pytest.mark.slow
def test_a_four_trial_sweep_is_one_parent_with_four_children(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read the file store here
    store = tmp_path / "mlruns"
    proc = dtf("dtf.tune", *SMALL[:2], "--epochs=1", "--steps_per_epoch=3", "--reference_batch_size=64",
               "--tune_global_batch_sizes=32,64", "--tune_base_lr=0.05,0.1", "--tuner=grid", "--max_trials=4",
               f"--tune_dir={tmp_path / 'tune'}", f"--tracking_uri={store}", "--experiment_name=sweep",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    uri = f"file://{store}"
    runs = client(uri).search_runs([client(uri).get_experiment_by_name("sweep").experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 5 and len(children) == 4
    with open(tmp_path / "tune" / "results.csv") as f:
        rows = {r["trial"]: r for r in csv.DictReader(f)}
    best = max(rows.values(), key=lambda r: float(r["objective"]))
    for child in children:
        row = rows[child.data.tags["dtf.trial_id"]]
        assert child.info.status == "FINISHED"
        assert child.data.params["hp.global_batch_size"] == row["global_batch_size"]
        assert float(child.data.params["hp.base_lr"]) == float(row["base_lr"])
        assert child.data.metrics["objective"] == pytest.approx(float(row["objective"]))
        assert child.data.tags["dtf.best_trial"] == str(row is best).lower()
    assert parent.data.tags["dtf.best_trial_id"] == best["trial"] and parent.info.status == "FINISHED"
    assert parent.data.metrics["best_objective"] == pytest.approx(float(best["objective"]))
    assert {a.path for a in client(uri).list_artifacts(parent.info.run_id)} == {
        "results.csv", "best.flags", "objective_vs_batch.png"}
    assert parent.data.params["tune_global_batch_sizes"] == "32,64" and parent.data.params["tuner"] == "grid"


# --- the server goes away mid-run --------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_server_killed_mid_run_leaves_training_alone_and_the_fallback_syncs_once(tmp_path):
    directory = tmp_path / "server"
    directory.mkdir()
    server_proc, uri = start_server(directory)
    port = int(uri.rsplit(":", 1)[1])
    model_dir = tmp_path / "run"
    try:
        job = _start(model_dir, uri, "fallback", epochs=2)
        _wait(job, lambda: os.path.exists(model_dir / "mlflow_run.json"))
        run_id = recorded_run_id(model_dir)
        _wait(job, lambda: steps(uri, run_id, "epoch") == [20])
        stop_server(server_proc, signal.SIGKILL)
        assert job.wait(200) == 0
        out = job.stdout.read()
    finally:
        stop_server(server_proc, signal.SIGKILL)
    warnings = [line for line in out.splitlines() if "mlflow_fallback.jsonl" in line]
    assert len(warnings) == 1 and "did not answer" in warnings[0] and "python -m dtf.tracking sync" in warnings[0], out
    assert "dtf: done in" in out and (model_dir / "model.keras").exists()
    assert (model_dir / "mlflow_fallback.jsonl").exists()

    server_proc, uri = start_server(directory, port)  # the same server again
    try:
        assert client(uri).get_run(run_id).info.status == "RUNNING"  # the end is in the fallback
        synced = dtf("dtf.tracking", "sync", str(model_dir), cwd=tmp_path)
        assert synced.returncode == 0, synced.stderr[-3000:]
        run = client(uri).get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["dtf.exit_status"] == "0"
        assert_each_step_once(uri, run)
        assert steps(uri, run_id, "learning_rate") == list(range(1, 41))
        assert steps(uri, run_id, "val_loss") == [20, 40]
        assert run.outputs.model_outputs and {"flags.txt", "summary.json"} <= {
            a.path for a in client(uri).list_artifacts(run_id)}
        history = {key: steps(uri, run_id, key) for key in run.data.metrics}
        assert not (model_dir / "mlflow_fallback.jsonl").exists()  # now `….synced`: a second sync finds nothing
        shutil.copy(model_dir / "mlflow_fallback.jsonl.synced", model_dir / "mlflow_fallback.jsonl")
        replay = dtf("dtf.tracking", "sync", str(model_dir), cwd=tmp_path)  # the same file once more
        assert replay.returncode == 0, replay.stderr[-3000:]
        assert {key: steps(uri, run_id, key) for key in run.data.metrics} == history
        assert len(client(uri).get_run(run_id).outputs.model_outputs) == 1
    finally:
        stop_server(server_proc)


# --- one line, exit 2, nothing written ---------------------------------------------------------------------------

@pytest.mark.slow
def test_an_unreachable_server_at_start_is_one_line_exit_2_and_nothing_is_written(tmp_path):
    port = free_ports(1)[0]  # nothing listens there
    start = time.monotonic()
    proc = dtf("dtf.run", *SMALL, "--epochs=1", "--steps_per_epoch=2", f"--model_dir={tmp_path / 'run'}",
               f"--tracking_uri=http://127.0.0.1:{port}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        f"dtf.run: error: --tracking_uri=http://127.0.0.1:{port} is not reachable (connection refused; retried for "
        f"{RETRY_S}s); start the MLflow server or fix --tracking_uri (nothing was written)"], proc.stderr
    assert not (tmp_path / "run").exists() and os.listdir(tmp_path) == []
    print(f"exit 2 after {time.monotonic() - start:.1f}s")


def test_without_mlflow_tracking_is_one_line_naming_the_extra_and_the_rest_works(tmp_path):
    """--tracking_uri without MLflow installed: one line, exit 2, before TensorFlow loads; without it dtf never looks
    for MLflow (the default install has none)."""
    probe = ("import importlib.util, runpy, sys\n"
             "real = importlib.util.find_spec\n"
             "importlib.util.find_spec = lambda name, *a: None if name == 'mlflow' else real(name, *a)\n"
             "sys.argv = sys.argv[1:]\n"
             "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")
    store, run = f"--tracking_uri={tmp_path / 'store'}", f"--model_dir={tmp_path / 'run'}"
    for module, args in (("dtf.run", [store, run]), ("dtf.tune", [store, f"--tune_dir={tmp_path / 'tune'}"]),
                         ("dtf.predict", [store, run, f"--output={tmp_path / 'p.csv'}"])):
        proc = subprocess.run([sys.executable, "-c", probe, module, *args], cwd=tmp_path, env=ENV,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (module, proc.stderr[-2000:])
        assert proc.stderr.splitlines() == [f"{module}: error: --tracking_uri needs MLflow, which is not installed "
                                            "here; install it with pip install -e '.[mlflow]'"], proc.stderr
    assert os.listdir(tmp_path) == []


# --- in process: the pieces --------------------------------------------------------------------------------------

def test_a_step_is_written_once_and_a_param_keeps_its_first_value():
    from dtf.tracking import ops

    state = ops.RunState(last_step={"loss": 20}, params={"epochs": "5"})
    points = [["loss", 1.0, 0, 15], ["loss", 0.9, 0, 20], ["loss", 0.8, 0, 25], ["lr", 0.1, 0, 3], ["loss", 0.7, 0, 25]]
    assert [(k, s) for k, _, _, s in state.take_points(points)] == [("loss", 25), ("lr", 3)]
    assert state.take_params({"epochs": "10", "seed": "1"}) == ({"seed": "1"}, {"dtf.param_changed.epochs": "10"})
    assert state.filter(ops.model("model.keras")) is not None and state.filter(ops.model("model.keras")) is None
    assert state.filter(ops.batch([["loss", 1.0, 0, 25]], {"seed": "1"})) is None  # nothing new: no write


def test_status_follows_the_exit_status():
    from dtf.base.errors import INTERRUPTED, Preempted, Stopped, TrainingDiverged, UserError
    from dtf.tracking.mlflow_run import exit_status_of, mlflow_status

    cases = [(None, 0, "FINISHED"), (Preempted("x"), 143, "KILLED"), (KeyboardInterrupt(), INTERRUPTED, "KILLED"),
             (Stopped(signal.SIGTERM), 143, "KILLED"), (TrainingDiverged("x"), 3, "FAILED"),
             (UserError("x"), 2, "FAILED"), (RuntimeError("x"), 1, "FAILED")]
    for error, status, name in cases:
        assert (exit_status_of(error), mlflow_status(exit_status_of(error))) == (status, name), error


def test_uris_are_recorded_absolute(tmp_path, monkeypatch):
    from dtf.tracking.store import canonical, is_file_store

    monkeypatch.chdir(tmp_path)
    assert canonical("runs/mlruns") == f"file://{tmp_path}/runs/mlruns" == canonical("file:runs/mlruns")
    assert canonical("sqlite:///runs/mlflow.db") == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert canonical("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    assert canonical("http://127.0.0.1:5000/") == "http://127.0.0.1:5000" and canonical("databricks") == "databricks"
    assert is_file_store("runs/mlruns") and not is_file_store("sqlite:///x.db")


def test_a_resumed_run_continues_and_its_fallback_syncs_once_in_process(tmp_path, monkeypatch):
    """TrackedRun on a file store: a run reopened from its directory is the same run; a store that stops answering
    sends the writes to the fallback file, and syncing it (twice) writes each point once."""
    from dtf.tracking import fallback, store as store_lib
    from dtf.tracking.mlflow_run import TrackedRun

    for name, value in {**store_lib.MLFLOW_ENV, "MLFLOW_ALLOW_FILE_STORE": "true"}.items():
        monkeypatch.setenv(name, value)  # what Store would set, undone after the test
    store = store_lib.Store(str(tmp_path / "mlruns"), retry_s=0.2)
    first = TrackedRun.open(store, str(tmp_path), "exp", run_name="r", tags={})
    for step in range(1, 14):
        first.metrics({"lr": step / 100}, step)
    first.flush()
    again = TrackedRun.open(store, str(tmp_path), "exp", run_name="r", tags={})  # a rerun, resumed at step 10
    assert again.run_id == first.run_id
    def down(*args, **kwargs):
        raise OSError("connection refused")

    real_log_batch = store.client.log_batch
    monkeypatch.setattr(store.client, "log_batch", down)
    for step in range(11, 21):
        again.metrics({"lr": step / 100}, step)
    again.flush()
    again.end()
    assert again.falling_back and len(fallback.read_lines(again.fallback.path)) == 3  # points, exit tag, status
    monkeypatch.setattr(store.client, "log_batch", real_log_batch)
    fallback.sync(str(tmp_path))
    os.replace(again.fallback.path + fallback.SYNCED, again.fallback.path)  # the same file, synced once more
    fallback.sync(str(tmp_path))
    history = [m.step for m in store.client.get_metric_history(first.run_id, "lr")]
    assert history == list(range(1, 21)) and store.client.get_run(first.run_id).info.status == "FINISHED"


def test_the_relay_carries_one_address_and_refuses_tls(monkeypatch):
    from dtf.base.errors import UserError
    from dtf.cluster import relay

    echo = socket.socket()
    echo.bind(("127.0.0.1", 0))
    echo.listen(1)

    def serve():
        conn, _ = echo.accept()
        conn.sendall(conn.recv(100).upper())
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    uri = f"http://127.0.0.1:{echo.getsockname()[1]}"
    relays = relay.start_all([uri])
    try:
        monkeypatch.delenv(relay.ROUTE_ENV, raising=False)
        relay.open_inside(relays)
        inner = relay.route(uri)
        assert inner != uri and relay.route("http://elsewhere:1") == "http://elsewhere:1"
        with socket.create_connection(relay.address(inner), timeout=10) as conn:
            conn.sendall(b"tracked")
            assert conn.recv(100) == b"TRACKED"
    finally:
        relay.stop_all(relays)
        echo.close()
    with pytest.raises(UserError, match="TLS cannot be relayed"):
        relay.start_all(["https://mlflow.example.com"])


def test_tracking_and_its_store_load_neither_tensorflow_nor_mlflow_at_import():
    probe = ("import sys\nimport dtf.tracking, dtf.tracking.store, dtf.cluster.relay\n"
             "print(sorted(m for m in ('tensorflow', 'keras', 'mlflow') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=ENV,
                          cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_tracking_flags_are_not_part_of_the_plan_and_are_checked():
    from dtf.base.errors import UserError
    from dtf.config.config import Config
    from dtf.experiment import rundir

    plan = rundir.plan_of(Config(tracking_uri="sqlite:///x.db", experiment_name="e"))
    assert "tracking_uri" not in plan and "experiment_name" not in plan
    with pytest.raises(UserError, match="--tracking_uri is empty"):
        Config(tracking_uri=" ")
    with pytest.raises(UserError, match="--experiment_name is empty"):
        Config(experiment_name="")
