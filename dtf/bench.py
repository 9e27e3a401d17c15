"""`python -m dtf.bench bottleneck|overhead|scaling --flagfile=exp.flags [--flag=value ...]`: where the time goes.

Every `dtf.run` flag works (any experiment or --task); the benchmark runs that experiment as `dtf.run` would.

  bottleneck  the experiment's input pipeline alone, its train step fed from a batch in memory, and both together
              (examples/s, fraction of the step waiting for input); a verdict (input-bound / balanced /
              compute-bound, thresholds printed) and advice. Writes MODEL_DIR/bottleneck.json.
  overhead    the same model, data and strategy trained by dtf and by a hand-written Keras + tf.distribute script,
              alternating after warm-up: each one's steady-state step time and the ratio (goal: dtf >= 0.98).
              Epochs are what dtf.run trains: one pass over the data, or --steps_per_epoch.
  scaling     examples/s at --bench_replicas (default 1,2,4) replicas at a fixed per-replica batch (weak) and a fixed
              global batch (strong), each replica count in its own interpreter (mirrored on simulated CPU devices,
              or with --num_workers=N real worker processes, 1, 2, 4, ... N, through the launcher); the alpha-beta
              ring all-reduce model fitted to the measured all-reduce times, with the efficiency it predicts over a
              --link_gbps link.
              Writes MODEL_DIR/scaling.json, scaling.png.

Benchmarks print rates and ratios; on a shared machine compare ratios, not absolute numbers.
"""
import sys

from dtf import cli

BARRIER_TIMEOUT_MS = 120_000  # the workers' last meeting after a multi-worker bottleneck run (see bottleneck)


def _define(argv):
    from absl import flags

    from dtf.config import flags as dtf_flags

    dtf_flags.define_flags()
    kw = dict(module_name="dtf: bench")
    if "bench_steps" not in flags.FLAGS:
        flags.DEFINE_integer("bench_steps", 50, "bottleneck, scaling: timed steps per run (overhead times whole "
                             "epochs: one pass each, or --steps_per_epoch).", lower_bound=2, **kw)
        flags.DEFINE_integer("bench_warmup_steps", 10, "Untimed steps first (traces, fills buffers).", lower_bound=1,
                             **kw)
        flags.DEFINE_integer("bench_repeats", 3, "Alternating repeats; the median counts.", lower_bound=1, **kw)
        flags.DEFINE_integer("bench_epochs", 3, "overhead: epochs per fit (the first is not timed).", lower_bound=2,
                             **kw)
        flags.DEFINE_bool("bench_parts", False, "overhead: also time dtf's fit without each of its callbacks, "
                          "without any, and with the progress bar: what each part costs.", **kw)
        flags.DEFINE_list("bench_replicas", ["1", "2", "4"], "scaling: replica counts (mirrored).", **kw)
        flags.DEFINE_integer("num_workers", 0, "scaling: 1, 2, 4, ... and N worker processes (one replica each, "
                             "multi_worker on 127.0.0.1 through the launcher) instead of mirrored simulated CPU "
                             "devices over --bench_replicas. 0: mirrored.", lower_bound=0, **kw)
        flags.DEFINE_float("link_gbps", 100.0, "scaling: link bandwidth (Gbit/s) for the all-reduce model's "
                           "prediction.", lower_bound=0.001, **kw)
        flags.DEFINE_float("device_step_ms", None, "scaling: device step time for the model's prediction "
                           "(default: the measured 1-replica training step).", lower_bound=0.001, **kw)
        flags.DEFINE_float("bench_timeout", 900.0, "scaling: seconds each replica count may take.", lower_bound=1,
                           **kw)
    cli.define_task_flags(argv)


def _experiment(config):
    from dtf.experiment import train

    cluster = train.resolve_cluster(config)
    if cluster.is_chief:
        train.check_model_dir(config.model_dir)
    return train.Experiment(config, train.create_strategy(config), cluster)


def _gradient_bytes(model) -> int:
    return int(sum(v.numpy().nbytes for v in model.trainable_variables))


def bottleneck(config, flag_values) -> dict:
    import os

    from dtf.benchmarks import allreduce, bottleneck as lib

    exp = _experiment(config)
    model = exp.build_model()
    result = lib.measure(exp, model, steps=flag_values.bench_steps, warmup_steps=flag_values.bench_warmup_steps,
                         repeats=flag_values.bench_repeats)
    result["gradient_bytes"] = _gradient_bytes(model)
    if exp.plan.num_replicas > 1:
        result["allreduce"] = allreduce.measure_sizes(exp.strategy, result["gradient_bytes"])
    if exp.cluster.is_multi_worker:  # no worker leaves while a peer still reads the last all-reduce from it
        from dtf.upstream import tensorflow as tf_upstream

        tf_upstream.wait_at_barrier("dtf.bench.bottleneck.done", BARRIER_TIMEOUT_MS)
    result["advice"] = lib.advice(exp, result)
    result["experiment"] = exp.describe()
    if exp.cluster.is_chief:
        lib.write_json(os.path.join(config.model_dir, "bottleneck.json"), result)
        print(format_bottleneck(result))
        print(f"dtf.bench: wrote {os.path.join(config.model_dir, 'bottleneck.json')}")
    return result


