"""dtf.distribute.inputs: sharding touches every example exactly once, the order is a function of (seed, epoch),
evaluation keeps every example, and batch-size mistakes are one-line UserErrors.

In-process tests stand in a `PipelineStrategy` for a strategy with several input pipelines. The real checks run one
probe script under MirroredStrategy on 4 logical CPUs (its own process: logical devices must be set before TensorFlow
initializes) and under 2 real worker processes.
"""
import collections
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from dtf import datasets
from dtf.distribute import inputs as data
from dtf.base.errors import UserError
from helpers import (EVAL_FILE_LENGTHS, EVAL_RECORDS, GLOBAL_BATCH, STREAM_PASS_STEPS, TRAIN_IDS, WEIGHTS,
                     PipelineStrategy, parse_id, with_id, write_id_files)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def batches(dataset, count):
    it = iter(dataset)
    return [next(it)[1].numpy().tolist() for _ in range(count)]


def flat(nested):
    return [x for step in nested for part in step for x in part]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tfds"))
    datasets.load("shapes", "train", directory)
    return directory


# --- validation ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("global_batch, replicas, numbers", [(30, 4, ["30", "4", "28", "32"]), (2, 4, ["2", "4"])])
def test_global_batch_must_split_over_replicas(global_batch, replicas, numbers):
    with pytest.raises(UserError) as e:
        data.distribute_dataset(PipelineStrategy(1, replicas), tf.data.Dataset.range(64), global_batch)
    message = str(e.value)
    assert "\n" not in message and "global_batch_size" in message and "--" not in message
    assert "--global_batch_size" in e.value.as_flags()
    assert all(n in message for n in numbers), message


def test_training_data_smaller_than_one_global_batch():
    with pytest.raises(UserError, match=r"has 10 examples, fewer than one global batch \(global_batch_size=16\); "
                                        r"lower global_batch_size to at most 8") as e:
        data.distribute_dataset(PipelineStrategy(1, 4), tf.data.Dataset.range(10), 16)
    assert "(--global_batch_size=16); lower --global_batch_size to at most 8" in e.value.as_flags()


def test_zero_steps_when_a_pipeline_cannot_fill_one_step(tmp_path):
    # 12 examples >= one global batch of 8, but pipeline 1's file holds 2 while a step takes 8 / 2 = 4 from each.
    files = write_id_files(str(tmp_path / "uneven"), [10, 2])
    with pytest.raises(UserError) as e:
        data.distribute_dataset(PipelineStrategy(2, 2), files, 8, preprocess=parse_id)
    message = str(e.value)
    assert "\n" not in message and message.startswith("0 training steps per epoch")
    assert "pipeline 1 of 2 gets 2 examples" in message and "takes 4" in message
    assert "global_batch_size=8" in message and "global_batch_size to at most 4" in message
    assert "(--global_batch_size=8); lower --global_batch_size to at most 4" in e.value.as_flags()


def test_evaluation_of_nothing_and_bad_options():
    with pytest.raises(UserError, match="0 examples"):
        data.distribute_dataset(PipelineStrategy(1, 1), tf.data.Dataset.range(0), 4, training=False)
    with pytest.raises(UserError, match="initial_step=5 is past the end of an epoch of 5 steps"):
        data.distribute_dataset(PipelineStrategy(1, 1), tf.data.Dataset.range(20), 4, initial_step=5)
    with pytest.raises(UserError, match="split/data_dir apply to dataset names"):
        data.distribute_dataset(PipelineStrategy(1, 1), tf.data.Dataset.range(20), 4, split="train")
    with pytest.raises(UserError, match="cannot read input from a int"):
        data.distribute_dataset(PipelineStrategy(1, 1), 3, 4)


# --- order -----------------------------------------------------------------------------------------------------------

def source():
    return tf.data.Dataset.range(40).map(with_id)


