"""Run the GPU builds of benchmarks/roofline_calibration.py (gpu-build) on the GPU machine, with TVM's runtime only,
and time torch eager on the same models for comparison.

    python benchmarks/roofline_device.py BUILD_DIR [BUILD_DIR ...] --out results.json

Needs numpy, onnx, onnxruntime, torch, transformers and the TVM runtime (TVM_USE_RUNTIME_LIB=1); no pydantic,
no TVM compiler. For each build:
- weights: drawn at random with each tensor's mean and std (meta.json; integer tensors keep their values). The
  library holds no weights (64 MiB transfer limit); latency does not depend on their values.
- accuracy: TVM's outputs against ONNX Runtime (CPU) on graph.onnx with the same inputs and weights.
- latency: TVM (wall clock of one call + device sync, as the pipeline's measure stage), torch eager (fp32, the same
  transformers config, CUDA-synchronized), each with warm-up; p50 over the runs.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def timed(fn, warmup: int, max_runs: int, max_seconds: float) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (time.perf_counter() - start < max_seconds or len(times) < 5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"runs": len(times), "p50_ms": statistics.median(times), "min_ms": min(times), "mean_ms": statistics.fmean(times)}


def feeds_for(meta: dict, rng) -> tuple[dict, dict]:
    inputs = {}
    for spec in meta["inputs"]:
        shape, dtype, name = spec["shape"], spec["dtype"], spec["name"]
        if dtype.startswith("float"):
            inputs[name] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in name:
            inputs[name] = np.ones(shape, dtype)
        elif "type" in name:
            inputs[name] = np.zeros(shape, dtype)
        else:
            inputs[name] = rng.integers(0, 1000, shape).astype(dtype)
    weights = {}
    for w in meta["weights"]:
        if "values" in w:
            weights[w["name"]] = np.asarray(w["values"], dtype=w["dtype"]).reshape(w["shape"])
        elif "low" in w:  # integers of a lifted int8 build (gpu-build-int8): drawn in their range
            weights[w["name"]] = rng.integers(w["low"], w["high"] + 1, w["shape"]).astype(w["dtype"])
        else:
            weights[w["name"]] = rng.normal(w["mean"], w["std"], w["shape"]).astype(w["dtype"])
    return inputs, weights


def run_tvm(build: Path, meta: dict, inputs: dict, weights: dict, then: dict | None = None) -> tuple[list[np.ndarray], dict]:
    """(outputs, timing) of the build on `inputs`; with `then` (other inputs), also timing["then_outputs"]: the
    outputs of one more call on them after the timed runs (a CUDA graph replays with new input tensors)."""
    import tvm
    import tvm.runtime.vm

    dev = tvm.cuda(0)
    lib = tvm.runtime.load_module(str(build / "model.so"))
    vm = tvm.runtime.vm.VirtualMachine(lib, dev)
    main = vm["main"]
    dtypes = {w["name"]: w.get("tvm_dtype", w["dtype"]) for w in meta["weights"]}  # gpu-build --fp16 relax: float16 weights
    args = [tvm.runtime.tensor(a, device=dev) for a in inputs.values()] + [tvm.runtime.tensor(a.astype(dtypes[n]), device=dev) for n, a in weights.items()]

    def call():
        out = main(*args)
        dev.sync()
        return out

    def numpy(out) -> list[np.ndarray]:
        return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]

    outs = numpy(call())
    t = timed(call, 10, 500, 5.0)
    if then is not None:
        t["then_outputs"] = numpy(main(*[tvm.runtime.tensor(a, device=dev) for a in then.values()], *args[len(inputs):]))
    return outs, t


def run_ort(build: Path, inputs: dict, weights: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(build / "graph.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {**inputs, **weights})


def run_torch(name: str) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository (the GPU machine has no install)
    from autoglm_compile import zoo  # the model and seed of the ONNX file the builds came from

    m, x = zoo.resnet50_module() if "resnet" in name else zoo.bert_module()
    m = m.cuda()
    x = tuple(t.cuda() for t in x)
    res = {}
    for label, tf32 in (("fp32 strict (TF32 off)", False), ("fp32 default (cuDNN TF32 on for convs)", True)):
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.no_grad():
            def call():
                m(*x)
                torch.cuda.synchronize()

            res[label] = timed(call, 10, 500, 5.0)
    torch.backends.cudnn.allow_tf32 = True
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("builds", nargs="+")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import tvm

    libdir = Path(tvm.__file__).parent / "lib"
    ctypes.CDLL(str(libdir / "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_LOCAL)  # runtime-only mode loads no sidecar
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version,power.limit", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    results = {"gpu": smi, "tvm": tvm.__version__, "runs": []}
    print("GPU:", smi, flush=True)
    for b in args.builds:
        build = Path(b)
        meta = json.loads((build / "meta.json").read_text())
        rng = np.random.default_rng(0)
        inputs, weights = feeds_for(meta, rng)
        outs, tvm_t = run_tvm(build, meta, inputs, weights)
        ref = run_ort(build, inputs, weights)
        acc = []
        for name, a, r in zip(meta["outputs"], outs, ref):
            err = np.abs(a.astype(np.float64) - r)
            acc.append({"name": name, "max_abs": float(err.max()), "max_rel": float((err / (np.abs(r) + 1e-6)).max()),
                        "ok": bool(np.allclose(a, r, rtol=1e-3, atol=1e-4)), "ref_abs_mean": float(np.abs(r).mean())})
        torch_t = run_torch(meta["model"])
        est, est200 = meta["estimate"]["total_ms"], meta["estimate_h200"]["total_ms"]
        row = {"model": meta["model"], "tvm": tvm_t, "torch_eager": torch_t, "accuracy_vs_ort_cpu": acc,
               "estimate_h100_ms": est, "estimate_h200_ms": est200,
               "estimate_h200_over_tvm": est200 / tvm_t["p50_ms"],
               "estimate_h200_over_torch_strict": est200 / torch_t["fp32 strict (TF32 off)"]["p50_ms"]}
        results["runs"].append(row)
        print(json.dumps(row, indent=1), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
