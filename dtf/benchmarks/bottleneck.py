"""Which side limits one experiment: its input pipeline or its training step (`python -m dtf.bench bottleneck`).

Data parallelism pays only when training, not input, is the limit, so this measures, for the experiment exactly as
`dtf.run` would train it (its strategy, per-replica pipelines and compiled train step): (a) the input pipeline alone,
(b) the train step fed from one batch already in memory, (c) both together. The three alternate (in-memory training,
input, end-to-end) after warm-up and the median of the repeats counts (the machine may be shared).
The fraction of the step spent waiting for input is 1 - (b)'s step time / (c)'s, per repeat (adjacent runs), median.
"""
import json
import os
import statistics
import tempfile
import time
from typing import Dict, List, Optional

import tensorflow as tf

from dtf.distribute.strategy import strategy_name
from dtf.upstream import tensorflow as tf_upstream

MODES = ("training", "input", "end_to_end")
INPUT_BOUND_RATIO, COMPUTE_BOUND_RATIO = 1.25, 2.0
WHOLE_EPOCHS_UP_TO = 4  # x the timed steps: longer passes are timed inside one (bounds the run time)
# Waiting below this is not called input-bound: on a shared machine (b) and (c) drift by ~15% between runs.
INPUT_BOUND_WAIT = 0.25
THRESHOLDS = (f"compute-bound when input >= {COMPUTE_BOUND_RATIO:g} x training examples/s (then waiting for input "
              f"is CPU contention, not the pipeline); otherwise input-bound when input < {INPUT_BOUND_RATIO:g} x "
              f"training examples/s or >= {INPUT_BOUND_WAIT:.0%} of the step waits for input, else balanced")
SHORT_STEP_MS = 20.0  # below this, per-step overhead (Python, tf.function call, all-reduce latency) matters
CACHE_LIMIT_BYTES = 2 << 30  # suggest --cache for training splits smaller than this


def verdict(input_eps: float, training_eps: float, wait_fraction: float) -> str:
    """A pipeline that alone delivers >= COMPUTE_BOUND_RATIO x what training takes is not the limit, even if the step
    waits for it: that wait is the pipeline's threads and training competing for cores (see `contention`)."""
    ratio = input_eps / training_eps
    if ratio >= COMPUTE_BOUND_RATIO:
        return "compute-bound"
    if ratio < INPUT_BOUND_RATIO or wait_fraction >= INPUT_BOUND_WAIT:
        return "input-bound"
    return "balanced"


def contention(input_eps: float, training_eps: float, wait_fraction: float) -> Optional[str]:
    """Why a compute-bound step still waits for input, when it waits enough to matter (else None)."""
    ratio = input_eps / training_eps
    if ratio < COMPUTE_BOUND_RATIO or wait_fraction < INPUT_BOUND_WAIT:
        return None
    return (f"{wait_fraction:.0%} of the step waited for input although input alone is {ratio:.0f}x faster: CPU "
            "contention (other processes or the pipeline's threads compete for cores)")


def in_memory(strategy: tf.distribute.Strategy, batch) -> tf.distribute.DistributedDataset:
    """This worker's replicas' batches of one step (`batch`, as the real pipeline delivered it), repeated forever."""
    local = strategy.experimental_local_results(batch)
    stacked = tf.nest.map_structure(lambda *parts: tf.stack(parts), *local)

    def dataset_fn(ctx):
        del ctx
        return tf.data.Dataset.from_tensor_slices(stacked).repeat()

    return strategy.distribute_datasets_from_function(dataset_fn)


def _sync(outputs):
    """Wait for a train step's results (its loss); TF may run steps asynchronously."""
    values = outputs.get_value() if hasattr(outputs, "get_value") else outputs
    for value in tf.nest.flatten(values)[:1]:
        value.numpy()


