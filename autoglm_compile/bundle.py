"""The runtime a device needs to run artifacts: `autoglm-compile bundle-runtime --target T [-o DIR]`.

With DIR on PYTHONPATH and TVM_USE_RUNTIME_LIB=1, `import autoglm_compile; autoglm_compile.load(ARTIFACT)` works
on the device with only numpy installed (and onnxruntime for an artifact with ONNX Runtime segments):

    DIR/tvm/                 TVM's Python package with lib/libtvm_runtime.so (+ libtvm_runtime_cuda.so for CUDA
                             targets); no compiler library, no sources, headers, web runtime or compiler-only packages
    DIR/tvm_ffi/             tvm_ffi with lib/libtvm_ffi.so and its compiled core, for one CPython version
    DIR/typing_extensions.py tvm_ffi's one pure-Python dependency
    DIR/autoglm_compile/     the runtime modules only (runtime, fallback_runtime, bucket_runtime, runners/)
    DIR/*.dist-info/         METADATA and licenses of the three distributions
    DIR/BUNDLE.json          target, arch, Python version, versions, where the files came from, size

Where the files come from: the installed apache-tvm and apache-tvm-ffi when the target's CPU is this machine's
architecture and the device's Python is this interpreter's version; otherwise the wheels of the same versions for
that architecture and Python, from PyPI (`pip download`), cached in $XDG_CACHE_HOME/autoglm-compile/wheels
(~/.cache/...). A wheel already in the cache is used without the network.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

from .errors import InputError, ToolchainError
from .target import TargetDescriptor, host_arch, resolve_target

TVM_DIST, FFI_DIST, TYPING_DIST = "apache-tvm", "apache-tvm-ffi", "typing_extensions"
INFO = "BUNDLE.json"
# Folders of the tvm package that a runtime-only process never imports or that are not Python: tvm.relax, tvm.s_tir
# and tvm.topi are the compiler's Python side (TVM_USE_RUNTIME_LIB=1 does not import them); contrib, exec and
# testing are tools; the rest are sources, headers, CMake files and the web runtime.
TVM_SKIP = frozenset({"3rdparty", "contrib", "exec", "include", "lib64", "relax", "s_tir", "src", "testing", "topi", "web"})
FFI_SKIP = frozenset({"3rdparty", "cython", "include", "share", "src", "stub"})
TVM_LIBS = ("libtvm_runtime.so",)
TVM_CUDA_LIBS = ("libtvm_runtime_cuda.so",)  # needs the NVIDIA driver (libcuda.so.1) and libcudart.so.13
# autoglm_compile's modules that running an artifact imports (relative to the package folder; a test checks that
# runtime.load's imports are all here).
RUNTIME_MODULES = ("__init__.py", "runtime.py", "fallback_runtime.py", "bucket_runtime.py", "runners/__init__.py", "runners/runner.py")
# The glibc versions whose manylinux wheels a device may take (apache-tvm 0.27 ships manylinux_2_27/2_28 wheels).
MANYLINUX_GLIBC = range(28, 16, -1)


@dataclass
class Bundle:
    path: Path
    info: dict

    @property
    def bytes(self) -> int:
        return self.info["bytes"]


def wheel_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "autoglm-compile" / "wheels"


def wanted(rel: str, cuda: bool) -> bool:
    """Whether a file of the installed distributions (path relative to site-packages) goes into the bundle."""
    parts = rel.split("/")
    name = parts[-1]
    if "__pycache__" in parts:
        return False
    top = parts[0]
    if top.endswith(".dist-info"):
        dist = top.split("-")[0].lower()
        return dist in ("apache_tvm", "apache_tvm_ffi", "typing_extensions") and (name == "METADATA" or "licenses" in parts)
    if top == "typing_extensions.py":
        return True
    if top == "tvm":
        if len(parts) > 2 and parts[1] in TVM_SKIP:
            return False
        if len(parts) > 2 and parts[1] == "lib":
            return name in TVM_LIBS + (TVM_CUDA_LIBS if cuda else ())
        return name.endswith(".py") or name in ("LICENSE", "NOTICE") or parts[1] == "licenses"
    if top == "tvm_ffi":
        if len(parts) > 2 and parts[1] in FFI_SKIP:
            return False
        if len(parts) > 2 and parts[1] == "lib":
            return name.endswith(".so")  # libtvm_ffi.so, and libtvm_ffi_testing.so, which the core links against
        return name.endswith(".py") or (len(parts) == 2 and name.startswith("core.") and name.endswith(".so"))
    return False


def _python_version(python: str | None) -> str:
    if python is None:
        return f"{sys.version_info.major}.{sys.version_info.minor}"
    if not re.fullmatch(r"3\.\d{1,2}", python):
        raise InputError(f"--python {python}: not a Python version", "give the device's Python as X.Y, e.g. 3.11")
    return python


def _target_arch(target: TargetDescriptor) -> str:
    if target.backend != "tvm":
        raise InputError(f"target '{target.name}' runs artifacts on its vendor runtime, not TVM: there is no TVM runtime to bundle",
                         "its artifacts carry runner.py; install what their requirements-runtime.txt lists")
    assert target.cpu is not None  # TVM targets have a CPU (host targets get this machine's)
    return target.cpu.arch


# ----------------------------------------------------------------------------------------------- the sources

def _installed_files(cuda: bool, dists=(TVM_DIST, FFI_DIST, TYPING_DIST)) -> Iterator[tuple[str, Callable[[Path], None]]]:
    for dist_name in dists:
        dist = metadata.distribution(dist_name)
        for f in dist.files or ():
            rel = Path(f).as_posix()
            if wanted(rel, cuda):
                src = Path(dist.locate_file(f))
                yield rel, lambda dest, src=src: shutil.copy2(src, dest)


def _wheel_files(wheels: list[Path], cuda: bool) -> Iterator[tuple[str, Callable[[Path], None]]]:
    for whl in wheels:
        with zipfile.ZipFile(whl) as zf:
            for info in zf.infolist():
                if info.is_dir() or not wanted(info.filename, cuda):
                    continue

                def write(dest: Path, zf=zf, info=info) -> None:  # called while the generator holds zf open
                    with zf.open(info) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)
                    mode = (info.external_attr >> 16) & 0o777
                    os.chmod(dest, mode or (0o755 if dest.suffix == ".so" else 0o644))

                yield info.filename, write


def _platforms(arch: str) -> list[str]:
    return [f"manylinux_2_{v}_{arch}" for v in MANYLINUX_GLIBC] + [f"manylinux2014_{arch}"]


def fetch_wheels(arch: str, python: str, cache: Path | None = None, log: Callable[[str], None] = print) -> list[Path]:
    """The apache-tvm and apache-tvm-ffi wheels of the installed versions for `arch` and CPython `python`: from the
    cache when there, else downloaded from PyPI into it."""
    cache = cache or wheel_cache()
    cache.mkdir(parents=True, exist_ok=True)
    reqs = [f"{TVM_DIST}=={metadata.version(TVM_DIST)}", f"{FFI_DIST}=={metadata.version(FFI_DIST)}"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--implementation", "cp", "--python-version", python]
    for p in _platforms(arch):
        cmd += ["--platform", p]
    with tempfile.TemporaryDirectory(prefix="autoglm-wheels-") as tmp:
        offline = subprocess.run(cmd + ["--no-index", "--find-links", str(cache), "-d", tmp, *reqs], capture_output=True, text=True)
        if offline.returncode != 0:
            log(f"downloading {' '.join(reqs)} for {arch}, CPython {python} from PyPI into {cache}")
            online = subprocess.run(cmd + ["-d", tmp, *reqs], capture_output=True, text=True)
            if online.returncode != 0:
                why = (online.stderr.strip().splitlines() or ["pip failed"])[-1]
                raise ToolchainError(f"cannot get the {arch} wheels of {', '.join(reqs)} for CPython {python}: {why}",
                                     f"with network access, run: pip download --no-deps --only-binary=:all: --python-version {python} "
                                     f"--platform manylinux_2_28_{arch} -d {cache} {' '.join(reqs)}")
        out = []
        for whl in sorted(Path(tmp).glob("*.whl")):
            dest = cache / whl.name
            if not dest.exists():
                shutil.copy2(whl, dest)
            out.append(dest)
    return out


# ----------------------------------------------------------------------------------------------- the bundle

def _stage(output: Path) -> Path:
    if output.exists() and not (output / INFO).is_file():
        raise InputError(f"output path {output} exists and is not a runtime bundle", "choose another -o path, or remove it yourself")
    output.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))


def _commit(staging: Path, output: Path) -> None:
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.rename(output, old)
    os.rename(staging, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_bundle(target: str | TargetDescriptor, output: str | Path | None = None, python: str | None = None,
                 cache: Path | None = None, log: Callable[[str], None] = print) -> Bundle:
    """Write the runtime bundle for `target` (a name, alias, YAML path or descriptor) and CPython `python` (X.Y,
    default this interpreter's) to `output` (default build/runtime-<target>). An earlier bundle there is replaced
    only once the new one is complete."""
    from . import __version__

    desc = resolve_target(target) if isinstance(target, str) else target
    arch, py = _target_arch(desc), _python_version(python)
    cuda = desc.kind == "cuda"
    out = Path(output or Path("build") / f"runtime-{desc.name}").resolve()
    here = arch == host_arch() and py == f"{sys.version_info.major}.{sys.version_info.minor}"
    staging = _stage(out)
    try:
        wheels = [] if here else fetch_wheels(arch, py, cache, log)
        # typing_extensions is pure Python: the installed one serves every arch
        files = _installed_files(cuda) if here else itertools.chain(_wheel_files(wheels, cuda), _installed_files(cuda, (TYPING_DIST,)))
        count = 0
        for rel, write in files:
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            write(dest)
            count += 1
        pkg = Path(__file__).resolve().parent
        for rel in RUNTIME_MODULES:
            dest = staging / "autoglm_compile" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(pkg / rel, dest)
            count += 1
        if cuda and not any((staging / "tvm" / "lib" / n).is_file() for n in TVM_CUDA_LIBS):
            raise ToolchainError(f"the {arch} TVM runtime has no {TVM_CUDA_LIBS[0]}", "install apache-tvm's wheel, which ships it")
        size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
        info = {
            "target": desc.name,
            "arch": arch,
            "python": py,
            "cuda": cuda,
            "versions": {TVM_DIST: metadata.version(TVM_DIST), FFI_DIST: metadata.version(FFI_DIST),
                         TYPING_DIST: metadata.version(TYPING_DIST), "autoglm_compile": __version__},
            "from": "installed packages" if here else [w.name for w in wheels],
            "files": count,  # besides this one
            "bytes": size,  # of those files
            "use": "PYTHONPATH=<this folder> TVM_USE_RUNTIME_LIB=1 python3 -c \"import autoglm_compile; m = autoglm_compile.load('ARTIFACT')\"",
            "needs": ["numpy"] + (["the NVIDIA driver (libcuda.so.1)", "the CUDA 13 runtime library (libcudart.so.13)"] if cuda else []),
        }
        (staging / INFO).write_text(json.dumps(info, indent=2) + "\n")
        _commit(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Bundle(out, info)
