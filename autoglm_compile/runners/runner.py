#!/usr/bin/env python3
"""Run this artifact's model.onnx on the NPU runtime that runner.json names; where that runtime is not installed,
on ONNX Runtime's CPUExecutionProvider, with a note saying so.

    python runner.py                  run the stored verification inputs (verify/inputs.npz), print the outputs
    python runner.py --check          ... and compare them with verify/expected.npz (exit 3 on a mismatch)
    python runner.py --inputs x.npz --save out.npz
    python runner.py --runs 100       time 100 runs after a warm-up (p50, p90, mean)
    python runner.py --cpu            ONNX Runtime on the CPU, whatever is installed

runner.json "runtime":
- "onnxruntime" (Huawei Ascend): an ONNX Runtime session with the provider in "execution_provider"
  (CANNExecutionProvider: `pip install onnxruntime-cann` on the Ascend host, with the CANN toolkit's environment
  set up) and its "provider_options", then CPUExecutionProvider, which ONNX Runtime gives every node the NPU
  provider does not take.
- "magicmind" (Cambricon): the MagicMind model "magicmind_model" (model.mm, built on the MLU host by
  build_magicmind.py from model.onnx) run with MagicMind's Python runtime. Written against the API used in
  Cambricon's magicmind_cloud samples, and not run where it was written (no MLU there).

Needs numpy, and onnxruntime (or onnxruntime-cann) or MagicMind. Written by autoglm-compile; the same file is
autoglm_compile/runners/runner.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

CONFIG = "runner.json"
CPU = "CPUExecutionProvider"
EXIT_USAGE, EXIT_MISMATCH = 2, 3


class RunnerError(Exception):
    """The artifact or the inputs are not what the runner needs."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


class Runner:
    """model.onnx on the runtime runner.json names. Call it with a dict of arrays (or keyword arrays); it returns a
    list of numpy arrays, in the order of runner.json's outputs. `device` says what ran it; `note` why, when that
    is not the NPU."""

    def __init__(self, folder: str | Path = ".", cpu: bool = False, log=_note):
        self.folder = Path(folder)
        path = self.folder / CONFIG
        if not path.is_file():
            raise RunnerError(f"{self.folder}: no {CONFIG}", "run the runner from the artifact folder written by autoglm-compile")
        self.config = json.loads(path.read_text())
        self.inputs, self.outputs = self.config["inputs"], self.config["outputs"]
        self.note = None
        self._run = None
        if cpu:
            self.note = "--cpu: ONNX Runtime on the CPU"
        elif self.config["runtime"] == "magicmind":
            self._run, self.note = self._magicmind()
        else:
            self._run, self.note = self._onnxruntime(self.config["execution_provider"])
        if self._run is None:
            self._run, _ = self._onnxruntime(None)
        if self.note:
            log(self.note)

    # --------------------------------------------------------------------------------------------- runtimes

    def _onnxruntime(self, provider: str | None):
        import onnxruntime as ort

        providers: list = [CPU]
        note = None
        if provider is not None:
            available = ort.get_available_providers()
            if provider in available:
                options = {k: str(v) for k, v in self.config.get("provider_options", {}).items()}
                providers = [(provider, options), CPU]
            else:
                note = (
                    f"{provider} is not in this onnxruntime {ort.__version__} (it has {', '.join(available)}): "
                    f"running on {CPU} instead. On the device: {self.config.get('install', 'install the vendor build of onnxruntime')}"
                )
        so = ort.SessionOptions()
        so.log_severity_level = 3
        session = ort.InferenceSession(str(self.folder / self.config["model"]), so, providers=providers)
        self.device = f"onnxruntime {session.get_providers()[0]}"
        names = [o["name"] for o in self.outputs]
        return (lambda arrays: session.run(names, dict(zip([i["name"] for i in self.inputs], arrays)))), note

    def _magicmind(self):
        try:
            import magicmind.python.runtime as mm
        except ImportError:
            return None, f"MagicMind (magicmind.python.runtime) is not installed: running model.onnx on ONNX Runtime's {CPU} instead. On the MLU host: build model.mm with build_magicmind.py, then run this again"
        path = self.folder / self.config["magicmind_model"]
        if not path.is_file():
            return None, f"{path.name} not found: running model.onnx on ONNX Runtime's {CPU} instead. Build it first: python build_magicmind.py"
        model = mm.Model()
        model.deserialize_from_file(str(path))
        dev = mm.Device()
        dev.id = int(self.config.get("provider_options", {}).get("device_id", 0))
        if not dev.active().ok():
            raise RunnerError(f"cannot open MLU device {dev.id}", "check cnmon and the device_id in runner.json")
        econfig = mm.Model.EngineConfig()
        econfig.device_type = "MLU"
        engine = model.create_i_engine(econfig)
        context = engine.create_i_context()
        queue = dev.create_queue()
        tensors = context.create_inputs()
        self.device = f"MagicMind on MLU {dev.id}"
        self._keep = (model, engine, context, queue)  # alive as long as the runner

        def run(arrays):
            for t, a in zip(tensors, arrays):
                t.from_numpy(a)
                t.to(dev)
            outputs: list = []
            if not context.enqueue(tensors, outputs, queue).ok() or not queue.sync().ok():
                raise RunnerError("MagicMind enqueue failed", "see MagicMind's log above")
            return [o.asnumpy() for o in outputs]

        return run, None

    # ------------------------------------------------------------------------------------------------- run

    def check_inputs(self, feeds: dict) -> list[np.ndarray]:
        names = [i["name"] for i in self.inputs]
        missing = [n for n in names if n not in feeds]
        extra = [n for n in feeds if n not in names]
        if missing or extra:
            raise RunnerError(f"inputs do not match the artifact: missing {missing}, unexpected {extra}", f"the artifact takes: {', '.join(names)}")
        arrays = []
        for spec in self.inputs:
            a = np.asarray(feeds[spec["name"]])
            if list(a.shape) != list(spec["shape"]) or a.dtype.name != spec["dtype"]:
                raise RunnerError(f"input '{spec['name']}' is {a.dtype.name}{list(a.shape)}, the artifact takes {spec['dtype']}{spec['shape']}", "reshape or cast the input")
            arrays.append(np.require(a, requirements="C"))  # ascontiguousarray makes a 0-d input 1-d
        return arrays

    def __call__(self, feeds: dict | None = None, **kwargs) -> list[np.ndarray]:
        return [np.asarray(o) for o in self._run(self.check_inputs({**(feeds or {}), **kwargs}))]

    def stored_inputs(self) -> dict[str, np.ndarray]:
        with np.load(self.folder / self.config["verify"]["inputs"]) as z:
            return {k: z[k] for k in z.files}


