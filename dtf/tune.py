"""`python -m dtf.tune --flagfile=sweep.flags`: a keras-tuner sweep where every trial is a `dtf.run` experiment.

Takes every `dtf.run` flag plus a search space:

  --tune_global_batch_sizes=64,128,256   global batch (sharded over the replicas by dtf)
  --tune_base_lr=1e-3:1e-1:log           a range MIN:MAX[:log] (random/bayesian) or a list 0.01,0.1
  --tune_warmup_epochs=0,1
  --tune_lr_scaling=linear,sqrt
  --tuner=random|bayesian|hyperband|grid --max_trials=N --executions_per_trial=N
  --objective=val_accuracy|val_loss|val_<any metric> [--objective_direction=min|max] --tune_dir=DIR
  --objective=steps_to:val_accuracy>=0.9 (or seconds_to:)  optimizer updates (training seconds, validation
                                         excluded) to first reach the target, validated at epoch ends and every
                                         --validate_every_steps=N; each trial stops there
  --task=package.module:Attr             tune your own task (its flags work here as in dtf.run)
  --trial_workers=N [--parallel_trials=K] [--max_trial_restarts=R] [--trial_timeout_s=S] [--backend=local|ray|slurm]
                                         each trial a dtf.run job of N workers, K at once (see below)
  --emit=slurm                           print an sbatch script running this sweep as one Slurm job

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

Multi-worker trials: `--trial_workers=N` runs each trial as a `dtf.run` job of N worker processes (dtf's launcher:
its own TF_CONFIG and ports, sharding, chief-only outputs, backups, preemption), `--parallel_trials=K` at once, with
the oracle inside this process (it listens on nothing; keras-tuner's gRPC service has no authentication). A trial's
flagfile is TUNE_DIR/trials/<id>.flags and its model_dir TUNE_DIR/trials/<id>; its objective comes from the chief's
summary.json. A crashed worker restarts the trial from its backup up to --max_trial_restarts (143 uncounted); a
diverged trial (3) is recorded and the sweep goes on; a trial's user error (2) stops the sweep with its one line; a
trial silent for --trial_timeout_s is stopped and recorded as stalled. A killed tuner's trials back up and stop; the
rerun keeps finished trials and resumes running ones from their backups. --backend=ray runs trials on Ray Train,
--backend=slurm as srun steps inside the job `--emit=slurm` writes (see dtf.tuning.trial_jobs).
"""
import collections
import contextlib
import os
import signal
import sys
import time
from typing import List

