"""`autoglm-compile bundle-runtime`: the TVM runtime a device needs (no compiler), for the target's arch and Python.

The host bundle is proven self-sufficient: an artifact runs in a `python -S` process (no site-packages) whose only
paths are the bundle and a folder holding numpy alone (onnxruntime too, for a partitioned artifact), and every
module it loads comes from the bundle. The wheel path (other arch or Python) is checked offline against small
stand-in wheels in a private cache; the real aarch64 wheels (network, or the cache) are a slow test.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

import autoglm_compile

from autoglm_compile.bundle import INFO, RUNTIME_MODULES, wanted, write_bundle
from autoglm_compile.cli import app
from autoglm_compile.runfiles import check_snippet

TVM_V, FFI_V = metadata.version("apache-tvm"), metadata.version("apache-tvm-ffi")
ELF_MACHINE = {62: "x86_64", 183: "aarch64"}

# Run after the artifact's own check: where everything came from.
PROBE = """
import json, sys
import numpy as np, autoglm_compile, tvm, tvm_ffi
m = autoglm_compile.load(".")
print(json.dumps({
    "files": {n: sys.modules[n].__file__ for n in ("tvm", "tvm_ffi", "autoglm_compile", "typing_extensions", "numpy")},
    "runtime_only": tvm.base._RUNTIME_ONLY,
    "libs": sorted(tvm.base._LOADED_LIBS),
    "compiler_mapped": "libtvm_compiler" in open("/proc/self/maps").read(),
    "site_imported": "site" in sys.modules,
}))
"""


def only(tmp_path: Path, *names: str) -> Path:
    """A folder with just these installed packages (symlinks), so a `python -S` process sees nothing else."""
    folder = tmp_path / ("only-" + "-".join(names))
    folder.mkdir()
    for name in names:
        pkg = Path(__import__(name).__file__).parent
        for entry in (pkg, pkg.parent / f"{name}.libs"):
            if entry.exists():
                (folder / entry.name).symlink_to(entry)
    return folder


def run_bare(code: str, cwd: Path, *paths: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "TVM_USE_RUNTIME_LIB": "1", "PYTHONPATH": os.pathsep.join(map(str, paths))}
    return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def elf_machine(path: Path) -> str:
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF"
    return ELF_MACHINE.get(int.from_bytes(head[18:20], "little"), "other")


def relative_imports(path: Path) -> set[str]:
    """The package modules a module imports (`from .x import`, `from .runners.runner import`), as file paths."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            parts = node.module.split(".")
            out.add("/".join(parts) + ".py")
            if len(parts) > 1:
                out.add("/".join(parts[:-1]) + "/__init__.py")
    return out


def test_bundle_holds_every_module_that_loading_imports():
    """runtime.load and what it imports, transitively: all in RUNTIME_MODULES, which holds nothing else."""
    pkg = Path(autoglm_compile.__file__).parent
    seen, todo = set(), ["__init__.py", "runtime.py"]
    while todo:
        rel = todo.pop()
        if rel not in seen:
            seen.add(rel)
            todo += sorted(relative_imports(pkg / rel) - {"pipeline.py"})  # __init__.compile imports the compiler lazily
    assert seen == set(RUNTIME_MODULES)


@pytest.fixture(scope="module")
def host_bundle(tmp_path_factory):
    return write_bundle("host", tmp_path_factory.mktemp("bundle") / "rt", log=lambda _: None)


@pytest.mark.parametrize("rel, cuda, keep", [
    ("tvm/lib/libtvm_runtime.so", False, True),
    ("tvm/lib/libtvm_compiler.so", False, False),
    ("tvm/lib/libtvm_compiler.so", True, False),
    ("tvm/lib/libtvm_runtime_cuda.so", False, False),
    ("tvm/lib/libtvm_runtime_cuda.so", True, True),
    ("tvm/lib/libtvm_runtime_extra.so", False, False),
    ("tvm/runtime/vm.py", False, True),
    ("tvm/relax/__init__.py", False, False),
    ("tvm/3rdparty/dlpack/include/dlpack/dlpack.h", False, False),
    ("tvm/include/tvm/runtime/base.h", False, False),
    ("tvm/runtime/__pycache__/vm.cpython-311.pyc", False, False),
    ("tvm/script/tirx.pyi", False, False),
    ("tvm/LICENSE", False, True),
    ("tvm_ffi/core.cpython-311-aarch64-linux-gnu.so", False, True),
    ("tvm_ffi/lib/libtvm_ffi.so", False, True),
    ("tvm_ffi/lib/libtvm_ffi_testing.so", False, True),  # the core links against it
    ("tvm_ffi/cython/core.pyx", False, False),
    ("tvm_ffi/include/tvm/ffi/any.h", False, False),
    ("typing_extensions.py", False, True),
    ("apache_tvm-0.27.0.post1.dist-info/METADATA", False, True),
    ("apache_tvm-0.27.0.post1.dist-info/RECORD", False, False),
    ("apache_tvm_ffi-0.1.14.post1.dist-info/licenses/NOTICE", False, True),
    ("numpy/__init__.py", False, False),
])
def test_what_goes_into_a_bundle(rel, cuda, keep):
    assert wanted(rel, cuda) is keep


