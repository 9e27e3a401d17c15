"""What a run on a model_dir that already holds one does, and who may use a model_dir at a time.

Users rerun a flags.txt, extend `--epochs`, change a flag in the same `--model_dir`. The backup records the run's
*plan* (every flag that gives its weights, optimizer state and position a meaning: task, global batch, LR rule and
schedule, optimizer, seed, input order; not the worker or replica count — the global batch is the truth — and not
where outputs go), and a rerun is decided from it (`decide`):

- no backup (and no outputs): train from step 0;
- the same plan, interrupted: resume exactly where the backup stands;
- the same plan with another `--epochs` (not fewer than already trained): continue to the new end, the LR schedule
  recomputed for the new total (warmup is not repeated);
- the same plan, finished: train nothing, write nothing;
- another plan: a `UserError` naming the differing flags and the ways out (a new `--model_dir`, or `--restart`,
  which moves the old run aside to a sibling directory and never deletes it). After a run diverged, its optimization
  flags (LR, warmup, clipping, …) may change: the rerun continues from the last finite backup.

A run's chief holds `model_dir/dtf.lock` while it trains (`RunLock`), so a second run on the same directory is refused
with one line naming the holder; the lock of a killed run is taken over.
"""
import dataclasses
import datetime
import json
import os
import socket
import threading
import time
from typing import Dict, List, Optional

import tensorflow as tf

from dtf.base.errors import UserError
from dtf.base.logs import get_logger
from dtf.config.config import Config
from dtf.experiment import atomic, callbacks as callbacks_lib

log = get_logger(__name__)

BACKUP_DIR = "backup"
LOCK = "dtf.lock"
OUTPUTS = ("model.keras", "summary.json", "flags.txt")

# Fields that are not part of the plan: the layout (how many workers and replicas, which devices and all-reduce; the
# global batch is the truth, so the same plan runs on any of them), where and how often outputs are written, and
# input settings that do not change which examples a step sees. `epochs` is compared on its own (see `decide`).
_NOT_PLAN = frozenset({
    "strategy", "num_cpu_devices", "num_gpus", "communication", "cross_device_ops", "num_packs", "cluster_timeout",
    "worker_hosts", "task_index", "cluster_resolver", "per_replica_batch_size", "data_dir", "cache", "data_service",
    "epochs", "stop_at", "validate_every_steps", "validation_freq", "steps_per_execution", "jit_compile", "model_dir",
    "checkpoint_every", "preemption_grace_s", "backup_every_steps", "export", "log_every_steps", "profile_steps",
    "progress"})
_NOT_PLAN |= {"tracking_uri", "experiment_name"}  # where the run is also logged (dtf.tracking), not what it is
# Plan fields a rerun may change after the run diverged: how it optimizes, not what or on which batches.
_AFTER_DIVERGING = frozenset({
    "optimizer", "base_lr", "lr_scaling", "reference_batch_size", "warmup_epochs", "warmup_steps", "warmup_start_lr",
    "lr_schedule", "lr_decay_boundaries", "lr_decay_rate", "final_lr", "lr_decay_power", "momentum", "nesterov",
    "weight_decay", "clipnorm", "global_clipnorm", "clipvalue", "trust_coefficient"})
# Plan flags added since backups first recorded a plan, with what a backup that lacks them did.
_IMPLIED = {"epoch_mode": "pass"}  # every epoch was a fresh pass before streaming epochs


def plan_of(resolved: Config) -> Dict[str, str]:
    """The plan of a resolved config (global batch explicit): {flag name: value as flags.txt spells it}."""
    values = resolved.flag_values()
    plan = {name: value for name, value in values.items() if name not in _NOT_PLAN}
    if resolved.task:  # a task file is recorded by absolute path; the same file moved with its checkout is the same
        module_part, _, attr = resolved.task.rpartition(":")
        plan["task"] = f"{os.path.basename(module_part)}:{attr}"
    return plan


def differences(recorded: Dict[str, str], plan: Dict[str, str]) -> List[str]:
    """`--flag=new (was old)` for every plan flag that differs, in a stable order."""
    out = []
    for name in sorted(set(recorded) | set(plan)):
        if recorded.get(name) != plan.get(name):
            new = f"--{name}={plan[name]}" if name in plan else f"no --{name}"
            out.append(f"{new} (was {recorded[name]})" if name in recorded else f"{new} (was unset)")
    return out