from dtf import cli
from dtf.base import exitcodes
from dtf.base.errors import Stopped, UserError
from dtf.cluster import data_service
from dtf.tuning import distributed, results
from dtf.tuning.objectives import MAXIMIZED_WORDS, MINIMIZED_WORDS, objective_direction, speed_objective
from dtf.tuning.space import check_against_data, check_signature, parse_space, space_signature, validate_space
from dtf.tuning.trial_jobs import BACKENDS
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
    flags.DEFINE_integer("trial_workers", 0, "Run each trial as a dtf.run job of this many worker processes (dtf's "
                         "launcher: its own TF_CONFIG, ports and backup), data-parallel like dtf.launch "
                         "--num_workers=N. 0: trials train in this process.", **kw)
    flags.DEFINE_integer("parallel_trials", 1, "With --trial_workers: run this many trial jobs at once.", **kw)
    flags.DEFINE_integer("max_trial_restarts", 1, "With --trial_workers: restart a trial's crashed job this many "
                         "times, each from its own backup (preemptions, 143, are not counted); then it is recorded "
                         "as failed and the sweep goes on.", **kw)
    flags.DEFINE_float("trial_timeout_s", None, "With --trial_workers: stop (and record as stalled) a trial that "
                       "prints nothing for this many seconds; keep it above one epoch's time. Default: no limit.", **kw)
    flags.DEFINE_enum("backend", "local", list(BACKENDS), "With --trial_workers, where each trial job runs: local "
                      "(dtf.launch on this host), ray (Ray Train workers, dtf.launch --backend=ray), slurm (srun "
                      "steps inside the Slurm job that --emit=slurm writes).", **kw)
    flags.DEFINE_string("address", None, "--backend=ray: the Ray cluster the trials join (default: each trial starts "
                        "a local one).", **kw)
    flags.DEFINE_string("emit", None, "slurm: print an sbatch script that runs this sweep (same flags) as one Slurm "
                        "job, instead of running it.", **kw)
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
            sweep=None, train_with: str = "python -m dtf.run") -> int:
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
        speed = speed_objective(objective)
        if speed and any(r["status"] == "not_reached" for r in rows):
            raise UserError(f"no trial of the {len(rows)} reached {speed[1]} (see {tune_dir}/{results.RESULTS}); "
                            "train longer (--epochs) or lower the target in --objective")
        ended = collections.Counter(r["status"] for r in rows)
        hints = {"diverged": "lower --tune_base_lr or add warmup", "stalled": "raise --trial_timeout_s",
                 "failed": "see the failed trials' output above"}
        raise UserError(f"no trial of the {len(rows)} completed ({', '.join(f'{n} {k}' for k, n in ended.items())}; "
                        f"see {tune_dir}/{results.RESULTS}): " +
                        ("; ".join(hints[k] for k in ended if k in hints) or "lower --tune_base_lr or add warmup"))
    path = os.path.join(tune_dir, results.BEST_FLAGS)
    if changed or not tf.io.gfile.exists(path):
        results.write_best_flags(best, tune_dir, config)
    if sweep is not None:
        sweep.report(rows, best, files)
    print(f"dtf.tune: best trial {best['trial']}: {objective}={float(best['objective']):.4f} "
          f"(global batch {best['global_batch_size']}, base_lr {float(best['base_lr']):.4g}, peak LR "
          f"{float(best['peak_lr']):.4g}); train it: {train_with} --flagfile={path}")
    return 0


def _check_trial_jobs(FLAGS, role, tuner_name: str):
    """--trial_workers and its companions: one line for a value, or a combination, they cannot honour."""
    companions = ("parallel_trials", "max_trial_restarts", "trial_timeout_s")
    if FLAGS.trial_workers < 0:
        raise UserError(f"--trial_workers={FLAGS.trial_workers} must be >= 0 (0: trials train in this process)")
    if FLAGS.emit is not None and FLAGS.emit != "slurm":
        raise UserError(f"--emit={FLAGS.emit} is not a sweep script dtf writes; use --emit=slurm")
    if FLAGS.address is not None and FLAGS.backend != "ray":
        raise UserError("--address only applies to --backend=ray; remove it or add --backend=ray")
    if FLAGS.emit and FLAGS.backend != "local":
        raise UserError(f"--emit=slurm writes a script whose trials run as Slurm steps: remove "
                        f"--backend={FLAGS.backend}")
    if not FLAGS.trial_workers:
        for name in (*companions, "backend", "emit"):
            if FLAGS[name].present:
                raise UserError(f"--{name} only applies to trial jobs; add --trial_workers=N or remove --{name}")
        return
    if FLAGS.backend == "slurm" and not FLAGS.emit and "SLURM_JOB_ID" not in os.environ:
        raise UserError("--backend=slurm runs trials as steps of the Slurm job it is in: write that job's script with "
                        "--emit=slurm and submit it with sbatch")
    if FLAGS.parallel_trials < 1:
        raise UserError(f"--parallel_trials={FLAGS.parallel_trials} must be >= 1")
    if FLAGS.max_trial_restarts < 0:
        raise UserError(f"--max_trial_restarts={FLAGS.max_trial_restarts} must be >= 0 (0: never restart a trial)")
    if FLAGS.trial_timeout_s is not None and FLAGS.trial_timeout_s <= 0:
        raise UserError(f"--trial_timeout_s={FLAGS.trial_timeout_s:g} must be > 0 seconds; leave it out for no limit")
    refused = [
        (FLAGS.num_tuners, "--trial_workers runs parallel trial jobs itself: use --parallel_trials instead of "
                           "--num_tuners"),
        (FLAGS.executions_per_trial != 1, "--trial_workers runs each trial once: remove --executions_per_trial"),
        (tuner_name == "hyperband", "--tuner=hyperband continues a promoted trial's state in this process, which "
                                    "trial jobs do not do yet: use grid, random or bayesian with --trial_workers"),
        (FLAGS.tracking_uri, "--tracking_uri is not supported with --trial_workers yet (each trial would be its own "
                             "MLflow run, not a child of the sweep's): remove one of them"),
    ]
    for problem, message in refused:
        if problem:
            raise UserError(message)
    if role is not None:
        raise UserError("--trial_workers keeps the oracle in this process: unset KERASTUNER_ORACLE_IP/_PORT and "
                        "KERASTUNER_TUNER_ID")


