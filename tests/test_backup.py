"""Backups survive a kill at any moment: every write step of a backup is interrupted in turn (the file being written
is left half-written) and the next run must resume from the last whole backup — never crash on the partial file,
never start again from step 0 without saying so. Plus the reader's fallback and the atomic writer."""
import itertools
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from dtf.experiment import atomic
from dtf.experiment import callbacks
from dtf.base.errors import UserError


class Crash(Exception):
    """Stands for kill -9: the write stops here and nothing after it runs."""


class FaultAt:
    """Counts the filesystem writes of a backup (Keras's weights save, dtf's writes, renames and removes) and
    interrupts the `at`-th: a write leaves half its bytes behind, a rename or remove does not happen."""

    def __init__(self, monkeypatch, at):
        self.at, self.steps = at, []
        real_rename, real_remove, real_gfile = tf.io.gfile.rename, tf.io.gfile.remove, tf.io.gfile.GFile
        real_save = keras.Model.save_weights
        fault = self

        class HalfWriter:
            def __init__(self, f):
                self._f = f

            def write(self, data):
                self._f.write(data[:len(data) // 2])
                self._f.close()
                raise Crash

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._f.close()

        def gfile(path, mode="r"):
            f = real_gfile(path, mode)
            return HalfWriter(f) if "w" in mode and self._step(f"write {_kind(path)}") else f

        def rename(src, dst, overwrite=False):
            if fault._step(f"rename to {_kind(dst)}"):
                raise Crash
            real_rename(src, dst, overwrite)

        def remove(path):
            if fault._step(f"remove {_kind(path)}"):
                raise Crash
            real_remove(path)

        def save_weights(model, filepath, *args, **kwargs):
            real_save(model, filepath, *args, **kwargs)
            if fault._step("save weights"):
                with open(filepath, "r+b") as f:
                    f.truncate(os.path.getsize(filepath) // 2)
                raise Crash

        monkeypatch.setattr(tf.io.gfile, "GFile", gfile)
        monkeypatch.setattr(tf.io.gfile, "rename", rename)
        monkeypatch.setattr(tf.io.gfile, "remove", remove)
        monkeypatch.setattr(keras.Model, "save_weights", save_weights)

    def _step(self, what) -> bool:
        self.steps.append(what)
        return len(self.steps) - 1 == self.at


def _kind(path):
    name = os.path.basename(path)
    kind = "weights" if name.endswith(".weights.h5") else name.split("-")[-1] if atomic.is_temporary(name) else name
    return f"temporary {kind}" if atomic.is_temporary(name) else kind


def _model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    return model


def _backup(callback, epoch, steps_done, value):
    """Back up weights that are all `value` as (epoch, steps_done)."""
    callback.model.set_weights([np.full(w.shape, value, w.dtype) for w in callback.model.get_weights()])
    callback.step_offset = steps_done
    callback.on_epoch_begin(epoch)
    callback.save_now()


def _restore(backup_dir):
    """What a restarted run resumes from: (epoch, steps_done, the restored weights' value)."""
    callback = callbacks.BackupAndRestore(str(backup_dir))
    callback.set_model(_model())
    callback.on_train_begin()
    backup = callbacks.latest_backup(str(backup_dir))
    values = {float(v) for w in callback.model.get_weights() for v in np.ravel(w)}
    assert len(values) == 1, values  # one whole backup's weights, not a mix
    return backup.epoch, backup.steps_done, values.pop()


def test_a_kill_at_any_write_step_resumes_from_the_last_whole_backup(tmp_path, monkeypatch):
    outcomes = {}
    for at in itertools.count():
        backup_dir = tmp_path / f"at{at}"
        callback = callbacks.BackupAndRestore(str(backup_dir))
        callback.set_model(_model())
        _backup(callback, 1, 0, 1.0)
        _backup(callback, 1, 5, 2.0)  # a mid-epoch backup; the one before it is now the previous pair
        with monkeypatch.context() as m:
            fault = FaultAt(m, at)
            try:
                _backup(callback, 2, 0, 3.0)
                crashed = False
            except Crash:
                crashed = True
        resumed = _restore(backup_dir)
        if not crashed:
            assert resumed == (2, 0, 3.0)
            break
        outcomes[fault.steps[at]] = resumed
        # Before the new metadata is in place the run resumes from the last whole backup; after, from the new one.
        assert resumed in [(1, 5, 2.0), (2, 0, 3.0)], (fault.steps[at], resumed)
    print("\n".join(f"kill at {step}: resumes from epoch {e}, step {s}" for step, (e, s, _) in outcomes.items()))
    assert fault.steps[:6] == ["save weights", "rename to weights", "write temporary training_metadata.json.bkp",
                               "rename to training_metadata.json.bkp", "write temporary training_metadata.json",
                               "rename to training_metadata.json"], fault.steps
    assert outcomes["rename to training_metadata.json"] == (1, 5, 2.0)
    assert outcomes[fault.steps[6]] == (2, 0, 3.0)  # the cleanup after the commit point
    # What the successful backup left: one pair and its predecessor, nothing else.
    names = sorted(os.listdir(backup_dir))
    assert names[:2] == ["training_metadata.json", "training_metadata.json.bkp"], names
    assert [n.split("-")[1:3] for n in names[2:]] == [["e1", "s5"], ["e2", "s0"]], names


def _two_backups(tmp_path):
    callback = callbacks.BackupAndRestore(str(tmp_path))
    callback.set_model(_model())
    _backup(callback, 1, 0, 1.0)
    _backup(callback, 2, 0, 2.0)
    return json.loads((tmp_path / callbacks.METADATA).read_text())


@pytest.mark.parametrize("damage", ["truncated metadata", "missing weights", "corrupt weights", "no metadata"])
def test_damaged_newest_backup_falls_back_to_the_previous_with_a_warning(tmp_path, capfd, damage):
    meta = _two_backups(tmp_path)
    weights = tmp_path / meta["weights"]
    if damage == "truncated metadata":
        (tmp_path / callbacks.METADATA).write_text('{"epoch": 2, "steps_')
    elif damage == "missing weights":
        weights.unlink()
    elif damage == "corrupt weights":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        (tmp_path / callbacks.METADATA).unlink()
    assert _restore(tmp_path) == (1, 0, 1.0)
    err = capfd.readouterr().err
    assert err.count("resuming from the previous one (epoch 2, step 0)") == 1, err  # warned once, not per reader
    assert "the newest backup in" in err and "is damaged" in err


def test_no_whole_backup_is_an_error_not_a_silent_restart(tmp_path):
    meta = _two_backups(tmp_path)
    previous = json.loads((tmp_path / callbacks.PREVIOUS).read_text())
    (tmp_path / meta["weights"]).unlink()
    (tmp_path / previous["weights"]).write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"cannot be resumed: .*missing; .*checksum.*delete .* to train again"):
        callbacks.latest_backup(str(tmp_path))
    assert callbacks.latest_backup(str(tmp_path / "none")) is None  # no backup at all: a fresh start


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = str(tmp_path / "summary.json")
    atomic.write_json(path, {"v": 1})
    with monkeypatch.context() as m:
        FaultAt(m, 0)  # the temporary file is half-written, then the "kill"
        with pytest.raises(Crash):
            atomic.write_json(path, {"v": 2, "long": "x" * 100})
    assert json.loads(open(path).read()) == {"v": 1}
    assert os.listdir(tmp_path) == ["summary.json"]  # the partial temporary was removed
    with atomic.replacing(str(tmp_path / "model.keras")) as tmp:
        assert tmp.endswith(".keras") and os.path.dirname(tmp) == str(tmp_path)  # Keras checks the suffix
        open(tmp, "w").write("m")
    assert sorted(os.listdir(tmp_path)) == ["model.keras", "summary.json"]


SAVER = """
import sys
import numpy as np
import keras
from dtf.experiment import callbacks
callback = callbacks.BackupAndRestore(sys.argv[1])
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
model.compile(keras.optimizers.SGD(0.1), "mse")
callback.set_model(model)
backup = callbacks.latest_backup(sys.argv[1])
start = backup.epoch + 1 if backup else 1
for epoch in range(start, start + 10_000):
    model.set_weights([np.full(w.shape, float(epoch), w.dtype) for w in model.get_weights()])
    callback.on_epoch_begin(epoch)
    callback.save_now()
    print("SAVED", epoch, flush=True)
"""


@pytest.mark.slow
def test_kill_9_during_backups_resumes_from_a_whole_one(tmp_path):
    """A process backs up as fast as it can and is SIGKILLed at arbitrary moments (inside a write, most likely);
    after every kill the backup restores to the last saved epoch (or the one being saved), weights and step
    agreeing, and the next process continues from it."""
    import random
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    backup_dir, env = tmp_path / "backup", dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    rng, last_epoch = random.Random(0), 0
    for kill in range(3):
        proc = subprocess.Popen([sys.executable, str(script), str(backup_dir)], stdout=subprocess.PIPE, text=True,
                                env=env)
        try:
            saved = []
            deadline = time.monotonic() + 120
            while len(saved) < 3 and time.monotonic() < deadline:
                line = proc.stdout.readline()
                assert line, "saver exited early"
                saved.append(int(line.split()[1]))
            assert saved[0] == last_epoch + 1  # it continued from the backup
            time.sleep(rng.uniform(0, 0.05))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            rest = [int(line.split()[1]) for line in proc.stdout.read().splitlines()]
        finally:
            proc.kill()
            proc.wait()
        last_printed = (saved + rest)[-1]
        epoch, steps, value = _restore(backup_dir)
        assert epoch in (last_printed, last_printed + 1) and steps == 0 and value == float(epoch), (
            kill, last_printed, epoch, value)
        last_epoch = epoch
