"""Run an aarch64 artifact on this x86 machine under qemu-aarch64 (user mode), with Debian's arm64 Python and numpy
and the aarch64 TVM runtime bundle, and compare its outputs with ONNX Runtime's (on x86, stored in the artifact).

    python -m autoglm_compile.qemu [--target arm-cortex-a76] [--model autoglm_compile.zoo:small_cnn] [--keep DIR]

What it needs here: qemu-aarch64 (Debian's qemu-user), apt-get and dpkg-deb (to fetch and unpack the arm64 packages),
the aarch64 cross linker that aarch64 builds need anyway, and the network once (PyPI for the aarch64 TVM wheels,
Debian's archive for the packages), after which both are cached:

- the sysroot: python3.11 and python3-numpy for arm64 with their dependencies (and libstdc++6, which TVM's
  libraries need), resolved by apt-get in a private state folder (the system's sources and keys, its dpkg state
  untouched: no `dpkg --add-architecture`) and unpacked with `dpkg-deb -x`, in
  $XDG_CACHE_HOME/autoglm-compile/qemu/bookworm-arm64 (~/.cache/...);
- the aarch64 wheels of apache-tvm and apache-tvm-ffi, in .../wheels (autoglm_compile.bundle).

The artifact runs as on the device: `autoglm_compile.load` from the bundle alone, TVM_USE_RUNTIME_LIB=1,
python -S (no site-packages but the sysroot's numpy). qemu's wall time is emulation, not the device's latency.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import CompileError, ToolchainError

PYTHON = "3.11"  # Debian 12's python3, and the CPython of the bundle's tvm_ffi core
PACKAGES = ("python3.11", "python3-numpy", "libstdc++6")
PYTHON_BIN = "usr/bin/python3.11"
DIST_PACKAGES = "usr/lib/python3/dist-packages"
LIBDIR = "usr/lib/aarch64-linux-gnu"
# Debian installs these through update-alternatives in a maintainer script, which dpkg-deb -x does not run.
ALTERNATIVES = {"libblas.so.3": "blas/libblas.so.3", "liblapack.so.3": "lapack/liblapack.so.3"}
MARKER = ".complete"

# Runs inside qemu: the artifact loaded by the bundle's autoglm_compile, its outputs saved for the host to compare.
GUEST = """
import json, platform, sys, time
import numpy as np
import autoglm_compile, tvm
art, out = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
m = autoglm_compile.load(art)
t1 = time.perf_counter()
with np.load(art + "/" + m.manifest["verify"]["inputs"]) as z:
    feeds = {k: z[k] for k in z.files}
outputs = m(feeds)
t2 = time.perf_counter()
np.savez(out, **{o["name"]: a for o, a in zip(m.outputs, outputs)})
print(json.dumps({"machine": platform.machine(), "python": platform.python_version(), "numpy": np.__version__,
                  "tvm": tvm.__file__, "autoglm_compile": autoglm_compile.__file__, "runtime_only": tvm.base._RUNTIME_ONLY,
                  "libs": sorted(tvm.base._LOADED_LIBS), "load_s": t1 - t0, "run_s": t2 - t1}))
"""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "autoglm-compile" / "qemu"


def qemu_binary() -> str:
    for name in ("qemu-aarch64", "qemu-aarch64-static"):
        if shutil.which(name):
            return shutil.which(name)
    raise ToolchainError("qemu-aarch64 not found", "install Debian's qemu-user (apt-get install qemu-user)")


def _run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        raise ToolchainError(f"{what} failed: {' | '.join(tail)}", f"command: {' '.join(cmd)}")
    return proc


def sysroot(root: Path | None = None, log=print) -> Path:
    """Debian 12's arm64 python3.11 and numpy unpacked into a folder (built once, then reused)."""
    root = root or cache_root() / "bookworm-arm64"
    tree = root / "root"
    if (tree / MARKER).is_file():
        return tree
    for tool in ("apt-get", "dpkg-deb"):
        if not shutil.which(tool):
            raise ToolchainError(f"{tool} not found: the arm64 Python sysroot is built from Debian packages", "run this on Debian or Ubuntu")
    apt = root / "apt"
    shutil.rmtree(apt, ignore_errors=True)
    for d in ("state/lists/partial", "cache/archives/partial", "empty"):
        (apt / d).mkdir(parents=True)
    (apt / "state" / "status").touch()  # an empty dpkg status: apt resolves every dependency for arm64
    conf = apt / "apt.conf"
    conf.write_text("\n".join([
        f'Dir::State "{apt}/state";', f'Dir::State::status "{apt}/state/status";', f'Dir::Cache "{apt}/cache";',
        f'Dir::Etc::Parts "{apt}/empty";',  # the system's sources and keys, none of its hooks
        'APT::Architecture "arm64";', 'APT::Architectures { "arm64"; };',
        'Debug::NoLocking "true";', 'Acquire::Languages "none";', "",
    ]))
    env = {**os.environ, "APT_CONFIG": str(conf), "DEBIAN_FRONTEND": "noninteractive"}
    log(f"fetching Debian's arm64 {', '.join(PACKAGES)} into {root}")
    _run(["apt-get", "update"], "apt-get update (arm64)", env=env)
    _run(["apt-get", "install", "--download-only", "-y", "--no-install-recommends", *PACKAGES], "apt-get download (arm64)", env=env)
    debs = sorted((apt / "cache" / "archives").glob("*.deb"))
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(tree)], f"dpkg-deb -x {deb.name}")
    for link, target in ALTERNATIVES.items():
        dest = tree / LIBDIR / link
        if (tree / LIBDIR / target).exists() and not dest.exists():
            dest.symlink_to(target)
    (tree / MARKER).write_text("\n".join(d.name for d in debs) + "\n")
    shutil.rmtree(apt / "cache" / "archives", ignore_errors=True)
    return tree


