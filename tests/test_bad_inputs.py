"""The promise for a user's mistake, walked over every command-line tool: one line `dtf.X: error: …` naming the
flag or value, exit status 2 (never restarted), no traceback, and nothing written — not even an empty directory.

Each case runs `python -m MODULE ARGS` in a fresh empty working directory with every output flag (--model_dir,
--tune_dir, --output, --study_dir) pointing inside it; afterwards the directory must hold exactly what the case put
there (nothing, unless the case is about an existing file or directory). Task files and flagfiles live in a separate
fixtures directory. Cases run in parallel subprocesses (a module fixture runs the selected ones up front).
"""
import concurrent.futures
import hashlib
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from typing import Callable, NamedTuple, Optional, Sequence

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE_TIMEOUT_S = 240
PARALLEL = 3

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]  # the first case waits for them all

BAD_TASKS = '''
"""Tasks that break the dtf.Task contract, one way each (tests/test_bad_inputs.py)."""
import keras
import numpy as np
import tensorflow as tf
from absl import flags

import dtf

flags.DEFINE_integer("bad_units", 8, "Hidden units.")
N, FEATURES, CLASSES = 64, 8, 5


def arrays(labels_shape=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, FEATURES)).astype("float32")
    y = (np.arange(N) % CLASSES).astype("int64") if labels_shape is None else rng.normal(
        size=(N, *labels_shape)).astype("float32")
    return x, y


def examples(labels_shape=None):
    return tf.data.Dataset.from_tensor_slices(arrays(labels_shape))


def classifier(outputs=CLASSES, features=FEATURES):
    return keras.Sequential([keras.Input((features,)), keras.layers.Dense(outputs)])


class Good(dtf.Task):
    def datasets(self):
        return {"train": examples(), "validation": examples()}

    def build_model(self):
        return classifier()


class NoBuildModel(dtf.Task):
    def datasets(self):
        return {"train": examples()}


class NoDatasets(dtf.Task):
    def build_model(self):
        return classifier()


class ModelIsALayer(Good):
    def build_model(self):
        return keras.layers.Dense(CLASSES)


class ModelIsNone(Good):
    def build_model(self):
        pass


class DatasetsList(Good):
    def datasets(self):
        return [examples()]


class DatasetsBadKey(Good):
    def datasets(self):
        return {"training": examples()}


class DatasetsNumpy(Good):
    def datasets(self):
        return {"train": arrays()}


class DatasetsBatched(Good):
    def datasets(self):
        return {"train": examples().batch(8)}


class NoTrainSplit(Good):
    def datasets(self):
        return {"validation": examples()}


class ThreeOutputsFiveClasses(Good):
    def build_model(self):
        return classifier(outputs=3)


class RegressionShapeMismatch(Good):
    def datasets(self):
        return {"train": examples(labels_shape=(3,))}

    def build_model(self):
        return classifier(outputs=2)

    def loss(self):
        return "mse"

    def metrics(self):
        return ["mean_absolute_error"]


class WrongInputShape(Good):
    def build_model(self):
        return classifier(features=4)


class ValidationFeaturesDiffer(Good):
    def datasets(self):
        x, y = arrays()
        return {"train": examples(), "validation": tf.data.Dataset.from_tensor_slices((x[:, :4], y))}


class NeedsArguments(Good):
    def __init__(self, units):
        self.units = units


class LossNotALoss(Good):
    def loss(self):
        return "no_such_loss"


NOT_A_TASK = 42
'''
SYNTAX_ERROR_TASK = "import dtf\n\nclass T(dtf.Task)\n    pass\n"
IMPORT_ERROR_TASK = "import dtf\nimport no_such_package_for_dtf_tests\n\nclass T(dtf.Task):\n    pass\n"
FLAGFILES = {
    "nested_missing.flags": "--epochs=1\n--flagfile=no_such_inner.flags\n",
    "unknown_flag.flags": "--epochs=1\n--no_such_flag=3\n",
}


