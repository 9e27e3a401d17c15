"""TF_CONFIG parsing/validation and building: every malformed input gets an error naming the field and the fix."""
import json
import socket

import pytest

from dtf.cluster import tf_config as cluster
from dtf.base.errors import UserError


def cfg(cluster_spec, task=None, **extra):
    d = {"cluster": cluster_spec, **extra}
    if task is not None:
        d["task"] = task
    return json.dumps(d)


W2 = {"worker": ["127.0.0.1:2000", "127.0.0.1:2001"]}


def test_no_tf_config_is_a_single_local_worker(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    info = cluster.parse_tf_config()
    assert (info.num_workers, info.is_chief, info.is_multi_worker, info.task_type) == (1, True, False, None)


def test_worker_zero_is_chief_without_a_chief_task():
    infos = [cluster.parse_tf_config(cfg(W2, {"type": "worker", "index": i})) for i in range(2)]
    assert [i.is_chief for i in infos] == [True, False]
    assert infos[1].num_workers == 2 and infos[1].address == "127.0.0.1:2001"
    assert infos[1].worker_id == "worker_1"


def test_chief_task_roles_and_counts():
    spec = {"chief": ["127.0.0.1:1999"], "worker": ["127.0.0.1:2000", "127.0.0.1:2001"],
            "ps": ["127.0.0.1:3000"], "evaluator": ["127.0.0.1:4000"]}
    chief = cluster.parse_tf_config(cfg(spec, {"type": "chief", "index": 0}))
    worker0 = cluster.parse_tf_config(cfg(spec, {"type": "worker", "index": 0}))
    evaluator = cluster.parse_tf_config(cfg(spec, {"type": "evaluator", "index": 0}))
    assert chief.is_chief and not worker0.is_chief and not evaluator.is_chief
    assert chief.num_workers == 3  # chief + 2 workers train; ps and evaluator do not
    assert chief.worker_addresses == ["127.0.0.1:1999", "127.0.0.1:2000", "127.0.0.1:2001"]


@pytest.mark.parametrize("text, words", [
    ("{not json", ["not valid JSON"]),
    ("[1, 2]", ["JSON object"]),
    (json.dumps({"task": {"type": "worker", "index": 0}}), ["no 'cluster'"]),
    (cfg(W2), ["no 'task'"]),
    (cfg({"boss": ["127.0.0.1:1"]}, {"type": "boss", "index": 0}), ["unknown task type 'boss'", "chief, worker"]),
    (cfg(W2, {"type": "master", "index": 0}), ["task.type 'master' is unknown"]),
    (cfg(W2, {"type": "chief", "index": 0}), ["no 'chief' tasks"]),
    (cfg(W2, {"type": "worker", "index": 2}), ["task.index 2 is out of range", "0..1"]),
    (cfg(W2, {"type": "worker", "index": -1}), ["out of range"]),
    (cfg(W2, {"type": "worker", "index": "0"}), ["must be an integer"]),
    (cfg({"worker": ["127.0.0.1:2000", "127.0.0.1:2000"]}, {"type": "worker", "index": 0}),
     ["used by both worker[0] and worker[1]"]),
    (cfg({"worker": ["localhost"]}, {"type": "worker", "index": 0}), ["not host:port"]),
    (cfg({"worker": ["127.0.0.1:99999"]}, {"type": "worker", "index": 0}), ["1-65535"]),
    (cfg({"worker": ["127.0.0.1:abc"]}, {"type": "worker", "index": 0}), ["1-65535"]),
    (cfg({"worker": []}, {"type": "worker", "index": 0}), ["cluster.worker is empty"]),
    (cfg({"ps": ["127.0.0.1:1"]}, {"type": "ps", "index": 0}), ["no 'worker' or 'chief'"]),
    (cfg({"chief": ["127.0.0.1:1", "127.0.0.1:2"]}, {"type": "chief", "index": 0}), ["at most one chief"]),
])
def test_malformed_tf_config_errors(text, words):
    with pytest.raises(UserError) as e:
        cluster.parse_tf_config(text)
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message


def test_build_tf_config_round_trips():
    text = cluster.build_tf_config("127.0.0.1:5000, 127.0.0.1:5001", 1)
    info = cluster.parse_tf_config(text)
    assert info.cluster == {"worker": ["127.0.0.1:5000", "127.0.0.1:5001"]} and info.task_index == 1
    assert cluster.parse_tf_config(info.to_tf_config()) == info


@pytest.mark.parametrize("hosts, index, words", [
    ("", 0, ["--worker_hosts is empty"]),
    ("127.0.0.1:5000", 3, ["--task_index 3 is out of range"]),
    ("127.0.0.1", 0, ["--worker_hosts", "not host:port"]),
])
def test_build_tf_config_errors_name_the_flags(hosts, index, words):
    with pytest.raises(UserError) as e:
        cluster.build_tf_config(hosts, index)
    assert all(w in str(e.value) for w in words)


def test_resolve_cluster_flags(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "")  # recorded, so the TF_CONFIG that resolve_cluster exports is undone after
    monkeypatch.delenv("TF_CONFIG")
    with pytest.raises(UserError, match="--worker_hosts needs --task_index"):
        cluster.resolve_cluster("127.0.0.1:5000,127.0.0.1:5001", None)
    with pytest.raises(UserError, match="--task_index is set without --worker_hosts"):
        cluster.resolve_cluster(None, 1)
    info = cluster.resolve_cluster("127.0.0.1:5000,127.0.0.1:5001", 1)
    assert info.task_index == 1 and info.num_workers == 2
    with pytest.raises(UserError, match="both TF_CONFIG and --worker_hosts"):
        cluster.resolve_cluster("127.0.0.1:5000,127.0.0.1:5001", 0)


def test_free_ports_are_distinct_and_bindable():
    ports = cluster.free_ports(8)
    assert len(set(ports)) == 8
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_local_cluster_is_loopback_only():
    configs = [cluster.parse_tf_config(c) for c in cluster.local_cluster(3)]
    assert [c.task_index for c in configs] == [0, 1, 2]
    assert all(a.startswith("127.0.0.1:") for a in configs[0].worker_addresses)
