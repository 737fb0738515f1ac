"""One TVM build per shape bucket, or one build with a symbolic batch dim? Latency of both on this machine.

    python benchmarks/dynamic_shapes.py --batches 1 8 --size 64 --runs 5

The model is autoglm_compile.zoo.small_cnn (conv, batchnorm, residual, pooling, linear), exported to ONNX with a
symbolic batch dim. "static": one build per batch size (what shape buckets do). "dynamic": one build in which the
batch is a symbolic var (TVM Relax's dynamic shapes), run at each batch size. Both use the target's default lowering
(untuned), TVM's runtime, the same thread count; p50 of --runs runs after one warm-up run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def export(path: Path, size: int) -> Path:
    import torch

    from autoglm_compile.zoo import small_cnn

    net = small_cnn()
    x = torch.randn(1, 3, size, size)
    torch.onnx.export(net, (x,), str(path), input_names=["x"], output_names=["y"], opset_version=17, dynamo=False,
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return path


def build(model, shape_dict):
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from autoglm_compile.target import resolve_target
    from autoglm_compile.tvm_build import make_target

    mod = from_onnx(model, shape_dict=shape_dict, keep_params_in_input=False)
    target = make_target(resolve_target("host"))
    with target:
        lowered = relax.get_default_pipeline(target)(mod)
    ex = relax.build(lowered, target, relax_pipeline=None)
    return relax.VirtualMachine(ex, tvm.cpu(0))


def p50(vm, x, runs: int) -> float:
    import tvm

    arg = tvm.runtime.tensor(x, device=tvm.cpu(0))
    vm["main"](arg)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        vm["main"](arg)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.percentile(times, 50))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    import onnx
    import tvm

    threads = len(os.sched_getaffinity(0))
    tvm.get_global_func("runtime.config_threadpool")(1, threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = onnx.load(str(export(Path(tmp) / "cnn.onnx", args.size)))
        load = os.getloadavg()[0]
        dynamic = build(model, None)  # the batch stays the symbolic var 'batch'
        for b in args.batches:
            x = np.random.default_rng(0).standard_normal((b, 3, args.size, args.size)).astype(np.float32)
            static = build(model, {"x": [b, 3, args.size, args.size]})
            s, d = p50(static, x, args.runs), p50(dynamic, x, args.runs)
            out_s = static["main"](tvm.runtime.tensor(x)).numpy()
            out_d = dynamic["main"](tvm.runtime.tensor(x)).numpy()
            rows.append({"batch": b, "static_p50_ms": s, "dynamic_p50_ms": d, "dynamic_over_static": d / s,
                         "max_abs_diff": float(np.abs(out_s - out_d).max())})
    print(json.dumps({"machine": platform.processor() or platform.machine(), "threads": threads, "load_avg_1m": load,
                      "size": args.size, "runs": args.runs, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
