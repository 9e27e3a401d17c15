"""`python -m dtf.batch_study --flagfile=experiments/shapes_mirrored.flags --batches=64,128,256,512,1024`:
how far the global batch can grow, and with which LR rule.

Trains the flagfile's experiment once per (global batch, rule) and reports the final validation accuracy and the epochs
and optimizer steps to reach --target_accuracy: dtf's miniature of Goyal et al. 2017's table (rules `none`, `sqrt`,
`linear`, `linear_warmup`, and `lars`) and of McCandlish et al. 2018's Figure 1 (steps to target vs batch, with the
ideal linear-scaling line and the measured gradient noise scale B_noise, on runs with >= 2 replicas). Writes
results.csv, table.md and batch_scaling.png in --study_dir; each run's outputs in a subdirectory.
"""
import csv
import math
import os
from typing import List, Optional

from dtf import cli

RULES = ("none", "sqrt", "linear", "linear_warmup", "lars")
COLUMNS = ("global_batch_size", "rule", "peak_lr", "val_accuracy", "epochs_to_target", "steps_to_target",
           "gradient_noise_scale", "wall_time_s")


def _define(argv):
    from absl import flags

    from dtf.config import flags as dtf_flags

    dtf_flags.define_flags()
    module = "dtf: study"
    flags.DEFINE_list("batches", None, "Global batch sizes to train (the ladder).", module_name=module)
    flags.DEFINE_list("rules", list(RULES[:4]), f"LR rules to compare, of: {', '.join(RULES)}.", module_name=module)
    flags.DEFINE_float("target_accuracy", 0.8, "Validation accuracy whose first epoch counts as 'reached'.",
                       module_name=module)
    flags.DEFINE_float("study_warmup_epochs", 1.0, "Warmup of the linear_warmup and lars rules.", module_name=module)
    flags.DEFINE_float("lars_lr", 0.3, "LR of the lars rule (not scaled: LARS's trust ratio adapts per layer).",
                       module_name=module)
    flags.DEFINE_string("study_dir", "runs/batch_study", "Where results.csv, table.md and the plot go.",
                        module_name=module)
    cli.define_task_flags(argv)  # last: a task flag that clashes with any of dtf's is reported as such


def rule_config(config, batch: int, rule: str, warmup_epochs: float, lars_lr: float):
    """The experiment's config for one (batch, rule) cell; the rule decides LR scaling, warmup and optimizer."""
    changes = dict(global_batch_size=batch, per_replica_batch_size=None, warmup_steps=None, warmup_start_lr=None,
                   warmup_epochs=0.0)
    if rule in ("none", "sqrt", "linear"):
        changes.update(lr_scaling=rule)
    elif rule == "linear_warmup":
        changes.update(lr_scaling="linear", warmup_epochs=warmup_epochs)
    else:
        changes.update(optimizer="lars", base_lr=lars_lr, lr_scaling="none", warmup_epochs=warmup_epochs,
                       momentum=None, nesterov=False)
    return config.replace(**changes)


def first_reaching(values: List[float], target: float) -> Optional[int]:
    """1-based index of the first value >= target, or None."""
    return next((i + 1 for i, v in enumerate(values) if v >= target), None)


def row(summary: Optional[dict], batch: int, rule: str, target: float) -> dict:
    """One cell's results from its run summary (None: the run diverged)."""
    if summary is None:
        return dict(global_batch_size=batch, rule=rule, peak_lr=None, val_accuracy=None, epochs_to_target=None,
                    steps_to_target=None, gradient_noise_scale=None, wall_time_s=None)
    epochs = first_reaching(summary["history"].get("val_accuracy", []), target)
    return dict(global_batch_size=batch, rule=rule, peak_lr=summary["peak_lr"],
                val_accuracy=summary["final_metrics"]["val_accuracy"], epochs_to_target=epochs,
                steps_to_target=epochs and epochs * summary["steps_per_epoch"],
                gradient_noise_scale=summary.get("gradient_noise_scale"), wall_time_s=summary["wall_time_s"])


def _cells(config, batches, rules, study_dir, warmup_epochs, lars_lr, num_replicas):
    """[(batch, rule, the cell's config)] of the grid, in training order."""
    return [(batch, rule, rule_config(config, batch, rule, warmup_epochs, lars_lr).replace(
        model_dir=os.path.join(study_dir, f"b{batch}_{rule}"), measure_noise_scale=num_replicas >= 2))
        for batch in batches for rule in rules]


def check_grid(cells, batches, strategy):
    """Fail with one line naming --batches before any run trains or anything is written: every cell's config, and
    every batch against the replicas and the task's data (dtf.run's checks)."""
    from dtf.base.errors import UserError
    from dtf.experiment import train

    given = ",".join(map(str, batches))
    replicas = strategy.num_replicas_in_sync
    wrong = [b for b in batches if b % replicas]
    if wrong:
        raise UserError(f"--batches={given}: {wrong[0]} is not divisible by the {replicas} replicas; use "
                        f"multiples of {replicas}")
    checked = set()
    for batch, rule, cell in cells:
        if batch in checked:
            continue
        checked.add(batch)
        try:
            train.Experiment(cell, strategy, train.resolve_cluster(cell))
        except UserError as e:  # the batch is one of --batches here, not a --global_batch_size
            flags = {name: "batches" if name == "global_batch_size" else flag for name, flag in e.arguments.items()}
            raise UserError(f"--batches={given}: global batch {batch}: {e}", arguments=flags) from None