def test_host_bundle_runs_an_artifact_with_numpy_alone(host_bundle, built_artifact, tmp_path):
    out, _, _ = built_artifact
    root = host_bundle.path
    info = json.loads((root / INFO).read_text())
    assert info["arch"] == "x86_64" and info["from"] == "installed packages" and info["cuda"] is False
    assert info["versions"]["apache-tvm"] == TVM_V and info["versions"]["apache-tvm-ffi"] == FFI_V
    files = [p for p in root.rglob("*") if p.is_file() and p.name != INFO]
    assert info["files"] == len(files) and info["bytes"] == sum(p.stat().st_size for p in files)
    assert sorted(p.name for p in (root / "tvm" / "lib").iterdir()) == ["libtvm_runtime.so"]
    assert not (root / "tvm" / "relax").exists() and elf_machine(root / "tvm" / "lib" / "libtvm_runtime.so") == "x86_64"

    numpy_only = only(tmp_path, "numpy")
    # The check that the artifact's RUN.md gives, as written there.
    check = run_bare(check_snippet((out / "RUN.md").read_text()), out, root, numpy_only)
    assert check.returncode == 0, check.stderr
    assert "outputs match ONNX Runtime: y" in check.stdout
    probe = run_bare(PROBE, out, root, numpy_only)
    assert probe.returncode == 0, probe.stderr
    facts = json.loads(probe.stdout.strip().splitlines()[-1])
    for name in ("tvm", "tvm_ffi", "autoglm_compile", "typing_extensions"):
        assert Path(facts["files"][name]).is_relative_to(root), (name, facts["files"][name])
    assert Path(facts["files"]["numpy"]).is_relative_to(numpy_only)
    assert facts["runtime_only"] and facts["libs"] == ["tvm_runtime"] and not facts["compiler_mapped"]
    assert not facts["site_imported"]


def test_without_the_bundle_nothing_runs(built_artifact, tmp_path):
    """The control for the test above: the same bare process without the bundle cannot import TVM."""
    out, _, _ = built_artifact
    proc = run_bare(PROBE, out, only(tmp_path, "numpy"))
    assert proc.returncode != 0 and "No module named 'autoglm_compile'" in proc.stderr


def test_partitioned_artifact_runs_with_the_bundle_and_onnxruntime(host_bundle, tmp_path):
    from autoglm_compile.pipeline import CompileOptions, compile_model
    from test_fallback import celu_model

    model = tmp_path / "celu.onnx"
    onnx.save(celu_model(), str(model))
    out = tmp_path / "celu"
    report = compile_model(CompileOptions(source=str(model), output=out, runs=2))
    assert report.fallback is not None
    proc = run_bare(check_snippet((out / "RUN.md").read_text()), out, host_bundle.path, only(tmp_path, "numpy"), only(tmp_path, "onnxruntime"))
    assert proc.returncode == 0, proc.stderr
    assert "outputs match ONNX Runtime" in proc.stdout


def test_cuda_target_bundles_the_cuda_runtime(tmp_path):
    b = write_bundle("nvidia-h100", tmp_path / "rt", log=lambda _: None)
    assert sorted(p.name for p in (b.path / "tvm" / "lib").iterdir()) == ["libtvm_runtime.so", "libtvm_runtime_cuda.so"]
    assert b.info["cuda"] is True and any("libcudart.so.13" in n for n in b.info["needs"])


# ------------------------------------------------------------------------------------------ the wheel path