@dataclasses.dataclass(frozen=True)
class Decision:
    """What this run does in its model_dir."""

    action: str  # "fresh" | "resume" | "finished" | "export" (the backup is at the end; outputs missing)
    backup: Optional[callbacks_lib.Backup] = None
    move_aside: bool = False  # --restart: the old run goes to a sibling directory first (chief)
    summary: Optional[dict] = None  # "finished": the run's summary.json
    message: str = ""  # one line for the log

    @property
    def trains(self) -> bool:
        return self.action in ("fresh", "resume")


def decide(model_dir: str, plan: Dict[str, str], epochs: int, steps_per_epoch: int,
           restart: bool = False) -> Decision:
    """What a run with `plan` and `epochs` does in `model_dir` (see the module docstring). Reads only."""
    backup_dir = os.path.join(model_dir, BACKUP_DIR)
    backup = callbacks_lib.latest_backup(backup_dir)  # a damaged or metadata-less backup is a UserError there
    if backup is not None and backup.steps_done >= steps_per_epoch:  # a step backup at the epoch's last step,
        backup = dataclasses.replace(backup, epoch=backup.epoch + 1, steps_done=0)  # killed before the epoch's one
    if backup is None:
        leftovers = [name for name in OUTPUTS if tf.io.gfile.exists(os.path.join(model_dir, name))]
        if not leftovers:
            return Decision("fresh")
        if restart:
            return Decision("fresh", move_aside=True, message=f"--restart: moving the outputs in {model_dir} aside")
        raise UserError(f"--model_dir={model_dir} holds {', '.join(leftovers)} of a run but no backup to tell what "
                        "it was; use a new --model_dir, or add --restart to move the old outputs aside")
    recorded = None if backup.plan is None else {**_IMPLIED, **backup.plan}
    changed = differences(recorded, plan) if recorded is not None else []
    if changed:
        if backup.diverged and set(_changed_names(recorded, plan)) <= _AFTER_DIVERGING:
            return Decision("resume", backup, message=(
                f"the run in {model_dir} diverged; continuing from its last finite backup (epoch {backup.epoch + 1}, "
                f"step {backup.steps_done}) with {'; '.join(changed)}"))
        if restart:
            return Decision("fresh", move_aside=True, message=(
                f"--restart: {model_dir} holds another run ({'; '.join(changed)}); moving it aside"))
        raise UserError(f"--model_dir={model_dir} holds another run: {'; '.join(changed)}. Use a new --model_dir, "
                        "or add --restart to move the old run aside and train this one from step 0")
    if recorded is None:
        log.warning(f"the backup in {backup_dir} was written by an older dtf and records no plan; resuming it as is")
    if epochs < backup.epoch or (epochs == backup.epoch and backup.steps_done):
        done = f"{backup.epoch} epoch(s)" + (f" and {backup.steps_done} step(s)" if backup.steps_done else "")
        raise UserError(f"--epochs={epochs} is fewer than the {done} the run in {model_dir} has trained; give "
                        f"--epochs={backup.epoch + (1 if backup.steps_done else 0)} or more to continue it, or a new "
                        "--model_dir")
    if epochs == backup.epoch:  # at the end: finished, or killed while writing its outputs
        summary = _read_json(os.path.join(model_dir, "summary.json"))
        if (summary is not None and summary.get("epochs") == epochs
                and tf.io.gfile.exists(os.path.join(model_dir, "flags.txt"))):
            return Decision("finished", backup, summary=summary)
        return Decision("export", backup, message=f"the run in {model_dir} trained all {epochs} epochs but did not "
                        "write its outputs; writing them from its last backup")
    if backup.epochs is not None and epochs != backup.epochs:
        return Decision("resume", backup, message=(
            f"continuing the run in {model_dir} from epoch {backup.epoch + 1}, step {backup.steps_done} to "
            f"--epochs={epochs} (it was planned for {backup.epochs}); the LR schedule now spans {epochs} epochs"))
    return Decision("resume", backup, message=(
        f"resuming from the backup in {backup_dir}: epoch {backup.epoch + 1}, step {backup.steps_done}"))


