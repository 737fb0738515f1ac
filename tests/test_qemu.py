"""Stretch of issues 4 and 9: an aarch64 artifact runs under qemu-aarch64 with Debian's arm64 Python and numpy and
the aarch64 TVM runtime bundle alone, and matches ONNX Runtime on this machine (autoglm_compile.qemu).

Slow: it needs qemu-user and the aarch64 cross linker (make install, make qemu-check install them as root) and the
network once (Debian's arm64 packages, PyPI's aarch64 wheels), then runs from the caches (~20 s a target)."""
from __future__ import annotations

from pathlib import Path

import pytest

from autoglm_compile.qemu import check

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("target", ["arm-cortex-a76", "arm-neoverse-v1"])
def test_aarch64_artifact_matches_onnxruntime_under_qemu(tmp_path, target):
    r = check(target, "autoglm_compile.zoo:small_cnn", "x=1x3x32x32", tmp_path, log=lambda _: None)
    assert r["machine"] == "aarch64" and r["host"] == "x86_64"
    bundle = tmp_path / "runtime"
    assert Path(r["tvm"]).is_relative_to(bundle) and Path(r["autoglm_compile"]).is_relative_to(bundle)
    assert r["runtime_only"] is True and r["libs"] == ["tvm_runtime"]
    assert list(r["outputs"]) == ["output"]
    assert r["ok"], r["outputs"]  # allclose with the manifest's rtol/atol, against ONNX Runtime's stored outputs
