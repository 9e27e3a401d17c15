"""Graceful preemption: on SIGTERM every worker finishes its step, the job agrees on one step, every worker stops
there, the chief backs up at that step, and every process exits 143 (dtf.base.exitcodes.PREEMPTED); the rerun resumes at
that exact step.

The agreement follows TensorFlow's PreemptionCheckpointHandler (failure_handling.py), on the coordination service's
key-value store that MultiWorkerMirroredStrategy starts: synchronous all-reduce keeps workers at most one step (one
`steps_per_execution` call) apart, so the worker that got the signal, having finished step S, publishes "stop at the
first step after S" under one key (the first writer wins: several workers may be signalled at once) and waits until
every worker's watcher thread has acknowledged it. Only then does it train step S+1; as no worker can finish S+1
without it, every worker knows the target before it gets there, and none trains a step the others did not.

Why a Python handler installed after the strategy: TF's coordination-service agent installs its own SIGTERM handler
(the C++ preemption notifier) when MultiWorkerMirroredStrategy starts, and with it a SIGTERM no longer stops the
process. Installing ours after that takes the signal back. A watchdog exits 143 anyway when the job cannot agree,
back up and exit within the grace period: the rerun then resumes from the last whole backup.
"""
import os
import signal
import sys
import threading
import time
from typing import Optional, Sequence

import keras
import tensorflow as tf

from dtf.base import exitcodes
from dtf.base.errors import Preempted
from dtf.base.logs import get_logger
from dtf.cluster import tf_config as cluster_lib
from dtf.experiment import callbacks as callbacks_lib
from dtf.upstream import tensorflow as tf_upstream

log = get_logger(__name__)

TARGET_KEY = "dtf/preemption/stop_after"  # the global step (epoch × steps_per_epoch + step) every worker stops after
ACK_KEY = "dtf/preemption/ack/{}"
_POLL_MS = 1000  # the watcher's blocking read returns this often to see whether training has ended


