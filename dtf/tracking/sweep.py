"""A `dtf.tune` sweep in MLflow: one parent run for the sweep (recorded in --tune_dir, so a resumed sweep continues
it) and one child run per trial (tag `mlflow.parentRunId`, recorded in the trial's directory tune_dir/trials/ID). A
child holds the trial's hyperparameters (`hp.NAME` params, beside its resolved flags and layout), its metrics like any
run's, and, once the sweep reports, its `objective`; the best trial is tagged `dtf.best_trial=true` (the others
`false`) and named on the parent (`dtf.best_trial_id`, `dtf.best_run_id`, metric `best_objective`), which also holds
results.csv, best.flags and the plot.

Who writes: the process that serves the sweep (one process, or the --num_tuners chief) opens the parent before any
trial can start and reports at the end; whoever trains a trial (that process or a tuner worker) opens its child.
keras-tuner trains a trial that was running when its sweep was killed again from its first epoch: that is a new child
run, and the one before ends KILLED with the tag `dtf.superseded_by`.
"""
import contextlib
import os
from typing import Dict, Iterator, List, Optional

from dtf.tracking import callback as callback_lib, fallback as fallback_lib, mlflow_run, ops
from dtf.tracking.tracker import Tracker, layout_params, run_params


class Sweep:
    def __init__(self, tracker: Tracker, tune_dir: str):
        self.tracker, self.tune_dir = tracker, tune_dir
        self.parent: Optional[mlflow_run.TrackedRun] = None

    @staticmethod
    def params(config, flag_values) -> Dict[str, str]:
        """The parent's params: the flags every trial starts from, and dtf.tune's own (search space, tuner, …)."""
        tuning = flag_values.flags_by_module_dict().get("dtf: tuning", [])
        return {**run_params(config), **{f.name: ",".join(map(str, f.value)) if isinstance(f.value, list)
                                         else str(f.value) for f in tuning if f.value is not None}}

    def _trial_dir(self, trial_id) -> str:
        return os.path.join(self.tune_dir, "trials", str(trial_id))

    @contextlib.contextmanager
    def serving(self, params: Dict[str, str]) -> Iterator[mlflow_run.TrackedRun]:
        """Around the serving process's part (search or oracle, then the report): the parent run, ended by the
        outcome."""
        self.parent = self.tracker.open(self.tune_dir, f"sweep {os.path.basename(os.path.normpath(self.tune_dir))}",
                                        tags={"dtf.tune_dir": os.path.abspath(self.tune_dir)})
        self.parent.log_params(params)
        with mlflow_run.ending(self.parent):
            yield self.parent

    @contextlib.contextmanager
    def trial(self, trial_id, exp, hyperparameters: Dict) -> Iterator[List]:
        """Around one trial's training: its child run; yields the callbacks to train with."""
        model_dir = exp.config.model_dir
        parent = mlflow_run.recorded(self.tune_dir, self.tracker.uri)
        before = mlflow_run.recorded(model_dir, self.tracker.uri)
        run = self.tracker.open(model_dir, f"trial {trial_id}", resume=False,
                                parent_run_id=parent["run_id"] if parent else None,
                                tags={"dtf.trial_id": str(trial_id), "dtf.model_dir": os.path.abspath(model_dir)})
        if before and before["run_id"] != run.run_id:
            superseded = mlflow_run.TrackedRun(self.tracker.store, model_dir, before["run_id"], before["experiment_id"],
                                               ops.RunState(), fallback_lib.name_for("superseded"))
            superseded.set_tags({"dtf.superseded_by": run.run_id})
            superseded.set_status("KILLED")
        run.log_params({**run_params(exp.resolved_config()), **layout_params(exp),
                        **{f"hp.{k}": v for k, v in hyperparameters.items()}})
        with mlflow_run.ending(run):
            yield [callback_lib.MlflowMetrics(run, exp.config.log_every_steps)]

    def report(self, rows: List[dict], best: Optional[dict], files: List[str]):
        """After the sweep's results are written: each trial's objective and status on its child, the best trial
        tagged, and on the parent the best objective and the result files."""
        best_run = None
        for row in rows:
            child = mlflow_run.TrackedRun.attach(self.tracker.store, self._trial_dir(row["trial"]),
                                                 fallback_lib.name_for("sweep"))
            if child is None:
                continue
            if row["objective"] != "":
                child.metrics({"objective": float(row["objective"])}, child.last_step)
            is_best = best is not None and row["trial"] == best["trial"]
            best_run = child.run_id if is_best else best_run
            child.set_tags({"dtf.trial_status": row["status"], "dtf.best_trial": str(is_best).lower()})
            child.flush()
        if self.parent is None:
            return
        if best is not None:
            self.parent.metrics({"best_objective": float(best["objective"])}, len(rows))
            self.parent.set_tags({"dtf.best_trial_id": str(best["trial"]),
                                  **({"dtf.best_run_id": best_run} if best_run else {})})
        self.parent.flush()
        for path in files:
            self.parent.artifact(os.path.relpath(path, self.tune_dir) if "://" not in path else path)
