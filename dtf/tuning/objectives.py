"""Which way a metric improves: the tuner's objective and the evaluator's best checkpoint read it the same way."""
from dtf.base.errors import UserError

DIRECTIONS = ("auto", "min", "max")
# `auto` direction: names with these words are minimized / maximized; anything else needs an explicit direction.
MINIMIZED_WORDS = ("loss", "error")
MAXIMIZED_WORDS = ("accuracy", "auc", "precision", "recall")


def objective_direction(objective: str, direction: str = "auto") -> str:
    """"min" or "max" for `objective`: as given, or inferred from its name."""
    if not objective.strip():
        raise UserError("--objective is empty; name a metric the trials report, e.g. --objective=val_loss")
    if direction not in DIRECTIONS:
        raise UserError(f"--objective_direction={direction!r} is not valid; choose one of: {', '.join(DIRECTIONS)}")
    if direction != "auto":
        return direction
    name = objective.lower()
    if any(word in name for word in MINIMIZED_WORDS):
        return "min"
    if any(word in name for word in MAXIMIZED_WORDS):
        return "max"
    raise UserError(f"--objective={objective}: cannot tell whether to minimize or maximize it; add "
                    "--objective_direction=min or --objective_direction=max")