def run_study(config, batches, rules, target, study_dir, warmup_epochs=1.0, lars_lr=0.3, strategy=None):
    """Train every (batch, rule) cell under one strategy (a second strategy in one process collides with the
    first's collectives), rewriting the outputs after each cell; a diverged run is a result, not a failure. The
    whole grid is checked first."""
    from dtf.experiment import train

    strategy = strategy or train.create_strategy(config)
    cells = _cells(config, batches, rules, study_dir, warmup_epochs, lars_lr, strategy.num_replicas_in_sync)
    check_grid(cells, batches, strategy)
    rows = []
    for batch, rule, cell in cells:
        try:
            summary = train.run_experiment(cell, strategy)
        except train.TrainingDiverged:
            summary = None
        rows.append(row(summary, batch, rule, target))
        write_outputs(rows, study_dir, target)
    return rows


def _check(config, batches, rules, target):
    from dtf.base.errors import UserError

    if not batches:
        raise UserError("--batches is required: the global batch sizes to train, e.g. --batches=64,128,256")
    try:
        batches = sorted({int(b) for b in batches})
    except ValueError:
        raise UserError(f"--batches={','.join(batches)} must be integers, e.g. --batches=64,128,256")
    if batches[0] < 1:
        raise UserError(f"--batches={','.join(map(str, batches))} must all be >= 1")
    wrong = [r for r in rules if r not in RULES]
    if wrong or not rules:
        raise UserError(f"--rules={','.join(rules)} must be some of: {', '.join(RULES)}")
    if not 0 < target <= 1:
        raise UserError(f"--target_accuracy={target} must be in (0, 1]")
    if config.strategy == "multi_worker" or config.worker_hosts:
        raise UserError("dtf.batch_study trains on one host (one_device or mirrored); drop the multi-worker flags")
    return batches


def noise_scale_of(rows) -> Optional[float]:
    """B_noise as measured at the smallest batch with linear scaling (or the first measured run)."""
    measured = [r for r in rows if r["gradient_noise_scale"] is not None]
    preferred = [r for r in measured if r["rule"] == "linear"] or measured
    return preferred[0]["gradient_noise_scale"] if preferred else None


def write_outputs(rows, study_dir: str, target: float):
    """results.csv, table.md and batch_scaling.png."""
    os.makedirs(study_dir, exist_ok=True)
    csv_path, table_path = os.path.join(study_dir, "results.csv"), os.path.join(study_dir, "table.md")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    def cell(v):
        return "—" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    b_noise = noise_scale_of(rows)
    lines = [f"Target validation accuracy {target:g}; B_noise (gradient noise scale) "
             f"{'not measured (one replica)' if b_noise is None else f'{b_noise:.4g}'}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |" + (" diverged" if r["peak_lr"] is None else "")
              for r in rows]
    with open(table_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(rows, study_dir, target, b_noise)


def plot(rows, study_dir: str, target: float, b_noise: Optional[float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, steps_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for rule in dict.fromkeys(r["rule"] for r in rows):
        mine = [r for r in rows if r["rule"] == rule and r["val_accuracy"] is not None]
        acc_ax.plot([r["global_batch_size"] for r in mine], [r["val_accuracy"] for r in mine], "o-", label=rule)
        reached = [r for r in mine if r["steps_to_target"]]
        steps_ax.plot([r["global_batch_size"] for r in reached], [r["steps_to_target"] for r in reached], "o-",
                      label=rule)
    reached = [r for r in rows if r["steps_to_target"]]
    if reached:  # perfect scaling from the smallest batch that reached the target: steps ∝ 1 / batch
        first = min(reached, key=lambda r: (r["global_batch_size"], r["steps_to_target"]))
        xs = sorted({r["global_batch_size"] for r in rows if r["global_batch_size"] >= first["global_batch_size"]})
        steps_ax.plot(xs, [first["steps_to_target"] * first["global_batch_size"] / x for x in xs], "k--",
                      label="ideal linear")
        steps_ax.set_yscale("log")
    if b_noise is not None and math.isfinite(b_noise) and b_noise > 0:
        for ax in (acc_ax, steps_ax):
            ax.axvline(b_noise, color="gray", linestyle=":", label=f"B_noise ≈ {b_noise:.3g}")
    for ax, ylabel in ((acc_ax, "final validation accuracy"), (steps_ax, f"steps to val accuracy {target:g}")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch size")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(study_dir, "batch_scaling.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _body(rest):
    from dtf.base import versions

    versions.load_tensorflow()  # quiet, version-checked, before anything else imports it
    from absl import flags

    from dtf.config import flags as dtf_flags

    f = flags.FLAGS
    config = dtf_flags.config_from_flags()
    batches = _check(config, f.batches, f.rules, f.target_accuracy)
    run_study(config, batches, f.rules, f.target_accuracy, f.study_dir, f.study_warmup_epochs, f.lars_lr)
    for name in ("results.csv", "table.md", "batch_scaling.png"):
        print(f"dtf: wrote {os.path.join(f.study_dir, name)}")
    return 0


def main(argv=None):
    return cli.main("dtf.batch_study", _define, _body, argv, doc=__doc__)


if __name__ == "__main__":
    cli.exit(main())