def test_order_is_a_function_of_seed_and_epoch():
    def epochs(seed, count=3, **kwargs):
        d = data.distribute_dataset(PipelineStrategy(1, 1), source(), 8, seed=seed, **kwargs)
        it = batches(d.dataset[0], count * d.steps_per_epoch)
        return [it[e * d.steps_per_epoch:(e + 1) * d.steps_per_epoch] for e in range(count)]

    first = epochs(seed=3)
    tf.random.set_seed(1234)  # the process-wide seed does not enter the order
    assert epochs(seed=3) == first
    assert all(sorted(flat([e])) == list(range(40)) for e in first)
    assert first[0] != first[1] != first[2]
    assert epochs(seed=4)[0] != first[0]
    assert epochs(seed=3, count=2, initial_epoch=1) == first[1:]
    resumed = epochs(seed=3, count=1, initial_epoch=1, initial_step=2)[0]
    assert resumed[:3] == first[1][2:]


def test_the_next_epoch_is_started_while_this_one_is_read():
    # An epoch begins by filling its shuffle buffer; started only when the previous epoch ends, that stalled training
    # at every epoch boundary. The order must stay exactly flat_map's.
    produced = tf.Variable([0, 0, 0], dtype=tf.int64)

    def epoch(e):
        def counted(i):
            with tf.control_dependencies([produced.scatter_nd_add(tf.reshape(e, [1, 1]), tf.ones([1], tf.int64))]):
                return i + 10 * e

        return tf.data.Dataset.range(5).map(counted)

    chained = data._one_after_another(tf.data.Dataset.range(3), epoch, ready=2)
    it = iter(chained)
    first = [int(next(it))]
    deadline = time.monotonic() + 10
    while int(produced[1].numpy()) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert int(produced[1].numpy()) >= 1, "epoch 1 was not started while epoch 0 was read"
    assert first + [int(x) for x in it] == [int(x) for x in tf.data.Dataset.range(3).flat_map(
        lambda e: tf.data.Dataset.range(5).map(lambda i: i + 10 * e))]


def test_pipelines_split_every_epoch_disjointly_by_files_and_by_records(id_files):
    cases = {"files": id_files["train"], "records": tf.data.Dataset.range(TRAIN_IDS)}
    for sharding, src in cases.items():
        d = data.distribute_dataset(PipelineStrategy(2, 4), src, GLOBAL_BATCH, seed=5,
                                    preprocess=parse_id if sharding == "files" else with_id)
        assert (d.sharding, d.steps_per_epoch, d.per_replica_batch_size) == (sharding, 6, 4)
        per_pipeline = [batches(ds, 2 * 2 * d.steps_per_epoch) for ds in d.dataset]  # 2 epochs, 2 replicas each
        for epoch in range(2):
            seen = [i for p in per_pipeline for b in p[epoch * 12:(epoch + 1) * 12] for i in b]
            assert sorted(seen) == list(range(TRAIN_IDS)), (sharding, epoch)
        assert per_pipeline[0][:12] != per_pipeline[0][12:]


def test_records_sharding_hint_is_said_once_a_run_by_the_chief(monkeypatch, capfd):
    """One under-sharded split read by 4 pipelines, for training and evaluation: one line, from pipeline 0 only."""
    monkeypatch.setattr(data, "_said_shard_hint", False)
    split = datasets.from_dataset(tf.data.Dataset.range(64).map(with_id))
    for training in (True, False):
        data.distribute_dataset(PipelineStrategy(4, 4), split, GLOBAL_BATCH, training=training)
    err = capfd.readouterr().err
    assert err.count("store it in at least 4 files") == 1, err


def test_evaluation_keeps_every_example_once(id_files):
    d = data.distribute_dataset(PipelineStrategy(2, 2), id_files["eval"], GLOBAL_BATCH, training=False,
                                preprocess=parse_id)
    per_pipeline = [[b[1].numpy().tolist() for b in ds] for ds in d.dataset]
    assert [len(p) for p in per_pipeline] == [7, 5]  # 50 and 40 examples in batches of 8
    assert d.steps_per_epoch == 7  # the larger share decides; ceil(90 / 16) = 6 would drop examples
    assert sorted(i for p in per_pipeline for b in p for i in b) == list(range(90))
    assert int(d.dataset[0].cardinality()) == tf.data.UNKNOWN_CARDINALITY


