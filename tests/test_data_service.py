"""--data_service: the service produces every training example exactly once per epoch, in the local order (ids
collected under mirrored×4 and under 2 real workers), a run through it ends with the local run's weights, bad or
unreachable services are one-line errors, and local:N leaves no process behind.

One local:2 service (real dispatcher and worker processes) is shared by the module."""
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from dtf.cluster import tf_config as cluster
from dtf.distribute import inputs as data
from dtf.cluster import data_service
from dtf.config import specs
from dtf.base.errors import UserError
from helpers import GLOBAL_BATCH, TRAIN_IDS, PipelineStrategy, model_weights, parse_id, with_id

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def service():
    with data_service.local(2) as running:
        yield running


def children(pid: int):
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def replica_ids(strategy, dataset, steps):
    it = iter(dataset)
    return [[t.numpy().tolist() for t in strategy.experimental_local_results(next(it)[1])] for _ in range(steps)]


def test_bad_and_unreachable_specs_are_one_line_errors():
    for bad in ("foo", "local:0", "grpc://host", "grpc://h:99999", "http://h:1"):
        with pytest.raises(UserError, match=r"^--data_service=.* is not a tf.data service; write grpc://HOST:PORT"):
            specs.parse_data_service(bad)
    assert specs.parse_data_service("local:3") == specs.DataServiceSpec(local_workers=3)
    assert specs.parse_data_service("grpc://10.0.0.1:5050") == specs.DataServiceSpec(address="10.0.0.1:5050")
    port = cluster.free_ports(1)[0]
    with pytest.raises(UserError, match=f"--data_service=grpc://127.0.0.1:{port}: nothing answers"):
        with data_service.running(f"grpc://127.0.0.1:{port}"):
            pass


def test_no_fence_where_the_run_needs_the_network_and_the_warning_says_why(monkeypatch, capfd):
    """(The fenced case, from the OS: tests/test_exposure.py.)"""
    from dtf.cluster import netns

    monkeypatch.delenv(netns.ISOLATED_ENV, raising=False)
    monkeypatch.setattr(data_service, "_unfenced", None)
    assert [data_service.fence(text) for text in (None, "grpc://h:1", "bogus")] == [None] * 3  # nothing to fence
    assert "other workers" in data_service.fence("local:1", multi_worker=True)
    assert data_service.fence("local:1", ("gs://bucket/run", None)) == "gs://bucket/run needs the network"
    with data_service.local(1):
        pass
    warning = [line for line in capfd.readouterr().err.splitlines() if "binds its servers" in line]
    assert len(warning) == 1 and warning[0].endswith(
        "to every interface (no option), unauthenticated, and this process is not in a private network namespace "
        "(gs://bucket/run needs the network); run on a trusted network only"), warning