def _changed_names(recorded: Dict[str, str], plan: Dict[str, str]) -> List[str]:
    return [name for name in set(recorded) | set(plan) if recorded.get(name) != plan.get(name)]


def _read_json(path: str) -> Optional[dict]:
    try:
        with tf.io.gfile.GFile(path) as f:
            return json.loads(f.read())
    except (tf.errors.NotFoundError, ValueError):
        return None


def move_aside(model_dir: str) -> str:
    """Rename `model_dir` to a new sibling `<model_dir>.before-restart-<UTC time>`; returns the new path."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    target = f"{model_dir.rstrip('/')}.before-restart-{stamp}"
    n = 1
    while tf.io.gfile.exists(target):
        n += 1
        target = f"{model_dir.rstrip('/')}.before-restart-{stamp}-{n}"
    try:
        tf.io.gfile.rename(model_dir, target)
    except (OSError, tf.errors.OpError) as e:
        raise UserError(f"--restart: cannot move {model_dir} aside to {target} ({getattr(e, 'message', e)}); move "
                        "it yourself, or use a new --model_dir") from None
    return target


# ------------------------------------------------------------------------------------------------------------ lock


class RunLock:
    """`model_dir/dtf.lock`, held by a run's chief while it trains: {host, pid, started, beat}.

    A thread refreshes `beat` every `beat_s`; a lock whose process is gone (same host) or whose beat is older than
    `stale_s` (another host: a requeued job lands elsewhere) belongs to a killed run and is taken over."""

    def __init__(self, model_dir: str, beat_s: float = 15.0, stale_s: float = 90.0):
        self.path = os.path.join(model_dir, LOCK)
        self.beat_s, self.stale_s = beat_s, stale_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") == self._record["host"]:
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, KeyError, ValueError, TypeError):
                pass
            else:
                return int(holder["pid"]) == os.getpid()  # our own (a Python caller's earlier run)
        return time.time() - float(holder.get("beat", 0)) > self.stale_s

    def check_free(self) -> Optional[dict]:
        """The lock's record if a run that is gone left it (None: no lock); a UserError while a live run holds it."""
        holder = _read_json(self.path)
        if holder is not None and not self._stale(holder):
            since = datetime.datetime.fromtimestamp(float(holder.get("started", 0))).strftime("%H:%M:%S")
            raise UserError(f"--model_dir={os.path.dirname(self.path)} is in use by another run (pid "
                            f"{holder.get('pid')} on {holder.get('host')}, since {since}; {self.path}); wait for it "
                            "to end, or use another --model_dir")
        return holder

    def acquire(self):
        holder = self.check_free()
        if holder is not None:
            log.warning(f"taking over the lock of a run that is gone (pid {holder.get('pid')} on "
                        f"{holder.get('host')}): {self.path}")
        tf.io.gfile.makedirs(os.path.dirname(self.path))
        if holder is not None:
            try:
                tf.io.gfile.remove(self.path)
            except tf.errors.NotFoundError:  # another run took it over first: it then holds it (below)
                pass
        if not self._create():
            raise UserError(f"--model_dir={os.path.dirname(self.path)} was just taken by another run "
                            f"({self.path}); use another --model_dir")
        self._thread = threading.Thread(target=self._beat, name="dtf-lock", daemon=True)
        self._thread.start()
        return self

    def _create(self) -> bool:
        """Create the lock file only if there is none: O_EXCL locally; elsewhere write, then read back who won."""
        if "://" not in self.path:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({**self._record, "beat": time.time()}))
            return True
        self._write()
        mine = _read_json(self.path)
        return mine is not None and mine.get("pid") == os.getpid() and mine.get("host") == self._record["host"]

    def _write(self):
        atomic.write_json(self.path, {**self._record, "beat": time.time()})

    def _beat(self):
        while not self._stop.wait(self.beat_s):
            try:
                self._write()
            except (OSError, tf.errors.OpError) as e:  # the directory went away or read-only: training decides
                log.debug(f"lock heartbeat: {e}")

    def release(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = _read_json(self.path)
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == self._record["host"]:
            try:
                tf.io.gfile.remove(self.path)
            except (OSError, tf.errors.OpError):
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
