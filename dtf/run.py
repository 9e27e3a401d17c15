"""`python -m dtf.run --flagfile=experiments/shapes_mirrored.flags [--flag=value ...]`: train one experiment.

The same command runs on one device, on simulated or real mirrored devices, or as one worker of a multi-worker job
(TF_CONFIG, or --worker_hosts/--task_index, or --cluster_resolver=slurm).
"""
import sys

from dtf import cli


def _define(argv):
    from dtf import flags as dtf_flags

    dtf_flags.define_flags()
    dtf_flags.define_task_flags(argv)


def _body(rest):
    from dtf import versions

    versions.load_tensorflow()  # quiet, version-checked, before anything else imports it
    from dtf import cluster as cluster_lib
    from dtf import flags as dtf_flags
    from dtf.summaries import EPOCH_SCALARS
    from dtf.train import run_experiment

    config = dtf_flags.config_from_flags()
    summary = run_experiment(config)
    if cluster_lib.parse_tf_config().is_chief:
        shown = " ".join(f"{k}={v:.4f}" for k, v in summary["final_metrics"].items() if k not in EPOCH_SCALARS)
        print(f"dtf: done in {summary['wall_time_s']:.1f}s: {shown} examples/sec={summary['examples_per_sec']:.0f}")
        print(f"dtf: outputs in {config.model_dir}; view with: tensorboard --logdir {config.model_dir}/tensorboard")
    return 0


def main(argv=None):
    return cli.main("dtf.run", _define, _body, argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