def test_options_dtf_shards_itself_and_order_can_be_relaxed():
    d = data.distribute_dataset(PipelineStrategy(1, 1), source(), 8, deterministic=False)
    options = d.dataset[0].options()
    assert options.experimental_distribute.auto_shard_policy == tf.data.experimental.AutoShardPolicy.OFF
    assert options.deterministic is False


def test_share_sizes_and_shorter_epochs(id_files):
    split = datasets.from_tfrecord_files(id_files["eval"])
    assert data.share_sizes(split, 1) == ("none", [90])
    assert data.share_sizes(split, 2) == ("files", [50, 40])
    assert data.share_sizes(split, 16) == ("records", [6] * 10 + [5] * 6)
    d = data.distribute_dataset(PipelineStrategy(1, 1), source(), 8, steps_per_epoch=2, epoch_mode="pass")
    first, second = [batches(d.dataset[0], 4)[i:i + 2] for i in (0, 2)]
    assert (d.steps_per_epoch, d.epoch_mode) == (2, "pass") and first != second
    assert set(flat([first])) & set(flat([second])), "each pass-mode epoch is a fresh pass (ids may repeat)"
    with pytest.raises(UserError, match="^steps_per_epoch=6 is more than one pass over the data \\(5 steps\\); with "
                                        "epoch_mode=pass an epoch is at most one pass") as e:
        data.distribute_dataset(PipelineStrategy(1, 1), source(), 8, steps_per_epoch=6, epoch_mode="pass")
    assert "lower --steps_per_epoch, or use --epoch_mode=stream" in e.value.as_flags()


@pytest.mark.parametrize("steps_per_epoch", [2, 3, 7])
def test_streaming_epochs_are_windows_of_one_stream_of_exact_passes(steps_per_epoch):
    """Epochs of 2, 3 and 7 steps over a 5-step pass read one stream: pass p is the shuffle of (seed, p), every id
    once per pass, whatever the epoch length; a resume at any (epoch, step) continues that stream exactly."""
    whole = data.distribute_dataset(PipelineStrategy(1, 1), source(), 8, seed=3)
    assert (whole.steps_per_epoch, whole.epoch_mode, whole.steps_per_pass) == (5, "pass", 5)
    stream = batches(whole.dataset[0], 20)
    assert all(sorted(flat([stream[p * 5:(p + 1) * 5]])) == list(range(40)) for p in range(4))
    assert stream[:5] != stream[5:10]
    d = data.distribute_dataset(PipelineStrategy(1, 1), source(), 8, seed=3, steps_per_epoch=steps_per_epoch)
    assert (d.steps_per_epoch, d.epoch_mode, d.steps_per_pass) == (steps_per_epoch, "stream", 5)
    assert batches(d.dataset[0], 20) == stream
    for epoch, step in [(1, 0), (1, 1), (2, steps_per_epoch - 1)]:
        position = epoch * steps_per_epoch + step
        resumed = data.distribute_dataset(PipelineStrategy(1, 1), source(), 8, seed=3, steps_per_epoch=steps_per_epoch,
                                          initial_epoch=epoch, initial_step=step)
        assert batches(resumed.dataset[0], 20 - position) == stream[position:], (epoch, step)


def test_stream_and_pass_epochs_are_the_same_at_one_pass_and_a_mode_is_named():
    one_pass = [data.distribute_dataset(PipelineStrategy(2, 4), tf.data.Dataset.range(TRAIN_IDS).map(with_id),
                                        GLOBAL_BATCH, seed=5, epoch_mode=mode) for mode in ("stream", "pass")]
    assert [d.epoch_mode for d in one_pass] == ["stream", "pass"]
    assert [batches(ds, 24) for ds in one_pass[0].dataset] == [batches(ds, 24) for ds in one_pass[1].dataset]
    with pytest.raises(UserError, match="^epoch_mode='window' is not valid; choose one of: auto, stream, pass$"):
        data.distribute_dataset(PipelineStrategy(1, 1), source(), 8, epoch_mode="window")


