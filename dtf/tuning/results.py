"""A sweep's outputs in --tune_dir: results.csv (one row per trial), the table dtf.tune prints, best.flags (the best
trial as a `dtf.run` flagfile) and the objective-vs-batch plot."""
import csv
import math
import os
from typing import List, Optional

from dtf.tuning import trial_files

RESULTS, BEST_FLAGS, PLOT = "results.csv", "best.flags", "objective_vs_batch.png"
RESULT_COLUMNS = ["trial", "global_batch_size", "base_lr", "warmup_epochs", "lr_scaling", "peak_lr", "objective",
                  "epochs_run", "wall_time_s", "status", "tuner", "workers", "restarts"]
# How a trial ended beyond keras-tuner's completed/failed (trial_info's status; dtf.tuning.trial_jobs): a speed
# objective's trial that never reached its target is "not_reached" and scores +inf, the worst.
DTF_STATUSES = ("diverged", "stalled", "failed")


def collect_results(tuner, tune_dir: str, config) -> List[dict]:
    from dtf.optim import scaling

    rows = []
    for trial_id, trial in sorted(tuner.oracle.trials.items(), key=lambda kv: (len(kv[0]), kv[0])):
        values, info = trial.hyperparameters.values, trial_files.read_info(tune_dir, trial_id)
        gb = int(values.get("global_batch_size", info.get("global_batch_size") or config.global_batch_size or 64))
        base_lr = float(values.get("base_lr", config.base_lr))
        rule = values.get("lr_scaling", config.lr_scaling)
        peak = info.get("peak_lr") or scaling.scaled_lr(
            base_lr, gb * (config.gradient_accumulation_steps or 1), config.reference_batch_size, rule)
        status = str(trial.status).split(".")[-1].lower()
        if info.get("status") in DTF_STATUSES:
            status = info["status"]
        objective = info.get("objective", trial.score)  # a trial job's own value (+inf: never reached its target)
        if info.get("reached") is False:
            status = "not_reached"
        rows.append({"trial": trial_id, "global_batch_size": gb, "base_lr": base_lr,
                     "warmup_epochs": float(values.get("warmup_epochs", config.warmup_epochs)), "lr_scaling": rule,
                     "peak_lr": peak, "objective": objective if objective is not None else "",
                     "epochs_run": info.get("epochs_run", ""),
                     "wall_time_s": round(info["wall_time_s"], 2) if "wall_time_s" in info else "",
                     "status": status, "tuner": info.get("tuner", ""), "workers": info.get("num_workers", ""),
                     "restarts": info.get("restarts", "")})
    return rows


def write_results(rows: List[dict], tune_dir: str) -> bool:
    """Write results.csv unless it already holds exactly these rows (a finished sweep's rerun leaves it as it is);
    whether it was written."""
    import io

    import tensorflow as tf

    from dtf.experiment import atomic

    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=RESULT_COLUMNS)
    w.writeheader()
    w.writerows(rows)
    path = os.path.join(tune_dir, RESULTS)
    try:
        with tf.io.gfile.GFile(path) as f:
            if f.read() == text.getvalue():
                return False
    except tf.errors.NotFoundError:
        pass
    atomic.write_text(path, text.getvalue())
    return True


def format_table(rows: List[dict]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [RESULT_COLUMNS] + [[fmt(r[c]) for c in RESULT_COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(RESULT_COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


def best_row(rows: List[dict], direction: str) -> Optional[dict]:
    done = [r for r in rows if r["status"] == "completed" and r["objective"] != ""
            and math.isfinite(float(r["objective"]))]
    if not done:
        return None
    key = (lambda r: -float(r["objective"])) if direction == "max" else (lambda r: float(r["objective"]))
    return min(done, key=key)


def write_best_flags(best: dict, tune_dir: str, config) -> str:
    from dtf.experiment import atomic

    overrides = dict(global_batch_size=int(best["global_batch_size"]), per_replica_batch_size=None,
                     base_lr=float(best["base_lr"]), warmup_epochs=float(best["warmup_epochs"]),
                     lr_scaling=best["lr_scaling"], worker_hosts=None, task_index=None,
                     model_dir=os.path.join(tune_dir, "best"))
    if overrides["warmup_epochs"] and config.warmup_steps is not None:
        overrides["warmup_steps"] = None
    best_config = config.replace(**overrides)
    path = os.path.join(tune_dir, BEST_FLAGS)
    atomic.write_text(path, f"# dtf.tune best trial {best['trial']}: {best['objective']} "
                            f"(train it: python -m dtf.run --flagfile={path})\n" + best_config.to_flagfile())
    return path


def plot(rows: List[dict], tune_dir: str, objective: str) -> Optional[str]:
    import matplotlib
    import tensorflow as tf

    from dtf.experiment import atomic

    matplotlib.use("Agg")
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["objective"] != "" and math.isfinite(float(r["objective"]))]
    fig, ax = plt.subplots(figsize=(6, 4))
    if done:
        lrs = [float(r["peak_lr"]) for r in done]
        norm = mcolors.LogNorm(vmin=min(lrs), vmax=max(lrs) * (1.0001 if min(lrs) == max(lrs) else 1))
        sc = ax.scatter([r["global_batch_size"] for r in done], [float(r["objective"]) for r in done], c=lrs,
                        cmap="viridis", norm=norm, s=50, edgecolors="k")
        fig.colorbar(sc, ax=ax, label="peak LR")
        ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch size")
    kind, speed, target = objective.partition(":")
    ax.set_ylabel(f"{kind.replace('_', ' ')} {target}" if speed else objective)  # steps to val_accuracy>=0.9
    missed = sum(r["status"] == "not_reached" for r in rows)
    ax.set_title(f"dtf.tune: {len(done)} completed of {len(rows)} trials" +
                 (f"; {missed} never reached {target}" if missed else ""))
    fig.tight_layout()
    path = os.path.join(tune_dir, PLOT)
    with atomic.replacing(path) as tmp, tf.io.gfile.GFile(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)
    return path
