"""The search space of a sweep: parsed from the --tune_* flags and checked before any trial trains, so a bad space,
batch or objective is one line and nothing is written; and its signature, so a rerun resumes only the same sweep."""
import json
import math
import os
from typing import Dict, List, Optional

from dtf.base.errors import UserError
from dtf.tuning import trial_files
from dtf.tuning.tuners import TUNERS

SPACE_FILE = "space.json"
# Space flag -> (Config field, value type).
SPACE_FLAGS = {
    "tune_global_batch_sizes": ("global_batch_size", int),
    "tune_base_lr": ("base_lr", float),
    "tune_warmup_epochs": ("warmup_epochs", float),
    "tune_lr_scaling": ("lr_scaling", str),
}


def _parse_list(flag: str, values, kind) -> Optional[list]:
    if values is None:
        return None
    values = [v.strip() for v in values if v.strip()]
    if not values:
        raise UserError(f"--{flag} is empty; give at least one value or leave the flag out")
    try:
        out = [kind(v) for v in values]
    except ValueError:
        raise UserError(f"--{flag}={','.join(values)} must be a comma-separated list of {kind.__name__}s")
    if kind is float and not all(math.isfinite(v) for v in out):
        raise UserError(f"--{flag}={','.join(values)} must be finite numbers")
    return list(dict.fromkeys(out))  # unique, in order