class Case(NamedTuple):
    id: str
    argv: Sequence[str]  # after `python -m`; {fx}: the fixtures directory, {cwd}: the case's working directory
    says: Sequence[str]  # what the error line must contain (the flag or value it is about)
    status: int = 2
    setup: Optional[Callable[[str], None]] = None  # puts the existing state a case is about into the working dir
    one_line: bool = True  # False: the launcher reports a worker's error in its own words (the worker's line inside)
    privileged: bool = True  # False: run without root's override of file permissions
    xfail: Optional[str] = None  # "fixed on branch X"


def _read_only_dir(cwd):
    os.mkdir(os.path.join(cwd, "ro"))
    os.chmod(os.path.join(cwd, "ro"), stat.S_IRUSR | stat.S_IXUSR)


def _file(name, text="x"):
    def make(cwd):
        with open(os.path.join(cwd, name), "w") as f:
            f.write(text)
    return make


TASK = "--task={fx}/bad_tasks.py:"
RUN_TASK = ["dtf.run", "--model_dir={cwd}/m", "--epochs=1", "--global_batch_size=16", "--progress=none"]
SHORT = ["--epochs=1", "--steps_per_epoch=2", "--global_batch_size=16", "--model_dir={cwd}/m"]
LAUNCH = ["dtf.launch", "--num_workers=2"]
WORKER = ["--", sys.executable, "-m", "dtf.run"]
SPACE = "--tune_base_lr=0.01,0.1"
TUNE = ["dtf.tune", "--tune_dir={cwd}/t", "--max_trials=1", "--epochs=1", "--global_batch_size=16", SPACE]
PREDICT = ["dtf.predict", "--output={cwd}/p.npy"]
BATCH_STUDY = ["dtf.batch_study", "--study_dir={cwd}/s", "--epochs=1"]


def task(name, *more, tool=RUN_TASK):
    return [*tool, TASK + name, *more]


