"""`python -m dtf.tune --flagfile=sweep.flags`: a keras-tuner sweep where every trial is a `dtf.run` experiment.

Takes every `dtf.run` flag plus a search space:

  --tune_global_batch_sizes=64,128,256   global batch (sharded over the replicas by dtf)
  --tune_base_lr=1e-3:1e-1:log           a range MIN:MAX[:log] (random/bayesian) or a list 0.01,0.1
  --tune_warmup_epochs=0,1
  --tune_lr_scaling=linear,sqrt
  --tuner=random|bayesian|hyperband|grid --max_trials=N --executions_per_trial=N
  --objective=val_accuracy|val_loss|val_<any metric> [--objective_direction=min|max] --tune_dir=DIR
  --task=package.module:Attr             tune your own task (its flags work here as in dtf.run)

A trial's Config is `config_from_flags(**trial_values)` — the same code path as `dtf.run` — and it trains with
`dtf.experiment.train.Experiment` under the strategy created once from the flags, so the batch is sharded per replica
and the peak LR scaled by dtf's rule. A trial that diverges is recorded as failed and the sweep goes on. Rerunning the
same command resumes the sweep (finished trials are kept). Outputs in --tune_dir: results.csv, best.flags (train it with
`python -m dtf.run --flagfile=TUNE_DIR/best.flags`), objective_vs_batch.png, TensorBoard logs in tb/<trial_id>
(with HParams), and keras-tuner's own state in sweep/. Hyperband: a promoted trial continues its parent's weights and
optimizer state (trials/<id>/hyperband_state.weights.h5) and trains only the epochs its rung adds.

Distributed: `--num_tuners=N` starts, with `dtf.cluster.procs`, one chief process (keras-tuner's oracle, served over
gRPC on 127.0.0.1; it never trains) plus N tuner workers (tuner0..tuner{N-1}) that ask it for trials and train them with
whatever --strategy the flags say; each runs this same command line with KERASTUNER_TUNER_ID/_ORACLE_IP/_ORACLE_PORT
set and no TF_CONFIG. Output is prefixed [chief]/[tuner0]/...; if one fails all are stopped (non-zero exit). Only
the chief writes results.csv, best.flags and the plot. Rerunning the same command resumes (trials that were running
when the sweep was killed are run again). With those KERASTUNER_* variables already set (your own cluster), dtf.tune
just runs as that role.
"""
import contextlib
import os
import signal
import sys
import time
from typing import List

from dtf import cli
from dtf.base.errors import Stopped, UserError
from dtf.cluster import data_service
from dtf.tuning import distributed, results
from dtf.tuning.objectives import MAXIMIZED_WORDS, MINIMIZED_WORDS, objective_direction
from dtf.tuning.space import check_against_data, check_signature, parse_space, space_signature, validate_space
from dtf.tuning.tuners import TUNERS, make_tuner


def _define(argv):
    from absl import flags

    from dtf.config import flags as dtf_flags

    dtf_flags.define_flags()
    module = "dtf: tuning"
    kw = dict(module_name=module)
    flags.DEFINE_list("tune_global_batch_sizes", None, "Global batch sizes to try, e.g. 64,128,256.", **kw)
    flags.DEFINE_string("tune_base_lr", None, "base_lr: a range MIN:MAX[:log] or a list, e.g. 0.01,0.1.", **kw)
    flags.DEFINE_list("tune_warmup_epochs", None, "Warmup epochs to try, e.g. 0,1.", **kw)
    flags.DEFINE_list("tune_lr_scaling", None, "LR scaling rules to try, e.g. linear,sqrt.", **kw)
    flags.DEFINE_string("tuner", "random", f"Search algorithm: {', '.join(TUNERS)}.", **kw)
    flags.DEFINE_integer("max_trials", 10, "Trials to run (grid: at most this many; hyperband: ignored).", **kw)
    flags.DEFINE_integer("executions_per_trial", 1, "Trainings per trial (objective averaged).", **kw)
    flags.DEFINE_string("objective", "val_accuracy", "What to optimize: a metric the trials report, e.g. val_loss, "
                        "val_accuracy, val_mean_absolute_error (val_ = on the validation split).", **kw)
    flags.DEFINE_string("objective_direction", "auto", f"min or max; auto: min for names with "
                        f"{'/'.join(MINIMIZED_WORDS)}, max for {'/'.join(MAXIMIZED_WORDS)}.", **kw)
    flags.DEFINE_string("tune_dir", "runs/tune", "Sweep directory (rerun the same command to resume).", **kw)
    flags.DEFINE_integer("num_tuners", 0, "Distributed tuning on this host: a chief (oracle) process plus this many "
                         "tuner-worker processes on 127.0.0.1. 0: one process. Ignored when KERASTUNER_TUNER_ID is "
                         "set (the process runs as that role).", **kw)
    cli.define_task_flags(argv)  # last: a task flag that clashes with any of dtf's is reported as such


