"""Per-replica input pipelines: `distribute_dataset` turns a source into what `model.fit`/`evaluate` consume.

Built on `strategy.distribute_datasets_from_function`: one input pipeline per worker, each feeding that worker's
replicas batches of `global_batch_size / num_replicas`. A pipeline reads a disjoint share of the source: whole shard
files when there are at least as many shards as pipelines, else all records keeping every n-th (correct, but every
pipeline reads everything; tensorflow/datasets#2133 is the TFDS face of this). The shares are a fixed function of the
file list, so they are disjoint whatever the seed.

Training reads a stream of passes. A pass is the share shuffled by a seed derived from (seed, pass number), whatever
TensorFlow's global seed, and cut to the same number of steps on every pipeline (the smallest share decides), so
every example is seen once per pass and passes stay aligned across pipelines even when shares differ in size. What an
epoch is (`epoch_mode`, see `resolve_epoch_mode`): "stream", the epoch's `steps_per_epoch` steps of that one
continuous stream (epoch e is global steps [e·S, (e+1)·S), any S: short epochs read only what they train on); or
"pass", every epoch a fresh pass cut at `steps_per_epoch` (at most one pass). With one-pass epochs the two are the
same. The order is a function of the global step, so a job restarted at `initial_epoch=e, initial_step=k` sees exactly
the batches an uninterrupted run would have. The next pass's pipeline starts while the current one trains: its
shuffle buffer fills in the background instead of stalling the step that starts a pass (so two are held at a time).

Evaluation keeps every example once: no shuffle, no repeat, the last partial batch kept. Replicas whose pipeline has
run out get empty batches (TensorFlow's partial-batch handling); Keras weighs loss and metrics by batch size, so
metrics equal the single-device ones (checked under mirrored and 2 workers in tests/test_data.py).

With a tf.data service (`data_service`, see dtf.cluster.data_service), training batches are produced by the service in
the same order and counts; evaluation stays local (exact, and small).

Elastic resume (`Carry`): a run resumed on another number of input pipelines (workers) or replicas at the same global
batch. With `sharding="batch"` nothing changes: the global batch sequence does not depend on the layout. With shares
("none", "files", "records") a pass depends on the layout, so the rest of the interrupted pass is rebuilt from the old
layout's shares (each shuffled as that layout shuffled it, minus the steps it trained) and dealt out to the new
pipelines: every example of that pass not yet trained on is trained on exactly once, in other batches than the old
layout would have formed; the passes after it are whole passes of the new layout.
"""
import dataclasses
import math
import warnings
from typing import Callable, List, Optional, Sequence, Tuple, Union

import tensorflow as tf

from dtf import datasets
from dtf.base.errors import UserError
from dtf.base.logs import get_logger
from dtf.config.batch_plan import BatchPlan
from dtf.config.choices import EPOCH_MODES, SHARDINGS
from dtf.datasets import DatasetSplit
from dtf.datasets.split import count_examples
from dtf.upstream import tensorflow as tf_upstream

log = get_logger(__name__)
# register_dataset, traced inside the pass function, reads the options TF now keeps in the graph; nothing is lost.
warnings.filterwarnings("ignore", message="To make it possible to preserve tf.data options across serialization")

DEFAULT_SEED = 0
DEFAULT_SHUFFLE_BUFFER = 10_000
# Pass seeds are seed * SEED_STRIDE + pass: distinct for any run shorter than this many passes.
SEED_STRIDE = 1_000_003
GRAPH_SEED = 87654321  # any fixed non-zero value (TF treats a (0, 0) seed pair as "random")
BATCH = ("global_batch_size",)  # the argument the batch messages name (the CLI shows it as --global_batch_size)

Source = Union[str, DatasetSplit, tf.data.Dataset, Sequence[str],
               Callable[[tf.distribute.InputContext], tf.data.Dataset]]