def format_bottleneck(r: dict) -> str:
    lines = [f"experiment: {r['experiment']}",
             f"(a) input pipeline alone:        {r['input_examples_per_sec']:12.0f} examples/s",
             f"(b) train step, batch in memory: {r['training_examples_per_sec']:12.0f} examples/s  "
             f"({r['training_step_ms']:.1f} ms/step)",
             f"(c) end to end:                  {r['end_to_end_examples_per_sec']:12.0f} examples/s  "
             f"({r['end_to_end_step_ms']:.1f} ms/step, {r['input_wait_fraction']:.0%} of it waiting for input)",
             f"input / training: {r['input_to_training_ratio']:.2f}x   ({r['steps']} steps x {r['repeats']} "
             f"alternating repeats after {r['warmup_steps']} warm-up steps; medians)"]
    if "allreduce" in r:
        a = r["allreduce"]
        lines.append(f"gradient all-reduce ({a['gradient_bytes'] / 2**20:.2f} MB over {a['replicas']} replicas): "
                     f"{1000 * a['gradient_seconds']:.2f} ms")
    note = f"; {r['verdict_note']}" if r.get("verdict_note") else ""
    lines += [f"verdict: {r['verdict'].upper()}{note}", f"  thresholds: {r['thresholds']}", "advice:"]
    lines += [f"  - {item}" for item in r["advice"]] or ["  - none"]
    return "\n".join(lines)


def overhead(config, flag_values) -> dict:
    from dtf.benchmarks import overhead as lib

    epochs = flag_values.bench_epochs
    config = config.replace(epochs=epochs, validation_freq=epochs + 1)  # epochs as dtf.run trains them
    exp = _experiment(config)
    result = lib.compare(exp, repeats=flag_values.bench_repeats, parts=flag_values.bench_parts)
    if exp.cluster.is_chief:
        print(f"experiment: {exp.describe()}; no validation")
        for name in ("dtf", "hand_written"):
            runs = ", ".join(f"{v:.2f}" for v in result["runs_step_ms"][name])
            print(f"{name.replace('_', '-'):>13}: {result[f'{name}_step_ms']:8.2f} ms/step  (runs: {runs})")
        print(f"ratio dtf / hand-written examples/s: {result['ratio']:.3f}  (goal >= {result['goal']}; "
              f"{result['repeats']} alternating repeats of {result['epochs_per_fit']} epochs x "
              f"{result['steps_per_epoch']} steps after a warm-up fit each, first epoch of each fit untimed)")
        if result["parts"]:
            print("what each part of dtf's fit costs per step (its variant against the whole, medians):")
        for name, part in result["parts"].items():
            runs = ", ".join(f"{v:.2f}" for v in result["runs_step_ms"][name])
            print(f"  {name:>24}: {part['cost_ms']:+7.2f} ms  ({part['variant']}: {part['variant_step_ms']:.2f} "
                  f"ms/step; runs: {runs})")
    return result


def scaling(config, flag_values) -> dict:
    from dtf.benchmarks import scaling as bench_scaling

    return bench_scaling.run(config, flag_values)


RUNNERS = {"bottleneck": bottleneck, "overhead": overhead, "scaling": scaling}


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    command = argv[1] if len(argv) > 1 and not argv[1].startswith("-") else None
    rest = [argv[0]] + argv[2:] if command else argv

    def body(_):
        from absl import flags

        from dtf.base.errors import UserError
        from dtf.config import flags as dtf_flags

        if command not in RUNNERS:
            given = f"{command!r} is not a benchmark" if command else "no benchmark given"
            raise UserError(f"{given}; run python -m dtf.bench {{{'|'.join(RUNNERS)}}} --flagfile=exp.flags")
        from dtf.base import versions

        versions.load_tensorflow()  # quiet, version-checked, before anything else imports it

        RUNNERS[command](dtf_flags.config_from_flags(), flags.FLAGS)
        return 0

    return cli.main(f"dtf.bench {command}" if command else "dtf.bench", _define, body, rest, doc=__doc__)


if __name__ == "__main__":
    cli.exit(main())
