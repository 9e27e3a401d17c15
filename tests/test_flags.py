"""Config, its generated flags, their validators and the flagfile round trip, in process (absl FlagValues and
flagsaver): bad input is a one-line UserError naming the flag, with no subprocess per case."""
import dataclasses
import glob
import os

import pytest
from absl import flags
from absl.testing import flagsaver

from dtf import cli, run
from dtf.base import exitcodes
from dtf.config import config as config_lib
from dtf.config import flags as dtf_flags
from dtf.base.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def flag_values():
    values = flags.FlagValues()
    dtf_flags.define_flags(values)
    return values


def _parse(flag_values, *args) -> config_lib.Config:
    cli.parse_flags(["dtf.run", *args], flag_values)
    return dtf_flags.config_from_flags(flag_values)


def test_every_config_field_is_a_flag_with_its_help_group_and_default(flag_values):
    for field in dataclasses.fields(config_lib.Config):
        if not field.metadata["flag"]:  # set by dtf (the task's own flags), not a flag itself
            assert field.name not in flag_values, field.name
            continue
        flag = flag_values[field.name]
        assert flag.help.startswith(field.metadata["help"]), field.name
        assert flag_values.find_module_defining_flag(field.name) == f"dtf: {field.metadata['group']}"
        if field.metadata["choices"]:
            assert ", ".join(field.metadata["choices"]) in flag.help
    assert _parse(flag_values) == config_lib.Config()  # the flags' defaults are the config's


def test_defining_twice_is_harmless(flag_values):
    dtf_flags.define_flags(flag_values)
    assert _parse(flag_values, "--epochs=3").epochs == 3


@pytest.mark.parametrize("args, words", [
    (["--no_such_flag=1"], ["Unknown command line flag 'no_such_flag'"]),
    (["--epochs=two"], ["--epochs", "two"]),
    (["--optimizer=adamax"], ["--optimizer='adamax' is not valid", "sgd, adam"]),
    (["--strategy=tpu"], ["--strategy='tpu' is not valid", "mirrored"]),
    (["--global_batch_size=64", "--per_replica_batch_size=16"], ["--global_batch_size", "not both"]),
    (["--warmup_epochs=1", "--warmup_steps=10"], ["--warmup_epochs or --warmup_steps, not both"]),
    (["--flagfile=/nonexistent/exp.flags"], ["/nonexistent/exp.flags"]),
    (["--base_lr=-1"], ["--base_lr=-1.0 must be > 0"]),
    (["--base_lr=nan"], ["--base_lr=nan must be a finite number"]),
    (["--epochs=0"], ["--epochs=0 must be > 0"]),
    (["--num_cpu_devices=0"], ["--num_cpu_devices=0 must be >= 1"]),
    (["--gradient_accumulation_steps=1"], ["--gradient_accumulation_steps=1 must be >= 2"]),
    (["--lr_decay_boundaries=1,x"], ["--lr_decay_boundaries=1,x must be a comma-separated list of floats"]),
    (["--profile_steps=5"], ["--profile_steps=5 must be two steps START,STOP"]),
])
def test_bad_input_is_a_one_line_user_error_naming_the_flag(flag_values, args, words):
    with pytest.raises(UserError) as e:
        _parse(flag_values, *args)
    message = e.value.as_flags()
    assert "\n" not in message and all(w in message for w in words), message


def test_python_built_configs_are_validated_the_same_way():
    with pytest.raises(UserError, match="--optimizer='adamax' is not valid"):
        config_lib.Config(optimizer="adamax")
    with pytest.raises(UserError, match="--epochs=0 must be > 0"):
        config_lib.Config().replace(epochs=0)


def test_flagfile_round_trip(tmp_path):
    config = config_lib.Config(strategy="mirrored", num_cpu_devices=4, global_batch_size=128, base_lr=0.05,
                               lr_schedule="step", lr_decay_boundaries=(1.5, 3.0), profile_steps=(2, 4),
                               nesterov=True, export=False, momentum=0.8, model_dir=str(tmp_path / "run"))
    path = tmp_path / "exp.flags"
    path.write_text(config.to_flagfile())
    with flagsaver.flagsaver():  # the global registry, as the CLIs use it; restored afterwards
        dtf_flags.define_flags()
        assert _parse(flags.FLAGS, f"--flagfile={path}") == config
        assert _parse(flags.FLAGS, f"--flagfile={path}", "--epochs=9", "--noexport") == config.replace(epochs=9)
    assert config_lib.Config().to_flagfile() != config.to_flagfile()


def _plain_run_flagfile(path: str) -> bool:
    """Not a sweep or study (they carry dtf.tune's / dtf.batch_study's flags too), nor a --task one (its flags are
    the task module's; those flagfiles are trained as written in tests/test_task_runs.py)."""
    with open(path) as f:
        return "sweep" not in path and "batch_study" not in path and "--task=" not in f.read()


@pytest.mark.parametrize("path", sorted(p for p in glob.glob(os.path.join(REPO, "experiments", "*.flags"))
                                        if _plain_run_flagfile(p)))
def test_shipped_flagfiles_parse(flag_values, path):
    config = _parse(flag_values, f"--flagfile={path}")
    assert config.model_dir


@pytest.mark.parametrize("args, words", [
    (["--optimizer=adamax"], ["--optimizer='adamax' is not valid"]),
    (["--global_batch_size=64", "--per_replica_batch_size=16"], ["not both"]),
    (["--model_dir=/proc/dtf_cannot_write"], ["--model_dir=/proc/dtf_cannot_write is not writable"]),
    (["--flagfile=/nonexistent/exp.flags"], ["/nonexistent/exp.flags"]),
    (["stray"], ["unexpected argument(s) stray"]),
])
def test_run_cli_reports_bad_input_on_one_line_with_status_2(capsys, args, words):
    with flagsaver.flagsaver():
        assert run.main(["dtf.run", *args]) == exitcodes.USER_ERROR
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("dtf.run: error: "), err
    assert all(w in err for w in words), err
    assert not os.path.exists("/proc/dtf_cannot_write")
