"""Every artifact says what to install on the device (requirements-runtime.txt) and how to run it (RUN.md).

The files are written from the manifest and hashed in it. A TVM artifact pins apache-tvm and apache-tvm-ffi to the
versions that built it and lists onnxruntime only when a segment runs on ONNX Runtime; a CUDA artifact says that no
CUDA compiler is needed; a vendor artifact points at its runner.py. RUN.md's check is run as written in
test_runtime_bundle, with the runtime bundle alone; here it is shown to fail on wrong outputs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata

import pytest

from autoglm_compile.artifact import sha256
from autoglm_compile.runfiles import REQUIREMENTS, RUN, check_snippet, tvm_files, vendor_files

TVM_V, FFI_V = metadata.version("apache-tvm"), metadata.version("apache-tvm-ffi")


def requirements(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def manifest(**changes) -> dict:
    """A TVM artifact's manifest, as far as the run files read it."""
    m = {
        "library": "model.so",
        "inputs": [{"name": "x", "shape": [1, 3, 8, 8], "dtype": "float32"}],
        "outputs": [{"name": "y", "shape": [1, 4], "dtype": "float32"}],
        "target": {"name": "host", "device": "cpu", "tvm": {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}},
        "versions": {"autoglm_compile": "0.1.0", "tvm": TVM_V, "onnxruntime": "1.32.0"},
    }
    m.update(changes)
    return m


def test_built_artifact_has_run_files_hashed_in_its_manifest(built_artifact):
    out, _, _ = built_artifact
    files = json.loads((out / "manifest.json").read_text())["files"]
    for name in (REQUIREMENTS, RUN):
        assert files[name] == sha256(out / name)
    assert requirements((out / REQUIREMENTS).read_text()) == ["numpy>=1.24", f"apache-tvm=={TVM_V}", f"apache-tvm-ffi=={FFI_V}"]
    run = (out / RUN).read_text()
    assert "bundle-runtime --target host" in run and "TVM_USE_RUNTIME_LIB=1" in run
    assert "x float32[1,3,16,16]" in run and "y float32[1,4]" in run
    assert "CUDA" not in run


def test_run_md_check_fails_on_wrong_outputs(built_artifact, tmp_path):
    """The check can fail: with the expected outputs changed it exits non-zero."""
    import shutil

    import numpy as np

    out, _, _ = built_artifact
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with np.load(copy / "verify" / "expected.npz") as z:
        np.savez(copy / "verify" / "expected.npz", y=z["y"] + 1.0)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TVM_USE_RUNTIME_LIB"] = "1"
    proc = subprocess.run([sys.executable, "-c", check_snippet((copy / RUN).read_text())], capture_output=True, text=True, env=env, cwd=copy, timeout=300)
    assert proc.returncode != 0 and "Not equal to tolerance" in proc.stderr


def test_onnxruntime_only_with_onnxruntime_segments():
    segs = [{"backend": "tvm"}, {"backend": "onnxruntime"}, {"backend": "tvm"}]
    req, run = tvm_files(manifest(library=None, segments=segs, runtime_dependencies={"onnxruntime": "1.32.0"}))
    assert requirements(req) == ["numpy>=1.24", f"apache-tvm=={TVM_V}", f"apache-tvm-ffi=={FFI_V}", "onnxruntime>=1.32.0"]
    assert "1 segment(s) run on ONNX Runtime" in run and "pip install numpy onnxruntime" in run
    req, _ = tvm_files(manifest(library=None, segments=[{"backend": "tvm"}, {"backend": "tvm"}]))
    assert not any(r.startswith("onnxruntime") for r in requirements(req))


def test_cuda_artifact_needs_no_cuda_compiler():
    target = {"name": "nvidia-h100", "device": "cuda", "tvm": {"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}}}
    req, run = tvm_files(manifest(target=target))
    assert requirements(req) == ["numpy>=1.24", f"apache-tvm=={TVM_V}", f"apache-tvm-ffi=={FFI_V}"]
    assert "libcudart.so.13" in req and "sm_90" in req
    assert "no CUDA compiler (no nvcc, no NVRTC)" in run and "sm_90" in run and "libcuda.so.1" in run
    assert "bundle-runtime --target nvidia-h100" in run


def test_aarch64_artifact_says_its_arch():
    target = {"name": "arm-cortex-a76", "device": "cpu", "tvm": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"}}
    req, run = tvm_files(manifest(target=target))
    assert "(aarch64 Linux)" in req.splitlines()[0] and "arm-cortex-a76 (aarch64, CPU)" in run


@pytest.mark.parametrize("runtime, install, ort_line", [
    ("onnxruntime", "pip install onnxruntime-cann (...)", True),
    ("magicmind", "install Cambricon's MagicMind (...)", True),
])
def test_vendor_run_files(runtime, install, ort_line):
    m = manifest(backend="vendor-onnx", library="model.onnx", target={"name": "npu", "device": "npu"},
                 vendor={"execution_provider": "CANNExecutionProvider", "runtime": runtime})
    req, run = vendor_files(m, {"runtime": runtime, "install": install})
    assert requirements(req) == ["numpy>=1.24", "onnxruntime>=1.32.0"]
    assert install in req and "python3 runner.py --check" in run and "apache-tvm" not in req + run


def test_vendor_artifact_gets_run_files(tmp_path):
    from test_npu import build

    out, report = build(tmp_path, "ascend-910b")
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert REQUIREMENTS in files and RUN in files and REQUIREMENTS in report.vendor.files
    assert "onnxruntime-cann" in (out / REQUIREMENTS).read_text()
    run = (out / RUN).read_text()
    assert "python3 runner.py --check" in run and "CANNExecutionProvider" in run
    proc = subprocess.run([sys.executable, "runner.py", "--check"], capture_output=True, text=True, cwd=out, timeout=300)
    assert proc.returncode == 0, proc.stderr
