"""The strategy factory: names, auto choice, and rejection of options that do not apply."""
import json

import pytest
import tensorflow as tf

import dtf
from dtf.distribute import strategy as strategy_lib
from dtf.base.errors import UserError


@pytest.fixture(autouse=True)
def no_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)


def test_auto_without_cluster_or_gpus_is_default():
    s = dtf.create_strategy()
    assert s is tf.distribute.get_strategy() and s.num_replicas_in_sync == 1


def test_auto_with_cpu_devices_is_mirrored(caplog):
    s = dtf.create_strategy("auto", num_cpu_devices=4)
    assert isinstance(s, tf.distribute.MirroredStrategy) and s.num_replicas_in_sync == 4


def test_one_device_and_describe_line():
    s = dtf.create_strategy("one_device")
    assert isinstance(s, tf.distribute.OneDeviceStrategy)
    line = strategy_lib.describe(s)
    assert "strategy=one_device" in line and "replicas=1" in line and "chief=True" in line


def test_mirrored_cross_device_ops_are_wired():
    s = dtf.create_strategy("mirrored", num_cpu_devices=4, cross_device_ops_name="reduce_to_one")
    assert isinstance(s.extended._cross_device_ops, tf.distribute.ReductionToOneDevice)


@pytest.mark.parametrize("kwargs, words", [
    (dict(name="horovod"), ["unknown strategy 'horovod'", "auto, default, one_device, mirrored, multi_worker"]),
    (dict(name="mirrored", communication="ring"), ["communication", "do not apply to strategy 'mirrored'"]),
    (dict(name="multi_worker", cross_device_ops_name="nccl"), ["cross_device_ops", "'multi_worker'"]),
    (dict(name="multi_worker", num_cpu_devices=4), ["num_cpu_devices", "'multi_worker'"]),
    (dict(name="default", num_cpu_devices=4), ["num_cpu_devices", "'default'"]),
    (dict(name="one_device", communication="ring"), ["communication", "'one_device'"]),
    (dict(name="one_device", devices=["/cpu:0", "/cpu:1"]), ["exactly one device"]),
    (dict(name="mirrored", cross_device_ops_name="magic"), ["unknown cross-device ops 'magic'",
                                                           "nccl, hierarchical_copy, reduce_to_one"]),
    (dict(name="mirrored", num_cpu_devices=2, num_gpus=1), ["--num_cpu_devices", "--num_gpus"]),
    (dict(name="mirrored", num_gpus=2), ["--num_gpus=2", "0 GPU"]),
    (dict(name="mirrored", num_cpu_devices=64), ["--num_cpu_devices=64 came too late", "4 CPU device"]),
    (dict(name="mirrored", num_packs=0), ["--num_packs"]),
    (dict(name="mirrored", num_packs=2, cross_device_ops_name="reduce_to_one"),
     ["--num_packs=2 applies only with --cross_device_ops=nccl or hierarchical_copy"]),
])
def test_factory_rejections(kwargs, words):
    with pytest.raises(ValueError) as e:  # UserError is a ValueError
        dtf.create_strategy(**kwargs)
    assert isinstance(e.value, UserError)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_unknown_communication_lists_valid_values():
    with pytest.raises(UserError, match="auto, ring, nccl"):
        strategy_lib.communication_options("mpi")


def test_tf_config_with_workers_rejects_single_host_strategies(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                                                "task": {"type": "worker", "index": 0}}))
    with pytest.raises(UserError, match="TF_CONFIG names 2 workers but strategy is 'mirrored'"):
        dtf.create_strategy("mirrored", num_cpu_devices=4)


def test_cluster_timeout_is_a_clear_error(run_python):
    """A worker whose peers never come up exits after the timeout with one line naming what it waited for."""
    proc = run_python("""
import dtf
from dtf.cluster import tf_config as cluster
ports = cluster.free_ports(2)
os.environ["TF_CONFIG"] = cluster.build_tf_config([f"127.0.0.1:{p}" for p in ports], 0)
dtf.create_strategy("multi_worker", cluster_timeout_s=3)
print("NOT REACHED")
""", timeout_s=120, expect_ok=False)
    assert proc.returncode != 0
    assert "NOT REACHED" not in proc.stdout
    assert "dtf: error: worker_0 could not reach the other workers (127.0.0.1:" in proc.stderr
    assert "within 3s" in proc.stderr


def test_version_guard_message():
    from dtf.base import versions
    with pytest.raises(UserError, match=r"keras 3.20.0 \(supported: >=3.15,<3.16\)"):
        versions.check_versions("2.21.0", "3.20.0")
    with pytest.raises(UserError, match=r"tensorflow 2.16.1"):
        versions.check_versions("2.16.1", "3.15.1")
    versions.check_versions("2.21.0", "3.15.1")


def test_multi_worker_flagfile_alone_trains_as_one_worker(tmp_path):
    """The README's multi-worker flagfile run without TF_CONFIG or a launcher: one worker, one line saying so and how
    to start more, the run's outputs, exit 0."""
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    proc = subprocess.run([sys.executable, "-m", "dtf.run", "--flagfile=experiments/shapes_multi_worker.flags",
                           "--epochs=1", "--steps_per_epoch=3", "--warmup_epochs=0", f"--model_dir={tmp_path}"],
                          cwd=repo, env=dict(env, PYTHONPATH=repo), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    assert out.count("training as one worker") == 1
    assert "python -m dtf.launch --num_workers=2 -- python -m dtf.run" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["strategy"] == "multi_worker" and summary["num_workers"] == 1
    assert (tmp_path / "model.keras").exists()


def test_strategy_names_are_the_flag_values(mirrored4):
    assert strategy_lib.strategy_name(tf.distribute.get_strategy()) == "default"
    assert strategy_lib.strategy_name(dtf.create_strategy("one_device")) == "one_device"
    assert strategy_lib.strategy_name(mirrored4) == "mirrored"
    assert "strategy=default " in strategy_lib.describe(tf.distribute.get_strategy())
