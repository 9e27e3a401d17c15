"""A training target such as `val_accuracy>=0.9`: where `dtf.run --stop_at` stops a run, and what a sweep's
`steps_to:`/`seconds_to:` objectives count up to (one parser, so both read it alike)."""
import math
import re
from typing import NamedTuple

from dtf.base.errors import UserError

_TARGET = re.compile(r"^\s*([A-Za-z_][\w./-]*)\s*(>=|<=)\s*(\S+)\s*$")


class Target(NamedTuple):
    metric: str
    op: str  # ">=" or "<="
    value: float

    def reached(self, x: float) -> bool:
        return math.isfinite(x) and (x >= self.value if self.op == ">=" else x <= self.value)

    def __str__(self):
        return f"{self.metric}{self.op}{self.value:g}"


def parse_target(text: str, flag: str) -> Target:
    """`METRIC>=VALUE` or `METRIC<=VALUE` as a Target; a UserError naming `flag` otherwise."""
    m = _TARGET.match(text or "")
    value = None
    if m:
        try:
            value = float(m.group(3))
        except ValueError:
            pass
    if value is None or not math.isfinite(value):
        raise UserError(f"{flag}={text} must be METRIC>=VALUE or METRIC<=VALUE with a finite VALUE, e.g. "
                        "val_accuracy>=0.9 or val_loss<=0.3")
    return Target(m.group(1), m.group(2), value)
