"""Shared test helpers. Multi-worker tests run real worker processes on 127.0.0.1 via `dtf.cluster.procs`."""
import os
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER_TIMEOUT_S = float(os.environ.get("DTF_TEST_WORKER_TIMEOUT", "300"))


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests"),
                                                         os.environ.get("PYTHONPATH", "")]))


def _script(tmp_path, code: str):
    script = tmp_path / f"script_{abs(hash(code))}.py"
    script.write_text("import json, os, sys\n"
                      f"OUT = {str(tmp_path)!r}\n"
                      "TASK = json.loads(os.environ.get('TF_CONFIG') or '{\"task\": {\"index\": 0}}')['task']['index']\n"
                      + textwrap.dedent(code))
    return script


@pytest.fixture
def run_python(tmp_path):
    """run_python(code, timeout_s=...) -> CompletedProcess: `code` in a fresh interpreter (e.g. to get its own
    logical-device split), with OUT and TASK globals as in `run_workers`; fails the test on a non-zero exit."""
    import subprocess

    def run(code: str, timeout_s: float = WORKER_TIMEOUT_S, env=None, expect_ok=True):
        full_env = _env()
        full_env.update(env or {})
        proc = subprocess.run([sys.executable, str(_script(tmp_path, code))], env=full_env, cwd=str(tmp_path),
                              capture_output=True, text=True, timeout=timeout_s)
        if expect_ok and proc.returncode != 0:
            pytest.fail(f"script failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    return run


@pytest.fixture
def run_workers(tmp_path):
    """run_workers(code, num_workers, timeout_s=...) -> GroupResult. The script gets OUT (a per-test directory) and
    TASK (its worker index) as globals; it fails the test if any worker fails or times out."""
    from dtf.cluster import procs

    def run(code: str, num_workers: int, timeout_s: float = WORKER_TIMEOUT_S, env=None, expect_ok=True):
        script = _script(tmp_path, code)
        full_env = _env()
        full_env.update(env or {})
        result = procs.run_local_workers([sys.executable, str(script)], num_workers, env=full_env,
                                         cwd=str(tmp_path), timeout_s=timeout_s)
        if expect_ok and not result.ok:
            pytest.fail(f"workers failed (timed_out={result.timed_out}):\n{result.report()}")
        return result

    return run


def pytest_configure(config):
    """Give the pytest process 4 logical CPU devices before TensorFlow initializes, so in-process tests can build a
    4-replica MirroredStrategy. Other replica counts need their own process (`run_python`): TF's collective group
    keys clash between mirrored strategies of different sizes in one process."""
    import dtf

    dtf.simulate_cpu_devices(4)
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order pytest_collection_modifyitems sets
        config.option.loadscopereorder = False


@pytest.fixture(scope="session")
def mirrored4():
    """The pytest process's one 4-replica MirroredStrategy. Each new strategy restarts TF's collective instance keys,
    so a second one's all-reduces collide with the first's ("Shape mismatch in the collective instance")."""
    import dtf

    return dtf.create_strategy("mirrored", num_cpu_devices=4)


@pytest.fixture(scope="module")
def id_files(tmp_path_factory):
    """TFRecord files of consecutive ids (helpers.parse_id reads them): 8 even training files, 8 uneven eval files."""
    from helpers import EVAL_FILE_LENGTHS, TRAIN_IDS, write_id_files

    directory = tmp_path_factory.mktemp("ids")
    return {"train": write_id_files(str(directory / "train"), [TRAIN_IDS // 8] * 8),
            "eval": write_id_files(str(directory / "eval"), EVAL_FILE_LENGTHS)}


@pytest.fixture
def start_launcher(tmp_path):
    """start_launcher(*args) -> helpers.Launcher running `python -m dtf.launch ARGS` in tmp_path; each is cleaned up
    (its launcher and every worker it was seen with stopped) when the test ends."""
    from helpers import Launcher

    started = []

    def start(*args):
        started.append(Launcher(list(args), str(tmp_path)))
        return started[-1]

    yield start
    for launcher in started:
        launcher.cleanup()


def _slurm_unavailable(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"Slurm is needed in CI but {why}")
    pytest.skip(f"real Slurm unavailable: {why}")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A real single-node Slurm (tests/slurm_cluster.py), one per test file. Skipped with the reason when Slurm is
    not installed here; under CI (CI=true, where .ci/run installs it) that is a failure instead."""
    from slurm_cluster import SlurmCluster, SlurmUnavailable

    why = SlurmCluster.unavailable()
    if why:
        _slurm_unavailable(why)
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.__enter__()
    except SlurmUnavailable as e:
        _slurm_unavailable(str(e))
    try:
        yield cluster
    finally:
        cluster.stop()


# Files that must not run beside each other in `pytest -n 2 --dist loadgroup`: each Slurm file starts its own Slurm.
SHARED_GROUPS = {"test_slurm": "slurm", "test_slurm_preemption": "slurm", "test_tune_cluster": "slurm"}


# Seconds each group takes in a clean `.ci/run` on 2 cores (measured; rounded). The longest are handed out first, so
# that at the end neither worker waits long for the other: xdist alone orders groups by their number of tests, which
# left the docs harness (4 tests, ~12 minutes) to start last while the other worker had nothing to do.
EXPECTED_S = {
    "test_docs": 800, "slurm": 480, "test_bench": 330, "test_run": 310, "test_tracking": 300, "test_bad_inputs": 290,
    "test_task_runs": 240, "test_tune": 220, "test_exit": 200, "test_elastic": 170, "test_ray": 160,
    "test_accumulation": 160, "test_batch_study": 150, "test_preemption": 140, "test_data_service": 130,
    "test_predict": 120, "test_rerun": 110, "test_multi_worker": 90, "test_launch": 80, "test_evaluator": 60}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist's `--dist loadgroup` (the README's test command) a file's tests stay in one worker, so its
    module fixtures (a trained reference run, a Slurm cluster, the bad-input table) are built once, and the files of
    SHARED_GROUPS share a worker; the groups come longest first (EXPECTED_S), each file's tests in their order."""
    groups = {}
    for item in items:
        name = item.module.__name__.rpartition(".")[2]
        groups[item] = SHARED_GROUPS.get(name, name)
        item.add_marker(pytest.mark.xdist_group(groups[item]))
    items.sort(key=lambda item: -EXPECTED_S.get(groups[item], 0))