@dataclasses.dataclass(frozen=True)
class DistributedData:
    """What the runner needs: the dataset for `fit`/`evaluate` and the numbers to drive them.

    Training: `fit(dataset, steps_per_epoch=steps_per_epoch, initial_epoch=...)`; the dataset repeats forever.
    Evaluation: `evaluate(dataset, steps=steps_per_epoch)`: ceil(num_examples / global_batch_size) when the shares are
    balanced, more when a worker's files hold more than its part (the other workers then get empty batches).
    """

    dataset: tf.distribute.DistributedDataset
    num_examples: int
    steps_per_epoch: int
    global_batch_size: int
    per_replica_batch_size: int
    sharding: str  # how pipelines split the source: "none" (one pipeline), "files", "records", or "function"
    epoch_mode: Optional[str] = None  # training: "stream" or "pass" (see resolve_epoch_mode)
    steps_per_pass: Optional[int] = None  # training: steps in one pass over the smallest share
    input_shape: Optional[Tuple[int, ...]] = None
    num_classes: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a pass is made of on one layout: its input pipelines, replicas and sharding, and the steps read of each
    pass (a pass's steps, or an epoch's when "pass" epochs cut passes). Recorded with every backup."""

    pipelines: int
    replicas: int
    sharding: str  # "batch", "none", "files", "records" or "function"
    steps_read: int  # steps read of each pass

    def same_passes(self, other: "Layout") -> bool:
        """Whether passes hold the same examples in the same batches (then a resume needs no `Carry`)."""
        if self.sharding == other.sharding == "batch":
            return self.steps_read == other.steps_read
        return (self.pipelines, self.sharding, self.steps_read) == (other.pipelines, other.sharding, other.steps_read)


@dataclasses.dataclass(frozen=True)
class Carry:
    """The rest of pass `pass_number` after a layout change at global step `step`: the steps `skip`.. of the old
    layout's pass (`old`), `steps` global batches in any layout, followed by the new layout's passes from
    `pass_number + 1`. The order of the rest is a function of the old layout alone, so a second change inside it keeps
    it."""

    step: int
    pass_number: int
    skip: int
    steps: int
    old: Layout

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, record: dict) -> "Carry":
        return cls(**{**record, "old": Layout(**record["old"])})


@dataclasses.dataclass(frozen=True)
class _Share:
    """One input pipeline's part of the source, and the sizes of every pipeline's part (all workers compute the same
    sizes, so they agree on the number of steps)."""

    sharding: str
    sizes: List[int]
    dataset: tf.data.Dataset


def check_global_batch(global_batch_size: int, num_replicas: int) -> int:
    """The per-replica batch size, or a UserError when the global batch cannot be split evenly over the replicas
    (`dtf.config.batch_plan.BatchPlan` is the one place that rule lives)."""
    return BatchPlan(global_batch_size=global_batch_size, num_replicas=num_replicas).per_replica_batch_size


def training_steps(sizes: Sequence[int], global_batch_size: int, num_replicas: int) -> int:
    """Steps per epoch when every pipeline must supply its replicas' full batches: the smallest share decides."""
    per_replica = check_global_batch(global_batch_size, num_replicas)
    per_pipeline = per_replica * (num_replicas // len(sizes))
    total = sum(sizes)
    if total < global_batch_size:
        raise UserError(f"the training data has {total} examples, fewer than one global batch (global_batch_size="
                        f"{global_batch_size}); lower global_batch_size to at most "
                        f"{_largest_batch(total, num_replicas)}", arguments=BATCH)
    steps = min(sizes) // per_pipeline
    if steps == 0:
        smallest = min(sizes)
        raise UserError(
            f"0 training steps per epoch: input pipeline {sizes.index(smallest)} of {len(sizes)} gets {smallest} "
            f"examples but one step takes {per_pipeline} from each pipeline (global_batch_size={global_batch_size}); "
            f"lower global_batch_size to at most {_largest_batch(smallest * len(sizes), num_replicas)} or split the "
            f"data into more even shards", arguments=BATCH)
    return steps


def evaluation_steps(sizes: Sequence[int], global_batch_size: int, num_replicas: int) -> int:
    """Steps that show every example once: the pipeline with the most batches decides; the others pad with empties."""
    per_replica = check_global_batch(global_batch_size, num_replicas)
    replicas_per_pipeline = num_replicas // len(sizes)
    if sum(sizes) == 0:
        raise UserError("the evaluation data has 0 examples; check the split name and the data_dir")
    return max(math.ceil(math.ceil(size / per_replica) / replicas_per_pipeline) for size in sizes)


def _largest_batch(examples: int, num_replicas: int) -> int:
    return max(examples // num_replicas * num_replicas, num_replicas)


def pass_seed(seed: int, number):
    """The shuffle seed of pass `number` (may be a tensor): the same on every worker, different every pass."""
    return tf.cast(seed, tf.int64) * SEED_STRIDE + tf.cast(number, tf.int64)


def resolve_epoch_mode(epoch_mode: str, steps_per_epoch: Optional[int], steps_per_pass: int) -> str:
    """"stream" or "pass", what `epoch_mode` ("auto", "stream", "pass") means for epochs of `steps_per_epoch` steps
    (None: one pass). auto streams unless an epoch is one pass: a shorter "pass" epoch still reads and shuffles the
    whole share and trains on a random subset of it (measured: 0.88 of a hand-written script at 30 of 62 steps)."""
    if epoch_mode not in EPOCH_MODES:
        raise UserError(f"epoch_mode={epoch_mode!r} is not valid; choose one of: {', '.join(EPOCH_MODES)}",
                        arguments=("epoch_mode",))
    if epoch_mode == "auto":
        return "pass" if steps_per_epoch in (None, steps_per_pass) else "stream"
    if epoch_mode == "pass" and steps_per_epoch is not None and steps_per_epoch > steps_per_pass:
        raise UserError(f"steps_per_epoch={steps_per_epoch} is more than one pass over the data ({steps_per_pass} "
                        f"steps); with epoch_mode=pass an epoch is at most one pass: lower steps_per_epoch, or use "
                        f"epoch_mode=stream", arguments=("steps_per_epoch", "epoch_mode"))
    return epoch_mode


def reading_mode(epoch_mode: str, steps_per_epoch: int, steps_per_pass: int, one_pass_epochs: bool = False) -> str:
    """How a run with `epoch_mode` epochs reads passes of `steps_per_pass` steps (after a resume on another layout,
    that pass length may not be the one the epochs were made for): "pass" epochs longer than the pass, or epochs that
    were one pass of the layout the run started on (`one_pass_epochs`) and differ from this one's, stream, every pass
    whole and each epoch keeping its steps."""
    if epoch_mode == "pass" and (steps_per_epoch > steps_per_pass
                                 or (one_pass_epochs and steps_per_epoch != steps_per_pass)):
        return "stream"
    return epoch_mode


def steps_read(epoch_mode: str, steps_per_epoch: int, steps_per_pass: int) -> int:
    """The steps read of each pass: all of it when streaming, an epoch's when each epoch is a pass (cut)."""
    return steps_per_epoch if epoch_mode == "pass" else steps_per_pass


def pass_position(step: int, steps_read_per_pass: int, carry: Optional[Carry] = None) -> Tuple[int, int, bool]:
    """(the pass global step `step` is in, its steps before `step`, whether that pass is `carry`'s rest of a pass).
    After a layout change (`carry`) passes are counted from its step. An epoch that is a (cut) pass reads as many steps
    of each pass as it has, so the same count serves both epoch modes."""
    if carry is None:
        return step // steps_read_per_pass, step % steps_read_per_pass, False
    if step < carry.step:
        raise ValueError(f"step {step} is before the layout change at step {carry.step}")
    if step < carry.step + carry.steps:
        return carry.pass_number, step - carry.step, True
    passes, skip = divmod(step - carry.step - carry.steps, steps_read_per_pass)
    return carry.pass_number + 1 + passes, skip, False


def stream_position(epoch_mode: str, steps_per_epoch: int, steps_per_pass: int, initial_epoch: int,
                    initial_step: int, carry: Optional[Carry] = None) -> Tuple[int, int, int, bool]:
    """(the steps read of each pass, the pass a run resumed at (initial_epoch, initial_step) starts in, the steps of
    it to skip, whether that pass is `carry`'s rest of a pass). Streaming, passes are read whole and epochs are windows
    of them; else each epoch is a pass, cut."""
    read = steps_read(epoch_mode, steps_per_epoch, steps_per_pass)
    return (read, *pass_position(initial_epoch * steps_per_epoch + initial_step, read, carry))


def _resolve(source: Source, split: Optional[str], data_dir: Optional[str], training: bool):
    """A DatasetSplit, or the user's function of InputContext (which shards by itself)."""
    if isinstance(source, str):
        return datasets.load(source, split or ("train" if training else "test"), data_dir)
    if split is not None or data_dir is not None:
        raise UserError("split/data_dir apply to dataset names only; this source is not a name")
    if isinstance(source, DatasetSplit):
        return source
    if isinstance(source, tf.data.Dataset):
        return datasets.from_dataset(source)
    if isinstance(source, (list, tuple)) and all(isinstance(f, str) for f in source):
        return datasets.from_tfrecord_files(source)
    if callable(source):
        return source
    raise UserError(f"cannot read input from a {type(source).__name__}; give a dataset name, a tf.data.Dataset, a list "
                    "of TFRecord files, or a function of tf.distribute.InputContext returning a tf.data.Dataset")


def share_sizes(split: DatasetSplit, num_pipelines: int) -> Tuple[str, List[int]]:
    """How `num_pipelines` input pipelines split `split` ("none", "files" or "records") and each one's examples.

    A runner can compute the exact steps per epoch before building anything: `training_steps(sizes, ...)` with one
    pipeline per worker."""
    if num_pipelines == 1:
        return "none", [split.num_examples]
    if split.num_shards >= num_pipelines:
        return "files", [sum(split.shard_lengths[i::num_pipelines]) for i in range(num_pipelines)]
    n = split.num_examples
    return "records", [n // num_pipelines + (i < n % num_pipelines) for i in range(num_pipelines)]


_said_shard_hint = False


def _share_data(source, sharding: str, ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    """Pipeline `ctx.input_pipeline_id`'s part of `source` under `sharding` (unshuffled)."""
    if sharding == "function":
        return source(ctx)
    if sharding in ("none", "batch"):
        return source.read(None)
    if sharding == "files":
        return source.read(ctx)
    return source.read(None).shard(ctx.num_input_pipelines, ctx.input_pipeline_id)


def _share(source, ctx: tf.distribute.InputContext) -> _Share:
    """This pipeline's part: by files when there are enough shards, else by records (with a warning)."""
    pipelines, index = ctx.num_input_pipelines, ctx.input_pipeline_id
    if not isinstance(source, DatasetSplit):
        contexts = [tf.distribute.InputContext(pipelines, i, ctx.num_replicas_in_sync) for i in range(pipelines)]
        return _Share("function", [count_examples(source(c)) for c in contexts], source(ctx))
    sharding, sizes = share_sizes(source, pipelines)
    if sharding != "records":
        return _Share(sharding, sizes, _share_data(source, sharding, ctx))
    global _said_shard_hint
    if index == 0 and not _said_shard_hint:  # the chief's pipeline, once a run: not per split, worker or epoch
        _said_shard_hint = True
        log.warning(f"{source.name} {source.split} is stored in {source.num_shards} shard(s) for {pipelines} input "
                    f"pipelines: sharding by records, so every pipeline reads all {source.num_examples} examples and "
                    f"keeps 1 in {pipelines}; store it in at least {pipelines} files to read less")
    return _Share(sharding, sizes, _share_data(source, sharding, ctx))


def _training_steps(share: _Share, global_batch_size: int, num_replicas: int, steps_per_epoch: Optional[int],
                    epoch_mode: str, initial_step: int, carry: Optional[Carry]) -> Tuple[int, int, str]:
    """(steps per epoch, steps per pass, the resolved epoch mode); the resume step must fall inside the epoch. After
    a layout change (`carry`) the mode is the run's, resolved on the layout it started on."""
    per_pass = training_steps(share.sizes, global_batch_size, num_replicas)
    if steps_per_epoch is not None and steps_per_epoch < 1:
        raise UserError(f"steps_per_epoch={steps_per_epoch} must be >= 1", arguments=("steps_per_epoch",))
    if carry is not None and epoch_mode in ("stream", "pass"):
        mode = reading_mode(epoch_mode, steps_per_epoch or per_pass, per_pass)
    else:
        mode = resolve_epoch_mode(epoch_mode, steps_per_epoch, per_pass)
    steps = steps_per_epoch or per_pass
    if initial_step >= steps:
        raise UserError(f"initial_step={initial_step} is past the end of an epoch of {steps} steps")
    return steps, per_pass, mode


def _evaluation_batches(data: tf.data.Dataset, per_replica: int, preprocess, preprocess_batch) -> tf.data.Dataset:
    """Every example once, in order, the last partial batch kept."""
    if preprocess is not None:
        data = data.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    # Workers may hold different numbers of batches; a known per-worker count would make Keras stop each
    # worker at its own count, leaving the others waiting in a collective. Unknown, all stop together.
    data = _map_batches(data.batch(per_replica, num_parallel_calls=tf.data.AUTOTUNE), preprocess_batch)
    return data.filter(lambda *_: True)


def _check_reading(shuffle_buffer: int, initial_epoch: int, initial_step: int, cache: bool, training: bool,
                   data_service):
    if shuffle_buffer < 1:
        raise UserError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}", arguments=("shuffle_buffer",))
    if initial_epoch < 0 or initial_step < 0:
        raise UserError(f"initial_epoch ({initial_epoch}) and initial_step ({initial_step}) must be >= 0")
    if data_service is not None and training and cache:
        raise UserError("--cache keeps examples in the training process, which --data_service does not read; "
                        "remove one of them", arguments=("cache", "data_service"))


def _options(deterministic: Optional[bool]) -> tf.data.Options:
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF  # dtf shards itself
    if deterministic is not None:
        options.deterministic = deterministic
    return options


def _log_input(data: DistributedData, share: _Share, num_replicas: int, training: bool, data_service):
    sharded = f"{len(share.sizes)} pipelines sharded by {share.sharding}" if len(share.sizes) > 1 else "1 pipeline"
    served = f", from the tf.data service {data_service.target}" if data_service is not None and training else ""
    steps = f"{data.steps_per_epoch} steps"
    if data.epoch_mode == "stream":
        steps += f" per epoch, streamed over passes of {data.steps_per_pass}"
    log.info(f"{'training' if training else 'evaluation'} input: {data.num_examples} examples, {sharded}, global batch "
             f"{data.global_batch_size} = {num_replicas} replica(s) x {data.per_replica_batch_size}, "
             f"{steps}{served}")


def distribute_dataset(strategy: tf.distribute.Strategy, source: Source, global_batch_size: int, *,
                       training: bool = True, seed: Optional[int] = None, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                       cache: bool = False, deterministic: Optional[bool] = None,
                       preprocess: Optional[Callable] = None, preprocess_batch: Optional[Callable] = None,
                       data_dir: Optional[str] = None, split: Optional[str] = None, initial_epoch: int = 0,
                       initial_step: int = 0, steps_per_epoch: Optional[int] = None, epoch_mode: str = "auto",
                       sharding: str = "auto", data_service=None, carry: Optional[Carry] = None) -> DistributedData:
    """Per-replica batches of `source` for `strategy`, one input pipeline per worker (see the module doc).

    Args:
      strategy: the strategy whose replicas get the batches.
      source: a dataset name (`dtf.datasets.load`), a `DatasetSplit`, an unbatched `tf.data.Dataset`, a list of
        TFRecord files (then `preprocess` parses the records), or a function of `tf.distribute.InputContext`
        returning that pipeline's unbatched share.
      global_batch_size: examples per step over all replicas; it must split evenly over them.
      training: True: shuffled batches, repeating forever in epochs of the returned `steps_per_epoch` steps (for
        `fit`); False: every example once, in order, the last partial batch kept (for `evaluate`).
      seed: the shuffle seed shared by all workers (None: DEFAULT_SEED, so restarts reproduce the order).
      shuffle_buffer: examples in the shuffle buffer (>= 1).
      cache: keep the decoded share in memory after the first epoch (not with `data_service`).
      deterministic: False lets tf.data reorder for speed, which gives up the reproducible order.
      preprocess: applied per example after the cache and the shuffle (augmentation belongs here).
      preprocess_batch: applied to every per-replica batch (the element structure, batched), for vectorized parsing
        or augmentation.
      data_dir: where a dataset name's files are (dataset names only).
      split: a dataset name's split (dataset names only); None: "train" for training, "test" for evaluation.
      initial_epoch: the epoch a resumed training job starts at.
      initial_step: the step of `initial_epoch` it starts at (skipped to, not replayed).
      steps_per_epoch: training epochs of this many steps instead of one pass.
      epoch_mode: what a training epoch is: "stream" (the next `steps_per_epoch` steps of the stream of passes),
        "pass" (a fresh pass cut at `steps_per_epoch`), or "auto" (stream unless an epoch is one pass); see
        `resolve_epoch_mode`.
      sharding: how training pipelines split a dataset: "auto" (by files when there are enough, else by records) or
        "batch": every pipeline reads the whole split in the one global order and keeps its slice of each global
        batch, so any number of replicas and workers trains on exactly the single-device batch sequence (the way to
        check equivalence, or to compare runs across cluster sizes), at the cost of every worker reading everything.
      data_service: a running tf.data service (see dtf.cluster.data_service) that produces the training batches, in
        the same order and counts; evaluation stays local.
      carry: after a resume on another layout, where the interrupted pass stands (see `Carry`; from
        dtf.experiment.elastic).

    Returns:
      The `DistributedData` for `fit` or `evaluate`: the dataset and its steps per epoch.
    """
    if sharding not in SHARDINGS:
        raise UserError(f"sharding={sharding!r} is not valid; choose one of: {', '.join(SHARDINGS)}",
                        arguments={"sharding": "input_sharding"})
    source = _resolve(source, split, data_dir, training)
    num_replicas = strategy.num_replicas_in_sync
    per_replica = check_global_batch(global_batch_size, num_replicas)
    _check_reading(shuffle_buffer, initial_epoch, initial_step, cache, training, data_service)
    if carry is not None and data_service is not None:
        raise UserError("a run resumed on another number of workers or replicas cannot read its interrupted pass "
                        "from a tf.data service; resume it without --data_service, or on its old layout "
                        f"({carry.old.pipelines} worker(s), {carry.old.replicas} replica(s))",
                        arguments=("data_service",))
    seed = DEFAULT_SEED if seed is None else seed
    options = _options(deterministic)
    by_batch = training and sharding == "batch" and isinstance(source, DatasetSplit)
    plans = []

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        share = _Share("batch", [source.num_examples], source.read(None)) if by_batch else _share(source, ctx)
        data = _filled_cache(share.dataset) if cache else share.dataset
        if training:
            steps, per_pass, mode = _training_steps(share, global_batch_size, num_replicas, steps_per_epoch,
                                                    epoch_mode, initial_step, carry)
            pass_steps, first_pass, skip, in_carry = stream_position(mode, steps, per_pass, initial_epoch,
                                                                     initial_step, carry)
            rest = None
            if in_carry:
                rest = _rest_of_pass(source, carry, ctx, per_replica, seed, shuffle_buffer, preprocess,
                                     preprocess_batch)
                first_pass += 1
            data = _training_batches(data, ctx, per_replica, pass_steps, seed, shuffle_buffer, preprocess,
                                     preprocess_batch, first_pass, skip, global_batch_size if by_batch else None,
                                     data_service, rest)
        else:
            steps, per_pass, mode = evaluation_steps(share.sizes, global_batch_size, num_replicas), None, None
            data = _evaluation_batches(data, per_replica, preprocess, preprocess_batch)
        plans.append((share, steps, per_pass, mode))
        return data.prefetch(tf.data.AUTOTUNE).with_options(options)

    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    share, steps, per_pass, mode = plans[0]
    data = DistributedData(dataset=dataset, num_examples=sum(share.sizes), steps_per_epoch=steps,
                           global_batch_size=global_batch_size, per_replica_batch_size=per_replica,
                           sharding=share.sharding, epoch_mode=mode, steps_per_pass=per_pass,
                           input_shape=getattr(source, "input_shape", None),
                           num_classes=getattr(source, "num_classes", None))
    _log_input(data, share, num_replicas, training, data_service)
    return data


def _map_batches(batches: tf.data.Dataset, fn: Optional[Callable]) -> tf.data.Dataset:
    """`fn` on every batch, given as one structure (a tuple, or a lone tensor such as serialized records)."""
    if fn is None:
        return batches
    return batches.map(lambda *batch: fn(batch if len(batch) > 1 else batch[0]), num_parallel_calls=tf.data.AUTOTUNE)


def _filled_cache(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` cached in memory and filled now, by one pass. Filled lazily, the cache would complete only if some
    epoch read the share to its end, which an epoch that stops after its last full batch does not always do."""
    cached = dataset.cache()
    cached.reduce(tf.constant(0), lambda count, _: count)
    return cached


def _one_after_another(inputs: tf.data.Dataset, make: Callable, ready: int) -> tf.data.Dataset:
    """`inputs.flat_map(make)` (the same elements in the same order), but the dataset of the next input is started
    while the current one is read, and keeps `ready` elements waiting. A pass starts by filling its shuffle buffer
    (the whole share when it fits): done in flat_map's turn, that stalled training 0.4-0.6 s at every pass boundary of
    the default experiment. The price: the next pass's shuffle buffer is held in memory too."""
    return tf_upstream.parallel_interleave(inputs, make, buffer_output_elements=ready, prefetch_input_elements=1)


def _shuffled(share: tf.data.Dataset, seed: int, buffer: int, p) -> tf.data.Dataset:
    """`share` in pass `p`'s order. Call it inside a traced dataset function: it sets only that function's graph-level
    seed, which TF pairs with the op seed, so the order depends on (seed, p) alone, not on whether or how the user set
    the process-wide seed."""
    tf.random.set_seed(GRAPH_SEED)
    return share.shuffle(buffer, seed=pass_seed(seed, p))


def _rest_of_pass(source, carry: Carry, ctx: tf.distribute.InputContext, per_replica: int, seed: int, buffer: int,
                  preprocess, preprocess_batch) -> tf.data.Dataset:
    """This pipeline's batches of the rest of `carry`'s pass: every old pipeline's share shuffled as the old layout
    shuffled it, its first `carry.skip` steps' examples dropped and cut where the old pass was, concatenated over the
    old pipelines; new pipeline j keeps every n-th example from the j-th, so global step t of the rest is examples
    [t·global batch, (t+1)·global batch) of it, whatever the new layout. Every old pipeline's share is read, for
    this pass only."""
    old = carry.old
    old_per_pipeline = ctx.num_replicas_in_sync * per_replica // old.pipelines  # what one old pipeline gave a step
    parts = []
    for i in range(old.pipelines):
        old_ctx = tf.distribute.InputContext(old.pipelines, i, old.replicas)
        parts.append(tf.data.Dataset.from_tensors(tf.constant(carry.pass_number, tf.int64)).flat_map(
            lambda p, share=_share_data(source, old.sharding, old_ctx): _shuffled(share, seed, buffer, p).skip(
                carry.skip * old_per_pipeline).take(carry.steps * old_per_pipeline)))
    rest = parts[0]
    for part in parts[1:]:
        rest = rest.concatenate(part)
    rest = rest.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
    if preprocess is not None:
        rest = rest.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    replicas = ctx.num_replicas_in_sync // ctx.num_input_pipelines
    rest = rest.batch(per_replica, drop_remainder=True).take(carry.steps * replicas)
    return _map_batches(rest, preprocess_batch)


def _training_batches(share: tf.data.Dataset, ctx: tf.distribute.InputContext, per_replica: int, steps: int,
                      seed: int, buffer: int, preprocess, preprocess_batch, first_pass: int, skip_steps: int,
                      slice_of_global: Optional[int] = None, service=None,
                      rest: Optional[tf.data.Dataset] = None) -> tf.data.Dataset:
    """Passes first_pass, first_pass + 1, ... of `steps` steps each (one batch per local replica per step), pass p
    the share shuffled by pass_seed(seed, p); the first `skip_steps` steps are skipped. With `slice_of_global` (the
    global batch), `share` is the whole split and this pipeline keeps its slice of each global batch. With `service`,
    each pass is produced there in `service.jobs` parts (see dtf.cluster.data_service for why that keeps the order).
    With `rest` (the rest of a pass begun on another layout, `_rest_of_pass`), it comes first, and is what
    `skip_steps` counts in."""
    replicas = ctx.num_replicas_in_sync // ctx.num_input_pipelines
    batches_per_pass = steps * replicas
    per_pipeline = per_replica * replicas
    first = ctx.input_pipeline_id * per_pipeline

    def my_slice(*batch):
        part = tuple(x[first:first + per_pipeline] for x in batch)
        return part if len(part) > 1 else part[0]

    @tf.autograph.experimental.do_not_convert  # plain Python branches; AutoGraph misreads this closure and warns
    def shuffled_pass(p, part=None):
        data = _shuffled(share, seed, buffer, p)
        if part is not None and not slice_of_global:  # a service part: the examples of batches part, part + jobs, ...
            data = data.take(batches_per_pass * per_replica).enumerate().filter(
                lambda i, _: i // per_replica % service.jobs == part).map(lambda _, example: example)
        if preprocess is not None:
            data = data.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
        if slice_of_global:
            data = data.batch(slice_of_global, drop_remainder=True).map(my_slice).unbatch()
        data = data.batch(per_replica, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE).take(batches_per_pass)
        if part is not None and slice_of_global:
            data = data.shard(service.jobs, part)
        return _map_batches(data, preprocess_batch)

    def served_pass(p):
        def served_part(k):
            part = tf.data.Dataset.from_tensors(k).flat_map(lambda k: shuffled_pass(p, k))  # one split: one worker
            dataset_id = tf.data.experimental.service.register_dataset(service.target, part)
            return tf.data.experimental.service.from_dataset_id(
                tf.data.experimental.service.ShardingPolicy.DYNAMIC, service.target, dataset_id, part.element_spec)

        return tf.data.Dataset.range(service.jobs).interleave(served_part, cycle_length=service.jobs, block_length=1)

    if service:  # the service's workers already run ahead
        passes = tf.data.Dataset.counter(first_pass).flat_map(served_pass)
    else:
        passes = _one_after_another(tf.data.Dataset.counter(first_pass), shuffled_pass, ready=replicas)
    if rest is not None:
        passes = rest.concatenate(passes)
    passes = passes.skip(skip_steps * replicas)
    # Infinite (not unknown) keeps TF from checking every step whether some worker ran out of data.
    return passes.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
