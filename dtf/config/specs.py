"""Parsing of the two flag values that name something outside the config: a `--task` spec and a `--data_service`.

Pure string work, so flags, the CLIs and Config validate them without importing the task (TensorFlow) or starting
a service.
"""
import dataclasses
import os
import re
from typing import Optional

from dtf.base.errors import UserError

DATA_SERVICE_FLAG = "data_service"
_DATA_SERVICE = re.compile(
    r"^(?:grpc://(?P<host>[\w.-]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})|local:(?P<workers>\d+))$")


def is_path(module_part: str) -> bool:
    """Whether a --task spec's module part is a file (`dir/task.py`) rather than a dotted module name."""
    return module_part.endswith(".py") or os.sep in module_part


def module_name(spec: str) -> str:
    """The name `spec`'s module is imported under: its dotted name, or a .py file's stem."""
    module_part = spec.strip().rpartition(":")[0]
    if is_path(module_part):
        return os.path.splitext(os.path.basename(module_part))[0]
    return module_part


def canonical_spec(spec: str) -> str:
    """`spec` as every worker and a later re-run can load it: a file path made absolute."""
    module_part, _, attr = spec.strip().rpartition(":")
    if is_path(module_part):
        return f"{os.path.abspath(module_part)}:{attr}"
    return spec.strip()


@dataclasses.dataclass(frozen=True)
class DataServiceSpec:
    """A parsed --data_service: an address to use, or a number of local workers to start."""

    address: Optional[str] = None  # host:port of a running dispatcher
    local_workers: Optional[int] = None


def parse_data_service(text: str) -> DataServiceSpec:
    """The --data_service value, or a one-line UserError naming the flag."""
    m = _DATA_SERVICE.match(text or "")
    if not m or (m["port"] and not 0 < int(m["port"]) < 65536) or (m["workers"] and int(m["workers"]) < 1):
        flag = DATA_SERVICE_FLAG
        raise UserError(f"--{flag}={text} is not a tf.data service; write grpc://HOST:PORT for a running dispatcher "
                        f"or local:N to start one with N workers, e.g. --{flag}=local:2")
    if m["workers"]:
        return DataServiceSpec(local_workers=int(m["workers"]))
    return DataServiceSpec(address=f"{m['host']}:{m['port']}")
