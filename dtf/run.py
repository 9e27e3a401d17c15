"""`python -m dtf.run --flagfile=experiments/shapes_mirrored.flags [--flag=value ...]`: train one experiment.

The same command runs on one device, on simulated or real mirrored devices, or as one worker of a multi-worker job
(TF_CONFIG, or --worker_hosts/--task_index, or --cluster_resolver=slurm).
"""
import os

from dtf import cli

MODES = ("train", "evaluate_continuously")


# What the evaluator takes from --model_dir's flags.txt when the command line names no data.
RUN_DATA_FLAGS = ("task", "dataset", "model", "data_dir")


def _define(argv):
    """Defines the flags; an evaluator (--mode=evaluate_continuously) first gets its run's data flags into `argv`."""
    from absl import flags

    from dtf.config import flags as dtf_flags

    if dtf_flags.arg_value(argv[1:], "mode") == "evaluate_continuously":
        argv[:], _ = dtf_flags.with_run_data_flags(argv, RUN_DATA_FLAGS)
    dtf_flags.define_flags()
    if "mode" not in flags.FLAGS:
        flags.DEFINE_enum("mode", "train", MODES, "train, or evaluate_continuously: score each new checkpoint in "
                          "--model_dir once (what a TF_CONFIG evaluator task does); not written to flags.txt.",
                          module_name="dtf: evaluator")
        flags.DEFINE_string("best_metric", None, "Evaluator: keep the checkpoint with the best value of this metric "
                            "(default loss) as best.keras.", module_name="dtf: evaluator")
        flags.DEFINE_boolean("restart", False, "If --model_dir holds a different run (other flags), move it aside "
                             "to MODEL_DIR.before-restart-TIME and train this one from step 0 (without it: refused). "
                             "The same run is resumed or left as it is; not written to flags.txt.",
                             module_name="dtf: outputs")
        flags.DEFINE_float("eval_timeout_s", 600.0, "Evaluator: give up (exit 2) when --model_dir still holds no "
                           "training run after this many seconds; once a run is there, it waits as long as training "
                           "lasts.", lower_bound=0, module_name="dtf: evaluator")
    _fence_data_service(argv)
    cli.define_task_flags(argv)


def _fence_data_service(argv):
    """--data_service=local:N: fence its servers (dtf.cluster.data_service.fence) before anything, a --task module
    included, starts TensorFlow's threads: a namespace change leaves running threads outside."""
    from dtf.base.errors import UserError
    from dtf.cluster import data_service, tf_config as cluster_lib
    from dtf.config.flags import arg_value

    try:
        multi_worker = cluster_lib.parse_tf_config().is_multi_worker
    except UserError:  # the run reports it; no fence meanwhile
        multi_worker = True
    multi_worker = (multi_worker or bool(arg_value(argv, "worker_hosts"))
                    or arg_value(argv, "cluster_resolver") == "slurm")
    paths = (arg_value(argv, "model_dir"), arg_value(argv, "data_dir") or os.environ.get("DTF_DATA_DIR"))
    data_service.fence(arg_value(argv, "data_service"), paths, multi_worker)


def _body(rest):
    from absl import flags

    from dtf.base import versions
    from dtf.config import flags as dtf_flags

    config = dtf_flags.config_from_flags()  # the flags' own checks first: instant, before TensorFlow loads
    checked = None
    if config.tracking_uri:  # a missing `mlflow` extra or an unreachable store: one line, before TensorFlow loads
        from dtf.tracking import store

        checked = store.Store(config.tracking_uri)
        checked.check(config.experiment_name)
    versions.load_tensorflow()  # quiet, version-checked, before anything else imports it
    from dtf.base.errors import UserError
    from dtf.cluster import tf_config as cluster_lib
    from dtf.experiment.summaries import EPOCH_SCALARS
    from dtf.experiment.train import run_experiment

    tracker = None
    if config.tracking_uri:
        from dtf.tracking.tracker import Tracker

        tracker = Tracker.from_config(config, "dtf.run", checked)
    if flags.FLAGS.mode == "evaluate_continuously" or cluster_lib.parse_tf_config().task_type == "evaluator":
        from dtf.experiment import evaluator
        from dtf.tuning.objectives import objective_direction

        metric = flags.FLAGS.best_metric or "loss"
        try:
            direction = objective_direction(metric)
        except UserError:
            raise UserError(f"--best_metric={metric}: cannot tell whether lower or higher is better; name a loss or "
                            "error (lower) or an accuracy, AUC, precision or recall (higher)") from None
        results = evaluator.evaluate_continuously(config, metric, direction, flags.FLAGS.eval_timeout_s,
                                                  on_scores=tracker.evaluator(config.model_dir) if tracker else None)
        print(f"dtf: evaluated {len(results['checkpoints'])} checkpoint(s); best: {results['best']}")
        return 0
    summary = run_experiment(config, restart=flags.FLAGS.restart, tracker=tracker)
    if summary.get("already_finished"):
        if cluster_lib.parse_tf_config().is_chief:
            shown = " ".join(f"{k}={v:.4f}" for k, v in summary["final_metrics"].items() if k not in EPOCH_SCALARS)
            print(f"dtf: {config.model_dir} already holds this run, finished ({summary['epochs']} epochs): {shown}; "
                  "nothing trained or written (more --epochs continue it)")
        return 0
    if cluster_lib.parse_tf_config().is_chief:
        shown = " ".join(f"{k}={v:.4f}" for k, v in summary["final_metrics"].items() if k not in EPOCH_SCALARS)
        print(f"dtf: done in {summary['wall_time_s']:.1f}s: {shown} examples/sec={summary['examples_per_sec']:.0f}")
        print(f"dtf: outputs in {config.model_dir}; view with: tensorboard --logdir {config.model_dir}/tensorboard")
    return 0


def main(argv=None):
    return cli.main("dtf.run", _define, _body, argv, doc=__doc__)


if __name__ == "__main__":
    cli.exit(main())