# ---------------------------------------------------------------------------------------------------------- main

_ARGV: List[str] = []


def _launch_tuners(num_tuners: int) -> int:
    """This command line again as a chief and `num_tuners` tuner workers (dtf.tuning.distributed); their exit code."""
    from dtf.cluster import procs

    procs.raise_stopped_on_signals()
    try:
        return distributed.launch(_ARGV, num_tuners)
    except Stopped as stop:
        print(f"dtf.tune: got {signal.Signals(stop.signum).name}; stopped all processes", file=sys.stderr)
        return 128 + stop.signum


def _search(tuner, hypermodel, config):
    """Train this process's trials with one --data_service for all of them. keras-tuner prints a progress display per
    trial: stdout is kept for dtf's own table."""
    import contextlib
    import io

    from dtf.tuning.hypermodel import ObjectiveNotReported

    try:
        with data_service.running(config.data_service) as hypermodel.data_service:
            with contextlib.redirect_stdout(io.StringIO()):
                tuner.search(verbose=0)
    except ObjectiveNotReported as e:
        raise UserError(str(e)) from None


def _serve_as_chief(tuner):
    """Serve the oracle until every tuner worker the --num_tuners launcher started has stopped."""
    n = os.environ.get(distributed.NUM_TUNERS_ENV)
    expected = {f"tuner{i}" for i in range(int(n))} if n and n.isdigit() else None
    distributed.serve_oracle(tuner, expected)


def _report(tuner, tune_dir: str, config, objective: str, direction: str, ran: int, start: float,
            sweep=None) -> int:
    """Print the results table and the best trial; rewrite results.csv, the plot and best.flags only when the results
    changed (or a file is missing), so a finished sweep's rerun leaves them as they are."""
    import tensorflow as tf

    rows = results.collect_results(tuner, tune_dir, config)
    changed = results.write_results(rows, tune_dir)
    print(results.format_table(rows))
    print(f"dtf.tune: {ran} new trial(s) in {time.time() - start:.1f}s, {len(rows)} in total; "
          f"results in {os.path.join(tune_dir, results.RESULTS)}" + ("" if changed else " (unchanged)"))
    if changed or not tf.io.gfile.exists(os.path.join(tune_dir, results.PLOT)):
        results.plot(rows, tune_dir, objective)
    best = results.best_row(rows, direction)
    files = [os.path.join(tune_dir, name) for name in (results.RESULTS, results.PLOT, results.BEST_FLAGS)]
    if best is None:
        if sweep is not None:
            sweep.report(rows, None, files)
        raise UserError(f"no trial of the {len(rows)} completed (see {tune_dir}/{results.RESULTS}); lower "
                        "--tune_base_lr or add warmup")
    path = os.path.join(tune_dir, results.BEST_FLAGS)
    if changed or not tf.io.gfile.exists(path):
        results.write_best_flags(best, tune_dir, config)
    if sweep is not None:
        sweep.report(rows, best, files)
    print(f"dtf.tune: best trial {best['trial']}: {objective}={float(best['objective']):.4f} "
          f"(global batch {best['global_batch_size']}, base_lr {float(best['base_lr']):.4g}, peak LR "
          f"{float(best['peak_lr']):.4g}); train it: python -m dtf.run --flagfile={path}")
    return 0


