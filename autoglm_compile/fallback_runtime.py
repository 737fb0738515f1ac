"""Run a partitioned artifact (--fallback onnxruntime): its segments in the manifest's order, TVM segments on the
TVM runtime and ONNX Runtime segments on onnxruntime's CPU provider. Imports numpy, the TVM runtime and
onnxruntime only (the manifest's runtime_dependencies), never the compiler.

Tensors cross from TVM to numpy through DLPack (no copy on the CPU); numpy arrays enter TVM through DLPack where
they are 64-byte aligned and contiguous, else by a copy. On a CUDA target every crossing is a device copy.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .runtime import INITIAL_AFFINITY, ArtifactError, check_feeds, restore_affinity, tvm_device


def _to_numpy(value, on_cpu: bool) -> list[np.ndarray]:
    if hasattr(value, "numpy"):
        if on_cpu and hasattr(value, "__dlpack__"):
            try:
                return [np.from_dlpack(value)]
            except (TypeError, RuntimeError, BufferError):
                pass
        return [value.numpy()]
    if type(value).__name__ == "Shape":  # a ShapeTuple result (a shape computed by the graph)
        return [np.array(list(value), dtype=np.int64)]
    out: list[np.ndarray] = []
    for item in value:
        out.extend(_to_numpy(item, on_cpu))
    return out


class PartitionedModel:
    """A loaded artifact with TVM and ONNX Runtime segments; called like CompiledModel."""

    def __init__(self, path: str | Path, manifest: dict, device: str | None = None, threads: int | None = None):
        import tvm
        import tvm.runtime.vm

        try:
            import onnxruntime as ort
        except ImportError:
            dep = manifest.get("runtime_dependencies", {}).get("onnxruntime", "")
            raise ArtifactError(f"{path}: this artifact runs part of the model on ONNX Runtime, which is not installed", f"pip install onnxruntime=={dep}" if dep else "pip install onnxruntime") from None
        self.threads = threads or len(INITIAL_AFFINITY)
        tvm.get_global_func("runtime.config_threadpool")(1, self.threads)
        self.path, self.manifest = Path(path), manifest
        self.inputs, self.outputs = manifest["inputs"], manifest["outputs"]
        kind = device or manifest["target"]["device"]
        self.device = tvm_device(kind)
        self._on_cpu = kind != "cuda"
        self._tvm = tvm
        self._steps = []
        for seg in manifest["segments"]:
            file = str(self.path / seg["file"])
            ins = [i["name"] for i in seg["inputs"]]
            outs = [o["name"] for o in seg["outputs"]]
            if seg["backend"] == "tvm":
                vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(file), self.device)
                self._steps.append(("tvm", vm["main"], ins, outs))
            else:
                so = ort.SessionOptions()
                so.log_severity_level = 3
                so.intra_op_num_threads = self.threads
                sess = ort.InferenceSession(file, so, providers=["CPUExecutionProvider"])
                self._steps.append(("onnxruntime", sess, ins, outs))

    def check_inputs(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return check_feeds(self.inputs, feeds)

    def prepare(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.check_inputs(feeds)

    def _tensor(self, a: np.ndarray):
        a = np.require(a, requirements="C")  # not ascontiguousarray: it makes a 0-d tensor 1-d
        if self._on_cpu and a.ctypes.data % 64 == 0 and a.size:
            try:
                return self._tvm.runtime.from_dlpack(a)
            except Exception:  # an alignment or dtype DLPack refuses: copy
                pass
        return self._tvm.runtime.tensor(a, device=self.device)

    def _step(self, step, env: dict) -> None:
        backend, fn, ins, outs = step
        if backend == "tvm":
            result = fn(*[self._tensor(env[n]) for n in ins])
            self.device.sync()
            values = _to_numpy(result, self._on_cpu)
        else:
            restore_affinity()  # TVM's pool pins the calling thread; give ONNX Runtime every core
            values = fn.run(outs, {n: env[n] for n in ins})
        env.update(zip(outs, values))

    def run_prepared(self, env: dict[str, np.ndarray]) -> list[np.ndarray]:
        env = dict(env)
        for step in self._steps:
            self._step(step, env)
        return [env[o["name"]] for o in self.outputs]

    def __call__(self, feeds: dict[str, np.ndarray] | None = None, **kwargs: np.ndarray) -> list[np.ndarray]:
        return self.run_prepared(self.prepare({**(feeds or {}), **kwargs}))

    def segment_times(self, feeds: dict[str, np.ndarray], runs: int = 5) -> list[float]:
        """p50 milliseconds of each segment over `runs` runs (after one warm-up run)."""
        env0 = self.prepare(feeds)
        self.run_prepared(env0)
        times: list[list[float]] = [[] for _ in self._steps]
        for _ in range(runs):
            env = dict(env0)
            for k, step in enumerate(self._steps):
                t0 = time.perf_counter()
                self._step(step, env)
                times[k].append((time.perf_counter() - t0) * 1e3)
        return [float(np.percentile(t, 50)) for t in times]
