"""Measurement: latency statistics, the ONNX Runtime reference and baseline, and accuracy against it."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import onnx

from .report import AccuracyReport, LatencyStats, OutputError


def time_runs(fn: Callable[[], object], warmup: int, runs: int, min_runs: int, max_seconds: float) -> LatencyStats:
    """Warm up, then call fn up to `runs` times, stopping early after `max_seconds` once `min_runs` are done."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < runs:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= min_runs and time.perf_counter() - start > max_seconds:
            break
    ms = np.array(times) * 1e3
    return LatencyStats(
        runs=len(ms), warmup=warmup,
        mean_ms=float(ms.mean()), p50_ms=float(np.percentile(ms, 50)), p90_ms=float(np.percentile(ms, 90)),
        p99_ms=float(np.percentile(ms, 99)), min_ms=float(ms.min()), max_ms=float(ms.max()),
        throughput_per_s=float(1e3 / ms.mean()),
    )


def ort_session(model: onnx.ModelProto, threads: int | None = None, optimize: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def has_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def reference_session(model: onnx.ModelProto):
    """ONNX Runtime on the model, as the reference. A QDQ model runs without ONNX Runtime's graph optimizations,
    i.e. with its own arithmetic (each QuantizeLinear rounds its float input, each DequantizeLinear is exact), which is
    what TVM builds: the optimizations fuse Q/DQ into kernels that compute otherwise. DequantizeLinear on an int8 weight
    before a MatMul with a float activation becomes MatMulNBits, which quantizes the activation too (on a 128x384 by
    384x1536 matmul, max abs error 0.38 where the model's arithmetic gives 2e-5), and QLinearMatMul/QLinearConv
    requantize in integers, which rounds some values to the next level."""
    return ort_session(model, optimize=not has_qdq(model))


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model's outputs on ONNX Runtime, the reference (reference_session)."""
    return reference_session(model).run(None, feeds)


def compare(actual: list[np.ndarray], expected: list[np.ndarray], names: list[str], rtol: float, atol: float, budget=None) -> AccuracyReport:
    """Element-wise check |a - e| <= atol + rtol * |e| (numpy.allclose's rule), per output. With an accuracy budget
    (precision.Budget: fp16, int8 and mixed builds) each output is checked against the budget's metric instead, and
    max abs / max rel are only reported."""
    from .precision import metric_value

    outs = []
    ok = len(actual) == len(expected)
    for name, a, e in zip(names, actual, expected):
        a64, e64 = np.asarray(a, dtype=np.float64), np.asarray(e, dtype=np.float64)
        if a64.shape != e64.shape:
            outs.append(OutputError(name=name, max_abs=float("inf"), max_rel=float("inf"), ok=False, shape_mismatch=True,
                                    metric=None if budget is None else float("nan")))
            ok = False
            continue
        diff = np.abs(a64 - e64)
        rel = diff / np.maximum(np.abs(e64), 1e-12)
        nan_ok = not np.any(np.isnan(a64) != np.isnan(e64))
        metric = None
        if budget is None:
            good = bool(np.all(diff <= atol + rtol * np.abs(e64))) and nan_ok
        else:
            metric = metric_value(budget.metric, a64, e64)
            good = budget.holds(metric) and nan_ok
        outs.append(OutputError(name=name, max_abs=float(diff.max(initial=0.0)), max_rel=float(rel.max(initial=0.0)), ok=good, metric=metric))
        ok = ok and good
    return AccuracyReport(rtol=rtol, atol=atol, ok=ok, outputs=outs, budget=budget)