def test_function_source_shards_itself_and_sizes_are_counted():
    def per_pipeline(ctx):
        return tf.data.Dataset.range(30).shard(ctx.num_input_pipelines, ctx.input_pipeline_id).map(with_id)

    d = data.distribute_dataset(PipelineStrategy(2, 2), per_pipeline, 4)
    assert (d.sharding, d.num_examples, d.steps_per_epoch) == ("function", 30, 7)


def test_cache_is_filled_once_and_then_serves_every_epoch():
    reads = tf.Variable(0, dtype=tf.int64)

    def counted(i):
        reads.assign_add(1)
        return with_id(i)

    src = tf.data.Dataset.range(20).map(counted)
    d = data.distribute_dataset(PipelineStrategy(1, 1), src, 8, cache=True, shuffle_buffer=4)
    assert int(reads.numpy()) == 20  # filled when built
    epochs = batches(d.dataset[0], 3 * d.steps_per_epoch)
    assert int(reads.numpy()) == 20
    assert all(len(set(sum(epochs[e * 2:e * 2 + 2], []))) == 16 for e in range(3))


# --- real strategies -------------------------------------------------------------------------------------------------

PROBE = r'''
import hashlib, json, os, sys
import numpy as np
import dtf
strategy = dtf.create_strategy("multi_worker" if os.environ.get("TF_CONFIG") else "mirrored",
                               num_cpu_devices=None if os.environ.get("TF_CONFIG") else 4)
import keras
import tensorflow as tf
from dtf.distribute import inputs as data
sys.path.insert(0, os.environ["PROBE_TESTS"])
from helpers import EVAL_RECORDS, GLOBAL_BATCH, SHAPES_BATCH, STREAM_PASS_STEPS, WEIGHTS, parse_id, with_id

spec = json.loads(os.environ["PROBE_SPEC"])


def local(value):
    return strategy.experimental_local_results(value)


def ids(batch):
    return [t.numpy().tolist() for t in local(batch[1])]


def hashes(batch):
    return [[hashlib.md5(image.tobytes()).hexdigest() for image in t.numpy()] for t in local(batch[0])]


def run(d, key, epochs=1, evaluation=False):
    """What every local replica got at each step; for evaluation, also whether the data ended after the steps."""
    it = iter(d.dataset)
    result = {"steps": [key(next(it)) for _ in range(epochs * d.steps_per_epoch)],
              "steps_per_epoch": d.steps_per_epoch, "sharding": d.sharding}
    if evaluation:
        try:
            next(it)
            result["exhausted"] = False
        except (StopIteration, tf.errors.OutOfRangeError):
            result["exhausted"] = True
    return result


records = lambda n: tf.data.Dataset.range(n).map(with_id)
out = {"replicas": strategy.num_replicas_in_sync}
out["train_records"] = run(data.distribute_dataset(strategy, records(96), GLOBAL_BATCH, seed=5), ids, epochs=2)
out["train_files"] = run(data.distribute_dataset(strategy, spec["train"], GLOBAL_BATCH, seed=5, preprocess=parse_id),
                         ids, epochs=2)
out["resumed_files"] = run(data.distribute_dataset(strategy, spec["train"], GLOBAL_BATCH, seed=5, preprocess=parse_id,
                                                   initial_epoch=1, initial_step=2), ids)
# 30-step epochs streamed over 62-step passes: 5 epochs, then a resume in the middle of the second pass (step 70).
out["stream"] = run(data.distribute_dataset(strategy, records(STREAM_PASS_STEPS * GLOBAL_BATCH), GLOBAL_BATCH, seed=5,
                                            steps_per_epoch=30), ids, epochs=5)
out["stream_resumed"] = run(data.distribute_dataset(strategy, records(STREAM_PASS_STEPS * GLOBAL_BATCH), GLOBAL_BATCH,
                                                    seed=5, steps_per_epoch=30, initial_epoch=2, initial_step=10), ids)
out["eval_records"] = run(data.distribute_dataset(strategy, records(EVAL_RECORDS), GLOBAL_BATCH, training=False),
                         ids, evaluation=True)
out["eval_files"] = run(data.distribute_dataset(strategy, spec["eval"], GLOBAL_BATCH, training=False,
                                                preprocess=parse_id), ids, evaluation=True)
out["shapes_train"] = run(data.distribute_dataset(strategy, "shapes", SHAPES_BATCH, data_dir=spec["data_dir"]), hashes)
out["shapes_slice"] = run(data.distribute_dataset(strategy, "shapes", SHAPES_BATCH, data_dir=spec["data_dir"],
                                                  split="train[:10%]"), hashes)
out["shapes_test"] = run(data.distribute_dataset(strategy, "shapes", SHAPES_BATCH, data_dir=spec["data_dir"],
                                                 split="test", training=False), hashes, evaluation=True)

# Keras on the same pipelines: metrics over every example (partial and empty batches included) and a short fit.
def labelled(x, i):
    return x, i % 3

with strategy.scope():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
model.set_weights([WEIGHTS, np.zeros(3, np.float32)])
for name, src, kwargs in [("keras_eval_files", spec["eval"], {"preprocess": lambda s: labelled(*parse_id(s))}),
                          ("keras_eval_records", records(EVAL_RECORDS), {"preprocess": labelled})]:
    d = data.distribute_dataset(strategy, src, GLOBAL_BATCH, training=False, **kwargs)
    out[name] = model.evaluate(d.dataset, steps=d.steps_per_epoch, verbose=0, return_dict=True)
train = data.distribute_dataset(strategy, records(96), GLOBAL_BATCH, preprocess=labelled)
history = model.fit(train.dataset, steps_per_epoch=train.steps_per_epoch, epochs=2, verbose=0)
out["fit_loss"] = history.history["loss"]
with open(os.path.join(OUT, f"probe_{TASK}.json"), "w") as f:
    json.dump(out, f)
'''