def run_artifact(artifact: Path, bundle: Path, tree: Path, timeout: float = 600) -> dict:
    """Run the artifact's stored inputs under qemu-aarch64 and compare with its stored ONNX Runtime outputs."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    v = manifest["verify"]
    with tempfile.TemporaryDirectory(prefix="autoglm-qemu-") as tmp:
        out = Path(tmp) / "outputs.npz"
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TVM_USE_RUNTIME_LIB": "1", "PYTHONPATH": f"{bundle}:{tree / DIST_PACKAGES}"}
        cmd = [qemu_binary(), "-L", str(tree), str(tree / PYTHON_BIN), "-S", "-c", GUEST, str(artifact), str(out)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=timeout)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"the artifact failed under qemu-aarch64 (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        facts = json.loads(proc.stdout.strip().splitlines()[-1])
        with np.load(out) as got, np.load(artifact / v["expected"]) as want:
            outputs = {}
            for name in want.files:
                a, b = got[name], want[name]
                ok = a.shape == b.shape and bool(np.allclose(a, b, rtol=v["rtol"], atol=v["atol"]))
                outputs[name] = {"max_abs": float(np.abs(a.astype(np.float64) - b).max()) if a.shape == b.shape else None, "ok": ok}
    return {**facts, "qemu_wall_s": wall, "outputs": outputs, "ok": all(o["ok"] for o in outputs.values()),
            "rtol": v["rtol"], "atol": v["atol"]}


def check(target: str = "arm-cortex-a76", model: str = "autoglm_compile.zoo:small_cnn", input_shape: str = "x=1x3x32x32",
          workdir: Path | None = None, log=print) -> dict:
    """Build `model` for the aarch64 `target`, bundle the aarch64 runtime, run it under qemu, compare with ONNX Runtime."""
    from .bundle import write_bundle
    from .pipeline import CompileOptions, compile_model

    tree = sysroot(log=log)
    with tempfile.TemporaryDirectory(prefix="autoglm-qemu-check-") as tmp:
        work = workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        artifact = work / "artifact"
        report = compile_model(CompileOptions(source=model, target=target, output=artifact, input_shapes=[input_shape] if input_shape else []))
        bundle = write_bundle(target, work / "runtime", PYTHON, log=log)
        result = run_artifact(artifact, bundle.path, tree)
    return {"target": target, "model": model, "host": platform.machine(), "bundle_bytes": bundle.bytes,
            "artifact_bytes": report.memory.artifact_bytes if report.memory else None, **result}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m autoglm_compile.qemu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="arm-cortex-a76", help="an aarch64 CPU target")
    ap.add_argument("--model", default="autoglm_compile.zoo:small_cnn", help="ONNX file or module:factory")
    ap.add_argument("--input-shape", default="x=1x3x32x32", help="NAME=DIMS for the model's input ('' for none)")
    ap.add_argument("--keep", type=Path, help="keep the artifact and the bundle in this folder")
    args = ap.parse_args(argv)
    try:
        result = check(args.target, args.model, args.input_shape, args.keep, log=lambda s: print(s, file=sys.stderr))
    except CompileError as e:
        print(f"error: {e}" + (f"\nHint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return int(e.exit_code)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 3


if __name__ == "__main__":
    sys.exit(main())
