"""`python -m dtf.launch --backend=ray`: 2 Ray Train workers (TensorflowTrainer forms TF_CONFIG) train the
multi-worker experiment and end with the local launcher's weights; a user error (2) is not retried.

Ray runs inside a private loopback-only network namespace (tests/netns.py): its servers and TF's bind every interface.
Skipped with the reason when Ray is not installed (`pip install -e '.[ray]'`) or there is no root; under CI (which
installs the extra) that is a failure instead."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import max_weight_delta
from netns import LoopbackNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
# The README's Ray command, every path relative to the launch directory: a flagfile nesting another (which names
# the task by module), a task file that replaces it and writes its CSV to a relative --csv_path, a relative
# --model_dir; shortened as the docs harness does.
FLAGFILE = """--flagfile=experiments/tabular_regression.flags
--task=houses.py:HousePrices
--strategy=multi_worker
--num_cpu_devices=1
--model_dir=runs/houses_multi_worker
"""
RUN = ["python", "-m", "dtf.run", "--flagfile=experiments/houses_multi_worker.flags", "--epochs=1",
       "--steps_per_epoch=3", "--warmup_epochs=0", "--cluster_timeout=60"]


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
        assert [p.pid for p in ns.processes()] == []  # dtf.backends.ray stopped the Ray instance it started


def _env(**extra):
    return dict(os.environ, PYTHONPATH=REPO, RAY_AUTH_MODE="disabled", **extra)


def _launch(args, cwd, wrap=lambda c: c, timeout_s=420):
    env = _env(PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    return subprocess.run(wrap([sys.executable, "-m", "dtf.launch", *args]), env=env, cwd=str(cwd),
                          capture_output=True, text=True, timeout=timeout_s)


def _python(netns, tmp_path, code, env):
    """`code` as a script in tmp_path, run there inside the namespace."""
    script = tmp_path / "script.py"
    script.write_text(code)
    return subprocess.run(netns.wrap([sys.executable, str(script)]), env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=300)


def _worker_lines(output):
    return [line for line in output.splitlines() if line.startswith(("[chief] ", "[worker 1] "))]


def test_ray_runs_the_readme_command_in_the_launch_directory(netns, tmp_path):
    """Run from a fresh directory as a user would: relative paths resolve there and outputs land there; each line of
    the workers once (as with the local launcher), none of Ray's; and the local launcher's weights."""
    shutil.copytree(os.path.join(REPO, "experiments"), tmp_path / "experiments")
    shutil.copy(os.path.join(REPO, "examples", "tabular_regression.py"), tmp_path / "houses.py")
    (tmp_path / "experiments" / "houses_multi_worker.flags").write_text(FLAGFILE)
    ray_run = _launch(["--backend=ray", "--num_workers=2", "--max_restarts=1", "--", *RUN, "--model_dir=runs/ray"],
                      tmp_path, netns.wrap)
    out = ray_run.stdout + ray_run.stderr
    assert ray_run.returncode == 0, out[-4000:]
    local = _launch(["--num_workers=2", "--timeout=300", "--", *RUN, "--model_dir=runs/local"], tmp_path)
    assert local.returncode == 0, (local.stdout + local.stderr)[-3000:]

    summary = json.loads((tmp_path / "runs" / "ray" / "summary.json").read_text())
    assert summary["num_workers"] == 2 and summary["num_replicas"] == 2
    assert (tmp_path / "runs" / "data" / "houses.csv").is_file()  # the task's relative --csv_path
    assert sorted(os.listdir(tmp_path / "runs")) == ["data", "local", "ray"]
    assert sorted(os.listdir(tmp_path / "runs" / "ray")) == sorted(os.listdir(tmp_path / "runs" / "local"))

    ray_lines, local_lines = _worker_lines(ray_run.stdout), _worker_lines(local.stdout)
    shared = set(ray_lines) & set(local_lines)  # lines without timings
    assert len(shared) >= 6, (ray_lines, local_lines)
    assert {line: ray_lines.count(line) for line in shared} == {line: local_lines.count(line) for line in shared}
    assert sum(line.startswith("[chief] dtf: done in ") for line in ray_lines) == 1
    for noise in ("Failed to query", "RayTrainWorker", "TrainController", "PlacementGroupCleaner", "Traceback"):
        assert noise not in out, out[-4000:]
    diff = max_weight_delta(tmp_path / "runs" / "ray", tmp_path / "runs" / "local")
    print(f"ray: max |Δw| vs dtf.launch = {diff:.2e}")
    assert diff < 1e-5


# Through the Python entry, on one Ray instance started by the script (Ray's log forwarding on): a crash (1) is
# retried and the rerun succeeds; a user error (2) is not retried; a launch directory a node lacks is one line, 2,
# and nothing runs. Each worker appends a line per attempt to its own file (a relative path: the launch directory),
# prints its attempt, and takes its status from how many it had.
RETRIES = """
import os
import sys
import ray
from dtf.backends import ray as dtf_ray
ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2)
def stub(name, statuses):  # statuses[task index][attempt], the last one repeating
    code = (f"import json, os, sys; i = json.loads(os.environ['TF_CONFIG'])['task']['index']; "
            f"path = {name!r} + str(i); "
            f"n = len(open(path).readlines()) if os.path.exists(path) else 0; open(path, 'a').write('run' + chr(10)); "
            f"print({name!r}, 'attempt', n); s = {statuses!r}[i]; sys.exit(s[min(n, len(s) - 1)])")
    return [sys.executable, "-c", code]
