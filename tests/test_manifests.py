"""Cluster manifests: the TFJob YAML the Training Operator needs; the sbatch script's layout, resources and rerun
rules (run by bash with a fake `srun`/`scontrol`; tests/test_slurm.py runs it on a real Slurm); TF_CONFIG and ports
from a Slurm task's environment."""
import copy
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys

import pytest
import yaml
from absl import flags as absl_flags

from dtf import launch
from dtf.cluster import tf_config as cluster
from dtf.backends import tfjob as manifests
from dtf.backends import slurm
from dtf.backends import slurm_task
from dtf.base import errors
from dtf.base.errors import UserError



@pytest.fixture
def api():
    """tests/tfjob_api.py, which needs Kubeflow's TFJob models (`kubeflow-training`, in the test extra)."""
    return pytest.importorskip("tfjob_api", reason="needs kubeflow-training: pip install -e '.[test]'")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["python", "-m", "dtf.run", "--flagfile=mnist.cfg", "--model_dir=/shared/run1"]


def _emit(capsys, *args):
    assert launch.main(["dtf.launch", *args]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def test_tfjob_has_a_chief_and_workers_in_the_tensorflow_container(capsys, api):
    doc = yaml.safe_load(_emit(capsys, "--emit=tfjob", "--num_workers=3", "--image=reg.example/dtf:0.1",
                               "--job_name=mnist-run1", "--max_restarts=2", "--timeout=3600", "--", *RUN))
    assert doc["apiVersion"] == "kubeflow.org/v1" and doc["kind"] == "TFJob"
    assert doc["metadata"]["name"] == "mnist-run1"
    specs = doc["spec"]["tfReplicaSpecs"]
    assert {k: v["replicas"] for k, v in specs.items()} == {"Chief": 1, "Worker": 2}
    for spec in specs.values():
        assert spec["restartPolicy"] == "ExitCode"  # 143 retried, 2 and 3 never (dtf.base.exitcodes)
        [container] = spec["template"]["spec"]["containers"]
        assert container == {"name": "tensorflow", "image": "reg.example/dtf:0.1", "command": RUN}
    assert doc["spec"]["runPolicy"] == {"cleanPodPolicy": "Running", "backoffLimit": 2, "activeDeadlineSeconds": 3600}
    assert api.validate_tfjob(doc) == []


def test_tfjob_defaults_and_a_single_worker(capsys, api):
    doc = yaml.safe_load(_emit(capsys, "--emit=tfjob", "--num_workers=1", "--", "python", "train.py"))
    assert list(doc["spec"]["tfReplicaSpecs"]) == ["Chief"]
    assert doc["spec"]["runPolicy"] == {"cleanPodPolicy": "Running"}  # else the operator's own defaults
    assert doc["metadata"]["name"] == manifests.DEFAULT_JOB_NAME
    assert doc["spec"]["tfReplicaSpecs"]["Chief"]["template"]["spec"]["containers"][0]["image"] == \
        manifests.DEFAULT_IMAGE
    assert api.validate_tfjob(doc) == []


SHARED_RUN = ["python", "-m", "dtf.run", "--flagfile=/shared/exp.flags", "--model_dir=/shared/run1"]


@pytest.mark.parametrize("num_workers", [1, 2, 4])
def test_tfjob_with_evaluator_resources_and_volume_validates_against_the_tfjob_api(capsys, api, num_workers):
    doc = yaml.safe_load(_emit(capsys, "--emit=tfjob", f"--num_workers={num_workers}", "--image=reg.example/dtf:0.1",
                               "--gpus_per_worker=2", "--cpu=8", "--memory=32Gi", "--volume=dtf-runs:/shared",
                               "--evaluator=python eval.py --model_dir=/shared/run1", "--max_restarts=3", "--",
                               *SHARED_RUN))
    assert api.validate_tfjob(doc) == []
    specs = doc["spec"]["tfReplicaSpecs"]
    expected = {"Chief": 1, "Evaluator": 1, **({"Worker": num_workers - 1} if num_workers > 1 else {})}
    assert {k: v["replicas"] for k, v in specs.items()} == expected
    for replica_type, spec in specs.items():
        pod = spec["template"]["spec"]
        [container] = pod["containers"]
        assert pod["volumes"] == [{"name": "dtf-shared", "persistentVolumeClaim": {"claimName": "dtf-runs"}}]
        assert container["volumeMounts"] == [{"name": "dtf-shared", "mountPath": "/shared"}]
        if replica_type == "Evaluator":
            assert container["command"] == ["python", "eval.py", "--model_dir=/shared/run1"]
            assert "resources" not in container
        else:
            assert container["command"] == SHARED_RUN
            amounts = {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}
            assert container["resources"] == {"requests": amounts, "limits": amounts}


def test_tfjob_model_dir_may_be_an_object_store_url(capsys, api):
    doc = yaml.safe_load(_emit(capsys, "--emit=tfjob", "--num_workers=2", "--volume=data:/data", "--", "python", "-m",
                               "dtf.run", "--model_dir=gs://bucket/run1"))
    assert api.validate_tfjob(doc) == []


def test_the_validator_rejects_what_the_api_would(api):
    """The validator can fail: unknown fields, wrong types, missing required fields, bad enum values, no chief."""
    good = yaml.safe_load(manifests.tfjob(["python", "train.py"], 2))
    assert api.validate_tfjob(good) == []
    cases = {
        "unknown field": lambda d: d["spec"]["tfReplicaSpecs"]["Chief"].update(restartPolicies="Never"),
        "expected int": lambda d: d["spec"]["tfReplicaSpecs"]["Worker"].update(replicas="1"),
        "`name`, must not be `None`": lambda d: d["spec"]["tfReplicaSpecs"]["Chief"]["template"]["spec"][
            "containers"][0].pop("name"),
        "restartPolicy": lambda d: d["spec"]["tfReplicaSpecs"]["Chief"].update(restartPolicy="OnExitCode"),
        "unknown TF replica type": lambda d: d["spec"]["tfReplicaSpecs"].update(Eval=d["spec"]["tfReplicaSpecs"]["Chief"]),
        "more than one Chief": lambda d: d["spec"]["tfReplicaSpecs"].update(Master=d["spec"]["tfReplicaSpecs"]["Chief"]),
        "DNS-1035": lambda d: d["metadata"].update(name="1job"),
        "cleanPodPolicy": lambda d: d["spec"]["runPolicy"].update(cleanPodPolicy="Always"),
    }
    for message, break_it in cases.items():
        doc = copy.deepcopy(good)
        break_it(doc)
        errors = api.validate_tfjob(doc)
        assert any(message in e for e in errors), (message, errors)


@pytest.mark.parametrize("args, flag", [
    (["--gpus_per_worker=0"], "--gpus_per_worker"),
    (["--cpu=four"], "--cpu=four"),
    (["--memory=16GB"], "--memory=16GB"),
    (["--volume=/shared"], "--volume"),
    (["--volume=Claim:/shared"], "--volume"),
    (["--volume=runs:/shared"], "--model_dir=/tmp/run1"),
    (["--evaluator="], "--evaluator"),
    (["--evaluator=python 'unclosed"], "--evaluator"),
])
def test_bad_tfjob_options_are_one_line_and_exit_2(capsys, args, flag):
    assert launch.main(["dtf.launch", "--emit=tfjob", "--num_workers=2", *args, "--", "python", "-m", "dtf.run",
                        "--model_dir=/tmp/run1"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("dtf.launch: error: "), err
    assert flag in err


@pytest.mark.parametrize("flag", ["--gpus_per_worker=1", "--cpu=1", "--memory=1Gi", "--volume=runs:/shared"])
def test_tfjob_options_need_emit_tfjob(capsys, flag):
    assert launch.main(["dtf.launch", "--num_workers=2", "--emit=slurm", flag, "--", "python", "train.py"]) == 2
    assert "only applies to --emit=tfjob" in capsys.readouterr().err


def test_emit_slurm_runs_the_evaluator_as_its_own_step(capsys):
    assert launch.main(["dtf.launch", "--num_workers=2", "--emit=slurm", "--evaluator=python e.py 'a b'", "--",
                        "python", "train.py"]) == 0
    script = capsys.readouterr().out
    assert "srun --nodes=1 --ntasks=1 --overlap python -m dtf.backends.slurm_task --evaluator -- python e.py 'a b'" in script
    assert '  wait "$evaluator" && exit 0' in script and "    0) break ;;" in script


@pytest.mark.parametrize("name", ["Upper", "under_score", "-dash", "1st-run", "x" * 64, ""])
def test_job_names_must_be_dns_labels(name):
    with pytest.raises(UserError, match="--job_name"):
        manifests.check_job_name(name)


def _bash_n(script: str, tmp_path):
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return path


def _srun_line(script: str):
    [srun] = [line.strip() for line in script.splitlines() if line.strip().startswith("srun ")]
    return shlex.split(srun)[:-4]  # without the tee into $steplog


def test_sbatch_layout_resources_and_labelled_tasks(capsys, tmp_path):
    script = _emit(capsys, "--emit=slurm", "--num_workers=8", "--nodes=2", "--tasks_per_node=4", "--gres=gpu:4",
                   "--time=1:30:00", "--partition=gpu", "--output=logs/%x-%j.out", "--max_restarts=2", "--", *RUN)
    _bash_n(script, tmp_path)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = [line.split(" ", 1)[1] for line in lines if line.startswith("#SBATCH ")]
    assert directives == ["--job-name=dtf-job", "--nodes=2", "--ntasks-per-node=4", "--gres=gpu:4", "--time=1:30:00",
                          "--partition=gpu", "--output=logs/%x-%j.out", "--requeue", "--open-mode=append",
                          "--signal=TERM@120"]
    srun = _srun_line(script)
    assert '2>&1 | tee "$steplog"' in script  # the step's output, read for the first failure
    assert srun[:6] == ["srun", "--nodes=2", "--ntasks-per-node=4", "--label", "--kill-on-bad-exit=1",
                        "--gpu-bind=per_task:1"]  # 4 GPUs shared by 4 tasks: one each
    assert srun[6:] == ["python", "-m", "dtf.backends.slurm_task", "--", *RUN]  # the command unchanged
    assert "max_restarts=2" in lines


def test_sbatch_defaults_to_one_task_per_node(capsys):
    script = _emit(capsys, "--emit=slurm", "--num_workers=3", "--gres=gpu:8", "--timeout=300", "--", *RUN)
    assert "#SBATCH --nodes=3" in script and "#SBATCH --ntasks-per-node=1" in script
    assert "#SBATCH --time=5" in script
    assert "--signal" not in script  # a 5-minute job is not signalled 2 minutes before its end
    assert not any(a.startswith("--gpu-bind") for a in _srun_line(script))  # one task drives all 8 GPUs


@pytest.mark.parametrize("args, flag", [
    (["--num_workers=4", "--nodes=3"], "--nodes"),
    (["--num_workers=4", "--tasks_per_node=3"], "--tasks_per_node"),
    (["--num_workers=4", "--nodes=2", "--tasks_per_node=1"], "--num_workers=4"),
    (["--num_workers=2", "--nodes=0"], "--nodes"),
    (["--num_workers=2", "--nodes=2-1"], "--nodes=2-1"),
    (["--num_workers=40", "--tasks_per_node=40"], "--tasks_per_node=40"),
    (["--num_workers=4", "--tasks_per_node=4", "--gres=gpu:6"], "--gres=gpu:6"),
    (["--num_workers=2", "--gres=gpu 4"], "--gres"),
    (["--num_workers=2", "--time=1h"], "--time=1h"),
    (["--num_workers=2", "--time=0"], "--time=0"),
    (["--num_workers=2", "--time=60", "--timeout=60"], "--timeout"),
    (["--num_workers=2", "--partition=a b"], "--partition"),
    (["--num_workers=2", "--output= "], "--output"),
    (["--num_workers=2", "--output=my logs/x.out"], "--output"),
])
def test_bad_slurm_options_are_one_line_and_exit_2(capsys, args, flag):
    assert launch.main(["dtf.launch", "--emit=slurm", *args, "--", "python", "train.py"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("dtf.launch: error: "), err
    assert flag in err


@pytest.mark.parametrize("flag", ["--nodes=2", "--tasks_per_node=1", "--gres=gpu:1", "--time=10", "--partition=p",
                                  "--output=x.log"])
def test_slurm_options_need_emit_slurm(capsys, flag):
    assert launch.main(["dtf.launch", "--num_workers=2", "--emit=tfjob", flag, "--", "python", "train.py"]) == 2
    assert "only applies to --emit=slurm" in capsys.readouterr().err


@pytest.mark.parametrize("text, seconds", [("90", 5400), ("5:30", 330), ("1:30:00", 5400), ("2-00", 172800),
                                           ("2-01:30", 178200), ("1-00:00:30", 86430)])
def test_slurm_time_formats(text, seconds):
    assert slurm.parse_time(text) == seconds


# A fake srun: runs one task (rank $FAKE_RANK of a 2-task step on node9,node10) with the job's environment, after
# printing the start count; its exit status for each start comes from $FAKE_STATUSES ("1 143 0": start 0 exits 1...).
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
echo "srun start $DTF_LAUNCH_RESTART"
statuses=($FAKE_STATUSES)
status=${statuses[$DTF_LAUNCH_RESTART]:-0}
[ "$status" != 0 ] && exit "$status"
SLURM_JOB_ID=77 SLURM_PROCID=1 SLURM_STEP_NODELIST='node[9-10]' SLURM_STEP_TASKS_PER_NODE='1(x2)' exec "$@"
"""
# A fake srun whose step ends as srun reports it when task 1 diverged (3) and task 0, stopped by SIGTERM, saved and
# exited 143: the highest status, 143. Each task's own line names the first failure.
FAKE_SRUN_DIVERGED = """#!/bin/bash
echo "srun start $DTF_LAUNCH_RESTART"
echo " 1: dtf.backends.slurm_task: exited with status 3" >&2
echo " 0: dtf.backends.slurm_task: exited with status 143" >&2
exit 143
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*"
exit ${FAKE_REQUEUE_STATUS:-0}
"""


def _run_script(tmp_path, command, statuses, max_restarts, requeue_status=0, srun=FAKE_SRUN):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", srun), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    if not (bin_dir / "python").exists():
        (bin_dir / "python").symlink_to(sys.executable)
    path = _bash_n(slurm.sbatch(command, 2, job_name="t", max_restarts=max_restarts), tmp_path)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=REPO, SLURM_JOB_ID="77",
               FAKE_STATUSES=" ".join(map(str, statuses)), FAKE_REQUEUE_STATUS=str(requeue_status))
    env.pop("SLURM_RESTART_COUNT", None)
    return subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=120)


def test_sbatch_reruns_a_crash_and_runs_any_command_with_tf_config(tmp_path):
    """The quoting survives, the crashed step is rerun (DTF_LAUNCH_RESTART=1, on other ports), and the command
    sees the TF_CONFIG of rank 1."""
    command = ["python", "-c", "import os, sys; print('ARGS', sys.argv[1:]); print('TF_CONFIG', "
               "os.environ['TF_CONFIG'])", "it's", "a b"]
    proc = _run_script(tmp_path, command, [1], max_restarts=1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    assert out[:2] == ["srun start 0", "srun start 1"]
    assert "dtf: step failed with status 1; rerunning (restart 1 of 1)" in proc.stderr
    assert out[2] == "ARGS " + repr(["it's", "a b"])
    port = cluster.slurm_port({"SLURM_JOB_ID": "77", "DTF_LAUNCH_RESTART": "1"})
    assert json.loads(out[3].split(" ", 1)[1]) == {"cluster": {"worker": [f"node9:{port}", f"node10:{port}"]},
                                                   "task": {"type": "worker", "index": 1}}


@pytest.mark.parametrize("status", [2, 3])
def test_sbatch_never_reruns_a_user_error_or_divergence(tmp_path, status):
    proc = _run_script(tmp_path, ["python", "train.py"], [status], max_restarts=5)
    assert proc.returncode == status
    assert proc.stdout.splitlines() == ["srun start 0"]
    assert f"step exited with status {status} (user error or diverged); not rerunning" in proc.stderr


def test_sbatch_takes_the_status_of_the_task_that_failed_first(tmp_path):
    """srun says 143 (a peer stopped after the divergence): the step diverged (3), so it is neither requeued nor
    rerun."""
    proc = _run_script(tmp_path, ["python", "train.py"], [], max_restarts=5, srun=FAKE_SRUN_DIVERGED)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0] == "srun start 0" and "scontrol" not in proc.stdout
    assert "step exited with status 3 (user error or diverged); not rerunning" in proc.stderr
    assert " 1: dtf.backends.slurm_task: exited with status 3" in proc.stdout  # the step's output reached the job log


def test_sbatch_gives_up_after_max_restarts(tmp_path):
    proc = _run_script(tmp_path, ["python", "train.py"], [7, 7, 7, 7], max_restarts=2)
    assert proc.returncode == 7
    assert proc.stderr.count("dtf: step failed with status 7") == 3 and "giving up after 2 restart(s)" in proc.stderr


def test_sbatch_requeues_a_preempted_job_or_reruns_it_uncounted(tmp_path):
    proc = _run_script(tmp_path, ["python", "train.py"], [143], max_restarts=0)
    assert proc.returncode == 143 and "scontrol requeue 77" in proc.stdout
    # Requeue refused (e.g. the cluster forbids it): rerun here, not counted against --max_restarts=0.
    proc = _run_script(tmp_path, ["python", "-c", "print('done')"], [143, 143], max_restarts=0, requeue_status=1)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("scontrol requeue 77") == 2
    assert proc.stdout.splitlines()[-2:] == ["done", "dtf.backends.slurm_task: exited with status 0"]
    assert proc.stderr.count("requeue failed; rerunning the step here (not counted as a restart)") == 2


def test_slurm_tf_config_follows_the_rank_order_of_the_node_list():
    env = {"SLURM_PROCID": "3", "SLURM_STEP_NODELIST": "gpu[09-10],cpu1", "SLURM_STEP_TASKS_PER_NODE": "2(x2),1",
           "SLURM_JOB_ID": "5"}
    p = cluster.slurm_port(env)
    config = json.loads(cluster.slurm_tf_config(env))
    assert config == {"cluster": {"worker": [f"gpu09:{p}", f"gpu09:{p + 1}", f"gpu10:{p}", f"gpu10:{p + 1}",
                                             f"cpu1:{p}"]}, "task": {"type": "worker", "index": 3}}
    job_env = {"SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_TASKS_PER_NODE": "1"}
    assert json.loads(cluster.slurm_tf_config(job_env, port=2222))["cluster"] == {"worker": ["n1:2222"]}


def test_slurm_ports_differ_between_jobs_and_starts():
    ports = {cluster.slurm_port({"SLURM_JOB_ID": str(job), "DTF_LAUNCH_RESTART": str(start),
                                 "SLURM_RESTART_COUNT": str(requeue)})
             for job in range(1000, 1100) for start in range(3) for requeue in range(2)}
    assert len(ports) == 600  # no two (job, start, requeue) of 100 neighbouring jobs share a port block
    assert all(cluster.SLURM_PORT_LOW <= p and p + cluster.SLURM_PORT_STRIDE <= 32768 for p in ports)
    assert cluster.slurm_port({"SLURM_JOB_ID": "1", "DTF_SLURM_PORT": "40000"}) == 40000
    with pytest.raises(UserError, match="DTF_SLURM_PORT=80"):
        cluster.slurm_port({"SLURM_JOB_ID": "1", "DTF_SLURM_PORT": "80"})


HOSTLISTS = ["n1", "gpu[09-10],cpu1", "x-[001-003],y[1,3-4]", "rack[1-2]-n[1,3]", "node[9-11]"]


@pytest.mark.parametrize("hostlist", HOSTLISTS)
def test_hostlist_expands_as_slurm_does(hostlist, tmp_path):
    """Our parser against Slurm's own (`scontrol show hostnames` needs a config file but no running cluster)."""
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol not installed (apt-get install slurm-client)")
    (tmp_path / "slurm.conf").write_text("ClusterName=x\nSlurmctldHost=localhost\n")
    expected = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True, timeout=30,
                              check=True, env=dict(os.environ, SLURM_CONF=str(tmp_path / "slurm.conf"))).stdout.split()
    assert cluster.expand_hostlist(hostlist) == expected


def test_hostlist_and_tasks_per_node_parsing():
    assert cluster.expand_hostlist("node[9-11]") == ["node9", "node10", "node11"]
    assert cluster.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    for bad in ("n[1-", "n[a-b]", "a,,b"):
        with pytest.raises(UserError, match="host list"):
            cluster.expand_hostlist(bad)


@pytest.mark.parametrize("env, message", [
    ({}, "SLURM_PROCID"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_TASKS_PER_NODE": "1"}, "SLURM_STEP_NODELIST"),
    ({"SLURM_PROCID": "2", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
      "SLURM_JOB_ID": "3"}, "outside"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "n1", "SLURM_STEP_TASKS_PER_NODE": "1"}, "SLURM_JOB_ID"),
])
def test_slurm_tf_config_outside_a_step_says_so(env, message):
    with pytest.raises(UserError, match=message):
        cluster.slurm_tf_config(env)


def test_slurm_task_errors_are_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = REPO
    for args in (["--", "true"], []):
        proc = subprocess.run([sys.executable, "-m", "dtf.backends.slurm_task", *args], env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2
        assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("dtf.backends.slurm_task: error: ")


def test_slurm_task_reports_a_taken_port_by_number():
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "localhost",
               "SLURM_STEP_TASKS_PER_NODE": "1", "DTF_SLURM_PORT": str(port)}
        with pytest.raises(errors.PortTaken) as taken:
            slurm_task.task_tf_config(env)
    assert str(taken.value).startswith(f"port {port} on localhost (task 0 of job 9) is already in use")
    assert taken.value.exit_status == 1  # a crash: the script reruns the step on other ports
    assert json.loads(slurm_task.task_tf_config(env))["cluster"] == {"worker": [f"localhost:{port}"]}  # free now


@pytest.mark.parametrize("args, flag", [
    (["--backend=ray", "--emit=slurm"], "--emit"),
    (["--backend=ray", "--dry_run"], "--dry_run"),
    (["--backend=ray", "--timeout=60"], "--timeout"),
    (["--address=127.0.0.1:6379"], "--address"),
    (["--backend=spark"], "--backend"),
])
def test_bad_ray_backend_options_are_one_line_and_exit_2(capsys, args, flag):
    assert launch.main(["dtf.launch", "--num_workers=2", *args, "--", "python", "train.py"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("dtf.launch: error: "), err
    assert flag in err


def test_ray_backend_without_ray_says_how_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: `import ray` raises ImportError
    assert launch.main(["dtf.launch", "--backend=ray", "--num_workers=2", "--", "python", "train.py"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "pip install -e '.[ray]'" in err, err


def test_ray_fit_runs_a_config_as_the_same_dtf_run_flags():
    """dtf.backends.ray.fit(Config) runs `dtf.run` with the Config's flags: parsing them back gives the same Config."""
    from dtf.config import config as config_lib
    from dtf.config import flags as dtf_flags
    from dtf.backends import ray as dtf_ray

    config = config_lib.Config(dataset="synthetic", model="mlp", epochs=3, global_batch_size=32,
                               input_sharding="batch", model_dir="/shared/run1")
    command = dtf_ray.run_command(config)
    assert command[:3] == [sys.executable, "-m", "dtf.run"]
    values = absl_flags.FlagValues()
    dtf_flags.define_flags(values)
    values(["dtf.run", *command[3:]])
    assert dtf_flags.config_from_flags(values) == config


# A fake srun for the evaluator's script: every step is one task on node9 of job 77.
# Like srun without --unbuffered (slurmstepd forwards a task's output a line at a time), this passes the output on
# in whole lines (sed -u): the evaluator's step and the workers' write to the job's output at the same time, and a
# Python under PYTHONUNBUFFERED=1 writes a line's text and its newline separately (CI once got them mid-line).
FAKE_SRUN_ONE_TASK = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
SLURM_PROCID=0 SLURMD_NODENAME=node9 SLURM_STEP_NODELIST=node9 SLURM_STEP_TASKS_PER_NODE=1 "$@" 2>&1 | sed -u ''
exit ${PIPESTATUS[0]}
"""
EVALUATOR = """
import os, sys
runs = os.path.join(sys.argv[1], "evaluator_runs")
with open(runs, "a") as f:
    f.write("x")
print("TF_CONFIG", os.environ["TF_CONFIG"], flush=True)
sys.exit(1 if len(open(runs).read()) == 1 else 0)  # the first run crashes
"""


def test_sbatch_reruns_a_failed_evaluator_after_the_workers_finish(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN_ONE_TASK)
    (bin_dir / "srun").chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    (tmp_path / "evaluator.py").write_text(EVALUATOR)
    script = slurm.sbatch(["python", "-c", "print('worker done')"], 2, job_name="t", nodes=1, max_restarts=1,
                          evaluator=["python", str(tmp_path / "evaluator.py"), str(tmp_path)])
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=REPO, SLURM_JOB_ID="77",
               SLURM_JOB_NODELIST="node9", SLURM_TASKS_PER_NODE="2")
    env.pop("SLURM_RESTART_COUNT", None)
    proc = subprocess.run(["bash", str(_bash_n(script, tmp_path))], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "worker done" in proc.stdout
    assert "dtf: evaluator failed with status 1; rerunning it (restart 1 of 1)" in proc.stderr
    configs = [json.loads(line.split(" ", 2)[2]) for line in proc.stdout.splitlines()
               if line.startswith("evaluator: TF_CONFIG ")]
    port = cluster.slurm_port({"SLURM_JOB_ID": "77"})
    assert len(configs) == 2 and configs[0] == {
        "cluster": {"worker": [f"node9:{port}", f"node9:{port + 1}"], "evaluator": [f"node9:{port + 31}"]},
        "task": {"type": "evaluator", "index": 0}}
    assert (tmp_path / "evaluator_runs").read_text() == "xx"