CASES = [
    # --- dtf.run: flags, flagfiles, values
    Case("run-unknown-flag", ["dtf.run", "--bogus=1"], ["bogus"]),
    Case("run-epochs-1e20", ["dtf.run", "--epochs=1e20"], ["--epochs=1e20"]),
    Case("run-epochs-past-any-step-count", task("Good", "--epochs=100000000000000000000"), ["--epochs"]),
    Case("run-epochs-0", ["dtf.run", "--epochs=0"], ["--epochs=0"]),
    Case("run-flagfile-missing", ["dtf.run", "--flagfile=nope.flags"], ["--flagfile=nope.flags"]),
    Case("run-flagfile-nested-missing", ["dtf.run", "--flagfile={fx}/nested_missing.flags"], ["no_such_inner.flags"]),
    Case("run-flagfile-unknown-flag", ["dtf.run", "--flagfile={fx}/unknown_flag.flags"], ["no_such_flag"]),
    Case("run-strategy-enum", ["dtf.run", "--strategy=foo"], ["--strategy", "foo"]),
    Case("run-optimizer-enum", ["dtf.run", "--optimizer=adamw2"], ["--optimizer", "adamw2"]),
    Case("run-lr-scaling-enum", ["dtf.run", "--lr_scaling=cubic"], ["--lr_scaling", "cubic"]),
    Case("run-progress-enum", ["dtf.run", "--progress=loud"], ["--progress", "loud"]),
    Case("run-epoch-mode-enum", ["dtf.run", "--epoch_mode=window"], ["--epoch_mode", "window"]),
    Case("run-base-lr-negative", ["dtf.run", "--base_lr=-1"], ["--base_lr"]),
    Case("run-base-lr-nan", ["dtf.run", "--base_lr=nan"], ["--base_lr"]),
    Case("run-batch-not-an-int", ["dtf.run", "--global_batch_size=64.5"], ["--global_batch_size"]),
    Case("run-both-batch-flags", ["dtf.run", "--global_batch_size=64", "--per_replica_batch_size=32"],
         ["--global_batch_size", "--per_replica_batch_size"]),
    Case("run-both-warmups", ["dtf.run", "--warmup_epochs=1", "--warmup_steps=10"], ["--warmup_epochs", "--warmup_steps"]),
    Case("run-task-and-dataset", task("Good", "--dataset=shapes"), ["--dataset=shapes"]),
    Case("run-profile-steps", ["dtf.run", "--profile_steps=5"], ["--profile_steps"]),
    Case("run-decay-boundaries-not-numbers", ["dtf.run", "--lr_decay_boundaries=a,b"], ["--lr_decay_boundaries"]),
    Case("run-positional-argument", ["dtf.run", "train"], ["train"]),
    Case("run-accumulation-below-2", ["dtf.run", "--gradient_accumulation_steps=1"], ["--gradient_accumulation_steps"]),
    Case("run-mode-enum", ["dtf.run", "--mode=evaluate"], ["--mode", "evaluate"]),
    # --- dtf.run: batch and data checks that need the data, before anything is written
    Case("run-batch-larger-than-data", task("Good", "--global_batch_size=128"), ["--global_batch_size=128"]),
    Case("run-batch-larger-than-data-with-steps", task("Good", "--global_batch_size=128", "--steps_per_epoch=2"),
         ["--global_batch_size=128"]),
    Case("run-pass-epochs-past-one-pass", task("Good", "--steps_per_epoch=100", "--epoch_mode=pass"),
         ["--steps_per_epoch=100", "--epoch_mode=pass"]),
    Case("run-batch-not-divisible-by-replicas", task("Good", "--strategy=mirrored", "--num_cpu_devices=2",
                                                     "--global_batch_size=15"), ["--global_batch_size=15"]),
    Case("run-data-service-scheme", ["dtf.run", "--data_service=foo://x"], ["--data_service"]),
    Case("run-data-service-local-0", ["dtf.run", "--data_service=local:0"], ["--data_service"]),
    Case("run-data-service-local-x", ["dtf.run", "--data_service=local:x"], ["--data_service"]),
    Case("run-data-service-no-port", ["dtf.run", "--data_service=grpc://localhost"], ["--data_service"]),
    Case("run-data-service-and-cache", task("Good", "--data_service=local:1", "--cache"), ["--cache", "--data_service"]),
    Case("run-two-cluster-sources", ["dtf.run", "--cluster_resolver=slurm", "--worker_hosts=127.0.0.1:1"],
         ["--cluster_resolver", "--worker_hosts"]),
    Case("run-task-index-out-of-range", ["dtf.run", "--worker_hosts=127.0.0.1:1,127.0.0.1:2", "--task_index=5"],
         ["--task_index"]),
    Case("run-dataset-unknown", ["dtf.run", "--dataset=no_such_dataset", "--model_dir={cwd}/m"], ["no_such_dataset"]),
    Case("run-model-unknown", ["dtf.run", "--dataset=synthetic/8x8x1", "--model=no_such_model",
                               "--model_dir={cwd}/m"], ["no_such_model"]),
    # --- dtf.run: the Task contract
    Case("task-spec-without-attr", ["dtf.run", "--task=my_tasks"], ["--task=my_tasks"]),
    Case("task-file-missing", ["dtf.run", "--task=no_file.py:T"], ["--task=no_file.py:T"]),
    Case("task-module-missing", ["dtf.run", "--task=no_such_module_xyz:T"], ["--task=no_such_module_xyz:T"]),
    Case("task-attr-missing", task("Nope"), ["--task=", "Nope"]),
    Case("task-attr-not-a-task", task("NOT_A_TASK"), ["--task=", "NOT_A_TASK"]),
    Case("task-syntax-error", ["dtf.run", "--task={fx}/syntax_error_task.py:T"], ["--task=", "SyntaxError"]),
    Case("task-import-error", ["dtf.run", "--task={fx}/import_error_task.py:T"],
         ["--task=", "no_such_package_for_dtf_tests"]),
    Case("task-flag-bad-value", task("Good", "--bad_units=x"), ["--bad_units"]),
    Case("task-needs-arguments", task("NeedsArguments"), ["--task=", "NeedsArguments"]),
    Case("task-no-build-model", task("NoBuildModel"), ["--task=", "build_model()"]),
    Case("task-no-datasets", task("NoDatasets"), ["--task=", "datasets()"]),
    Case("task-model-is-a-layer", task("ModelIsALayer"), ["--task=", "build_model()", "Dense"]),
    Case("task-model-is-none", task("ModelIsNone"), ["--task=", "build_model()", "NoneType"]),
    Case("task-datasets-list", task("DatasetsList"), ["--task=", "datasets()", "list"]),
    Case("task-datasets-bad-key", task("DatasetsBadKey"), ["--task=", "'training'"]),
    Case("task-datasets-numpy", task("DatasetsNumpy"), ["--task=", "tuple"]),
    Case("task-datasets-batched", task("DatasetsBatched"), ["--task=", "batched"]),
    Case("task-no-train-split", task("NoTrainSplit"), ["--task=", "'train'"]),
    Case("task-3-outputs-5-classes", task("ThreeOutputsFiveClasses"), ["--task=", "label"]),
    Case("task-regression-label-shape", task("RegressionShapeMismatch"), ["--task=", "(16, 3)", "(16, 2)"]),
    Case("task-model-input-shape", task("WrongInputShape"), ["--task=", "model inputs"]),
    Case("task-validation-features-differ", task("ValidationFeaturesDiffer"), ["--task=", "validation"]),
    Case("task-loss-unknown", task("LossNotALoss"), ["--task=", "no_such_loss"]),
    # --- dtf.run: where it writes
    Case("run-model-dir-read-only", task("Good", "--model_dir={cwd}/ro/run"), ["--model_dir=", "ro/run"],
         setup=_read_only_dir, privileged=False),
    Case("run-model-dir-under-a-file", task("Good", "--model_dir={cwd}/f/run"), ["--model_dir=", "f/run"],
         setup=_file("f")),
    # --- the evaluator (dtf.run --mode=evaluate_continuously)
    Case("evaluator-best-metric", ["dtf.run", "--mode=evaluate_continuously", "--best_metric=foo_bar"],
         ["--best_metric=foo_bar"]),
    Case("evaluator-task-no-build-model", task("NoBuildModel", "--mode=evaluate_continuously"),
         ["--task=", "build_model()"]),
    Case("evaluator-model-dir-without-a-run",
         ["dtf.run", "--mode=evaluate_continuously", "--eval_timeout_s=1", "--model_dir={cwd}/nope"], ["--model_dir"]),
    # --- dtf.launch (local, ray, --emit)
    Case("launch-num-workers-0", ["dtf.launch", "--num_workers=0", *WORKER], ["--num_workers"]),
    Case("launch-num-workers-missing", ["dtf.launch", *WORKER], ["--num_workers"]),
    Case("launch-no-command", LAUNCH, ["--"]),
    Case("launch-backend-enum", [*LAUNCH, "--backend=k8s", *WORKER], ["--backend", "k8s"]),
    Case("launch-emit-enum", [*LAUNCH, "--emit=bogus", *WORKER], ["--emit=bogus"]),
    Case("launch-evaluator-quoting", [*LAUNCH, "--evaluator=a \"b", *WORKER], ["--evaluator"]),
    Case("launch-max-restarts-negative", [*LAUNCH, "--max_restarts=-1", *WORKER], ["--max_restarts"]),
    Case("launch-min-workers-over", [*LAUNCH, "--min_workers=3", *WORKER], ["--min_workers", "--num_workers=2"]),
    Case("launch-timeout-negative", [*LAUNCH, "--timeout=-5", *WORKER], ["--timeout"]),
    Case("launch-unknown-flag", [*LAUNCH, "--bogus", *WORKER], ["bogus"]),
    Case("launch-ray-with-emit", [*LAUNCH, "--backend=ray", "--emit=slurm", *WORKER], ["--emit", "--backend=ray"]),
    Case("launch-ray-bad-address", [*LAUNCH, "--backend=ray", "--address=bad:x", *WORKER], ["--address"]),
    Case("launch-slurm-time", [*LAUNCH, "--emit=slurm", "--time=abc", *WORKER], ["--time=abc"]),
    Case("launch-slurm-num-workers-negative", ["dtf.launch", "--num_workers=-1", "--emit=slurm", *WORKER],
         ["--num_workers"]),
    Case("launch-tfjob-volume", [*LAUNCH, "--emit=tfjob", "--volume=nocolon", *WORKER], ["--volume=nocolon"]),
    Case("launch-tfjob-gpus-negative", [*LAUNCH, "--emit=tfjob", "--gpus_per_worker=-1", *WORKER],
         ["--gpus_per_worker"]),
    Case("launch-worker-unknown-flag", [*LAUNCH, "--timeout=120", *WORKER, "--bogus=1"],
         ["dtf.run: error:", "bogus"], one_line=False),
    Case("launch-worker-task-no-datasets", [*LAUNCH, "--timeout=200", *WORKER, TASK + "NoDatasets",
                                            "--model_dir={cwd}/m"], ["dtf.run: error:", "datasets()"],
         one_line=False),
    # --- dtf.tune
    Case("tune-no-search-space", ["dtf.tune"], ["--tune_base_lr"]),
    Case("tune-tuner-enum", ["dtf.tune", SPACE, "--tuner=bayes2"], ["--tuner", "bayes2"]),
    Case("tune-base-lr-range-reversed", ["dtf.tune", "--tune_base_lr=0.1:0.01"], ["--tune_base_lr"]),
    Case("tune-base-lr-garbage", ["dtf.tune", "--tune_base_lr=abc"], ["--tune_base_lr"]),
    Case("tune-batch-sizes-garbage", ["dtf.tune", "--tune_global_batch_sizes=64,x"], ["--tune_global_batch_sizes"]),
    Case("tune-lr-scaling-unknown", ["dtf.tune", "--tune_lr_scaling=linear,cubic"], ["--tune_lr_scaling", "cubic"]),
    Case("tune-objective-direction-enum", ["dtf.tune", SPACE, "--objective_direction=up"], ["--objective_direction"]),
    Case("tune-max-trials-0", ["dtf.tune", SPACE, "--max_trials=0"], ["--max_trials"]),
    Case("tune-num-tuners-negative", ["dtf.tune", SPACE, "--num_tuners=-1"], ["--num_tuners"]),
    Case("tune-trial-workers-negative", ["dtf.tune", SPACE, "--trial_workers=-1"], ["--trial_workers=-1"]),
    Case("tune-parallel-trials-alone", ["dtf.tune", SPACE, "--parallel_trials=2"],
         ["--parallel_trials", "--trial_workers"]),
    Case("tune-trial-workers-with-num-tuners", ["dtf.tune", SPACE, "--trial_workers=2", "--num_tuners=2"],
         ["--num_tuners", "--parallel_trials"]),
    Case("tune-trial-workers-hyperband", ["dtf.tune", SPACE, "--trial_workers=2", "--tuner=hyperband"],
         ["--tuner=hyperband", "--trial_workers"]),
    Case("tune-steps-to-garbage", ["dtf.tune", SPACE, "--objective=steps_to:val_accuracy>0.9"],
         ["--objective=steps_to:", "METRIC>=VALUE"]),
    Case("tune-steps-to-direction", ["dtf.tune", SPACE, "--objective=steps_to:val_loss<=0.5",
                                     "--objective_direction=max"], ["--objective_direction=max"]),
    Case("run-stop-at-garbage", ["dtf.run", "--stop_at=val_accuracy=0.9"], ["--stop_at=val_accuracy=0.9"]),
    Case("run-validate-every-steps-without-stop-at", ["dtf.run", "--validate_every_steps=5"],
         ["--validate_every_steps=5", "--stop_at"]),
    Case("tune-task-no-build-model", task("NoBuildModel", tool=TUNE), ["--task=", "build_model()"]),
    Case("tune-batch-larger-than-data", task("Good", "--tune_global_batch_sizes=16,128", tool=TUNE),
         ["--tune_global_batch_sizes", "128"]),
    Case("tune-objective-not-reported", task("Good", "--objective=val_mean_absolute_error", tool=TUNE),
         ["--objective=val_mean_absolute_error"]),
    Case("tune-dir-read-only", task("Good", "--tune_dir={cwd}/ro/t", tool=TUNE), ["--tune_dir=", "ro/t"],
         setup=_read_only_dir, privileged=False),
    # --- dtf.predict
    Case("predict-nothing-to-run", PREDICT, ["--model"]),
    Case("predict-model-missing", [*PREDICT, "--model={cwd}/nope.keras"], ["--model=", "nope.keras"]),
    Case("predict-model-dir-missing", [*PREDICT, "--model_dir={cwd}/nope"], ["--model_dir=", "nope"]),
    Case("predict-missing-model-and-output-suffix", ["dtf.predict", "--model={cwd}/nope.keras",
                                                      "--output={cwd}/p.txt"], ["nope.keras"]),
    Case("predict-output-values-enum", [*PREDICT, "--output_values=probs2"], ["--output_values", "probs2"]),
    Case("predict-missing-model-output-exists", [*PREDICT, "--model={cwd}/m.keras"], ["--model=", "m.keras"],
         setup=_file("p.npy")),  # the existing --output stays as it was
    # --- dtf.bench
    Case("bench-no-command", ["dtf.bench"], ["bottleneck"]),
    Case("bench-unknown-command", ["dtf.bench", "speed"], ["speed"]),
    Case("bench-unknown-flag", ["dtf.bench", "bottleneck", "--bogus=1"], ["bogus"]),
    Case("bench-steps-0", ["dtf.bench", "bottleneck", "--bench_steps=0"], ["--bench_steps"]),
    Case("bench-overhead-one-epoch", ["dtf.bench", "overhead", "--bench_epochs=1"], ["--bench_epochs"]),
    Case("bench-scaling-replicas-garbage", ["dtf.bench", "scaling", "--bench_replicas=1,x"], ["--bench_replicas"]),
    Case("bench-bottleneck-task-no-datasets", ["dtf.bench", "bottleneck", TASK + "NoDatasets"],
         ["--task=", "datasets()"]),
    # --- dtf.batch_study
    Case("batch-study-no-batches", BATCH_STUDY, ["--batches"]),
    Case("batch-study-batches-garbage", [*BATCH_STUDY, "--batches=32,x"], ["--batches"]),
    Case("batch-study-rule-unknown", [*BATCH_STUDY, "--batches=32", "--rules=linear,cubic"], ["--rules", "cubic"]),
    Case("batch-study-target-accuracy", [*BATCH_STUDY, "--batches=32", "--target_accuracy=2"],
         ["--target_accuracy"]),
    Case("batch-study-batch-larger-than-data", [*BATCH_STUDY, TASK + "Good", "--batches=16,128"],
         ["--batches", "128"]),
]