crash = dtf_ray.fit(stub("crash", [[1, 0], [0]]), 2, max_restarts=1)  # the chief crashes once
usage = dtf_ray.fit(stub("usage", [[2], [2]]), 2, max_restarts=2)
missing = dtf_ray.fit(stub("missing", [[0], [0]]), 2, max_restarts=2, cwd=os.path.abspath("not-shared"))
print("STATUSES", crash, usage, missing, flush=True)
ray.shutdown()
"""


def test_ray_retries_a_crash_but_not_a_user_error(netns, tmp_path):
    run = _python(netns, tmp_path, RETRIES, _env())
    out = run.stdout + run.stderr
    assert run.returncode == 0 and "STATUSES 0 2 2" in out, out[-4000:]
    assert len((tmp_path / "crash0").read_text().splitlines()) == 2  # the crash, then the restarted group
    assert [len((tmp_path / f"usage{i}").read_text().splitlines()) for i in (0, 1)] == [1, 1]  # not retried
    assert "dtf.backends.ray: chief exited with status 1; Ray Train restarts the group" in out
    lines = run.stdout.splitlines()
    for line in ("[chief] crash attempt 0", "[chief] crash attempt 1", "[worker 1] crash attempt 0",
                 "[chief] usage attempt 0", "[worker 1] usage attempt 0"):
        assert lines.count(line) == 1, out[-4000:]  # once, though Ray also forwards the actors' output here
    assert not list(tmp_path.glob("missing*"))
    missing = [line for line in lines if line.startswith("dtf.backends.ray: error: ")]  # both workers' node: one line
    assert len(missing) == 1 and f"the launch directory {tmp_path}/not-shared does not exist on Ray node 127.0.0.1" \
        in missing[0], out[-4000:]


NICENESS = """
import os
import sys
from dtf.backends import ray as dtf_ray
status = dtf_ray.fit([sys.executable, "-c", "import os; print('niceness', os.nice(0))"], 1)
print("STATUS", status, "LEFT", os.environ.get("RAY_worker_niceness"), flush=True)
"""


def test_ray_local_instance_runs_the_command_at_normal_priority(netns, tmp_path):
    """Ray renices its workers to 15; on the instance dtf starts the command runs at 0, as with the local launcher
    (at 15 anything else running starved it: see dtf.backends.ray._init_local), and dtf's setting is not left behind."""
    env = _env()
    env.pop("RAY_worker_niceness", None)
    run = _python(netns, tmp_path, NICENESS, env)
    out = run.stdout + run.stderr
    assert run.returncode == 0 and "STATUS 0 LEFT None" in run.stdout, out[-4000:]
    assert "[chief] niceness 0" in run.stdout.splitlines(), out[-4000:]