def measure(exp, model, steps: int = 50, warmup_steps: int = 10, repeats: int = 3) -> Dict:
    """Examples/s of the experiment's input alone, its train step alone and both, after warm-up (medians of
    `repeats` alternating runs of `steps` steps)."""
    data = exp.train_data()
    model.fit(data.dataset, steps_per_epoch=warmup_steps, epochs=1, shuffle=False, verbose=0)  # builds, traces the step
    train_step = model.train_function
    per_call = model.steps_per_execution
    memory = iter(in_memory(exp.strategy, next(iter(data.dataset))))
    # Each pass starts by filling a shuffle buffer (while the previous pass trains): every epoch in pass mode, every
    # pass when streaming. Passes of at most WHOLE_EPOCHS_UP_TO x `steps` steps are timed whole, past the first, so a
    # window holds one fill per pass as training does; longer ones are timed within a pass (a pipeline whose cost is
    # that fill then looks faster).
    fill_every = data.steps_per_pass if data.epoch_mode == "stream" else data.steps_per_epoch
    whole = fill_every <= WHOLE_EPOCHS_UP_TO * steps
    window, lead = ((-(-steps // fill_every) * fill_every, fill_every + warmup_steps) if whole
                    else (steps, warmup_steps))
    calls, warmup_calls = max(1, -(-window // per_call)), max(1, -(-lead // per_call))

    @tf.function
    def pull(iterator):  # consumes a step's batches in a graph, as the train step does
        return tf.nest.flatten(exp.strategy.experimental_local_results(iterator.get_next()))[0][:1]

    def run(mode: str, iterator, n_calls: int):
        if mode == "input":
            for _ in range(n_calls * per_call):
                last = pull(iterator)
            last.numpy()
            return
        outputs = None
        for _ in range(n_calls):
            outputs = train_step(iterator)
        _sync(outputs)

    seconds = {mode: [] for mode in MODES}
    for _ in range(repeats):
        for mode in MODES:
            # Input and end-to-end runs read a fresh pipeline: one left idle between runs would work ahead (its
            # prefetch buffers, the next epoch) and the timed run would count that as speed.
            iterator = memory if mode == "training" else iter(data.dataset)
            run(mode, iterator, warmup_calls)
            start = time.perf_counter()
            run(mode, iterator, calls)
            seconds[mode].append(time.perf_counter() - start)
    n = calls * per_call
    batch = exp.plan.global_batch_size
    median = {mode: statistics.median(values) for mode, values in seconds.items()}
    eps = {mode: n * batch / median[mode] for mode in MODES}
    # Paired by repeat (adjacent runs), so that load from other processes that drifts over the runs cancels.
    wait = statistics.median(max(0.0, 1.0 - t / e) for t, e in zip(seconds["training"], seconds["end_to_end"]))
    return {
        "input_examples_per_sec": eps["input"], "training_examples_per_sec": eps["training"],
        "end_to_end_examples_per_sec": eps["end_to_end"],
        "training_step_ms": 1000 * median["training"] / n, "end_to_end_step_ms": 1000 * median["end_to_end"] / n,
        "input_wait_fraction": wait, "input_to_training_ratio": eps["input"] / eps["training"],
        "verdict": verdict(eps["input"], eps["training"], wait),
        "verdict_note": contention(eps["input"], eps["training"], wait), "thresholds": THRESHOLDS,
        "steps": n, "warmup_steps": warmup_calls * per_call, "whole_epochs": whole, "repeats": repeats,
        "runs_s": seconds, "global_batch_size": batch, "per_replica_batch_size": exp.plan.per_replica_batch_size,
        "num_replicas": exp.plan.num_replicas, "strategy": strategy_name(exp.strategy),
    }


def _sequential_maps(dataset: tf.data.Dataset) -> int:
    """How many `map`s without num_parallel_calls the dataset's graph has (tf.data class names)."""
    count, pending = 0, [dataset]
    while pending:
        current = pending.pop()
        count += type(current).__name__.lstrip("_") == "MapDataset"
        pending.extend(tf_upstream.dataset_inputs(current))
    return count


def advice(exp, result: Dict) -> List[str]:
    """Concrete next steps for this experiment, from its verdict and config."""
    c, split, out = exp.config, exp.train_split, []
    kind = result["verdict"]
    if kind != "compute-bound":
        maps = _sequential_maps(split.read(None))
        if maps:
            out.append(f"the task's training data has {maps} sequential map(s): pass num_parallel_calls="
                       "tf.data.AUTOTUNE to .map() in datasets() (or move the work into preprocess_batch, vectorized)")
        if not c.cache:
            x, y = exp.sample_batch()
            row_bytes = sum(t.numpy().nbytes for t in tf.nest.flatten((x, y))) / max(1, int(tf.shape(y)[0]))
            size = row_bytes * split.num_examples
            if size < CACHE_LIMIT_BYTES:
                out.append(f"--cache: the decoded training split is ~{size / 2**20:.0f} MB; keep it in memory after "
                           "the first epoch instead of decoding it every epoch")
        if c.deterministic:
            out.append("--nodeterministic lets tf.data hand over elements as they are ready (gives up the "
                       "reproducible order)")
        workers = exp.cluster.num_workers
        if workers > 1 and split.num_shards < workers:
            out.append(f"store the training data in at least {workers} files (it has {split.num_shards}): each worker "
                       "then reads only its own files instead of every record")
        out.append(f"move preprocessing off the training hosts with the tf.data service (tf.data.experimental."
                   f"service: a dispatcher and workers on other machines): this host's pipeline delivers "
                   f"{result['input_examples_per_sec']:.0f} examples/s")
    if kind != "input-bound":
        out.append(f"more replicas help: this host's input could feed {result['input_to_training_ratio']:.1f}x the "
                   "current training rate")
    if result.get("verdict_note"):
        out.append("the step waits for cores, not data: stop other work on this host, or cap the pipeline's threads "
                   "(tf.data.Options().threading.private_threadpool_size in datasets()), and measure again")
    if result["training_step_ms"] < SHORT_STEP_MS:
        out.append(f"steps are short ({result['training_step_ms']:.1f} ms): a larger per-replica batch (now "
                   f"{exp.plan.per_replica_batch_size}; --global_batch_size) or --steps_per_execution=N cuts the "
                   "per-step overhead")
    return out


def write_json(path: str, value: Dict):
    """`value` as JSON at `path`, atomically (a temp file in the same directory, then os.replace)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".tmp-", suffix=".json", delete=False) as f:
        json.dump(value, f, indent=2, default=float)
    os.replace(f.name, path)
