"""Progress on the chief's stdout, in examples/s of the global batch (all replicas: dtf's one batch convention).

--progress: `bar` redraws one line per epoch as steps finish (a terminal); `epoch` prints one line when an epoch ends
(logs, CI, Slurm: a redrawn bar would pile up there as one line per refresh); `auto` picks bar on a terminal, else
epoch; `none` prints nothing. dtf.run and dtf.tune (one labelled line or bar per trial epoch) use `TrainingProgress`;
dtf.predict draws a `Bar` over its examples (without a bar it logs a line every few seconds, as before).
"""
import shutil
import sys
import time
from typing import Optional, TextIO

import keras

from dtf.config.config import PROGRESS_MODES
from dtf.experiment.summaries import EPOCH_SCALARS

REFRESH_S = 0.1  # the bar redraws at most this often (and at its last step)


def resolve(mode: str, stream: TextIO) -> str:
    """`auto` → `bar` on a terminal, else `epoch`; other modes as given."""
    assert mode in PROGRESS_MODES, mode
    if mode != "auto":
        return mode
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "epoch"


def rate(examples: float, seconds: float) -> str:
    return f"{examples / max(seconds, 1e-9):,.0f} examples/s"


class Bar:
    """One redrawn line: `label[=====>....] done/total - N examples/s - extra`; `finish` replaces it by a final line."""

    WIDTH = 30

    def __init__(self, total: int, stream: TextIO, label: str = ""):
        self.total, self.stream, self.label = total, stream, label
        self._drawn_at, self._width = float("-inf"), 0

    def update(self, done: int, examples: float, seconds: float, extra: str = ""):
        now = time.monotonic()
        if now - self._drawn_at < REFRESH_S and done < self.total:
            return
        self._drawn_at = now
        filled = min(self.WIDTH, self.WIDTH * done // max(self.total, 1))
        bar = "=" * filled + (">" + "." * (self.WIDTH - filled - 1) if filled < self.WIDTH else "")
        line = f"{self.label}[{bar}] {done}/{self.total} - {rate(examples, seconds)}" + (f" - {extra}" if extra else "")
        self._draw(line[:shutil.get_terminal_size((1000, 24)).columns - 1])  # a wrapped line cannot be redrawn

    def finish(self, line: str):
        self._draw(line)
        self.stream.write("\n")
        self.stream.flush()

    def _draw(self, line: str):
        self.stream.write("\r" + line + " " * max(0, self._width - len(line)))  # blank what a longer line left
        self.stream.flush()
        self._width = len(line)


def _metrics(logs) -> str:
    """Loss and metrics as Keras shows them (the LR and timing scalars dtf adds are left out: examples/s says it)."""
    shown = []
    for name, value in (logs or {}).items():
        try:
            shown.append(f"{name}: {float(value):.4f}")
        except (TypeError, ValueError):  # not a scalar
            continue
    return " - ".join(s for s in shown if s.split(":")[0] not in EPOCH_SCALARS)


class TrainingProgress(keras.callbacks.Callback):
    """Keras fit's progress (use with verbose=0): a bar per epoch, or one line per epoch, with the training
    examples/s of the epoch (validation excluded). `label` prefixes every line (dtf.tune: the trial); `note` ends
    the first epoch line (a resume on another layout: the change, dtf.experiment.elastic)."""

    def __init__(self, mode: str, global_batch_size: int, stream: Optional[TextIO] = None, label: str = "",
                 note: str = ""):
        super().__init__()
        self.note = note
        self.stream = stream or sys.stdout
        self.mode, self.global_batch_size, self.label = resolve(mode, self.stream), global_batch_size, label
        self._bar: Optional[Bar] = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._steps, self._train_s = time.perf_counter(), 0, 0.0
        if self.mode == "bar":
            self._bar = Bar(self.params["steps"], self.stream, f"{self._epoch(epoch)} ")

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        self._train_s = time.perf_counter() - self._start  # the rate stops here: Keras validates before epoch end
        if self._bar is not None:
            self._bar.update(self._steps, self._steps * self.global_batch_size, self._train_s, _metrics(logs))

    def on_epoch_end(self, epoch, logs=None):
        if self.mode == "none":
            return
        line = (f"{self._epoch(epoch)}: {self._steps} steps in {self._train_s:.1f}s, "
                f"{rate(self._steps * self.global_batch_size, self._train_s)}")
        metrics = _metrics(logs)
        line += f" - {metrics}" if metrics else ""
        if self.note:
            line, self.note = f"{line} - layout changed at {self.note}", ""
        if self._bar is not None:
            self._bar.finish(line)
            self._bar = None
        else:
            print(line, file=self.stream, flush=True)

    def _epoch(self, epoch: int) -> str:
        return f"{self.label}epoch {epoch + 1}/{self.params['epochs']}"
