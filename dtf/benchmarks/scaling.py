"""Weak and strong scaling of one experiment (`python -m dtf.bench scaling`), plus the alpha-beta all-reduce model.

Each replica count runs `python -m dtf.bench bottleneck` in its own interpreter (TF's collective keys clash between
mirrored strategies of different sizes in one process): mirrored on simulated CPU devices, or with --num_workers=N one
worker process per replica (1, 2, 4, ... N workers) on 127.0.0.1, started as a group with a timeout by
`dtf.cluster.procs` (the launcher's process groups). Weak scaling keeps the per-replica batch (the flags' per-replica
batch, else their global batch at 1 replica); strong keeps the global batch (the flags' global batch, else the
per-replica batch x the largest replica count). The all-reduce times each run measured are fitted by
`dtf.benchmarks.allreduce`, and the model predicts efficiency over a --link_gbps link.
"""
import json
import os
import sys
import time
from typing import Dict, List

from dtf.base.errors import UserError
from dtf.benchmarks import allreduce
from dtf.benchmarks.bottleneck import write_json
from dtf.cluster import procs, tf_config as cluster_lib
from dtf.experiment import train

PREDICT_AT = (2, 4, 8, 16, 32, 64)
DEFAULT_PER_REPLICA = 64


def replica_counts(values) -> List[int]:
    try:
        counts = sorted({int(v) for v in values})
    except ValueError:
        raise UserError(f"--bench_replicas={','.join(values)} must be a comma-separated list of integers, e.g. 1,2,4")
    if not counts or counts[0] < 1:
        raise UserError(f"--bench_replicas={','.join(values)} must be replica counts >= 1, e.g. 1,2,4")
    return counts


def batches(config, counts: List[int]) -> Dict[str, int]:
    per_replica = config.per_replica_batch_size or config.global_batch_size or DEFAULT_PER_REPLICA
    global_batch = config.global_batch_size or per_replica * counts[-1]
    bad = [p for p in counts if global_batch % p]
    if bad:
        raise UserError(f"strong scaling keeps the global batch {global_batch}, which {bad[0]} replicas cannot split; "
                        f"give --global_batch_size as a multiple of every --bench_replicas count")
    return {"weak_per_replica": per_replica, "strong_global": global_batch}


def _point(config, flag_values, mode: str, replicas: int, global_batch: int) -> Dict:
    folder = os.path.join(config.model_dir, "points", f"{mode}_{replicas}")
    os.makedirs(folder, exist_ok=True)
    workers = flag_values.num_workers > 0
    point = config.replace(global_batch_size=global_batch, per_replica_batch_size=None, model_dir=folder,
                           worker_hosts=None, task_index=None,
                           **(dict(strategy="multi_worker", num_cpu_devices=None) if workers else
                              dict(strategy="mirrored" if replicas > 1 else "one_device",
                                   num_cpu_devices=replicas if replicas > 1 else None)))
    flagfile = os.path.join(folder, "point.flags")
    with open(flagfile, "w") as f:
        f.write(point.to_flagfile())
    command = procs.python_command(
        "-m", "dtf.bench", "bottleneck", f"--flagfile={flagfile}", f"--bench_steps={flag_values.bench_steps}",
        f"--bench_warmup_steps={flag_values.bench_warmup_steps}", f"--bench_repeats={flag_values.bench_repeats}")
    tf_configs = cluster_lib.local_cluster(replicas) if workers else [None]
    result = procs.run_group(command, tf_configs, timeout_s=flag_values.bench_timeout)
    if not result.ok:
        sys.stderr.write(result.report() + "\n")
        failed = "timed out (--bench_timeout)" if result.timed_out else "failed"
        raise UserError(f"scaling: the {mode} run at {replicas} replica(s) {failed}; its output is above")
    with open(os.path.join(folder, "bottleneck.json")) as f:
        return json.load(f)


def worker_counts(num_workers: int) -> List[int]:
    """1, 2, 4, ... below num_workers, then num_workers."""
    counts = [1]
    while counts[-1] * 2 < num_workers:
        counts.append(counts[-1] * 2)
    return counts + [num_workers] if num_workers > 1 else counts


