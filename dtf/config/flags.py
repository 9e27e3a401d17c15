"""absl flags for every `Config` field, grouped by concern, with validators; and the Config built from them.

Flags are generated from `dtf.config.config.Config`, so a flag's help, default and constraints are the config's. Groups
show up as sections of `--helpfull` (absl groups flags by the module name they are registered under). A `--task`
module's own flags are defined by importing it before parsing (`dtf.cli.define_task_flags`), and recorded in the Config.
"""
import dataclasses
import os
import typing
from typing import List, Optional, Sequence, Tuple

from absl import flags

from dtf.base.errors import UserError
from dtf.config import config as config_lib, specs

FLAGS = flags.FLAGS


def _kind(field):
    """(base type, is_tuple) for a Config field annotation such as Optional[int] or Tuple[float, ...]."""
    tp = field.type
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is tuple:
        return typing.get_args(tp)[0], True
    return tp, False


def _validator(field):
    def check(value):
        try:
            config_lib.check_value(field, _convert(field, value))
        except (UserError, ValueError) as e:
            raise flags.ValidationError(str(e))
        return True
    return check


def _convert(field, value):
    base, is_tuple = _kind(field)
    if is_tuple:
        try:
            return tuple(base(v) for v in (value or ()))
        except ValueError:
            raise UserError(f"--{field.name}={','.join(value)} must be a comma-separated list of {base.__name__}s")
    return value


def define_flags(flag_values=FLAGS, names: Optional[Sequence[str]] = None):
    """Register one absl flag per Config field, or only those in `names` (idempotent per FlagValues)."""
    for field in dataclasses.fields(config_lib.Config):
        if field.name in flag_values or not field.metadata["flag"] or (names is not None and field.name not in names):
            continue
        meta, base = field.metadata, _kind(field)
        module = f"dtf: {meta['group']}"
        help_text = meta["help"] + (f" One of: {', '.join(meta['choices'])}." if meta["choices"] else "")
        kwargs = dict(flag_values=flag_values, module_name=module)
        if base[1]:
            flags.DEFINE_list(field.name, [str(v) for v in field.default] or None, help_text, **kwargs)
        elif base[0] is bool:
            flags.DEFINE_boolean(field.name, field.default, help_text, **kwargs)
        elif base[0] is int:
            flags.DEFINE_integer(field.name, field.default, help_text, **kwargs)
        elif base[0] is float:
            flags.DEFINE_float(field.name, field.default, help_text, **kwargs)
        else:
            flags.DEFINE_string(field.name, field.default, help_text, **kwargs)
        flags.register_validator(field.name, _validator(field), flag_values=flag_values)


def _last_value(args: Sequence[str], name: str) -> Optional[str]:
    """The last --name=V / --name V in expanded `args`, else None."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(f"--{name}="):
            value = arg[len(f"--{name}="):]
        elif arg == f"--{name}" and i + 1 < len(args):
            value = args[i + 1]
    return value


def _expanded(argv: Sequence[str], flag_values=FLAGS) -> Optional[List[str]]:
    """`argv` with its flagfiles read in (None when they do not read: the real parse then reports that)."""
    try:
        return flag_values.read_flags_from_files(list(argv), force_gnu=False)
    except flags.Error:
        return None


def arg_value(argv: Sequence[str], name: str, flag_values=FLAGS) -> Optional[str]:
    """The last --name on the command line or in its flagfiles, before parsing (None when absent or the flagfiles
    do not read: the real parse then reports that)."""
    args = _expanded(argv, flag_values)
    return None if args is None else _last_value(args, name)


def task_spec(argv: Sequence[str], flag_values=FLAGS) -> Optional[str]:
    """The last --task on the command line or in its flagfiles."""
    return arg_value(argv, "task", flag_values)


def with_run_data_flags(argv: Sequence[str], names: Sequence[str], flag_values=FLAGS) -> Tuple[List[str], str]:
    """(argv, note): a command reading a finished run (`--model_dir=RUN`) takes what RUN/flags.txt recorded of its
    data and model — the flags `names` (of --task/--dataset/--model/--data_dir) and the task module's own flags —
    inserted ahead of the command line, which wins. Only when the command line names neither --task nor --dataset
    (naming one chooses the data); note says what was taken ("" when nothing)."""
    args = _expanded(argv[1:], flag_values)
    model_dir = _last_value(args or [], "model_dir")
    if not model_dir or any(_last_value(args, name) is not None for name in ("task", "dataset")):
        return list(argv), ""
    path = os.path.join(model_dir, "flags.txt")
    lines = [line.strip() for line in _read_lines(path) if line.startswith("--")]
    dtf_flags = {f.name for f in dataclasses.fields(config_lib.Config) if f.metadata["flag"]}

    def name_of(line):
        name = line[2:].split("=", 1)[0]
        return name[2:] if "=" not in line and name.startswith("no") and name[2:] in dtf_flags else name

    taken = [line for line in lines if name_of(line) in names or name_of(line) not in dtf_flags]
    if not any(name_of(line) in ("task", "dataset") for line in taken):
        return list(argv), ""
    return [argv[0], *taken, *argv[1:]], f"{' '.join(taken)} (from {path})"


def _read_lines(path: str) -> List[str]:
    """The lines of `path`, [] when it cannot be read. A remote path (gs://, s3://, ...) is read through TensorFlow's
    filesystems, the only ones that know it; TensorFlow is imported then and only then, so local runs parse their
    flags without it."""
    if "://" not in path:
        try:
            with open(path) as f:
                return f.read().splitlines()
        except OSError:
            return []
    import tensorflow as tf

    try:
        with tf.io.gfile.GFile(path) as f:
            return f.read().splitlines()
    except tf.errors.OpError:
        return []


def task_flag_names(config_task: Optional[str], flag_values=FLAGS) -> List[str]:
    """The flags the task's own module defined (absl files flags under the defining module's name)."""
    if not config_task:
        return []
    return sorted(f.name for f in flag_values.flags_by_module_dict().get(specs.module_name(config_task), []))


def config_from_flags(flag_values=FLAGS, **overrides) -> config_lib.Config:
    """The typed Config from parsed flags (`overrides` win: the tuner sets a trial's values this way)."""
    values = {f.name: _convert(f, flag_values[f.name].value) for f in dataclasses.fields(config_lib.Config)
              if f.metadata["flag"]}
    values["task_flags"] = tuple(flag_values[name].serialize()
                                 for name in task_flag_names(overrides.get("task", values["task"]), flag_values))
    values.update(overrides)
    return config_lib.Config(**values)
