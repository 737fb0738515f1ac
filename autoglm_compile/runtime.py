"""Run an artifact. Imports numpy and the TVM runtime only: not the TVM compiler, pydantic, typer, rich or
onnx-graphsurgeon, so a deployment image needs just `numpy` and `apache-tvm` (runtime library)."""
from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
LIBRARY = "model.so"
FORMAT_VERSION = 1
# The cores this process may use, read before TVM's thread pool pins the calling thread to one of them.
INITIAL_AFFINITY = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset(range(os.cpu_count() or 1))


class ArtifactError(Exception):
    """The artifact is missing, damaged, or the inputs do not match it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def read_manifest(path: str | Path) -> dict:
    root = Path(path)
    mf = root / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{root}: not an artifact (no {MANIFEST})", "give the folder written by autoglm-compile -o")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mf}: damaged manifest ({e})", "rebuild the artifact") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{mf}: format version {manifest.get('format_version')}, this runtime reads {FORMAT_VERSION}", "rebuild the artifact with this version")
    return manifest


def _flatten(value) -> list[np.ndarray]:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    out: list[np.ndarray] = []
    for item in value:  # a tuple of outputs comes back as an Array
        out.extend(_flatten(item))
    return out


def check_feeds(inputs: list[dict], feeds: dict) -> dict[str, np.ndarray]:
    """The feeds as contiguous arrays in the manifest's input order; ArtifactError naming the input that does not fit.
    (runners/runner.py keeps its own copy: it runs inside the artifact without this package.)"""
    names = [i["name"] for i in inputs]
    missing = [n for n in names if n not in feeds]
    extra = [n for n in feeds if n not in names]
    if missing or extra:
        raise ArtifactError(f"inputs do not match the artifact: missing {missing}, unexpected {extra}", f"the artifact takes: {', '.join(names)}")
    out = {}
    for spec in inputs:
        a = np.asarray(feeds[spec["name"]])
        if list(a.shape) != list(spec["shape"]) or a.dtype.name != spec["dtype"]:
            raise ArtifactError(f"input '{spec['name']}' is {a.dtype.name}{list(a.shape)}, the artifact takes {spec['dtype']}{spec['shape']}", "reshape or cast the input")
        out[spec["name"]] = np.require(a, requirements="C")  # ascontiguousarray would make a 0-d input 1-d
    return out


@dataclass(frozen=True)
class KernelTime:
    name: str  # the function the VM called: a fused kernel (e.g. fused_conv2d3_add1_relu1) or a vm.builtin
    calls: int  # calls per run
    ms: float  # milliseconds per run, all calls together


class CompiledModel:
    """A loaded artifact: call it with a dict of arrays (or keyword arrays); it returns a list of numpy arrays."""

    def __init__(self, path: str | Path, device: str | None = None, threads: int | None = None):
        import tvm  # the runtime; the compiler library is not needed (TVM_USE_RUNTIME_LIB=1 works)
        import tvm.runtime.vm  # not imported by tvm.runtime itself; only tvm.relax (the compiler) imports it

        # TVM's default pool size is a heuristic (and tvm.runtime.num_threads() does not report it): set it. Its
        # parallel loops size themselves from TVM_NUM_THREADS, read when the pool starts (the first parallel call),
        # and default to half the cores (one on a 2-core machine: ResNet-50 tuned, 122 ms instead of 64 ms here);
        # config_threadpool alone does not change that, so the variable is set too.
        self.threads = threads or int(os.environ.get("TVM_NUM_THREADS") or 0) or len(INITIAL_AFFINITY)
        os.environ["TVM_NUM_THREADS"] = str(self.threads)
        tvm.get_global_func("runtime.config_threadpool")(1, self.threads)

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        spec = self.manifest["target"].get("tvm", {})
        arch = str((spec.get("host") or spec).get("mtriple", "")).split("-")[0]
        here = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
        if arch and arch != here:
            raise ArtifactError(f"{self.path}: built for {arch} ({self.manifest['target']['name']}), and this machine is {here}", "copy the artifact to the target device and run it there")
        self.inputs = self.manifest["inputs"]
        self.outputs = self.manifest["outputs"]
        kind = device or self.manifest["target"]["device"]
        self.device = tvm_device(kind)
        lib = tvm.runtime.load_module(str(self.path / self.manifest["library"]))
        self._vm = tvm.runtime.vm.VirtualMachine(lib, self.device)
        self._main = self._vm["main"]
        self._tensor = tvm.runtime.tensor
        self._staged: list = []  # __call__'s device input tensors, reused while the shapes and dtypes hold

    def check_inputs(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(check_feeds(self.inputs, feeds).values())

    def prepare(self, feeds: dict[str, np.ndarray]) -> list:
        """Device tensors for the inputs, to time the model without host copies."""
        return [self._tensor(a, device=self.device) for a in self.check_inputs(feeds)]

    def run_prepared(self, args: list):
        out = self._main(*args)
        self.device.sync()
        return out

    def __call__(self, feeds: dict[str, np.ndarray] | None = None, **kwargs: np.ndarray) -> list[np.ndarray]:
        return _flatten(self.run_prepared(self._stage(self.check_inputs({**(feeds or {}), **kwargs}))))

    def _stage(self, arrays: list[np.ndarray]) -> list:
        """The inputs copied into device tensors kept from the last call where shapes and dtypes match (a new
        allocation per call costs a cudaMalloc and a cudaFree on GPUs), else new ones."""
        kept = self._staged + [None] * (len(arrays) - len(self._staged))
        self._staged = [t.copyfrom(a) if t is not None and tuple(t.shape) == a.shape and str(t.dtype) == str(a.dtype)
                        else self._tensor(a, device=self.device) for t, a in zip(kept, arrays)]
        return list(self._staged)

    def profile(self, feeds: dict[str, np.ndarray], runs: int = 10, warmup: int = 2) -> list[KernelTime]:
        """Where the time goes: every function the VM calls (the compiled kernels and its builtins), timed on the
        host around each call over `runs` runs after `warmup`, slowest first. On a GPU each call is followed by a
        synchronization, so the times are the kernels' own, without the overlap of asynchronous launches."""
        import time

        args = self.prepare(feeds)
        for _ in range(warmup):
            self.run_prepared(args)
        totals: dict[str, float] = {}
        calls: dict[str, int] = {}
        started = [0.0]
        sync = self.device.sync

        def instrument(func, name, before_run, ret_value, *_args):
            if before_run:
                started[0] = time.perf_counter()
            else:
                sync()
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - started[0]
                calls[name] = calls.get(name, 0) + 1
            return 0  # VMInstrumentReturnKind.NO_OP: run the call

        self._vm.set_instrument(instrument)
        try:
            for _ in range(runs):
                self.run_prepared(args)
        finally:
            self._vm.set_instrument(None)
        rows = [KernelTime(n, calls[n] // runs, t / runs * 1e3) for n, t in totals.items()]
        return sorted(rows, key=lambda r: -r.ms)


class VendorModel:
    """An artifact of the vendor-onnx backend (NPU targets): its model.onnx run by its runner (runners/runner.py,
    which needs numpy and onnxruntime): on the NPU runtime where it is installed, else on ONNX Runtime's CPU."""

    def __init__(self, path: str | Path, manifest: dict, cpu: bool = False):
        from .runners.runner import Runner, RunnerError

        self.path, self.manifest = Path(path), manifest
        self.inputs, self.outputs = manifest["inputs"], manifest["outputs"]
        self._error = RunnerError
        try:
            self._runner = Runner(self.path, cpu=cpu)
        except RunnerError as e:
            raise ArtifactError(str(e), e.hint) from None
        self.device = self._runner.device

    def __call__(self, feeds: dict[str, np.ndarray] | None = None, **kwargs: np.ndarray) -> list[np.ndarray]:
        try:
            return self._runner({**(feeds or {}), **kwargs})
        except self._error as e:
            raise ArtifactError(str(e), e.hint) from None


def tvm_device(kind: str):
    """The TVM device for "cuda" or "cpu". For CUDA in runtime-only mode (TVM_USE_RUNTIME_LIB=1, or no compiler
    library), TVM's CUDA runtime, libtvm_runtime_cuda.so beside libtvm_runtime.so, is loaded here: only the compiler
    side (tvm.backend.cuda) loads it otherwise. It needs the NVIDIA driver and the CUDA runtime library, not nvcc."""
    import tvm

    if kind != "cuda":
        return tvm.cpu(0)
    libs = tvm.base._LOADED_LIBS
    if "tvm_runtime_cuda" not in libs:
        import ctypes

        path = Path(libs["tvm_runtime"]._name).resolve().parent / "libtvm_runtime_cuda.so"
        try:
            libs["tvm_runtime_cuda"] = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
        except OSError as e:
            raise ArtifactError(f"cannot load TVM's CUDA runtime: {e}", "install the NVIDIA driver and the CUDA 13 runtime library (libcudart.so.13), and use a TVM runtime with libtvm_runtime_cuda.so (autoglm-compile bundle-runtime --target <a CUDA target>)") from None
    return tvm.cuda(0)


def load(path: str | Path, device: str | None = None, threads: int | None = None):
    """Load an artifact. `threads` defaults to the cores this process may use."""
    manifest = read_manifest(path)
    if manifest.get("buckets"):  # shape buckets: one variant per set of input shapes, dispatched by shape
        from .bucket_runtime import BucketedModel

        return BucketedModel(path, manifest, device, threads)
    if manifest.get("backend") == "vendor-onnx":
        return VendorModel(path, manifest, cpu=device == "cpu")
    if manifest.get("segments"):  # some nodes on ONNX Runtime (--fallback onnxruntime): needs onnxruntime too
        from .fallback_runtime import PartitionedModel

        return PartitionedModel(path, manifest, device, threads)
    return CompiledModel(path, device, threads)


def restore_affinity() -> None:
    """Undo the pinning of the calling thread by TVM's thread pool (so other runtimes get every core again)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, INITIAL_AFFINITY)
