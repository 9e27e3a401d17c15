"""The typed experiment config: one frozen dataclass that `dtf.run` builds from flags and `dtf.tune` builds per trial.

Each field carries its flag's group, help text and constraints, so flags (`dtf.config.flags`), validation and the
resolved flagfile (`to_flagfile`) all come from this one list and cannot disagree.
"""
import dataclasses
import math
from typing import Optional, Tuple

from dtf.base.errors import UserError
from dtf.base.exitcodes import PREEMPTION_GRACE_S
from dtf.config import specs, target
from dtf.config.choices import (COMMUNICATIONS, CROSS_DEVICE_OPS, DEFAULT_CLUSTER_TIMEOUT_S, EPOCH_MODES,
                                LR_SCALING_RULES, OPTIMIZERS, SCHEDULES, SHARDINGS, STRATEGIES)

MAX_CPU_DEVICES = 256  # simulated replicas share one host's cores; more only makes TensorFlow stall at start-up


def _f(default, group, help, choices=None, lower=None, positive=False, flag=True):
    """A field with its flag's group, help and constraints; `flag=False`: set by dtf, not a flag of its own."""
    return dataclasses.field(default=default, metadata=dict(group=group, help=help, choices=choices, lower=lower,
                                                            positive=positive, flag=flag))


CLUSTER_RESOLVERS = ("tf_config", "slurm")
PROGRESS_MODES = ("auto", "bar", "epoch", "none")


