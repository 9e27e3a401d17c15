"""Benchmark (not a test): Hyperband vs a full grid on the same `shapes` space.

Budget = training epochs spent. Prints the grid's best objective and budget, the epochs Hyperband spent until a
trial first came within --tolerance of the grid's best, and their ratio (lower is better for Hyperband).

    python tools/bench_tuner.py [--epochs=4] [--tolerance=0.01] [--out=/tmp/bench_tuner] [--reuse_grid]

--reuse_grid takes the grid's results from OUT/grid/results.csv when a previous run left them (the grid does not
depend on Hyperband's code or settings), to measure a Hyperband change in a third of the time.
"""
import argparse
import csv
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPACE = ["--dataset=shapes", "--model=mlp", "--strategy=mirrored", "--num_cpu_devices=2", "--optimizer=sgd",
         "--reference_batch_size=128", "--lr_schedule=cosine", "--steps_per_epoch=20", "--seed=42",
         "--tune_global_batch_sizes=64,256", "--tune_base_lr=0.01,0.1,1.0", "--tune_warmup_epochs=0,1",
         "--tune_lr_scaling=linear", "--objective=val_accuracy"]


def sweep(tuner: str, epochs: int, tune_dir: str, reuse: bool = False):
    if not (reuse and os.path.exists(os.path.join(tune_dir, "results.csv"))):
        shutil.rmtree(tune_dir, ignore_errors=True)
        cmd = [sys.executable, "-m", "dtf.tune", *SPACE, f"--tuner={tuner}", f"--epochs={epochs}",
               "--max_trials=100", f"--tune_dir={tune_dir}"]
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    with open(os.path.join(tune_dir, "results.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "completed"]
    return sorted(rows, key=lambda r: int(r["trial"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--out", default="/tmp/bench_tuner")
    parser.add_argument("--reuse_grid", action="store_true", help="reuse OUT/grid/results.csv when present")
    args = parser.parse_args()
    grid = sweep("grid", args.epochs, os.path.join(args.out, "grid"), reuse=args.reuse_grid)
    best = max(float(r["objective"]) for r in grid)
    grid_budget = sum(int(r["epochs_run"]) for r in grid)
    band = sweep("hyperband", args.epochs, os.path.join(args.out, "hyperband"))
    spent, reached = 0, None
    for r in band:
        spent += int(r["epochs_run"])
        if reached is None and float(r["objective"]) >= best - args.tolerance:
            reached = spent
    band_total = sum(int(r["epochs_run"]) for r in band)
    print(f"grid: {len(grid)} trials, {grid_budget} epochs, best val_accuracy {best:.4f}")
    print(f"hyperband: {len(band)} trials, {band_total} epochs, best {max(float(r['objective']) for r in band):.4f}")
    if reached is None:
        print(f"hyperband never came within {args.tolerance} of the grid's best; ratio: n/a")
    else:
        print(f"epochs to within {args.tolerance} of the grid's best: hyperband {reached} vs grid {grid_budget}: "
              f"ratio {reached / grid_budget:.2f}")


if __name__ == "__main__":
    main()