def _parse_lr_range(text: str) -> dict:
    """--tune_base_lr=MIN:MAX[:log] as {"min":, "max":, "log":}."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("log", "linear")):
        raise UserError(f"--tune_base_lr={text} must be MIN:MAX or MIN:MAX:log")
    try:
        lo, hi = float(parts[0]), float(parts[1])
    except ValueError:
        raise UserError(f"--tune_base_lr={text}: MIN and MAX must be numbers")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise UserError(f"--tune_base_lr={text}: MIN and MAX must be finite")
    if lo > hi:
        raise UserError(f"--tune_base_lr={text}: MIN {lo:g} is greater than MAX {hi:g}")
    if lo <= 0:
        raise UserError(f"--tune_base_lr={text}: MIN must be > 0")
    return {"min": lo, "max": hi, "log": len(parts) == 3 and parts[2] == "log"}


def parse_space(flag_values) -> Dict[str, dict]:
    """{Config field: {"values": [...]} or {"min":, "max":, "log":}} from the --tune_* flags (validated shapes)."""
    space = {}
    for flag in ("tune_global_batch_sizes", "tune_warmup_epochs", "tune_lr_scaling"):
        field, kind = SPACE_FLAGS[flag]
        values = _parse_list(flag, flag_values[flag].value, kind)
        if values is not None:
            space[field] = {"values": values}
    lr = flag_values["tune_base_lr"].value
    if lr is not None:
        text = lr.strip()
        if not text:
            raise UserError("--tune_base_lr is empty; give MIN:MAX[:log] or a list such as 0.01,0.1")
        if ":" in text:
            space["base_lr"] = _parse_lr_range(text)
        else:
            space["base_lr"] = {"values": _parse_list("tune_base_lr", text.split(","), float)}
    if not space:
        raise UserError("nothing to tune: give at least one of --tune_global_batch_sizes, --tune_base_lr, "
                        "--tune_warmup_epochs, --tune_lr_scaling")
    return space


def _corner_values(spec: dict) -> list:
    return spec["values"] if "values" in spec else [spec["min"], spec["max"]]


def validate_space(space: dict, base_config, num_replicas: int, tuner: str, max_trials: int,
                   executions_per_trial: int):
    """Fail with one line before any trial runs: every corner of the space must make a valid Config and plan."""
    import itertools

    from dtf.config.batch_plan import BatchPlan

    if tuner not in TUNERS:
        raise UserError(f"--tuner={tuner!r} is not valid; choose one of: {', '.join(TUNERS)}")
    if max_trials < 1:
        raise UserError(f"--max_trials={max_trials} must be >= 1")
    if executions_per_trial < 1:
        raise UserError(f"--executions_per_trial={executions_per_trial} must be >= 1")
    if tuner == "grid" and any("values" not in s for s in space.values()):
        raise UserError("--tuner=grid needs lists, not ranges: give e.g. --tune_base_lr=0.01,0.1")
    if tuner == "hyperband" and base_config.epochs < 2:
        raise UserError(f"--tuner=hyperband needs --epochs >= 2 (its max epochs), got {base_config.epochs}")
    for batch in space.get("global_batch_size", {}).get("values", []):
        if batch % num_replicas:
            raise UserError(f"--tune_global_batch_sizes: {batch} is not divisible by the {num_replicas} replicas; "
                            f"use multiples of {num_replicas}")
    fields = list(space)
    for combo in itertools.product(*(_corner_values(space[f]) for f in fields)):
        overrides = dict(zip(fields, combo))
        if "global_batch_size" in overrides:
            overrides["per_replica_batch_size"] = None
        try:
            config = base_config.replace(**overrides)
        except UserError as e:  # the message names the Config field: name the search-space flag that set it
            message = str(e)
            for flag, (field, _) in SPACE_FLAGS.items():
                if field in overrides:
                    message = message.replace(f"--{field}=", f"--{flag}: ")
            raise UserError(f"search space point {overrides}: {message}") from None
        if config.global_batch_size:
            BatchPlan.create(num_replicas, global_batch_size=config.global_batch_size)


def reported_metrics(exp) -> List[str]:
    """The metric names a trial of `exp` reports (its history's keys but dtf's EPOCH_SCALARS): the compiled model's,
    and their val_ twins when the task has an evaluation split. Known from one symbolic build on one real batch;
    nothing trains."""
    from dtf.upstream import keras as keras_upstream

    model = exp.build_model()
    with exp.strategy.scope():
        keras_upstream.symbolic_build(model, exp.sample_batch())
    names = list(model.get_metrics_result())
    return names + ([f"val_{name}" for name in names] if exp.eval_split is not None else [])


def check_against_data(space: dict, config, strategy, cluster, task, objective: str):
    """Fail with one line before any trial trains or anything is written: each global batch of the space against
    the task's data (dtf.run's checks), and --objective against the metrics the task's model reports."""
    from dtf.experiment import train
    from dtf.experiment.summaries import EPOCH_SCALARS

    exp = None
    for batch in space.get("global_batch_size", {}).get("values") or [None]:
        trial_config = config if batch is None else config.replace(global_batch_size=batch,
                                                                    per_replica_batch_size=None)
        try:
            exp = train.Experiment(trial_config, strategy, cluster, task)
        except UserError as e:
            if batch is None:
                raise
            raise UserError(f"--tune_global_batch_sizes: {batch}: {e.as_flags()}") from None
    names = reported_metrics(exp)
    if objective not in names and objective not in EPOCH_SCALARS:
        raise UserError(f"--objective={objective} is not a metric this task's model reports; choose one of: "
                        f"{', '.join(names)}")


def space_signature(space: dict, flag_values) -> dict:
    """What makes two runs the same sweep (a rerun resumes it; anything else needs its own --tune_dir)."""
    return {"space": space, "tuner": flag_values["tuner"].value, "objective": flag_values["objective"].value,
            "task": flag_values["task"].value}


def check_signature(tune_dir: str, signature: dict, write: bool):
    import tensorflow as tf

    from dtf.experiment import atomic

    sig_path = os.path.join(tune_dir, SPACE_FILE)
    if tf.io.gfile.exists(sig_path):
        old = trial_files.read_json(sig_path)
        if old != json.loads(json.dumps(signature)):
            raise UserError(f"--tune_dir={tune_dir} holds a sweep with a different space/tuner/objective "
                            f"({old}); use a new --tune_dir to start another sweep")
    elif write:
        atomic.write_json(sig_path, signature)  # another process never reads half a file