def _body(rest):
    from absl import flags

    FLAGS = flags.FLAGS
    if FLAGS.tracking_uri:
        from dtf.tracking import store

        store.require_mlflow()  # a missing `mlflow` extra is one line, before anything starts
    space = parse_space(FLAGS)
    tuner_name, objective = FLAGS.tuner, FLAGS.objective
    if tuner_name not in TUNERS:  # before importing TensorFlow: fail fast
        raise UserError(f"--tuner={tuner_name!r} is not valid; choose one of: {', '.join(TUNERS)}")
    direction = objective_direction(objective, FLAGS.objective_direction)
    role = distributed.role()
    if FLAGS.num_tuners < 0:
        raise UserError(f"--num_tuners={FLAGS.num_tuners} must be >= 0")
    if FLAGS.num_tuners and role is None:
        return _launch_tuners(FLAGS.num_tuners)

    from dtf.base import versions

    versions.load_tensorflow()  # quiet, version-checked, before anything else imports it
    from dtf.config import flags as dtf_flags
    from dtf.upstream import keras_tuner as kt_upstream  # checks the keras-tuner version before anything uses it
    from dtf.experiment import task as task_lib, train

    config = dtf_flags.config_from_flags()
    tune_dir = FLAGS.tune_dir
    cluster = train.resolve_cluster(config)
    if cluster.is_multi_worker:
        raise UserError("dtf.tune trains each trial on one host (one_device or mirrored); multi-worker trials are not "
                        "supported: unset TF_CONFIG/--worker_hosts and use --num_tuners=N for parallel trials")
    strategy = train.create_strategy(config)
    validate_space(space, config, strategy.num_replicas_in_sync, tuner_name, FLAGS.max_trials,
                   FLAGS.executions_per_trial)
    task = task_lib.from_config(config)
    check_against_data(space, config, strategy, cluster, task, objective)
    sweep = None
    if config.tracking_uri:  # a parent run for the sweep, a child run per trial (dtf.tracking.sweep)
        from dtf.tracking.sweep import Sweep
        from dtf.tracking.tracker import Tracker

        sweep = Sweep(Tracker.from_config(config, "dtf.tune"), tune_dir)
        sweep.tracker.check()  # an unreachable store is one line, before anything is written
    train.check_model_dir(tune_dir, "--tune_dir")
    check_signature(tune_dir, space_signature(space, FLAGS), write=role in (None, "chief"))

    from dtf.tuning.hypermodel import DtfHyperModel

    hypermodel = DtfHyperModel(space, strategy, cluster, tune_dir, task, objective, sweep)
    tuner = make_tuner(tuner_name, hypermodel, objective, direction, FLAGS.max_trials, FLAGS.executions_per_trial,
                       tune_dir, strategy, config.seed, config.epochs)
    tuner.oracle.verbose = 0
    start = time.time()
    if role not in (None, "chief"):  # a tuner worker: train the trials the chief hands out, write no results
        _search(tuner, hypermodel, config)
        print(f"dtf.tune: {role} ran {len(hypermodel.trials_run)} trial(s) in {time.time() - start:.1f}s: "
              f"{', '.join(map(str, hypermodel.trials_run)) or 'none'}")
        return 0

    kt_upstream.repair_reloaded_oracle(tuner.oracle)
    before = len(tuner.oracle.trials)
    with sweep.serving(sweep.params(config, FLAGS)) if sweep else contextlib.nullcontext():
        if role == "chief":
            _serve_as_chief(tuner)
        else:
            _search(tuner, hypermodel, config)
        return _report(tuner, tune_dir, config, objective, direction, len(tuner.oracle.trials) - before, start,
                       sweep)


def main(argv=None):
    _ARGV[:] = list(sys.argv if argv is None else argv)
    return cli.main("dtf.tune", _define, _body, argv, doc=__doc__)


if __name__ == "__main__":
    cli.exit(main())
