"""Which way a metric improves: the tuner's objective and the evaluator's best checkpoint read it the same way; and
the speed objectives steps_to:/seconds_to: (fewest optimizer updates / training seconds to reach a target)."""
from typing import Optional, Tuple

from dtf.base.errors import UserError
from dtf.config.target import Target, parse_target

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
        if speed_objective(objective) and direction != "min":
            raise UserError(f"--objective={objective} counts steps or seconds to a target: fewer is better; remove "
                            f"--objective_direction={direction}")
        return direction
    if speed_objective(objective):
        return "min"
    name = objective.lower()
    if any(word in name for word in MINIMIZED_WORDS):
        return "min"
    if any(word in name for word in MAXIMIZED_WORDS):
        return "max"
    raise UserError(f"--objective={objective}: cannot tell whether to minimize or maximize it; add "
                    "--objective_direction=min or --objective_direction=max")


SPEED_KINDS = ("steps_to", "seconds_to")


def speed_objective(objective: str) -> Optional[Tuple[str, Target]]:
    """("steps_to"|"seconds_to", target) for `steps_to:val_accuracy>=0.9`-style objectives, else None."""
    kind, sep, rest = objective.partition(":")
    if not sep or kind.strip() not in SPEED_KINDS:
        return None
    return kind.strip(), parse_target(rest, f"--objective={kind.strip()}:")


def speed_score(kind: str, stop_at: dict, steps_run: int) -> Tuple[float, float]:
    """A speed objective's (score, score for the oracle) from a run summary's "stop_at" entry: the steps or training
    seconds to the target, both. A run that never reached it scores +inf (the worst) and gives the oracle twice its
    own budget (steps run, or training seconds) instead: finite, since Keras Tuner's Bayesian oracle reads +inf as 0."""
    if stop_at.get("reached"):
        value = float(stop_at["step"] if kind == "steps_to" else stop_at["train_seconds"])
        return value, value
    budget = steps_run if kind == "steps_to" else stop_at.get("train_seconds", 0.0)
    return float("inf"), 2.0 * max(float(budget), 1.0)