def test_dtf_run_rejects_a_bad_spec_with_status_2():
    done = subprocess.run([sys.executable, "-m", "dtf.run", "--data_service=foo", "--epochs=1"], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("dtf.run: error: --data_service=foo is not a tf.data")


@pytest.mark.slow
def test_mirrored4_every_example_once_in_the_local_order(mirrored4, service, id_files):
    in_memory = tf.data.Dataset.range(TRAIN_IDS).map(with_id)
    for source, kwargs in ((in_memory, {}), (in_memory, {"sharding": "batch"}),
                           (id_files["train"], {"preprocess": parse_id})):
        local = data.distribute_dataset(mirrored4, source, GLOBAL_BATCH, seed=5, **kwargs)
        served = data.distribute_dataset(mirrored4, source, GLOBAL_BATCH, seed=5, data_service=service, **kwargs)
        steps = 2 * served.steps_per_epoch
        got = replica_ids(mirrored4, served.dataset, steps)
        assert got == replica_ids(mirrored4, local.dataset, steps)
        for epoch in (got[:steps // 2], got[steps // 2:]):
            assert sorted(i for step in epoch for part in step for i in part) == list(range(TRAIN_IDS))


PROBE = r'''
import dtf
strategy = dtf.create_strategy("multi_worker")
import tensorflow as tf
from dtf.distribute import inputs as data
from dtf.cluster import data_service
sys.path.insert(0, os.environ["PROBE_TESTS"])
from helpers import GLOBAL_BATCH, parse_id
service = data_service.Service(os.environ["SERVICE"], 2)
d = data.distribute_dataset(strategy, json.loads(os.environ["FILES"]), GLOBAL_BATCH, seed=5, preprocess=parse_id,
                            data_service=service)
it = iter(d.dataset)
steps = [[t.numpy().tolist() for t in strategy.experimental_local_results(next(it)[1])]
         for _ in range(2 * d.steps_per_epoch)]
with open(os.path.join(OUT, f"ids_{TASK}.json"), "w") as f:
    json.dump(steps, f)
'''


@pytest.mark.slow
def test_two_workers_every_example_once_in_the_local_order(run_workers, service, id_files, tmp_path):
    run_workers(PROBE, 2, env={"SERVICE": service.target, "FILES": json.dumps(id_files["train"]),
                               "PROBE_TESTS": os.path.dirname(os.path.abspath(__file__))})
    workers = [json.loads((tmp_path / f"ids_{i}.json").read_text()) for i in range(2)]
    steps = len(workers[0]) // 2
    assert len(workers[1]) == 2 * steps == 2 * TRAIN_IDS // GLOBAL_BATCH
    for epoch in (slice(0, steps), slice(steps, 2 * steps)):
        seen = [i for w in workers for step in w[epoch] for part in step for i in part]
        assert sorted(seen) == list(range(TRAIN_IDS))
    local = data.distribute_dataset(PipelineStrategy(2, 2), id_files["train"], GLOBAL_BATCH, seed=5,
                                    preprocess=parse_id)
    for worker, ds in enumerate(local.dataset):
        it = iter(ds)
        assert [step[0] for step in workers[worker]] == [next(it)[1].numpy().tolist() for _ in range(2 * steps)]


@pytest.mark.slow
def test_run_through_local_service_reaches_the_same_weights_and_stops_it(mirrored4, tmp_path):
    from dtf.config.config import Config
    from dtf.experiment.train import run_experiment

    weights, before = {}, set(children(os.getpid()))
    for name, spec in (("local", None), ("served", "local:2")):
        config = Config(strategy="mirrored", num_cpu_devices=4, dataset="shapes", model="mlp", epochs=2,
                        steps_per_epoch=6, global_batch_size=64, model_dir=str(tmp_path / name), data_service=spec,
                        data_dir=str(tmp_path / "data"), log_every_steps=3)
        summary = run_experiment(config, strategy=mirrored4)
        assert set(children(os.getpid())) == before, "tf.data service processes outlived the run"
        weights[name] = model_weights(tmp_path / name)
        weights[name + "_acc"] = summary["final_metrics"]["val_accuracy"]
    assert all(np.array_equal(a, b) for a, b in zip(weights["local"], weights["served"]))
    assert weights["local_acc"] == weights["served_acc"]


def test_local_service_is_stopped_and_reaped_on_interrupt():
    before = set(children(os.getpid()))
    with pytest.raises(KeyboardInterrupt):
        with data_service.local(1) as running:
            started = set(children(os.getpid())) - before
            assert len(started) == 2 and data_service.reachable(running.target[len("grpc://"):])
            raise KeyboardInterrupt
    assert set(children(os.getpid())) == before
    assert not any(map(alive, started))


def test_emit_tfjob_adds_a_data_service_the_command_points_at(capsys):
    import yaml

    from dtf import launch

    tfjob_api = pytest.importorskip("tfjob_api", reason="needs kubeflow-training: pip install -e '.[test]'")
    command = ["python", "-m", "dtf.run", "--epochs=1"]
    assert launch.main(["dtf.launch", "--emit=tfjob", "--num_workers=2", "--job_name=run1", "--image=reg/dtf:1",
                        "--data_service_workers=3", "--", *command]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["TFJob", "Service", "Deployment", "Deployment"]
    assert tfjob_api.validate_tfjob(docs[0]) == []
    for doc in docs[1:]:
        errors = []
        tfjob_api._check(doc, f"V1{doc['kind']}", doc["kind"], errors)
        assert errors == []
    for spec in docs[0]["spec"]["tfReplicaSpecs"].values():
        assert spec["template"]["spec"]["containers"][0]["command"] == [*command,
                                                                        "--data_service=grpc://run1-data:5050"]
    service, dispatcher, workers = docs[1:]
    assert service["metadata"]["name"] == "run1-data"
    assert service["spec"]["selector"] == dispatcher["spec"]["template"]["metadata"]["labels"]
    assert dispatcher["spec"]["template"]["spec"]["containers"][0]["command"][-2:] == ["dispatcher", "5050"]
    assert workers["spec"]["replicas"] == 3
    assert workers["spec"]["template"]["spec"]["containers"][0]["command"][-3:] == ["5051", "run1-data:5050",
                                                                                    "$(POD_IP)"]


def test_emit_slurm_starts_checks_and_stops_the_service(capsys):
    from dtf import launch

    assert launch.main(["dtf.launch", "--emit=slurm", "--num_workers=2", "--data_service_workers=2", "--",
                        "python", "-m", "dtf.run"]) == 0
    script = capsys.readouterr().out
    assert script.count("python -m dtf.cluster.data_service dispatcher") == 1
    assert "for i in $(seq 2); do" in script and "python -m dtf.cluster.data_service worker" in script
    assert "python -m dtf.cluster.data_service wait" in script and "kill $(jobs -p)" in script
    assert 'python -m dtf.run "--data_service=grpc://$ds_host:$ds_port" 2>&1' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


@pytest.mark.parametrize("args, message", [
    (["--data_service_workers=2", "--"], "--data_service_workers only applies with --emit"),
    (["--emit=slurm", "--data_service_workers=0", "--"], "--data_service_workers must be >= 1"),
    (["--emit=tfjob", "--data_service_workers=1", "--", "--data_service=local:1"], "remove --data_service from"),
])
def test_bad_data_service_workers_are_one_line_and_exit_2(capsys, args, message):
    from dtf import launch

    argv = ["dtf.launch", "--num_workers=2", *args[:args.index("--") + 1], "python", "-m", "dtf.run",
            *args[args.index("--") + 1:]]
    assert launch.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_tune_trials_read_from_one_local_service(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "dtf.tune", "--dataset=synthetic", "--model=mlp", "--epochs=1", "--steps_per_epoch=3",
         "--tune_global_batch_sizes=32,64", "--tune_base_lr=0.05", "--tuner=grid", "--max_trials=2",
         f"--tune_dir={tmp_path / 'tune'}", "--data_service=local:1"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dtf.tune: 2 new trial(s)" in done.stdout
    assert done.stderr.count("dtf: tf.data service: dispatcher") == 1
    served = r"3 steps per epoch, streamed over passes of \d+, from the tf\.data service grpc://127\.0\.0\.1:"
    assert len(re.findall(served, done.stderr)) == 2, done.stderr[-3000:]


def test_local_service_dies_with_a_killed_parent(tmp_path):
    code = ("import os, subprocess, time\nfrom dtf import data_service\n"
            "with data_service.local(1):\n"
            "    pids = subprocess.run(['pgrep', '-P', str(os.getpid())], capture_output=True, text=True).stdout\n"
            "    print(' '.join(pids.split()), flush=True)\n"
            "    time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=REPO))
    try:
        servers = [int(p) for p in parent.stdout.readline().split()]
    finally:
        parent.kill()
        parent.wait()
    assert len(servers) == 2
    deadline = time.monotonic() + 10
    while any(map(alive, servers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, servers))