def run(config, flag_values) -> Dict:
    train.check_model_dir(config.model_dir)
    counts = (worker_counts(flag_values.num_workers) if flag_values.num_workers
              else replica_counts(flag_values.bench_replicas))
    sizes = batches(config, counts)
    table, total = [], 2 * len(counts)
    for p in counts:
        for mode, global_batch in (("weak", sizes["weak_per_replica"] * p), ("strong", sizes["strong_global"])):
            what = (f"{mode} scaling at {p} {'worker' if flag_values.num_workers else 'replica'}(s), global batch "
                    f"{global_batch} ({len(table) + 1} of {total})")
            print(f"dtf.bench: measuring {what} ...", flush=True)  # each takes minutes: say what runs
            began = time.monotonic()
            r = _point(config, flag_values, mode, p, global_batch)
            print(f"dtf.bench: measured {what} in {time.monotonic() - began:.0f}s: "
                  f"{r['end_to_end_examples_per_sec']:.0f} examples/s", flush=True)
            table.append({"mode": mode, "replicas": p, "global_batch_size": global_batch,
                          "examples_per_sec": r["end_to_end_examples_per_sec"],
                          "training_examples_per_sec": r["training_examples_per_sec"],
                          "training_step_ms": r["training_step_ms"], "verdict": r["verdict"],
                          "gradient_bytes": r["gradient_bytes"], "allreduce": r.get("allreduce")})
    for mode in ("weak", "strong"):
        rows = [row for row in table if row["mode"] == mode]
        base = rows[0]["examples_per_sec"] / rows[0]["replicas"]
        for row in rows:
            row["speedup"] = row["examples_per_sec"] / rows[0]["examples_per_sec"]
            row["efficiency"] = row["examples_per_sec"] / (base * row["replicas"])
    out = {"replicas": counts, **sizes, "workers": flag_values.num_workers > 0, "points": table,
           "model": _model(table, flag_values)}
    write_json(os.path.join(config.model_dir, "scaling.json"), out)
    _plot(table, os.path.join(config.model_dir, "scaling.png"))
    print(format_table(out))
    print(f"dtf.bench: wrote {config.model_dir}/scaling.json and scaling.png")
    return out


def _model(table: List[Dict], flag_values) -> Dict:
    """The alpha-beta fit to every measured all-reduce, and the efficiency it predicts over --link_gbps."""
    points = [(row["allreduce"]["replicas"], n, t) for row in table if row["allreduce"]
              for n, t in zip(row["allreduce"]["bytes"], row["allreduce"]["seconds"])]
    if not points:
        return {}
    alpha, beta = allreduce.fit(points)
    one = next(row for row in table if row["mode"] == "weak")
    step_s = (flag_values.device_step_ms or one["training_step_ms"]) / 1000
    return {"alpha_s": alpha, "beta_bytes_per_s": beta, "gradient_bytes": one["gradient_bytes"],
            "device_step_ms": 1000 * step_s, "link_gbps": flag_values.link_gbps,
            "predicted": allreduce.predicted_efficiency(PREDICT_AT, one["gradient_bytes"], step_s, alpha,
                                                        flag_values.link_gbps)}


def format_table(out: Dict) -> str:
    lines = [f"{'mode':>6} {'replicas':>8} {'global batch':>12} {'examples/s':>11} {'speedup':>8} {'efficiency':>10}"
             f" {'all-reduce ms':>13}"]
    for row in out["points"]:
        ar = row["allreduce"]
        lines.append(f"{row['mode']:>6} {row['replicas']:>8} {row['global_batch_size']:>12} "
                     f"{row['examples_per_sec']:>11.0f} {row['speedup']:>8.2f} {row['efficiency']:>10.2f} "
                     f"{1000 * ar['gradient_seconds'] if ar else 0:>13.2f}")
    m = out["model"]
    if m:
        lines.append("MODEL (alpha-beta ring all-reduce, not a measurement): "
                     "T(p, n) = 2(p-1)*alpha + 2(p-1)/p * n/beta; "
                     f"fitted here: alpha = {1e6 * m['alpha_s']:.1f} us, beta = {m['beta_bytes_per_s'] / 1e9:.2f} GB/s")
        lines.append(f"  predicted weak-scaling efficiency for a {m['device_step_ms']:.1f} ms device step, "
                     f"{m['gradient_bytes'] / 2**20:.2f} MB of gradients, a {m['link_gbps']:g} Gbit/s link and the "
                     f"fitted alpha (no compute/communication overlap):")
        lines.append("  " + ", ".join(f"p={r['replicas']}: {r['efficiency']:.2f}" for r in m["predicted"]))
    return "\n".join(lines)


def _plot(table: List[Dict], path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in ("weak", "strong"):
        rows = [row for row in table if row["mode"] == mode]
        ax.plot([r["replicas"] for r in rows], [r["examples_per_sec"] for r in rows], "o-", label=f"{mode} (measured)")
        ax.plot([r["replicas"] for r in rows], [rows[0]["examples_per_sec"] / rows[0]["replicas"] * r["replicas"]
                                                for r in rows], ":", label=f"{mode} (ideal)")
    ax.set_xlabel("replicas")
    ax.set_ylabel("examples/s")
    ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