@dataclasses.dataclass(frozen=True)
class Config:
    # --- strategy
    strategy: str = _f("auto", "strategy", "Distribution strategy; auto = multi_worker under a multi-worker "
                       "TF_CONFIG, mirrored with >1 GPU or --num_cpu_devices>1, else default.", STRATEGIES)
    num_cpu_devices: Optional[int] = _f(None, "strategy", "Split the CPU into this many logical devices so "
                                        "mirrored training runs on a laptop.", lower=1)
    num_gpus: Optional[int] = _f(None, "strategy", "GPUs for mirrored/one_device (default: all).", lower=0)
    communication: Optional[str] = _f(None, "strategy", "multi_worker collective implementation.", COMMUNICATIONS)
    cross_device_ops: Optional[str] = _f(None, "strategy", "mirrored all-reduce implementation.", CROSS_DEVICE_OPS)
    num_packs: int = _f(1, "strategy", "Gradient packs for nccl/hierarchical_copy all-reduce.", lower=1)
    cluster_timeout: float = _f(float(DEFAULT_CLUSTER_TIMEOUT_S), "strategy", "Seconds a worker waits for the others before failing.",
                                positive=True)
    # --- cluster
    worker_hosts: Optional[str] = _f(None, "cluster", "Comma-separated host:port of every worker (instead of "
                                     "TF_CONFIG); the first is the chief.")
    task_index: Optional[int] = _f(None, "cluster", "This process's index in --worker_hosts.", lower=0)
    cluster_resolver: str = _f("tf_config", "cluster", "Where the cluster comes from: TF_CONFIG (or "
                               "--worker_hosts), or Slurm's environment.", CLUSTER_RESOLVERS)
    # --- task
    task: Optional[str] = _f(None, "task", "Your own task: package.module:Attr or path/to/file.py:Attr, a dtf.Task "
                             "subclass (its module's flags become flags too). Default: the built-in image "
                             "classification task, configured by --dataset and --model.")
    task_flags: Tuple[str, ...] = _f((), "task", "The task module's own flags, resolved (--name=value).", flag=False)
    dataset: Optional[str] = _f(None, "task", "Built-in task's dataset (default shapes): shapes[/28x28x1|/32x32x3], "
                                "digits, synthetic[/HxWxC], folder:/path, or a TFDS name prepared in --data_dir.")
    model: Optional[str] = _f(None, "task", "Built-in task's model (default cnn): mlp, cnn, resnet20, or a "
                              "keras.applications name (weights=None).")
    # --- data
    data_dir: Optional[str] = _f(None, "data", "TFDS data_dir (default $DTF_DATA_DIR or ~/tensorflow_datasets).")
    global_batch_size: Optional[int] = _f(None, "data", "Global batch (all replicas); the truth everything else "
                                          "derives from. Default 64 when neither batch flag is given.", positive=True)
    per_replica_batch_size: Optional[int] = _f(None, "data", "Per-replica batch, instead of --global_batch_size.",
                                               positive=True)
    input_sharding: str = _f("auto", "data", "How workers split the training data: auto (by files when there are "
                             "enough, else by records), or batch (every worker reads all of it and keeps its slice of "
                             "each global batch: the single-device batch sequence for any cluster size).",
                             SHARDINGS)
    shuffle_buffer: int = _f(10_000, "data", "Shuffle buffer (examples); the next pass's fills while this one "
                             "trains, so two are held.", positive=True)
    cache: bool = _f(False, "data", "Cache decoded examples in memory after the first epoch.")
    deterministic: bool = _f(True, "data", "Fixed element order in tf.data (needed for reproducible runs).")
    data_service: Optional[str] = _f(None, "data", "Produce training batches in a tf.data service: grpc://HOST:PORT "
                                     "of a running dispatcher, or local:N to start a dispatcher and N workers for "
                                     "this run. Same batches, same order; evaluation stays local.")
    # --- optimization
    optimizer: str = _f("sgd", "optimization", "Optimizer.", OPTIMIZERS)
    base_lr: float = _f(0.1, "optimization", "Learning rate at --reference_batch_size; scaled by --lr_scaling.",
                        positive=True)
    lr_scaling: str = _f("linear", "optimization", "peak_lr = base_lr × f(global_batch / reference_batch).",
                         LR_SCALING_RULES)
    reference_batch_size: int = _f(256, "optimization", "Batch size --base_lr is tuned for.", positive=True)
    warmup_epochs: float = _f(0.0, "optimization", "Linear warmup length in epochs.", lower=0)
    warmup_steps: Optional[int] = _f(None, "optimization", "Linear warmup length in steps (instead of epochs).",
                                     lower=0)
    warmup_start_lr: Optional[float] = _f(None, "optimization", "LR at step 0 of warmup (default: the smaller "
                                          "of --base_lr and the peak LR, as in Goyal et al.).", lower=0)
    lr_schedule: str = _f("cosine", "optimization", "Decay after warmup.", SCHEDULES)
    lr_decay_boundaries: Tuple[float, ...] = _f((), "optimization", "Epochs where --lr_schedule=step decays.")
    lr_decay_rate: float = _f(0.1, "optimization", "Factor applied at each step boundary.", positive=True)
    final_lr: float = _f(0.0, "optimization", "Final LR of cosine/polynomial.", lower=0)
    lr_decay_power: float = _f(1.0, "optimization", "Power of the polynomial decay.", positive=True)
    momentum: Optional[float] = _f(None, "optimization", "SGD/RMSprop momentum (SGD default 0.9).", lower=0)
    nesterov: bool = _f(False, "optimization", "Nesterov momentum (SGD).")
    weight_decay: Optional[float] = _f(None, "optimization", "Decoupled weight decay.", lower=0)
    clipnorm: Optional[float] = _f(None, "optimization", "Clip each all-reduced gradient to this norm.",
                                   positive=True)
    global_clipnorm: Optional[float] = _f(None, "optimization", "Clip the all-reduced gradients to this global norm.",
                                          positive=True)
    clipvalue: Optional[float] = _f(None, "optimization", "Clip each all-reduced gradient's elements to "
                                    "[-value, value].", positive=True)
    trust_coefficient: Optional[float] = _f(None, "optimization", "LARS trust coefficient η (default 0.001).",
                                            positive=True)
    gradient_accumulation_steps: Optional[int] = _f(None, "optimization", "Apply the optimizer every N batches to "
                                                    "their mean gradient (effective batch = global × N; any "
                                                    "strategy; an epoch N does not divide ends with the batches "
                                                    "left).", lower=2)
    measure_noise_scale: bool = _f(False, "optimization", "Log the gradient noise scale B_simple (McCandlish et al. "
                                   "2018) from each replica's and the all-reduced gradient; needs >= 2 replicas or "
                                   "accumulation.")
    # --- training
    epochs: int = _f(5, "training", "Training epochs.", positive=True)
    steps_per_epoch: Optional[int] = _f(None, "training", "Steps per epoch (default: one pass over the data).",
                                        positive=True)
    epoch_mode: str = _f("auto", "training", "What an epoch is: stream (the next --steps_per_epoch steps of one "
                         "continuous stream of shuffled passes; any length), pass (a fresh shuffled pass, cut at "
                         "--steps_per_epoch), or auto (stream when --steps_per_epoch is not one pass, else pass).",
                         EPOCH_MODES)
    validation_freq: int = _f(1, "training", "Validate every N epochs.", positive=True)
    stop_at: Optional[str] = _f(None, "training", "Stop training at the first validation where a metric reaches "
                                "this, e.g. val_accuracy>=0.9 or val_loss<=0.3; the summary records the optimizer "
                                "steps and training seconds (validation excluded) it took (stop_at).")
    validate_every_steps: int = _f(0, "training", "With --stop_at: also validate every N optimizer steps (0: at "
                                   "epoch ends only), so the target is found to the step; the epoch's training "
                                   "metrics then cover the steps since the last validation.", lower=0)
    steps_per_execution: int = _f(1, "training", "Steps run per tf.function call.", positive=True)
    mixed_precision: bool = _f(False, "training", "mixed_float16 (GPU) compute with float32 variables.")
    jit_compile: bool = _f(False, "training", "XLA-compile the train step.")
    seed: int = _f(42, "training", "Seed for weights init, shuffling and sharding.", lower=0)
    # --- outputs
    model_dir: str = _f("runs/default", "outputs", "Where the chief writes flags, summary, model, checkpoints and "
                        "TensorBoard logs.")
    checkpoint_every: int = _f(0, "outputs", "Keep a model checkpoint every N epochs (0: none).", lower=0)
    preemption_grace_s: float = _f(PREEMPTION_GRACE_S, "outputs", "Seconds from SIGTERM to exit: every worker stops "
                                   "at one agreed step, the chief backs up there, all exit 143 (preempted); past "
                                   "this, exit 143 without a new backup.", positive=True)
    backup_every_steps: int = _f(0, "outputs", "Also back up every N steps for mid-epoch resume (0: epoch ends "
                                 "only).", lower=0)
    export: bool = _f(True, "outputs", "Save the final model to model_dir/model.keras.")
    log_every_steps: int = _f(10, "outputs", "TensorBoard step-level scalars every N steps.", positive=True)
    profile_steps: Tuple[int, ...] = _f((), "outputs", "Profile this step range, e.g. 10,15.")
    progress: str = _f("auto", "outputs", "The chief's progress on stdout, with examples/s: bar (redrawn as steps "
                       "finish), epoch (one line per epoch: logs, CI, Slurm), none, or auto (bar on a terminal, "
                       "else epoch).", PROGRESS_MODES)
    # --- tracking
    tracking_uri: Optional[str] = _f(None, "tracking", "Also log the run to MLflow (the chief only): "
                                     "http(s)://HOST:PORT of a tracking server, sqlite:///PATH, or a local directory; "
                                     "params, metrics at their optimizer step, the model and the run's status. A "
                                     "rerun continues the same MLflow run. Needs pip install -e '.[mlflow]'. Default: "
                                     "off.")
    experiment_name: str = _f("dtf", "tracking", "The MLflow experiment a --tracking_uri run is logged in (created "
                              "if missing).")

    def __post_init__(self):
        for field in dataclasses.fields(self):
            check_value(field, getattr(self, field.name))
        if self.global_batch_size and self.per_replica_batch_size:
            raise UserError(f"give --global_batch_size ({self.global_batch_size}) or --per_replica_batch_size "
                            f"({self.per_replica_batch_size}), not both")
        if self.task and (self.dataset or self.model):
            given = " ".join(f"--{k}={getattr(self, k)}" for k in ("dataset", "model") if getattr(self, k))
            raise UserError(f"--task={self.task} replaces the built-in task that {given} configures; remove {given} "
                            "(the task's own flags configure it)")
        if self.data_service is not None:
            specs.parse_data_service(self.data_service)
            if self.cache:
                raise UserError("--cache keeps examples in the training process, which --data_service does not read; "
                                "remove one of them")
        if self.stop_at is not None:
            target.parse_target(self.stop_at, "--stop_at")
        if self.validate_every_steps and (self.stop_at is None or not self.stop_at.strip().startswith("val_")):
            raise UserError(f"--validate_every_steps={self.validate_every_steps} validates for --stop_at: give a "
                            "validation target such as --stop_at=val_accuracy>=0.9, or remove it")
        if self.warmup_steps is not None and self.warmup_epochs:
            raise UserError("give --warmup_epochs or --warmup_steps, not both")
        if (self.num_cpu_devices or 0) > MAX_CPU_DEVICES:  # TF then spends minutes setting up devices, silently
            raise UserError(f"--num_cpu_devices={self.num_cpu_devices} is more simulated CPU replicas than dtf "
                            f"supports; use at most {MAX_CPU_DEVICES}")
        if self.profile_steps and (len(self.profile_steps) != 2 or not 0 < self.profile_steps[0] <= self.profile_steps[1]):
            raise UserError(f"--profile_steps={','.join(map(str, self.profile_steps))} must be two steps "
                            "START,STOP with 0 < START <= STOP, e.g. 10,15")
        if self.tracking_uri is not None and not self.tracking_uri.strip():
            raise UserError("--tracking_uri is empty; give an MLflow tracking URI (e.g. http://127.0.0.1:5000 or "
                            "sqlite:///runs/mlflow.db), or leave it out")
        if not self.experiment_name.strip():
            raise UserError("--experiment_name is empty; name the MLflow experiment, e.g. --experiment_name=dtf")

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_flagfile(self) -> str:
        """The fully resolved flagfile, grouped by concern; `dtf.run --flagfile=` on it re-runs this experiment."""
        lines, group = [], None
        for field in dataclasses.fields(self):
            if field.metadata["group"] != group:
                group = field.metadata["group"]
                lines.append(f"# --- {group}")
            value = getattr(self, field.name)
            if value is None:
                continue
            if not field.metadata["flag"]:
                lines.extend(value)
            elif isinstance(value, bool):
                lines.append(f"--{field.name}" if value else f"--no{field.name}")
            elif not isinstance(value, tuple) or value:
                lines.append(f"--{field.name}={_spelled(value)}")
        return "\n".join(lines) + "\n"

    def flag_values(self) -> dict:
        """{field name: value as flags.txt spells it} for every field that is set (task flags joined by spaces)."""
        return {field.name: (" ".join(value) if not field.metadata["flag"] else _spelled(value))
                for field in dataclasses.fields(self)
                for value in [getattr(self, field.name)] if value is not None and value != ()}


def _spelled(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def check_value(field: dataclasses.Field, value):
    """Raise a one-line UserError naming the flag if `value` breaks the field's constraints."""
    meta, flag = field.metadata, f"--{field.name}"
    if value is None:
        return
    if meta["choices"] and value not in meta["choices"]:
        raise UserError(f"{flag}={value!r} is not valid; choose one of: {', '.join(meta['choices'])}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{flag}={value} must be a finite number")
    if meta["lower"] is not None and value < meta["lower"]:
        raise UserError(f"{flag}={value} must be >= {meta['lower']}")
    if meta["positive"] and not value > 0:
        raise UserError(f"{flag}={value} must be > 0")
