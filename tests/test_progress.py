"""dtf.experiment.progress: on a terminal a redrawn bar with steps and examples/s (of the global batch); elsewhere
exactly one line per epoch with examples/s; dtf.predict's bar over its examples ends in its summary line."""
import io
import re

import keras
import numpy as np
import pytest

from dtf.experiment import progress


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def fit(stream, mode="auto", epochs=2, steps=5, batch=8, label=""):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse", metrics=["mae"])
    x = np.random.default_rng(0).normal(size=(steps * batch, 3)).astype("float32")
    callback = progress.TrainingProgress(mode, global_batch_size=batch, stream=stream, label=label)
    model.fit(x, x[:, :1], batch_size=batch, epochs=epochs, validation_data=(x, x[:, :1]), verbose=0,
              callbacks=[callback])
    return stream.getvalue()


def test_a_terminal_gets_a_bar_with_steps_and_examples_per_sec(monkeypatch):
    monkeypatch.setattr(progress, "REFRESH_S", 0.0)  # draw every step
    monkeypatch.setenv("COLUMNS", "300")
    out = fit(FakeTerminal())
    lines = out.split("\n")
    assert len(lines) == 3 and lines[-1] == ""  # one finished line per epoch
    draws = [d.rstrip() for d in lines[0].split("\r") if d]
    assert len(draws) == 6  # each of the 5 steps, then the epoch's final line
    assert re.fullmatch(r"epoch 1/2 \[======>\.{23}\] 1/5 - [\d,]+ examples/s - loss: \S+ - mae: \S+", draws[0]), draws
    assert re.fullmatch(r"epoch 1/2 \[={30}\] 5/5 - [\d,]+ examples/s - loss: \S+ - mae: \S+", draws[4]), draws
    assert re.fullmatch(r"epoch 1/2: 5 steps in \d+\.\ds, [\d,]+ examples/s - loss: \S+ - mae: \S+ - val_loss: \S+ - "
                        r"val_mae: \S+", draws[5]), draws
    assert lines[1].split("\r")[-1].startswith("epoch 2/2: 5 steps in ")


@pytest.mark.parametrize("stream", [io.StringIO(), FakeTerminal()])
def test_not_a_terminal_or_epoch_mode_gives_exactly_one_line_per_epoch(stream):
    out = fit(stream, mode="auto" if not stream.isatty() else "epoch", epochs=3, label="trial 7: ")
    lines = out.splitlines()
    assert "\r" not in out and len(lines) == 3, out
    for e, line in enumerate(lines, 1):
        assert re.fullmatch(rf"trial 7: epoch {e}/3: 5 steps in \d+\.\ds, [\d,]+ examples/s - loss: \S+ - mae: \S+ - "
                            r"val_loss: \S+ - val_mae: \S+", line), line
        examples_per_sec = float(re.search(r"([\d,]+) examples/s", line).group(1).replace(",", ""))
        seconds = float(re.search(r"in (\S+)s,", line).group(1))
        # 5 steps × global batch 8 = 40 examples in the shown seconds (rounded to 0.1 s)
        assert 40 / (seconds + 0.05) - 1 <= examples_per_sec <= 40 / max(seconds - 0.05, 1e-9) + 1, line


def test_none_prints_nothing():
    assert fit(FakeTerminal(), mode="none") == ""


def test_auto_is_a_bar_only_on_a_terminal():
    assert progress.resolve("auto", FakeTerminal()) == "bar"
    assert progress.resolve("auto", io.StringIO()) == "epoch"
    assert progress.resolve("epoch", FakeTerminal()) == "epoch"


def test_bar_redraws_at_most_every_refresh_and_always_at_the_end(monkeypatch):
    clock = iter([0.0, 0.05, 0.2, 0.21])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    stream = FakeTerminal()
    monkeypatch.setenv("COLUMNS", "300")
    bar = progress.Bar(100, stream, "predict ")
    for done in (10, 20, 30, 100):  # at 0.0 (drawn), 0.05 (skipped), 0.2 (drawn), 0.21 (the end: drawn)
        bar.update(done, done, 1.0)
    bar.finish("dtf.predict: 100 examples in 1.00s")
    draws = [d.rstrip() for d in stream.getvalue().split("\r") if d]
    assert [re.search(r"\] (\d+)/100", d).group(1) for d in draws[:-1]] == ["10", "30", "100"]
    assert draws[1] == "predict [=========>....................] 30/100 - 30 examples/s"
    assert draws[-1] == "dtf.predict: 100 examples in 1.00s" and stream.getvalue().endswith("\n")


def test_the_bar_fits_the_terminal_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    stream = FakeTerminal()
    progress.Bar(10, stream, "epoch 1/2 ").update(10, 10, 1.0, "loss: 0.1234 - mae: 0.5678")
    assert stream.getvalue() == "\repoch 1/2 [" + "=" * 28  # 39 columns: the line never wraps