def _metric(metric: str, a: np.ndarray, e: np.ndarray) -> float:
    """An accuracy budget's metric (autoglm_compile/precision.py has the same definitions)."""
    if metric == "top1-agree":
        a2, e2 = a.reshape(-1, a.shape[-1] if a.ndim else 1), e.reshape(-1, e.shape[-1] if e.ndim else 1)
        return float(np.mean(np.argmax(a2, -1) == np.argmax(e2, -1))) if a2.size else 1.0
    a, e = a.ravel(), e.ravel()
    if metric == "cosine":
        na, ne = float(np.linalg.norm(a)), float(np.linalg.norm(e))
        return 1.0 if na == ne == 0.0 else 0.0 if na == 0.0 or ne == 0.0 else float(np.dot(a, e) / (na * ne))
    diff = float(np.max(np.abs(a - e), initial=0.0))
    if metric == "max-rel":
        scale = float(np.max(np.abs(e), initial=0.0))
        return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    return diff


def compare(outputs: list[np.ndarray], expected: list[np.ndarray], rtol: float, atol: float, budget: dict | None = None) -> tuple[bool, float]:
    """numpy.allclose's rule per output: |a - e| <= atol + rtol * |e|; with an accuracy budget (fp16/int8 builds:
    {metric, op, threshold}) the budget's metric per output instead. Returns (all ok, max abs error)."""
    ok, worst = len(outputs) == len(expected), 0.0
    for a, e in zip(outputs, expected):
        a64, e64 = np.asarray(a, np.float64), np.asarray(e, np.float64)
        if a64.shape != e64.shape:
            return False, float("inf")
        diff = np.abs(a64 - e64)
        worst = max(worst, float(diff.max(initial=0.0)))
        if budget:
            value = _metric(budget["metric"], a64, e64)
            ok = ok and (value >= budget["threshold"] if budget["op"] == ">=" else value <= budget["threshold"])
        else:
            ok = ok and bool(np.all(diff <= atol + rtol * np.abs(e64)))
    return ok, worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", default=str(Path(__file__).resolve().parent), help="the artifact folder [default: this script's]")
    p.add_argument("--inputs", help="a .npz of arrays by input name [default: the stored verification inputs]")
    p.add_argument("--save", help="write the outputs to this .npz")
    p.add_argument("--check", action="store_true", help="compare with verify/expected.npz (exit 3 on a mismatch)")
    p.add_argument("--runs", type=int, default=0, help="time this many runs after one warm-up")
    p.add_argument("--cpu", action="store_true", help="run on ONNX Runtime's CPUExecutionProvider")
    args = p.parse_args(argv)
    try:
        runner = Runner(args.folder, cpu=args.cpu)
        if args.inputs:
            with np.load(args.inputs) as z:
                feeds = {k: z[k] for k in z.files}
        else:
            feeds = runner.stored_inputs()
        outputs = runner(feeds)
    except RunnerError as e:
        print(f"error: {e}" + (f"\nHint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return EXIT_USAGE
    print(f"ran on: {runner.device}")
    names = [o["name"] for o in runner.outputs]
    for n, a in zip(names, outputs):
        a64 = np.asarray(a, np.float64)
        print(f"{n}: {a.dtype.name}{list(a.shape)} mean={a64.mean():.6g} std={a64.std():.6g} abs_sum={np.abs(a64).sum():.6g}")
    if args.save:
        np.savez(args.save, **dict(zip(names, outputs)))
    if args.runs > 0:
        arrays = runner.check_inputs(feeds)
        runner._run(arrays)
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            runner._run(arrays)
            times.append((time.perf_counter() - t0) * 1e3)
        t = np.array(times)
        print(f"latency over {len(t)} runs on {runner.device}: p50 {np.percentile(t, 50):.3f} ms, p90 {np.percentile(t, 90):.3f} ms, mean {t.mean():.3f} ms")
    if args.check:
        if args.inputs:
            print("error: --check compares the outputs of the stored verification inputs\nHint: leave out --inputs", file=sys.stderr)
            return EXIT_USAGE
        v = runner.config["verify"]
        with np.load(runner.folder / v["expected"]) as z:
            expected = [z[n] for n in names]
        budget = v.get("budget")
        ok, worst = compare(outputs, expected, v["rtol"], v["atol"], budget)
        rule = f"budget {budget['metric']}{budget['op']}{budget['threshold']:g}" if budget else f"rtol {v['rtol']:g}, atol {v['atol']:g}"
        print(f"check vs ONNX Runtime on the source model ({rule}): {'PASS' if ok else 'FAIL'}, max abs {worst:.3g}")
        if not ok:
            return EXIT_MISMATCH
    return 0


if __name__ == "__main__":
    sys.exit(main())
