"""`dtf.bench`: the bottleneck verdict on constructed cases, the overhead comparison, the all-reduce model, and the
CLI's errors. In-process (the pytest process has 4 logical CPU devices); the scaling run starts its own interpreters."""
import json
import math
import re
import warnings

import numpy as np
import pytest
from absl.testing import flagsaver

import bench_tasks
import dtf
from dtf import bench
from dtf.benchmarks import allreduce
from dtf.benchmarks import bottleneck
from dtf.cluster import tf_config as cluster_lib
from dtf.experiment import train
from dtf.config.config import Config


# No collective ops in-process: two MirroredStrategies in one process (this test's and another module's) reuse
# collective instance keys and fail with "Shape mismatch in the collective instance" when their tensors differ.
CROSS_DEVICE_OPS = "--cross_device_ops=reduce_to_one"


def _experiment(task, tmp_path, strategy="one_device", **overrides):
    config = Config(**{**dict(global_batch_size=64, optimizer="sgd", base_lr=0.01, epochs=1, seed=1,
                              model_dir=str(tmp_path), strategy=strategy), **overrides})
    strategy = dtf.create_strategy(strategy, num_cpu_devices=4 if strategy == "mirrored" else None)
    return train.Experiment(config, strategy, cluster_lib.parse_tf_config(), task)


@pytest.mark.parametrize("input_eps, training_eps, wait, expected", [
    (100, 1000, 0.0, "input-bound"),      # input far slower than the step
    (1200, 1000, 0.0, "input-bound"),     # below 1.25x: no headroom
    (1500, 1000, 0.30, "input-bound"),    # little headroom, and the step waits for it
    (80000, 1000, 0.25, "compute-bound"),  # 80x faster alone: the wait is CPU contention (see below)
    (5000, 1000, 0.15, "compute-bound"),
    (1500, 1000, 0.05, "balanced"),
    (1500, 1000, 0.24, "balanced"),
])
def test_verdict_thresholds(input_eps, training_eps, wait, expected):
    assert bottleneck.verdict(input_eps, training_eps, wait) == expected


def test_waiting_for_a_far_faster_pipeline_is_called_cpu_contention():
    """resnet20 on in-memory synthetic data on a busy machine: input alone 80x training, 25% of the step waiting."""
    note = bottleneck.contention(80000, 1000, 0.25)
    assert note == ("25% of the step waited for input although input alone is 80x faster: CPU contention (other "
                    "processes or the pipeline's threads compete for cores)")
    assert bottleneck.contention(80000, 1000, 0.10) is None and bottleneck.contention(1500, 1000, 0.30) is None
    line = next(line for line in bench.format_bottleneck(dict(
        experiment="x", input_examples_per_sec=80000, training_examples_per_sec=1000, training_step_ms=64,
        end_to_end_examples_per_sec=750, end_to_end_step_ms=85, input_wait_fraction=0.25, input_to_training_ratio=80,
        steps=8, repeats=3, warmup_steps=2, verdict="compute-bound", verdict_note=note, thresholds="t",
        advice=[])).splitlines() if line.startswith("verdict:"))
    assert line == f"verdict: COMPUTE-BOUND; {note}"


def test_pipeline_slowed_on_purpose_is_input_bound(tmp_path):
    exp = _experiment(bench_tasks.SlowInput(), tmp_path)
    result = bottleneck.measure(exp, exp.build_model(), steps=8, warmup_steps=2, repeats=3)
    print({k: round(v, 2) for k, v in result.items() if isinstance(v, float)})
    assert result["verdict"] == "input-bound"
    assert result["input_examples_per_sec"] < result["training_examples_per_sec"]
    # a sleep of INPUT_SLEEP_S per example caps the input at 1 / INPUT_SLEEP_S examples/s
    assert result["end_to_end_examples_per_sec"] < 1.5 / bench_tasks.INPUT_SLEEP_S
    advice = " ".join(bottleneck.advice(exp, result))
    assert "2 sequential map(s)" in advice and "tf.data service" in advice and "--cache" in advice
    assert "more replicas" not in advice


def test_heavy_model_on_in_memory_data_is_compute_bound(tmp_path):
    exp = _experiment(bench_tasks.HeavyModel(), tmp_path)
    result = bottleneck.measure(exp, exp.build_model(), steps=8, warmup_steps=2, repeats=3)
    print({k: round(v, 2) for k, v in result.items() if isinstance(v, float)})
    assert result["verdict"] == "compute-bound"
    assert result["input_to_training_ratio"] > bottleneck.COMPUTE_BOUND_RATIO
    advice = bottleneck.advice(exp, result)
    assert any("more replicas help" in a for a in advice) and not any("tf.data service" in a for a in advice)