class Preemption(keras.callbacks.Callback):
    """Turns SIGTERM into a clean stop at one agreed step (see the module doc). Create it right after the strategy
    (from then on it takes SIGTERM), `attach` the run's callbacks, pass it to `fit` last, and `close()` it when
    training is over."""

    def __init__(self, cluster: cluster_lib.ClusterInfo, grace_s: float):
        super().__init__()
        self.cluster, self.grace_s = cluster, grace_s
        self._distributed = cluster.num_workers > 1
        self._signalled: Optional[float] = None  # monotonic time of this process's own SIGTERM
        self._claimed = False
        self._target: Optional[int] = None  # global step to stop after, once known
        self._stop_at_epoch_end = False
        self._watchdog: Optional[threading.Timer] = None
        self._closing = threading.Event()
        self._watcher: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._previous = None  # the SIGTERM handler and wakeup fd to put back when training is over
        if threading.current_thread() is threading.main_thread():  # else Python cannot take signals here
            # Python runs a signal handler only when the main thread next runs Python code, and a worker whose peer
            # is gone sits in a collective for minutes. Python also writes each signal's number to the wakeup fd
            # at once: a thread reading it starts the watchdog whatever the main thread is doing.
            read_fd, self._wakeup_fd = os.pipe()
            os.set_blocking(self._wakeup_fd, False)
            self._previous = (signal.signal(signal.SIGTERM, self._on_sigterm),
                              signal.set_wakeup_fd(self._wakeup_fd, warn_on_full_buffer=False))
            threading.Thread(target=self._read_signals, args=(read_fd,), name="dtf-preemption-signals",
                             daemon=True).start()

    def attach(self, steps_per_epoch: int, callbacks: Sequence[keras.callbacks.Callback]):
        """The run's callbacks: their BackupAndRestore saves at the stop step (it counts the steps), and the others
        are ended as training ends."""
        self.steps_per_epoch = steps_per_epoch
        self._backup = next(cb for cb in callbacks if isinstance(cb, callbacks_lib.BackupAndRestore))
        self._others = [cb for cb in callbacks if cb is not self._backup]

    # --- signal, watchdog, watcher (threads other than the training loop)
    def _on_sigterm(self, signum=None, frame=None):
        del signum, frame
        with self._lock:
            if self._signalled is not None:
                return
            self._signalled = time.monotonic()
        log.info(f"preemption: got SIGTERM; stopping at an agreed step within {self.grace_s:g}s")
        self._arm_watchdog()

    def _read_signals(self, read_fd: int):
        with os.fdopen(read_fd, "rb", buffering=0) as signals:
            for chunk in iter(lambda: signals.read(64), b""):  # b"": `close` closed the other end
                if signal.SIGTERM in chunk:
                    self._on_sigterm()

    def _arm_watchdog(self):
        with self._lock:
            if self._watchdog is not None or self._closing.is_set():
                return
            self._watchdog = threading.Timer(self.grace_s, self._expire)
            self._watchdog.daemon = True
        self._watchdog.start()

    def _expire(self):
        sys.stderr.write(f"preemption: could not stop at an agreed step and back up within --preemption_grace_s="
                         f"{self.grace_s:g}; exiting {exitcodes.PREEMPTED} without a new backup (the rerun resumes "
                         "from the last whole one)\n")
        sys.stderr.flush()
        os._exit(exitcodes.PREEMPTED)

    def _watch(self):
        """Wait for the target step a signalled worker publishes; record it, then acknowledge it."""
        while not self._closing.is_set():
            try:
                value = tf_upstream.kv_get(TARGET_KEY, _POLL_MS)
            except tf.errors.DeadlineExceededError:
                continue
            except tf.errors.OpError as e:  # the service is gone (a peer died): the group is being stopped anyway
                log.debug(f"preemption: stopped watching ({e})")
                return
            self._target = int(value)
            self._arm_watchdog()
            tf_upstream.kv_set(ACK_KEY.format(self.cluster.task_index), "1")
            return

    def close(self):
        """Training is over (or stopped): stop the watchdog and the watcher thread, and give SIGTERM back to the
        handler before ours (in a dtf command, the default: a SIGTERM while it evaluates or exports ends it, and the
        rerun resumes from the last epoch's backup). dtf.run exits at once after a stop; a Python caller gets
        `Preempted` and its process lives on."""
        self._closing.set()  # from now on no watchdog is armed
        with self._lock:
            if self._watchdog is not None:
                self._watchdog.cancel()
        if self._watcher is not None:
            self._watcher.join()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous[0])
            signal.set_wakeup_fd(self._previous[1])
            os.close(self._wakeup_fd)

    # --- the training loop
    def on_train_begin(self, logs=None):
        if self._distributed and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="dtf-preemption-watcher", daemon=True)
            self._watcher.start()

    def _step(self) -> int:
        return self._backup.epoch * self.steps_per_epoch + self._backup.steps_done

    def on_train_batch_end(self, batch, logs=None):
        if self._signalled is not None and not self._claimed:
            self._claimed = True
            self._claim(self._step())
        if self._target is not None and self._step() >= self._target:
            if self._backup.steps_done == self.steps_per_epoch:  # the epoch's end backs up; stop right after it
                self._stop_at_epoch_end = True
            else:
                self._stop()

    def on_epoch_end(self, epoch, logs=None):
        if self._stop_at_epoch_end:
            self._stop()

    def _claim(self, step: int):
        """This worker was signalled after finishing `step`: stop there (one process) or publish step + 1."""
        if not self._distributed:
            self._target = step
            return
        try:
            tf_upstream.kv_set(TARGET_KEY, str(step + 1))
        except tf.errors.AlreadyExistsError:
            return  # another signalled worker published first; the watcher brings its target
        log.info(f"preemption: every worker stops after global step {step + 1}")
        for i in range(self.cluster.num_workers):
            left_ms = int(1000 * (self._signalled + self.grace_s - time.monotonic()))
            try:
                tf_upstream.kv_get(ACK_KEY.format(i), max(1, left_ms))
            except tf.errors.OpError as e:
                raise Preempted(f"preempted: worker {i} did not acknowledge the stop step ({type(e).__name__}); "
                                "exiting without a new backup (the rerun resumes from the last whole one)") from None

    def _stop(self):
        """Back up at this step (only the chief's lands in model_dir), end the other callbacks, raise Preempted."""
        backup, started = self._backup, time.monotonic()
        epoch, steps = backup.epoch, backup.steps_done
        if not self._stop_at_epoch_end:  # the epoch end just saved this position
            backup.save_now()
        for cb in self._others:
            cb.on_train_end()
        backup.remove_private_dir()
        since = f"{time.monotonic() - self._signalled:.1f}s after SIGTERM" if self._signalled else "on a peer's SIGTERM"
        where = f"epoch {epoch + 1}, step {steps}" if steps else f"the end of epoch {epoch}"
        raise Preempted(f"preempted: stopped at {where} ({since}; backup {time.monotonic() - started:.1f}s); the "
                        f"rerun resumes there (exit status {exitcodes.PREEMPTED})")
