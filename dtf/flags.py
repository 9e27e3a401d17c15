"""absl flags for every `Config` field, grouped by concern, with validators; and the Config built from them.

Flags are generated from `dtf.config.Config`, so a flag's help, default and constraints are the config's. Groups
show up as sections of `--helpfull` (absl groups flags by the module name they are registered under). A `--task`
module's own flags are defined by importing it before parsing (`define_task_flags`), and recorded in the Config.
"""
import dataclasses
import typing
from typing import List, Optional, Sequence

from absl import flags

from dtf import config as config_lib
from dtf.errors import UserError

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


def argv_value(argv: Sequence[str], name: str, flag_values=FLAGS) -> Optional[str]:
    """The last --name on the command line or in its flagfiles, before the parse (None when absent or the flagfiles
    do not read: the real parse then reports that)."""
    try:
        args = flag_values.read_flags_from_files(list(argv), force_gnu=False)
    except flags.Error:
        return None
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(f"--{name}="):
            value = arg[len(f"--{name}="):]
        elif arg == f"--{name}" and i + 1 < len(args):
            value = args[i + 1]
    return value


def task_spec(argv: Sequence[str], flag_values=FLAGS) -> Optional[str]:
    """The last --task on the command line or in its flagfiles."""
    return argv_value(argv, "task", flag_values)


def define_task_flags(argv: Sequence[str], flag_values=FLAGS):
    """Import the --task module named in `argv` before the command line is parsed, which defines its flags."""
    spec = task_spec(argv, flag_values)
    if spec:
        from dtf import task as task_lib  # loads TensorFlow: only when there is a task to import

        task_lib.resolve(spec)


def task_flag_names(config_task: Optional[str], flag_values=FLAGS) -> List[str]:
    """The flags the task's own module defined (absl files flags under the defining module's name)."""
    if not config_task:
        return []
    from dtf import task as task_lib

    return sorted(f.name for f in flag_values.flags_by_module_dict().get(task_lib.module_name(config_task), []))


def config_from_flags(flag_values=FLAGS, **overrides) -> config_lib.Config:
    """The typed Config from parsed flags (`overrides` win: the tuner sets a trial's values this way)."""
    values = {f.name: _convert(f, flag_values[f.name].value) for f in dataclasses.fields(config_lib.Config)
              if f.metadata["flag"]}
    values["task_flags"] = tuple(flag_values[name].serialize()
                                 for name in task_flag_names(overrides.get("task", values["task"]), flag_values))
    values.update(overrides)
    return config_lib.Config(**values)