def fake_wheel(cache: Path, dist: str, version: str, tag: str, files: dict[str, bytes]) -> Path:
    """A small wheel pip accepts (METADATA, WHEEL, RECORD) holding `files`."""
    stem = dist.replace("-", "_")
    info = f"{stem}-{version}.dist-info"
    path = cache / f"{stem}-{version}-{tag}.whl"
    entries = {**files,
               f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
               f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: {tag}\n".encode()}
    entries[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in entries).encode() + f"{info}/RECORD,,\n".encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


@pytest.fixture
def aarch64_cache(tmp_path):
    cache = tmp_path / "wheels"
    cache.mkdir()
    fake_wheel(cache, "apache-tvm", TVM_V, "py3-none-manylinux_2_28_aarch64", {
        "tvm/__init__.py": b"", "tvm/runtime/__init__.py": b"", "tvm/relax/__init__.py": b"", "tvm/LICENSE": b"L",
        "tvm/lib/libtvm_runtime.so": b"\x7fELF runtime", "tvm/lib/libtvm_compiler.so": b"\x7fELF compiler",
        "tvm/lib/libtvm_runtime_cuda.so": b"\x7fELF cuda", "tvm/include/x.h": b""})
    fake_wheel(cache, "apache-tvm-ffi", FFI_V, "cp311-cp311-manylinux_2_28_aarch64", {
        "tvm_ffi/__init__.py": b"", "tvm_ffi/core.cpython-311-aarch64-linux-gnu.so": b"\x7fELF core",
        "tvm_ffi/lib/libtvm_ffi.so": b"\x7fELF ffi", "tvm_ffi/cython/core.pyx": b""})
    return cache


def test_other_arch_comes_from_the_cached_wheels_offline(aarch64_cache, tmp_path):
    b = write_bundle("arm-cortex-a76", tmp_path / "rt", python="3.11", cache=aarch64_cache, log=lambda _: None)
    got = sorted(p.relative_to(b.path).as_posix() for p in b.path.rglob("*") if p.is_file() and ".dist-info" not in p.as_posix())
    assert got == sorted([
        INFO, "typing_extensions.py", "tvm/__init__.py", "tvm/runtime/__init__.py", "tvm/LICENSE", "tvm/lib/libtvm_runtime.so",
        "tvm_ffi/__init__.py", "tvm_ffi/core.cpython-311-aarch64-linux-gnu.so", "tvm_ffi/lib/libtvm_ffi.so",
        *(f"autoglm_compile/{m}" for m in RUNTIME_MODULES)])
    assert (b.path / "tvm" / "lib" / "libtvm_runtime.so").read_bytes() == b"\x7fELF runtime"
    assert b.info["arch"] == "aarch64" and b.info["python"] == "3.11" and len(b.info["from"]) == 2
    assert all("aarch64" in w for w in b.info["from"])


def test_aarch64_cuda_target_takes_the_cuda_runtime_from_the_wheel(aarch64_cache, tmp_path):
    b = write_bundle("jetson-orin", tmp_path / "rt", python="3.11", cache=aarch64_cache, log=lambda _: None)
    assert sorted(p.name for p in (b.path / "tvm" / "lib").iterdir()) == ["libtvm_runtime.so", "libtvm_runtime_cuda.so"]


def test_a_python_with_no_cached_wheel_and_no_network_is_a_clear_error(aarch64_cache, tmp_path, monkeypatch):
    """No wheel for CPython 3.9 in the cache, and PyPI unreachable (a dead proxy): exit 2 saying how to fetch it."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    from autoglm_compile.errors import ToolchainError

    with pytest.raises(ToolchainError) as e:
        write_bundle("arm-cortex-a76", tmp_path / "rt", python="3.9", cache=aarch64_cache, log=lambda _: None)
    assert "CPython 3.9" in str(e.value) and "pip download" in e.value.hint
    assert not (tmp_path / "rt").exists()


@pytest.mark.slow
def test_real_aarch64_wheels(tmp_path):
    """PyPI's aarch64 wheels (downloaded once into ~/.cache/autoglm-compile/wheels): AArch64 libraries, no compiler."""
    b = write_bundle("arm-cortex-a76", tmp_path / "rt", python="3.11", log=lambda _: None)
    lib = b.path / "tvm" / "lib"
    assert sorted(p.name for p in lib.iterdir()) == ["libtvm_runtime.so"]
    assert elf_machine(lib / "libtvm_runtime.so") == "aarch64"
    assert elf_machine(next((b.path / "tvm_ffi").glob("core.cpython-311-aarch64-linux-gnu.so"))) == "aarch64"
    assert b.bytes < 20 * 2**20


# ------------------------------------------------------------------------------------------------ the CLI

def test_cli_writes_a_bundle_and_replaces_an_earlier_one(tmp_path):
    out = tmp_path / "rt"
    for _ in range(2):
        res = CliRunner().invoke(app, ["bundle-runtime", "--target", "host", "-o", str(out)])
        assert res.exit_code == 0, res.output
        assert "MiB" in res.stderr and "TVM_USE_RUNTIME_LIB=1" in res.stderr
    assert (out / "tvm" / "lib" / "libtvm_runtime.so").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["rt"]  # no staging or old folder left


@pytest.mark.parametrize("args, message", [
    (["--target", "ascend-910b"], "runs artifacts on its vendor runtime"),
    (["--target", "no-such-target"], "unknown target"),
    (["--python", "3"], "not a Python version"),
])
def test_cli_errors(tmp_path, args, message):
    res = CliRunner().invoke(app, ["bundle-runtime", *args, "-o", str(tmp_path / "rt")])
    assert res.exit_code == 2 and message in res.stderr and "Hint:" in res.stderr
    assert "Traceback" not in res.output


def test_cli_refuses_to_overwrite_a_folder_that_is_no_bundle(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    res = CliRunner().invoke(app, ["bundle-runtime", "-o", str(tmp_path / "mine")])
    assert res.exit_code == 2 and "not a runtime bundle" in res.stderr
    assert (tmp_path / "mine" / "keep.txt").read_text() == "x"
