"""Inference throughput: dtf's ordered data-parallel inference (what `python -m dtf.predict` runs) against plain Keras
`model.predict` on the same model and data.

Not a test: prints examples/s and the ratios dtf / plain (goal >= 0.95) on one device and on MirroredStrategy over
--num_cpu_devices logical CPUs. Every timed call is a whole call as a user makes it: the input pipeline built, the
step traced (Keras's cached predict function is dropped first), every example predicted and brought back to numpy.
Calls alternate and the median counts, since the machine is shared; the CPU seconds the process spent per call are
printed too (examples per CPU second), which contention from other processes disturbs much less than wall time.

    python tools/bench_predict.py [--model cnn] [--examples 20000] [--global_batch_size 256] [--num_cpu_devices 2]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dtf  # noqa: E402,F401
from dtf import datasets  # noqa: E402  (first: dtf loads TensorFlow quietly)
from dtf.inference import predictor as inference
from dtf.datasets import models

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402


def timed(run, num_examples):
    """(examples per wall second, examples per CPU second of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    assert len(run()) == num_examples
    return num_examples / (time.perf_counter() - wall), num_examples / (time.process_time() - cpu)


def plain_predict(model, split, global_batch_size):
    """What one writes by hand: the split batched, features only, `model.predict`."""
    model.predict_function = None  # trace again, as a fresh call would
    features = split.read(None).map(lambda x, y: x).batch(global_batch_size).prefetch(tf.data.AUTOTUNE)
    return model.predict(features, verbose=0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--global_batch_size", type=int, default=256)
    parser.add_argument("--num_cpu_devices", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    dtf.simulate_cpu_devices(args.num_cpu_devices)
    split = datasets.load("synthetic", "test", num_examples=args.examples)
    strategies = {"one device": tf.distribute.get_strategy(),
                  f"mirrored x{args.num_cpu_devices}": dtf.create_strategy("mirrored",
                                                                           num_cpu_devices=args.num_cpu_devices)}
    keras.utils.set_random_seed(0)
    weights = models.build_model(args.model, split.input_shape, split.num_classes).get_weights()
    for name, strategy in strategies.items():
        with strategy.scope():
            model = models.build_model(args.model, split.input_shape, split.num_classes)
        model.set_weights(weights)
        candidates = {
            "dtf": lambda: inference.predict(model, strategy, split, args.global_batch_size).outputs["output"],
            "plain": lambda: plain_predict(model, split, args.global_batch_size)}
        runs = {k: [] for k in candidates}
        for _ in range(args.repeats):
            for k, run in candidates.items():
                runs[k].append(timed(run, split.num_examples))
        wall = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
        cpu = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
        for k in candidates:
            print(f"{name:>12} {k:>5}: {wall[k]:8.0f} examples/s, {cpu[k]:8.0f} examples/CPU-s  "
                  f"(runs: {', '.join(f'{r[0]:.0f}' for r in runs[k])})")
        print(f"{name:>12} ratio dtf / plain model.predict: {wall['dtf'] / wall['plain']:.2f} (wall), "
              f"{cpu['dtf'] / cpu['plain']:.2f} (CPU)  ({args.model}, {args.examples} examples, global batch "
              f"{args.global_batch_size})")


if __name__ == "__main__":
    main()
