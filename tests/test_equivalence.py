"""N replicas give the single-device weights at the same global batch: mirrored (2, 4 logical CPUs) and
multi-worker (2 and 3 real worker processes on 127.0.0.1), with SGD+momentum and with Adam."""
import json

import pytest

import dtf
import equiv_common as eq
from helpers import max_weight_delta, model_weights

TOL = 1e-5


@pytest.fixture(scope="module")
def single_device():
    return {opt: eq.train(dtf.create_strategy("one_device"), opt)[0] for opt in ("sgd", "adam")}


MIRRORED = """
import numpy as np
import dtf, equiv_common as eq
strategy = dtf.create_strategy("mirrored", num_cpu_devices=REPLICAS)
assert strategy.num_replicas_in_sync == REPLICAS
for opt in ("sgd", "adam"):
    weights, history = eq.train(strategy, opt)
    assert history["loss"][-1] < history["loss"][0], history
    np.savez(os.path.join(OUT, f"w_{opt}.npz"), *weights)
"""


@pytest.mark.parametrize("replicas", [2, 4])
def test_mirrored_matches_one_device(single_device, run_python, tmp_path, replicas):
    run_python(f"REPLICAS = {replicas}\n" + MIRRORED)
    for opt in ("sgd", "adam"):
        assert max_weight_delta(tmp_path / f"w_{opt}.npz", single_device[opt]) < TOL, opt


WORKER = """
import numpy as np
import dtf, equiv_common as eq
strategy = dtf.create_strategy()  # auto: multi_worker from TF_CONFIG
assert strategy.num_replicas_in_sync == NUM_WORKERS, strategy.num_replicas_in_sync
for opt in ("sgd", "adam"):
    weights, history = eq.train(strategy, opt)
    np.savez(os.path.join(OUT, f"w_{opt}_{TASK}.npz"), *weights)
    json.dump(history, open(os.path.join(OUT, f"h_{opt}_{TASK}.json"), "w"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [2, 3])
def test_multi_worker_matches_one_device(single_device, run_workers, tmp_path, num_workers):
    run_workers(f"NUM_WORKERS = {num_workers}\n" + WORKER, num_workers)
    for opt in ("sgd", "adam"):
        per_worker = [model_weights(tmp_path / f"w_{opt}_{task}.npz") for task in range(num_workers)]
        for task, weights in enumerate(per_worker):
            assert max_weight_delta(weights, single_device[opt]) < TOL, (opt, task)
            assert max_weight_delta(weights, per_worker[0]) == 0.0, (opt, task)  # bit-identical across workers
        losses = json.loads((tmp_path / f"h_{opt}_0.json").read_text())["loss"]
        assert losses[-1] < losses[0]
