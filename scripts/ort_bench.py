#!/usr/bin/env python3
"""Times one ONNX model with onnxruntime the way `osprey bench --json` times ours.

Prints one JSON object: {"latency_ms": {...}, "throughput_per_s", "threads", "iterations"}.
Graph optimisations are at ORT_ENABLE_ALL (onnxruntime's default), one intra-op
pool of --threads threads, sequential execution, random inputs in [-1, 1).
"""
import argparse, json, time

import numpy as np
import onnxruntime as ort


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--onnx", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--input-shape", action="append", default=[], help="NAME=D0,D1,...")
    a = p.parse_args()
    shapes = {}
    for s in a.input_shape:
        n, d = s.split("=", 1)
        shapes[n] = [int(x) for x in d.split(",")]
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(a.onnx, so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        shape = shapes.get(i.name) or [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        feeds[i.name] = rng.uniform(-1, 1, size=shape).astype(np.float32)
    for _ in range(a.warmup):
        sess.run(None, feeds)
    samples = []
    t0 = time.perf_counter()
    for _ in range(a.iterations):
        t = time.perf_counter()
        sess.run(None, feeds)
        samples.append((time.perf_counter() - t) * 1e3)
    total = time.perf_counter() - t0
    s = np.sort(np.array(samples))
    pct = lambda q: float(s[min(len(s), max(1, int(np.ceil(q / 100 * len(s))))) - 1])
    print(json.dumps({
        "latency_ms": {"min": float(s[0]), "mean": float(s.mean()), "median": float(np.median(s)),
                       "p90": pct(90), "p99": pct(99), "max": float(s[-1])},
        "throughput_per_s": a.iterations / total,
        "threads": a.threads,
        "iterations": a.iterations,
        "onnxruntime": ort.__version__,
    }))


if __name__ == "__main__":
    main()
