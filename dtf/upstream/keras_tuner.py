"""The private keras-tuner names dtf uses, each behind one function or class. Importing this module checks the
installed keras-tuner against `dtf.base.versions.KERAS_TUNER_RANGE` (verified: 1.4.8) and raises UserError outside
it; tests/test_upstream.py fails when one of these names changes shape or an upstream bug below is fixed.
"""
import functools
import json
import os
import threading
from importlib import metadata

import keras_tuner
import tensorflow as tf
from keras_tuner.engine.trial import TrialStatus

from dtf.base import versions

versions.check_keras_tuner(metadata.version("keras-tuner"))  # before the private imports: they may fail on another

from keras_tuner.src import config as _config, protos as _protos  # noqa: E402
from keras_tuner.src.distribute import oracle_chief as _oracle_chief  # noqa: E402
from keras_tuner.src.tuners import gridsearch as _gridsearch  # noqa: E402
from keras_tuner.src import utils as _utils  # noqa: E402


def _save_json_atomically(path, obj):
    """keras-tuner's `utils.save_json` (every oracle, trial and tuner state file), written to a temporary name and
    renamed. Upstream writes in place, so a tuner killed while saving (SIGKILL right after a trial ended, when the
    oracle saves) left an empty oracle.json, and the rerun failed in `reload` with a JSONDecodeError traceback (seen
    in CI once). Installed when this module is imported; no upstream issue filed; verified on 1.4.8."""
    text = json.dumps(obj)
    temporary = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"  # the oracle saves from several threads
    with tf.io.gfile.GFile(temporary, "w") as f:
        f.write(text)
    tf.io.gfile.rename(temporary, path, overwrite=True)
    return text


_utils.save_json = _save_json_atomically  # keras-tuner calls it as utils.save_json(...), so this is what it runs


def show_trial_tracebacks(enabled: bool):
    """keras-tuner prints the traceback of every failed trial unless its module-level `config.DEBUG` is off; dtf
    prints one line per failed trial instead (tracebacks with --verbosity=1). No public switch."""
    _config.DEBUG = enabled


class ReloadsWhoeverServes:
    """Tuner mixin: keras-tuner reloads a sweep only if this process's own tuner file (<tuner id>.json) exists, so a
    sweep begun with another --num_tuners (tuner0 vs chief) would start over. Here whoever serves the oracle reloads
    it when its file exists: the sweep is the oracle's state. Overrides the private `_populate_initial_space`, which
    `Tuner.__init__` calls; uses `_is_worker` and `Oracle._get_oracle_fname`. No upstream issue."""

    def _populate_initial_space(self):
        if not self._is_worker() and tf.io.gfile.exists(self.oracle._get_oracle_fname()):
            self.oracle.reload()
        else:
            super()._populate_initial_space()


# keras-tuner's gRPC oracle server (oracle_chief.start_server), which dtf serves with its own loop: keras-tuner's
# polls every 20 s and may exit before a slow worker connects (dtf.tuning.distributed.serve_oracle). Subclassed.
OracleServicer = _oracle_chief.OracleServicer


def chief_may_exit(oracle) -> bool:
    """keras-tuner's own rule for the chief to stop serving: no running trial, no tuner still going."""
    return _oracle_chief.exit_chief(oracle)


def create_trial_response(trial):
    """The gRPC reply to a CreateTrial request carrying `trial`."""
    return _protos.get_service().CreateTrialResponse(trial=trial.to_proto())


def add_oracle_servicer(servicer, server):
    """Register `servicer` (an OracleServicer) with a grpc `server`."""
    _protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)


def repair_reloaded_oracle(oracle):
    """After a kill, make keras-tuner's reloaded oracle finish the sweep without losing or repeating a trial (its
    `_retry_queue` is the list of trials to run again). No upstream issue filed for the first two:

    - A trial saved as RUNNING but missing from oracle.json's ongoing trials (killed between the two writes) is never
      run again by keras-tuner: queue it for a rerun like the ongoing ones.
    - keras-tuner queues every trial that oracle.json lists as ongoing for a rerun, but it saves oracle.json before
      removing a finished trial from the ongoing ones: drop trials whose own trial.json says they finished.
    - GridSearch: see `_rebuild_grid_order`.
    """
    finished = (TrialStatus.COMPLETED, TrialStatus.FAILED)
    queue = oracle._retry_queue
    queue[:] = [t for t in queue if oracle.trials[t].status not in finished]
    ongoing = {t.trial_id for t in oracle.ongoing_trials.values()}
    for trial_id, trial in sorted(oracle.trials.items()):
        if trial.status == TrialStatus.RUNNING and trial_id not in queue and trial_id not in ongoing:
            queue.append(trial_id)
    if isinstance(oracle, keras_tuner.oracles.GridSearchOracle) and oracle.trials:
        _rebuild_grid_order(oracle)


def _rebuild_grid_order(oracle):
    """GridSearchOracle keeps the tried combinations in order (`_ordered_ids`, a LinkedList, and `_populate_next`)
    but does not save them: after a reload it stops early or fails with a KeyError (keras-team/keras-tuner#1055,
    open; fix proposed in #1056). Rebuild both from the trials, ordered by the oracle's own `_compare`."""
    trials = oracle.trials
    ids = sorted(trials, key=functools.cmp_to_key(
        lambda a, b: oracle._compare(trials[a].hyperparameters.values, trials[b].hyperparameters.values)))
    oracle._ordered_ids = _gridsearch.LinkedList()
    for trial_id in ids:
        oracle._ordered_ids.insert(trial_id)
    oracle._populate_next = list(ids)
