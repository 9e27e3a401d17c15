"""The command-line tools' shared behaviour: light start-up (no TensorFlow for help, flag errors, the launcher's dry
run and manifests), the one error path with its exit statuses, and the lazy `import dtf`."""
import os
import subprocess
import sys

import pytest

from dtf.base import errors, exitcodes
from dtf.base.errors import DtfError, TrainingDiverged, UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs `python -m MODULE ARGS...` as on a login node without TensorFlow (importing tensorflow or keras fails), and
# reports on stderr at exit every attempt to import them and whether either is in sys.modules.
PROBE = ("import atexit, runpy, sys\n"
         "tried = []\n"
         "class NoTensorFlow:\n"
         "    def find_spec(self, name, path=None, target=None):\n"
         "        if name.split('.')[0] in ('tensorflow', 'keras'):\n"
         "            tried.append(name)\n"
         "            raise ImportError(f'no {name} on this node')\n"
         "sys.meta_path.insert(0, NoTensorFlow())\n"
         "atexit.register(lambda: sys.stderr.write('HEAVY=%s\\n' % sorted(set(tried) | {m for m in "
         "('tensorflow', 'keras') if m in sys.modules})))\n"
         "sys.argv = sys.argv[1:]\n"
         "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")


def _python(*args, code=None, timeout=120):
    argv = [sys.executable, "-c", code] if code else [sys.executable]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO)


@pytest.mark.parametrize("argv, status", [
    (["dtf.launch", "--help"], 0),
    (["dtf.launch", "--num_workers=2", "--dry_run", "--", "python", "train.py"], 0),
    (["dtf.launch", "--num_workers=2", "--emit=slurm", "--", "python", "-m", "dtf.run"], 0),
    (["dtf.launch", "--num_workers=2", "--emit=tfjob", "--", "python", "-m", "dtf.run"], 0),
    (["dtf.launch", "--num_workers=0", "--", "python"], 2),
    (["dtf.run", "--help"], 0),
    (["dtf.run", "--no_such_flag=1"], 2),
    (["dtf.run", "--base_lr=-1"], 2),
    (["dtf.tune", "--help"], 0),
    (["dtf.tune", "--tune_base_lr=0.1,0.2", "--trial_workers=2", "--emit=slurm"], 0),
])
def test_cli_does_not_import_tensorflow(argv, status):
    proc = _python(*argv, code=PROBE)
    assert proc.returncode == status, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == "HEAVY=[]", proc.stderr[-2000:]
    if status:
        assert proc.stderr.splitlines()[0].startswith(f"{argv[0]}: error: ")


@pytest.mark.parametrize("argv", [["dtf.run", "--help"], ["dtf.tune", "--help"], ["dtf.launch", "--help"]])
def test_help_documents_the_exit_statuses(argv):
    out = _python("-m", *argv).stdout
    assert "exit status:" in out
    for status in (exitcodes.OK, exitcodes.CRASH, exitcodes.USER_ERROR, exitcodes.DIVERGED, exitcodes.PREEMPTED):
        assert f"\n  {status:>4}  " in out, status


def test_import_dtf_is_light_until_tensorflow_is_needed():
    code = ("import sys, dtf\n"
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
            "assert dtf.UserError and dtf.TrainingDiverged and dtf.parse_tf_config\n"
            "from dtf import callbacks\n"
            "assert 'tensorflow' in sys.modules and 'dtf.optim.scaling' in sys.modules  # LR schedules registered\n"
            "assert callable(dtf.create_strategy) and callable(dtf.distribute_dataset)\n"
            "assert dtf.experiment.callbacks is callbacks\n"
            "try:\n"
            "    dtf.no_such_name\n"
            "except AttributeError as e:\n"
            "    print(e)\n")
    proc = _python(code=code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "module 'dtf' has no attribute 'no_such_name'"
    assert "cudart" not in proc.stderr  # TF loaded quietly


def test_versions_are_checked_when_tensorflow_is_first_needed():
    code = ("import dtf, dtf.base.versions\n"
            "dtf.base.versions.KERAS_RANGE = ((9, 0), (9, 1))\n"
            "try:\n"
            "    dtf.create_strategy\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    proc = _python(code=code)
    assert "dtf does not support keras 3." in proc.stdout and "supported: >=9.0,<9.1" in proc.stdout, proc.stderr


def test_errors_name_arguments_in_python_and_flags_on_the_command_line(capsys):
    error = UserError("global_batch_size=100 is not divisible by 8; use --per_replica_batch_size or a multiple of "
                      "8 for global_batch_size", arguments=("global_batch_size", "per_replica_batch_size"))
    assert str(error).startswith("global_batch_size=100")
    assert error.as_flags() == ("--global_batch_size=100 is not divisible by 8; use --per_replica_batch_size or a "
                                "multiple of 8 for --global_batch_size")
    assert errors.report("dtf.x", error) == exitcodes.USER_ERROR
    assert capsys.readouterr().err == f"dtf.x: error: {error.as_flags()}\n"


def _raise(error):
    def body():
        raise error
    return body


@pytest.mark.parametrize("error, status", [
    (UserError("bad\ninput"), exitcodes.USER_ERROR),
    (TrainingDiverged("loss became nan"), exitcodes.DIVERGED),
    (KeyboardInterrupt(), errors.INTERRUPTED),
])
def test_one_error_path_gives_each_error_its_status(capsys, error, status):
    assert errors.guard("dtf.x", _raise(error)) == status
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("dtf.x: "), err
    assert isinstance(error, (DtfError, KeyboardInterrupt))


def test_an_unexpected_exception_stays_a_crash_with_its_traceback():
    with pytest.raises(RuntimeError):
        errors.guard("dtf.x", _raise(RuntimeError("bug")))
    proc = _python(code="import sys; from dtf.base import errors\n"
                        "def body(): raise RuntimeError('bug')\n"
                        "sys.exit(errors.guard('dtf.x', body))\n")
    assert proc.returncode == exitcodes.CRASH and "Traceback" in proc.stderr
