"""All-reduce time, measured on a strategy, and the standard alpha-beta model of a ring all-reduce fitted to it.

Ring all-reduce of n bytes over p replicas (reduce-scatter then all-gather, 2(p-1) messages of n/p bytes each):

    T(p, n) = 2(p-1)·α + 2(p-1)/p · n/β          α: latency per message (s), β: link bandwidth (bytes/s)

With compute not overlapped with communication, a replica's weak-scaling efficiency at p replicas is
t_step / (t_step + T(p, n)) for a device step time t_step and n the gradient bytes. This is a model, not a
measurement: it predicts what a ring over a given link would do; simulated CPU devices do not communicate over links.
"""
import statistics
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import tensorflow as tf

SMALL_BYTES, LARGE_BYTES = 4096, 4 << 20  # latency-dominated and bandwidth-dominated sizes


def measure(strategy: tf.distribute.Strategy, num_bytes: int, repeats: int = 10) -> float:
    """Median seconds of one SUM all-reduce of `num_bytes` of float32 across the strategy's replicas."""
    size = max(1, num_bytes // 4)

    @tf.function
    def step():
        def replica_fn():
            ctx = tf.distribute.get_replica_context()
            value = tf.fill([size], tf.cast(ctx.replica_id_in_sync_group, tf.float32))
            return ctx.all_reduce("SUM", value)[:1]
        return strategy.run(replica_fn)

    def once() -> float:
        start = time.perf_counter()
        for value in strategy.experimental_local_results(step()):
            value.numpy()
        return time.perf_counter() - start

    once()  # trace
    return statistics.median(once() for _ in range(repeats))


def measure_sizes(strategy: tf.distribute.Strategy, gradient_bytes: int) -> Dict:
    """All-reduce seconds at a latency-bound size, a bandwidth-bound size and the model's gradient size (two sizes at
    least, so that one replica count already determines both α and β)."""
    sizes = sorted({SMALL_BYTES, LARGE_BYTES, int(gradient_bytes)})
    seconds = [measure(strategy, n) for n in sizes]
    return {"replicas": strategy.num_replicas_in_sync, "bytes": sizes, "seconds": seconds,
            "gradient_bytes": int(gradient_bytes), "gradient_seconds": seconds[sizes.index(int(gradient_bytes))]}


def ring_seconds(p: int, num_bytes: float, alpha_s: float, beta_bytes_per_s: float) -> float:
    if p <= 1:
        return 0.0
    return 2 * (p - 1) * alpha_s + 2 * (p - 1) / p * num_bytes / beta_bytes_per_s


def fit(points: Sequence[Tuple[int, float, float]]) -> Tuple[float, float]:
    """(α seconds, β bytes/s) fitted by least squares to (replicas, bytes, seconds) measurements with replicas >= 2;
    a coefficient the data pushes below zero is dropped (0 latency / infinite bandwidth) and the other refitted."""
    rows = [(2 * (p - 1), 2 * (p - 1) / p * n, t) for p, n, t in points if p >= 2]
    if not rows:
        raise ValueError("fitting the all-reduce model needs measurements at 2 or more replicas")
    a = np.array([[r[0], r[1]] for r in rows], dtype=float)
    b = np.array([r[2] for r in rows], dtype=float)
    alpha, inv_beta = np.linalg.lstsq(a, b, rcond=None)[0]
    if alpha < 0:
        alpha, inv_beta = 0.0, max(float(np.linalg.lstsq(a[:, 1:], b, rcond=None)[0][0]), 1e-30)
    elif inv_beta <= 0:
        alpha, inv_beta = max(float(np.linalg.lstsq(a[:, :1], b, rcond=None)[0][0]), 0.0), 1e-30
    return float(alpha), float(1.0 / inv_beta)


def predicted_efficiency(replicas: Sequence[int], num_bytes: float, step_s: float, alpha_s: float,
                         link_gbps: float) -> List[Dict]:
    """Weak-scaling efficiency the ring model predicts at each replica count over a `link_gbps` link."""
    beta = link_gbps * 1e9 / 8
    out = []
    for p in replicas:
        comm = ring_seconds(p, num_bytes, alpha_s, beta)
        out.append({"replicas": p, "allreduce_ms": 1000 * comm, "efficiency": step_s / (step_s + comm)})
    return out
