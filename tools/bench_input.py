"""Input throughput: dtf's training pipeline against a hand-tuned tf.data pipeline on the same source (shapes).

Not a test: prints examples/s for both and their ratio (goal: dtf / hand-tuned >= 1.0). Each pipeline first runs
`--warmup_steps` (filling caches and autotuning), then `--steps` are timed; runs alternate and the median counts, since
the machine is shared. Nothing consumes the batches, so this measures the input pipeline at its limit; notes/data.md
has the numbers and where dtf's per-epoch reshuffle costs time. Besides examples/s it prints the process CPU time per
step (tf.data's threads included), which other load on the machine changes little.

With `--steps_per_epoch=N`, dtf's pipeline runs with N-step epochs in both epoch modes (stream, and pass when N is at
most a pass), to show what a fresh pass per short epoch costs.

    python tools/bench_input.py [--dataset shapes/32x32x3] [--global_batch_size 256] [--no-cache] [--data_dir DIR]
                                [--steps_per_epoch N]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dtf import datasets  # noqa: E402  (first: dtf quiets TensorFlow's C++ logs before TF loads)
from dtf.distribute import inputs as data

import tensorflow as tf  # noqa: E402


def hand_tuned(split: datasets.DatasetSplit, global_batch_size: int, cache: bool, shuffle_buffer: int):
    """What one would write by hand on one device: read, cache, shuffle, repeat, batch, prefetch."""
    dataset = split.dataset
    if cache:
        dataset = dataset.cache()
    return dataset.shuffle(shuffle_buffer, seed=0).repeat().batch(global_batch_size, drop_remainder=True) \
        .prefetch(tf.data.AUTOTUNE)


def examples_per_second(dataset, global_batch_size: int, warmup_steps: int, steps: int):
    """(examples/s, process CPU ms per step) over `steps` after `warmup_steps`."""
    iterator = iter(dataset)
    for _ in range(warmup_steps):
        next(iterator)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        next(iterator)
    cpu_ms = 1000 * (time.process_time() - cpu) / steps
    return steps * global_batch_size / (time.perf_counter() - start), cpu_ms


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--global_batch_size", type=int, default=256)
    parser.add_argument("--shuffle_buffer", type=int, default=data.DEFAULT_SHUFFLE_BUFFER)
    parser.add_argument("--no-cache", dest="cache", action="store_false")
    parser.add_argument("--warmup_steps", type=int, default=40)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps_per_epoch", type=int, default=None)
    args = parser.parse_args(argv)

    split = datasets.load(args.dataset, "train", args.data_dir)
    strategy = tf.distribute.get_strategy()
    one_pass = split.num_examples // args.global_batch_size
    modes = ["auto"] if args.steps_per_epoch is None else ["stream"] + (["pass"] * (args.steps_per_epoch <= one_pass))

    def dtf(mode):
        return lambda: data.distribute_dataset(strategy, split, args.global_batch_size, cache=args.cache,
                                               shuffle_buffer=args.shuffle_buffer, steps_per_epoch=args.steps_per_epoch,
                                               epoch_mode=mode).dataset

    candidates = {("dtf" if mode == "auto" else f"dtf {mode}"): dtf(mode) for mode in modes}
    candidates["hand-tuned"] = lambda: hand_tuned(split, args.global_batch_size, args.cache, args.shuffle_buffer)
    runs = {name: [] for name in candidates}
    for _ in range(args.repeats):
        for name, build in candidates.items():
            runs[name].append(examples_per_second(build(), args.global_batch_size, args.warmup_steps, args.steps))
    median = {name: statistics.median(rate for rate, _ in r) for name, r in runs.items()}
    for name, rate in median.items():
        cpu = statistics.median(ms for _, ms in runs[name])
        print(f"{name:>10}: {rate:10.0f} examples/s, {cpu:6.2f} CPU ms/step  "
              f"(runs: {', '.join(f'{r:.0f}' for r, _ in runs[name])})")
    for name in candidates:
        if name != "hand-tuned":
            print(f"ratio {name} / hand-tuned: {median[name] / median['hand-tuned']:.2f}  ({split.name}, global batch "
                  f"{args.global_batch_size}, cache={args.cache}, {args.steps_per_epoch or one_pass} steps per epoch, "
                  f"{one_pass} per pass)")


if __name__ == "__main__":
    main()
