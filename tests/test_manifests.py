"""Cluster manifests: the TFJob YAML the Training Operator needs, an sbatch script that bash accepts and that runs the
command with the right TF_CONFIG (checked with a fake `srun`), and TF_CONFIG from a Slurm task's environment."""
import json
import os
import shlex
import subprocess
import sys

import pytest
import yaml

from dtf import launch
from dtf import cluster, manifests
from dtf.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["python", "-m", "dtf.run", "--flagfile=mnist.cfg", "--model_dir=/shared/run1"]


def _emit(capsys, *args):
    assert launch.main(["dtf.launch", *args]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def test_tfjob_has_a_chief_and_workers_in_the_tensorflow_container(capsys):
    doc = yaml.safe_load(_emit(capsys, "--emit=tfjob", "--num_workers=3", "--image=reg.example/dtf:0.1",
                               "--job_name=mnist-run1", "--max_restarts=2", "--timeout=3600", "--", *RUN))
    assert doc["apiVersion"] == "kubeflow.org/v1" and doc["kind"] == "TFJob"
    assert doc["metadata"]["name"] == "mnist-run1"
    specs = doc["spec"]["tfReplicaSpecs"]
    assert {k: v["replicas"] for k, v in specs.items()} == {"Chief": 1, "Worker": 2}
    for spec in specs.values():
        assert spec["restartPolicy"] == "OnFailure"
        [container] = spec["template"]["spec"]["containers"]
        assert container == {"name": "tensorflow", "image": "reg.example/dtf:0.1", "command": RUN}
    assert doc["spec"]["runPolicy"] == {"backoffLimit": 2, "activeDeadlineSeconds": 3600}


def test_tfjob_defaults_and_a_single_worker(capsys):
    doc = yaml.safe_load(_emit(capsys, "--emit=tfjob", "--num_workers=1", "--", "python", "train.py"))
    assert list(doc["spec"]["tfReplicaSpecs"]) == ["Chief"]
    assert "runPolicy" not in doc["spec"]  # no flags given: the operator's own defaults apply
    assert doc["metadata"]["name"] == manifests.DEFAULT_JOB_NAME
    assert doc["spec"]["tfReplicaSpecs"]["Chief"]["template"]["spec"]["containers"][0]["image"] == \
        manifests.DEFAULT_IMAGE


@pytest.mark.parametrize("name", ["Upper", "under_score", "-dash", "x" * 64, ""])
def test_job_names_must_be_dns_labels(name):
    with pytest.raises(UserError, match="--job_name"):
        manifests.check_job_name(name)


def _bash_n(script: str, tmp_path):
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return path


def test_sbatch_for_dtf_run_lets_the_runner_resolve_slurm(capsys, tmp_path):
    script = _emit(capsys, "--emit=slurm", "--num_workers=4", "--max_restarts=2", "--timeout=5400", "--", *RUN)
    _bash_n(script, tmp_path)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ("--nodes=4", "--ntasks-per-node=1", "--time=90", "--job-name=dtf-job"):
        assert f"#SBATCH {directive}" in lines
    [srun] = [line.strip() for line in lines if line.strip().startswith("srun ")]
    assert shlex.split(srun)[-len(RUN) - 1:] == RUN[:3] + ["--cluster_resolver=slurm"] + RUN[3:]
    assert "TF_CONFIG" not in script
    assert "$(seq 0 2)" in script


def test_sbatch_keeps_a_users_cluster_resolver_flag():
    command = RUN + ["--cluster_resolver=slurm"]
    assert manifests.sbatch(command, 2).count("--cluster_resolver") == 1


FAKE_SRUN = """#!/bin/bash
# One task of a 2-node step on node9 and node10 (as rank 1); the first attempt fails like a crashed task.
while [[ "$1" == --* ]]; do shift; done
echo "srun attempt $DTF_LAUNCH_RESTART"
[ "$DTF_LAUNCH_RESTART" = 0 ] && exit 1
SLURM_PROCID=1 SLURM_STEP_NODELIST='node[9-10]' SLURM_STEP_TASKS_PER_NODE='1(x2)' exec "$@"
"""


def test_sbatch_runs_any_command_with_tf_config_from_slurm_and_retries(tmp_path):
    """Runs the generated script with a fake srun: the quoting survives, the failed step is rerun with
    DTF_LAUNCH_RESTART=1, and the command sees the TF_CONFIG of rank 1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    command = ["python", "-c", "import os, sys; print('ARGS', sys.argv[1:]); print('TF_CONFIG', "
               "os.environ['TF_CONFIG']); print('RESTART', os.environ['DTF_LAUNCH_RESTART'])", "it's", "a b"]
    path = _bash_n(manifests.sbatch(command, 2, max_restarts=1), tmp_path)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=REPO)
    proc = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    assert out[:2] == ["srun attempt 0", "srun attempt 1"]
    assert "srun step failed with status 1 (attempt 0)" in proc.stderr
    assert out[2] == "ARGS " + repr(["it's", "a b"])
    tf_config = json.loads(out[3].split(" ", 1)[1])
    assert tf_config == {"cluster": {"worker": ["node9:8888", "node10:8888"]}, "task": {"type": "worker", "index": 1}}
    assert out[4] == "RESTART 1"


def test_sbatch_gives_up_after_max_restarts(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/bash\nexit 7\n")
    (bin_dir / "srun").chmod(0o755)
    path = _bash_n(manifests.sbatch(["python", "train.py"], 2, max_restarts=2), tmp_path)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 7
    assert proc.stderr.count("srun step failed with status 7") == 3


def test_slurm_tf_config_follows_the_rank_order_of_the_node_list():
    env = {"SLURM_PROCID": "3", "SLURM_STEP_NODELIST": "gpu[09-10],cpu1", "SLURM_STEP_TASKS_PER_NODE": "2(x2),1"}
    config = json.loads(cluster.slurm_tf_config(env))
    assert config == {"cluster": {"worker": ["gpu09:8888", "gpu09:8889", "gpu10:8888", "gpu10:8889", "cpu1:8888"]},
                      "task": {"type": "worker", "index": 3}}
    job_env = {"SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_TASKS_PER_NODE": "1"}
    assert json.loads(cluster.slurm_tf_config(job_env, port=2222))["cluster"] == {"worker": ["n1:2222"]}


@pytest.mark.parametrize("env, message", [
    ({}, "SLURM_PROCID"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_TASKS_PER_NODE": "1"}, "SLURM_STEP_NODELIST"),
    ({"SLURM_PROCID": "2", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}, "outside"),
])
def test_slurm_tf_config_outside_a_step_says_so(env, message):
    with pytest.raises(UserError, match=message):
        cluster.slurm_tf_config(env)


def test_manifests_cli_errors_are_one_line(capsys, monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    assert manifests.main(["dtf.manifests", "slurm_tf_config"]) == 2
    assert manifests.main(["dtf.manifests"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("dtf.manifests: error: ") for line in err)
    assert "srun" in err[0]