class Result(NamedTuple):
    status: Optional[int]
    stdout: str
    stderr: str
    before: dict
    after: dict
    seconds: float


def _tree(root):
    """Every path under `root` (directories too) with its content's digest: what a case wrote shows up here."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(folder, d), root) + "/"] = None
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                out[os.path.relpath(os.path.join(folder, name), root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _run(case: Case, fixtures: str, cwd: str) -> Result:
    os.makedirs(cwd)
    if case.setup:
        case.setup(cwd)
    before = _tree(cwd)
    argv = [a.format(fx=fixtures, cwd=cwd) for a in case.argv]
    command = [sys.executable, "-m", *argv]
    if not case.privileged and os.geteuid() == 0:  # root writes into read-only directories; drop that power
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *command]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    start = time.time()
    try:
        proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=CASE_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
        status, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        status = None
        stdout, stderr = [(x or b"").decode(errors="replace") if isinstance(x, bytes) else (x or "")
                          for x in (e.stdout, e.stderr)]
    seconds = time.time() - start
    after = _tree(cwd)
    for folder, _, _ in os.walk(cwd):  # let pytest remove it
        os.chmod(folder, stat.S_IRWXU)
    return Result(status, stdout, stderr, before, after, seconds)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input_fixtures")
    (root / "bad_tasks.py").write_text(textwrap.dedent(BAD_TASKS))
    (root / "syntax_error_task.py").write_text(SYNTAX_ERROR_TASK)
    (root / "import_error_task.py").write_text(IMPORT_ERROR_TASK)
    for name, text in FLAGFILES.items():
        (root / name).write_text(text)
    return str(root)


@pytest.fixture(scope="module")
def results(request, fixtures, tmp_path_factory):
    """Every selected case's Result, run PARALLEL at a time on first use; the total time goes to the terminal."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_bad_input" and item.module is request.module]
    work = tmp_path_factory.mktemp("bad_input_cwd")
    start = time.time()
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        futures = {c.id: pool.submit(_run, c, fixtures, str(work / c.id)) for c in selected}
        out = {k: f.result() for k, f in futures.items()}
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    slowest = sorted(out.items(), key=lambda kv: -kv[1].seconds)[:3]
    message = (f"bad inputs: {len(out)} case(s) in {time.time() - start:.0f}s, {PARALLEL} at a time; slowest: "
               + ", ".join(f"{k} {r.seconds:.0f}s" for k, r in slowest))
    if reporter:
        reporter.write_line(message)
    return out