def probe_env(id_files, data_dir):
    spec = {"train": id_files["train"], "eval": id_files["eval"], "data_dir": data_dir}
    return {"PROBE_SPEC": json.dumps(spec), "PROBE_TESTS": os.path.dirname(os.path.abspath(__file__))}


def reference_metrics(num_examples):
    """Loss and accuracy of the fixed Dense(3) on ids 0..num_examples-1, computed by numpy on one device."""
    i = np.arange(num_examples)
    x = np.sin(i[:, None].astype(np.float32) * np.array([1.0, 2.0, 3.0, 4.0], np.float32))
    logits = x @ WEIGHTS
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    labels = i % 3
    return {"loss": float(-log_softmax[i, labels].mean()), "accuracy": float((logits.argmax(1) == labels).mean())}


def shape_hashes(data_dir, split):
    images = datasets.load("shapes", split, data_dir).dataset.batch(1000)
    return collections.Counter(hashlib.md5(im.tobytes()).hexdigest() for b in images for im in b[0].numpy())


def merged(results, key):
    """Per step, the union over workers of what their replicas got."""
    steps = [r[key]["steps"] for r in results]
    assert len({len(s) for s in steps}) == 1, f"{key}: workers ran different step counts"
    return [[part for worker_step in step for part in worker_step] for step in zip(*steps)]