def _run_trial_jobs(jobs) -> int:
    """Run the sweep's trials as jobs (dtf.tuning.trial_jobs); 0, or 128+N when a signal stopped them (each job's
    workers backed up: the rerun resumes them)."""
    from dtf.cluster import procs

    procs.raise_stopped_on_signals()
    try:
        jobs.run()
    except Stopped as stop:
        print(f"dtf.tune: got {signal.Signals(stop.signum).name}; stopped all trials (they backed up; rerun the same "
              "command to resume the sweep)", file=sys.stderr, flush=True)
        return 128 + stop.signum
    if jobs.preempted:
        print("dtf.tune: a trial step was preempted; stopped all trials (they backed up): the requeued job resumes "
              "the sweep", file=sys.stderr, flush=True)
        return exitcodes.PREEMPTED
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
    _check_trial_jobs(FLAGS, role, tuner_name)
    if FLAGS.emit:
        from dtf.tuning import trial_jobs

        print(trial_jobs.sweep_sbatch(_ARGV[1:], FLAGS.trial_workers, FLAGS.parallel_trials), end="")
        return 0
    if FLAGS.num_tuners and role is None:
        return _launch_tuners(FLAGS.num_tuners)

    from dtf.base import versions

    versions.load_tensorflow()  # quiet, version-checked, before anything else imports it
    from dtf.config import flags as dtf_flags
    from dtf.upstream import keras_tuner as kt_upstream  # checks the keras-tuner version before anything uses it
    from dtf.experiment import task as task_lib, train

    speed = speed_objective(objective)
    config = dtf_flags.config_from_flags(**({"stop_at": str(speed[1])} if speed else {}))  # a trial's --stop_at
    tune_dir = FLAGS.tune_dir
    cluster = train.resolve_cluster(config)
    if cluster.is_multi_worker:
        raise UserError("dtf.tune is not one worker of a cluster: unset TF_CONFIG/--worker_hosts; for multi-worker "
                        "trials give --trial_workers=N (and --parallel_trials=K to run K at once)")
    strategy = train.create_strategy(config)
    # a trial job's replicas: this host's per worker (CPU: one), times its workers
    replicas = strategy.num_replicas_in_sync * max(FLAGS.trial_workers, 1)
    validate_space(space, config, replicas, tuner_name, FLAGS.max_trials, FLAGS.executions_per_trial)
    task = task_lib.from_config(config)
    check_against_data(space, config, strategy, cluster, task, speed[1].metric if speed else objective)
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
    if FLAGS.trial_workers:
        from dtf.tuning.trial_jobs import TrialJobs

        jobs = TrialJobs(tuner.oracle, tune_dir, objective, FLAGS.trial_workers, FLAGS.parallel_trials,
                         FLAGS.max_trial_restarts, FLAGS.trial_timeout_s, FLAGS.backend, FLAGS.address)
        status = _run_trial_jobs(jobs)
        if status:
            return status
        return _report(tuner, tune_dir, config, objective, direction, len(tuner.oracle.trials) - before, start,
                       train_with=f"python -m dtf.launch --num_workers={FLAGS.trial_workers} -- python -m dtf.run")
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