def _params():
    out = []
    for case in CASES:
        marks = [pytest.mark.xfail(reason=case.xfail, strict=False)] if case.xfail else []
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


def test_the_table_is_large_and_unique():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", _params())
def test_bad_input(case, results):
    r = results[case.id]
    shown = f"command: {shlex.join(case.argv)}\nstdout:\n{r.stdout[-2000:]}\nstderr:\n{r.stderr[-3000:]}"
    assert r.status == case.status, shown
    assert "Traceback" not in r.stdout + r.stderr, shown
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    if case.one_line:  # the error line, and at most dtf's own progress lines ("dtf: …") before it
        errors = [line for line in lines if not line.startswith("dtf: ")]
        assert len(errors) == 1 and re.match(rf"{re.escape(case.argv[0])}( \w+)?: error: ", errors[0]), shown
        line = errors[0]
    else:
        line = r.stderr
    for text in case.says:
        assert text.format(fx="", cwd="") in line, shown
    assert r.after == r.before, f"the case wrote {sorted(set(r.after) - set(r.before))}\n{shown}"


# --- environment failures at run time: one line naming the path, status 2 (a rerun cannot help until it is fixed)


def test_a_refused_write_names_its_path(tmp_path):
    import tensorflow as tf  # noqa: F401  (dtf.experiment.atomic needs it)

    from dtf.experiment import atomic
    from dtf.experiment import callbacks
    from dtf.base.errors import WriteFailed

    (tmp_path / "f").write_text("a file where a directory should be")
    target = str(tmp_path / "f" / "run" / "summary.json")
    with pytest.raises(WriteFailed, match=f"cannot write {target}: ") as e:
        atomic.write_json(target, {"a": 1})
    assert e.value.exit_status == 2
    with pytest.raises(WriteFailed, match="cannot write .*/f/run"):
        callbacks.write_dir(str(tmp_path / "f" / "run"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_the_write_check_leaves_nothing_behind(tmp_path):
    from dtf.experiment import atomic

    assert atomic.unwritable(str(tmp_path / "a" / "b" / "c")) is None
    (tmp_path / "f").write_text("x")
    assert atomic.unwritable(str(tmp_path / "f" / "run"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root ignores file permissions")
def test_a_backup_directory_made_read_only_is_one_line_naming_it(fixtures, tmp_path):
    """The model_dir is writable at the start (the check passes) but its backup directory is not: the first backup
    fails mid-run, as when a directory is made read-only while training."""
    backup = tmp_path / "m" / "backup"
    backup.mkdir(parents=True)
    backup.chmod(stat.S_IRUSR | stat.S_IXUSR)
    case = Case("mid-run", [*task("Good"), f"--model_dir={tmp_path}/m"], [], privileged=False)
    try:
        r = _run(case, fixtures, str(tmp_path / "cwd"))
    finally:
        backup.chmod(stat.S_IRWXU)
    assert r.status == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"dtf.run: error: cannot write {backup}: "), r.stderr
