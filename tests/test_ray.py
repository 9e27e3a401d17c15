"""`python -m dtf.launch --backend=ray`: 2 Ray Train workers (TensorflowTrainer forms TF_CONFIG) train the
multi-worker experiment and end with the local launcher's weights; a user error (2) is not retried.

Ray runs inside a private loopback-only network namespace (tests/netns.py): its servers and TF's bind every interface.
Skipped with the reason when Ray is not installed (`pip install -e '.[ray]'`) or there is no root; under CI (which
installs the extra) that is a failure instead."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from netns import LoopbackNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
RUN = ["python", "-m", "dtf.run", "--dataset=synthetic", "--model=mlp", "--epochs=2", "--steps_per_epoch=10",
       "--global_batch_size=32", "--input_sharding=batch", "--validation_freq=10", "--cluster_timeout=60"]


def _unavailable(why: str):
    if os.environ.get("CI"):  # .ci/run installs the ray extra: a missing one must not pass unnoticed
        pytest.fail(f"Ray is needed in CI but {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def netns():
    try:
        import ray.train.tensorflow  # noqa: F401
    except ImportError as e:
        _unavailable(f"Ray Train is not installed ({e}): pip install -e '.[ray]'")
    why = LoopbackNamespace.unavailable()
    if why:
        _unavailable(why)
    with LoopbackNamespace() as ns:
        yield ns
        assert [p.pid for p in ns.processes()] == []  # dtf.ray stopped the Ray instance it started


def _launch(args, cwd, wrap=lambda c: c, timeout_s=420):
    env = dict(os.environ, PYTHONPATH=REPO, RAY_AUTH_MODE="disabled",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    return subprocess.run(wrap([sys.executable, "-m", "dtf.launch", *args]), env=env, cwd=str(cwd),
                          capture_output=True, text=True, timeout=timeout_s)


def _weights(model_dir):
    import keras

    return keras.models.load_model(os.path.join(model_dir, "model.keras"), compile=False).get_weights()


def test_ray_workers_match_the_local_launcher(netns, tmp_path):
    ray_run = _launch(["--backend=ray", "--num_workers=2", "--", *RUN, f"--model_dir={tmp_path}/ray"], tmp_path,
                      netns.wrap)
    out = ray_run.stdout + ray_run.stderr
    assert ray_run.returncode == 0, out[-4000:]
    local = _launch(["--num_workers=2", "--timeout=300", "--", *RUN, f"--model_dir={tmp_path}/local"], tmp_path)
    assert local.returncode == 0, (local.stdout + local.stderr)[-3000:]

    assert "[chief] " in out and "[worker 1] " in out  # each worker's lines, prefixed by its role
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["num_workers"] == 2 and summary["num_replicas"] == 2
    assert sorted(os.listdir(tmp_path / "ray")) == sorted(os.listdir(tmp_path / "local"))  # chief-only outputs
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(_weights(tmp_path / "ray"), _weights(tmp_path / "local")))
    print(f"ray: max |Δw| vs dtf.launch = {diff:.2e}")
    assert diff < 1e-5


# Through the Python entry, on one Ray instance: a crash (1) is retried and the rerun succeeds; a user error (2) is not
# retried. Each worker appends a line per attempt to its own file, and takes its status from how many it had.
RETRIES = """
import sys
import ray
from dtf import ray as dtf_ray
ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2)
OUT = sys.argv[1]
def stub(name, statuses):  # statuses[task index][attempt], the last one repeating
    code = (f"import json, os, sys; i = json.loads(os.environ['TF_CONFIG'])['task']['index']; "
            f"path = os.path.join({OUT!r}, {name!r} + str(i)); "
            f"n = len(open(path).readlines()) if os.path.exists(path) else 0; open(path, 'a').write('run' + chr(10)); "
            f"s = {statuses!r}[i]; sys.exit(s[min(n, len(s) - 1)])")
    return [sys.executable, "-c", code]
crash = dtf_ray.fit(stub("crash", [[1, 0], [0]]), 2, max_restarts=1)  # the chief crashes once
usage = dtf_ray.fit(stub("usage", [[2], [2]]), 2, max_restarts=2)
print("STATUSES", crash, usage, flush=True)
ray.shutdown()
"""


def test_ray_retries_a_crash_but_not_a_user_error(netns, tmp_path):
    script = tmp_path / "retries.py"
    script.write_text(RETRIES)
    env = dict(os.environ, PYTHONPATH=REPO, RAY_AUTH_MODE="disabled")
    run = subprocess.run(netns.wrap([sys.executable, str(script), str(tmp_path)]), env=env, cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0 and "STATUSES 0 2" in out, out[-4000:]
    assert len((tmp_path / "crash0").read_text().splitlines()) == 2  # the crash, then the restarted group
    assert [len((tmp_path / f"usage{i}").read_text().splitlines()) for i in (0, 1)] == [1, 1]  # not retried
    assert "chief exited with status 1; Ray Train restarts the group" in out