def check_probe(results, num_replicas, shapes_dir):
    assert results[0]["replicas"] == num_replicas
    train_ids = list(range(TRAIN_IDS))
    for key in ("train_records", "train_files"):
        steps = merged(results, key)
        per_epoch = results[0][key]["steps_per_epoch"]
        assert per_epoch == TRAIN_IDS // GLOBAL_BATCH
        epochs = [steps[:per_epoch], steps[per_epoch:]]
        assert [sorted(flat(e)) for e in epochs] == [train_ids, train_ids], key
        assert flat(epochs[0]) != flat(epochs[1]), f"{key}: epoch 1 repeats epoch 0's order"
        assert all(len(part) == GLOBAL_BATCH // num_replicas for step in steps for part in step)
    resumed = merged(results, "resumed_files")
    assert resumed[:4] == merged(results, "train_files")[6 + 2:], "resume at epoch 1 step 2 differs"
    stream, passes = merged(results, "stream"), STREAM_PASS_STEPS
    assert len(stream) == 150 and results[0]["stream"]["steps_per_epoch"] == 30
    for p in range(2):
        assert sorted(flat(stream[p * passes:(p + 1) * passes])) == list(range(passes * GLOBAL_BATCH)), f"pass {p}"
    assert flat(stream[:passes]) != flat(stream[passes:2 * passes])
    assert merged(results, "stream_resumed") == stream[70:100], "the resumed stream differs from the uninterrupted"
    for key, size in (("eval_records", EVAL_RECORDS), ("eval_files", sum(EVAL_FILE_LENGTHS))):
        assert sorted(flat(merged(results, key))) == list(range(size)), key
        assert all(r[key]["exhausted"] for r in results), f"{key}: data left after steps_per_epoch"
    expected_train = shape_hashes(shapes_dir, "train")
    assert collections.Counter(flat(merged(results, "shapes_train"))) == expected_train
    slice_seen = collections.Counter(flat(merged(results, "shapes_slice")))
    assert sum(slice_seen.values()) == 800 and max(slice_seen.values()) == 1
    assert set(slice_seen) <= set(expected_train)
    assert collections.Counter(flat(merged(results, "shapes_test"))) == shape_hashes(shapes_dir, "test")
    for key, size in (("keras_eval_files", sum(EVAL_FILE_LENGTHS)), ("keras_eval_records", EVAL_RECORDS)):
        for metric, value in reference_metrics(size).items():
            got = [r[key][metric] for r in results]
            assert got == pytest.approx([value] * len(results), abs=1e-5), (key, metric)
    assert all(np.isfinite(r["fit_loss"]).all() for r in results)


@pytest.mark.slow
def test_mirrored_four_replicas_exactly_once(tmp_path, id_files, shapes_dir):
    script = tmp_path / "probe.py"
    script.write_text(f"OUT = {str(tmp_path)!r}\nTASK = 0\n" + PROBE)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **probe_env(id_files, shapes_dir))
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads((tmp_path / "probe_0.json").read_text())
    assert result["shapes_train"]["sharding"] == "none"
    check_probe([result], 4, shapes_dir)


@pytest.mark.slow
def test_two_workers_exactly_once_and_agree_on_the_order(run_workers, tmp_path, id_files, shapes_dir):
    # The workers build shapes themselves, at the same time, into an empty data_dir: one builds while the other waits,
    # and the result is the same data as the parent process's own build (shapes_dir).
    run_workers(PROBE, 2, env=probe_env(id_files, str(tmp_path / "fresh_data_dir")))
    results = [json.loads((tmp_path / f"probe_{i}.json").read_text()) for i in range(2)]
    assert [r["shapes_train"]["sharding"] for r in results] == ["files", "files"]
    assert [r["shapes_slice"]["sharding"] for r in results] == ["records", "records"]  # 1 shard for 2 pipelines
    assert results[0]["eval_files"]["steps_per_epoch"] == 7
    check_probe(results, 2, shapes_dir)
    # Each worker read exactly what the in-process simulation of its pipeline reads: the order is agreed, not random.
    simulated = data.distribute_dataset(PipelineStrategy(2, 2), id_files["train"], GLOBAL_BATCH, seed=5,
                                        preprocess=parse_id)
    for worker, ds in enumerate(simulated.dataset):
        assert [step[0] for step in results[worker]["train_files"]["steps"]] == batches(ds, 12)