def _run_cli(argv, capsys):
    with flagsaver.flagsaver():
        try:
            code = bench.main(argv)
        except SystemExit as e:
            code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bottleneck_cli_on_four_replicas_writes_its_json(tmp_path, capsys):
    code, out, err = _run_cli(["dtf.bench", "bottleneck", "--task=bench_tasks:HeavyModel", "--strategy=mirrored",
                               "--num_cpu_devices=4", CROSS_DEVICE_OPS, "--global_batch_size=64",
                               f"--model_dir={tmp_path}",
                               "--bench_steps=4", "--bench_warmup_steps=2", "--bench_repeats=1"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "bottleneck.json").read_text())
    assert result["num_replicas"] == 4 and result["per_replica_batch_size"] == 16
    assert result["verdict"] in ("input-bound", "balanced", "compute-bound")
    assert f"verdict: {result['verdict'].upper()}" in out and "thresholds: compute-bound when input >= 2 x" in out
    allreduce_run = result["allreduce"]
    assert allreduce_run["replicas"] == 4 and allreduce_run["gradient_bytes"] == result["gradient_bytes"] > 4096
    assert len(allreduce_run["bytes"]) >= 2  # two sizes determine alpha and beta
    assert all(s > 0 for s in allreduce_run["seconds"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # written atomically


def test_overhead_reduced_run_prints_both_step_times_and_what_each_part_costs(tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = _run_cli(["dtf.bench", "overhead", f"--task={tasks_for_tests_spec()}", "--strategy=one_device",
                                   "--global_batch_size=32", f"--model_dir={tmp_path}", "--bench_parts",
                                   "--steps_per_epoch=4", "--bench_epochs=2", "--bench_repeats=1"], capsys)
    assert code == 0, err
    assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]
    print(out)
    times = {name: float(ms) for name, ms in re.findall(r"^\s*(dtf|hand-written):\s+([0-9.]+) ms/step", out, re.M)}
    assert set(times) == {"dtf", "hand-written"} and all(0 < t < math.inf for t in times.values())
    ratio = float(re.search(r"ratio dtf / hand-written examples/s: ([0-9.]+)", out).group(1))
    assert ratio == pytest.approx(times["hand-written"] / times["dtf"], rel=0.02)
    parts = {name: (float(cost), sign, float(ms)) for name, cost, sign, ms in re.findall(
        r"^\s+([\w ]+):\s+([+-][0-9.]+) ms  \(dtf (with|without) [\w ]+: ([0-9.]+) ms/step", out, re.M)}
    assert set(parts) == {"TerminateOnNaN", "LayoutRecorder", "BackupAndRestore", "TrainingScalars", "TensorBoard",
                          "Preemption", "the callbacks", "the progress bar"}, out
    for cost, sign, ms in parts.values():  # the cost is the variant's difference from the whole, signed by the part
        assert cost == pytest.approx((ms - times["dtf"]) * (1 if sign == "with" else -1), abs=0.02)


def tasks_for_tests_spec():
    import tasks_for_tests

    return f"{tasks_for_tests.__file__}:Regression"


@pytest.mark.parametrize("argv, words", [
    (["dtf.bench"], "dtf.bench: error: no benchmark given; run python -m dtf.bench {bottleneck|overhead|scaling}"),
    (["dtf.bench", "speed"], "dtf.bench speed: error: 'speed' is not a benchmark"),
    (["dtf.bench", "bottleneck", "--bench_steps=1"], "dtf.bench bottleneck: error: flag --bench_steps=1"),
    (["dtf.bench", "scaling", "--bench_replicas=1,two"], "--bench_replicas=1,two must be"),
])
def test_bad_input_is_one_line_and_exit_2(argv, words, capsys, tmp_path):
    code, _, err = _run_cli(argv + [f"--model_dir={tmp_path}"], capsys)
    assert code == 2 and words in err and err.count("\n") == 1, err


def test_unwritable_model_dir_is_refused_before_any_run(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, _, err = _run_cli(["dtf.bench", "scaling", f"--model_dir={tmp_path / 'file' / 'out'}"], capsys)
    assert code == 2 and f"--model_dir={tmp_path / 'file' / 'out'} is not writable" in err and err.count("\n") == 1


def test_alpha_beta_fit_recovers_the_model_and_predicts_falling_efficiency():
    alpha, beta = 20e-6, 5e9
    points = [(p, n, allreduce.ring_seconds(p, n, alpha, beta)) for p in (2, 4) for n in (4096, 8 << 20)]
    fitted_alpha, fitted_beta = allreduce.fit(points)
    assert fitted_alpha == pytest.approx(alpha, rel=1e-6) and fitted_beta == pytest.approx(beta, rel=1e-6)
    # 2(p-1)/p * n / beta: a 1 MB all-reduce over 2 replicas on a 8 Gbit/s (1 GB/s) link with no latency = 1 ms
    assert allreduce.ring_seconds(2, 1e6, 0.0, 1e9) == pytest.approx(1e-3)
    predicted = allreduce.predicted_efficiency([1, 2, 8, 64], 8 << 20, 0.05, alpha, link_gbps=10)
    efficiencies = [p["efficiency"] for p in predicted]
    assert efficiencies[0] == 1.0 and all(a > b for a, b in zip(efficiencies, efficiencies[1:]))
    with pytest.raises(ValueError, match="2 or more replicas"):
        allreduce.fit([(1, 4096, 0.001)])
    # noisy data that would give a negative latency keeps alpha at 0
    assert allreduce.fit([(2, 4096, 1e-3), (2, 8 << 20, 1e-3 + 8e-3)])[0] >= 0
    assert np.isfinite(allreduce.fit([(2, 4096, 2e-3), (2, 8 << 20, 1e-3)])[1])


def test_strong_scaling_global_batch_must_split_over_every_count():
    from dtf.benchmarks import scaling as bench_scaling

    assert bench_scaling.batches(Config(per_replica_batch_size=16), [1, 2, 4]) == {
        "weak_per_replica": 16, "strong_global": 64}
    with pytest.raises(dtf.UserError, match="global batch 64, which 3 replicas cannot split"):
        bench_scaling.batches(Config(global_batch_size=64), [1, 3])


def test_worker_counts_double_up_to_the_number_of_workers():
    from dtf.benchmarks import scaling as bench_scaling

    assert bench_scaling.worker_counts(1) == [1] and bench_scaling.worker_counts(2) == [1, 2]
    assert bench_scaling.worker_counts(6) == [1, 2, 4, 6] and bench_scaling.worker_counts(8) == [1, 2, 4, 8]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["--bench_replicas=1,2", "--num_workers=2"])
def test_scaling_run_measures_weak_and_strong_in_own_interpreters(tmp_path, capsys, where):
    code, out, err = _run_cli(["dtf.bench", "scaling", f"--task={tasks_for_tests_spec()}", "--per_replica_batch_size=8",
                               where, f"--model_dir={tmp_path}", "--bench_steps=4", "--bench_warmup_steps=2",
                               "--bench_repeats=1", "--link_gbps=10", "--bench_timeout=300"], capsys)
    assert code == 0, err
    print(out)
    unit = "worker" if where.startswith("--num_workers") else "replica"
    progress = [line.split(" scaling at ")[0][len("dtf.bench: "):] for line in out.splitlines()
                if line.startswith("dtf.bench: measur")]  # a line as each point starts and ends
    assert progress == ["measuring weak", "measured weak", "measuring strong", "measured strong"] * 2, out
    assert f"measured strong scaling at 2 {unit}(s), global batch 16 (4 of 4) in " in out, out
    result = json.loads((tmp_path / "scaling.json").read_text())
    points = {(p["mode"], p["replicas"]): p for p in result["points"]}
    assert set(points) == {("weak", 1), ("strong", 1), ("weak", 2), ("strong", 2)}
    assert points["weak", 2]["global_batch_size"] == 16 and points["strong", 1]["global_batch_size"] == 16
    assert points["weak", 1]["efficiency"] == 1.0 and all(p["examples_per_sec"] > 0 for p in points.values())
    assert points["weak", 2]["allreduce"]["replicas"] == 2 and points["weak", 1]["allreduce"] is None
    model = result["model"]
    assert model["link_gbps"] == 10 and [p["replicas"] for p in model["predicted"]][:2] == [2, 4]
    assert "MODEL (alpha-beta ring all-reduce, not a measurement)" in out
    assert (tmp_path / "scaling.png").stat().st_size > 1000
    assert result["workers"] == where.startswith("--num_workers")
    strategies = {json.loads((tmp_path / "points" / f"weak_{p}" / "bottleneck.json").read_text())["strategy"]
                  for p in (1, 2)}
    assert strategies == ({"multi_worker"} if result["workers"] else {"one_device", "mirrored"})
