"""What an artifact tells the device: requirements-runtime.txt (what to install) and RUN.md (how to run it).

Both are written from the manifest by the package stage (pipeline.stage_package, vendor.stage_package, and again
when --backend auto repackages), before the manifest's file hashes, so the manifest hashes them.

- TVM artifacts: numpy, apache-tvm and apache-tvm-ffi pinned to the versions that built the library (the runtime
  library alone is enough: TVM_USE_RUNTIME_LIB=1, or `autoglm-compile bundle-runtime`), and onnxruntime only when
  some segments run on ONNX Runtime. CUDA artifacts hold compiled device code, so the device needs the NVIDIA driver
  and the CUDA runtime library, not a CUDA compiler.
- Vendor-onnx artifacts (NPU targets): numpy and the runtime runner.py uses (README.md has the details).
"""
from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

REQUIREMENTS = "requirements-runtime.txt"
RUN = "RUN.md"
NUMPY = "numpy>=1.24"  # what autoglm_compile.runtime needs (pyproject's floor)
# apache-tvm 0.27's libtvm_runtime_cuda.so links against these (readelf -d, x86_64 and aarch64 wheels alike).
CUDA_LIBS = "the NVIDIA driver (libcuda.so.1) and the CUDA 13 runtime library (libcudart.so.13)"


def _onnxruntime_segments(manifest: dict) -> int:
    return sum(1 for s in manifest.get("segments") or () if s["backend"] == "onnxruntime")


def _arch(manifest: dict) -> str:
    spec = manifest["target"].get("tvm") or {}
    return str((spec.get("host") or spec).get("mtriple", "")).split("-")[0] or "x86_64"


def _io(specs: list[dict]) -> str:
    return ", ".join(f"{s['name']} {s['dtype']}[{','.join(str(d) for d in s['shape'])}]" for s in specs)


# The check in RUN.md, run from the artifact folder (tests run it as written).
CHECK = '''import numpy as np, autoglm_compile
m = autoglm_compile.load(".")
v = m.manifest["verify"]
with np.load(v["inputs"]) as z:
    outputs = m({k: z[k] for k in z.files})   # a list of numpy arrays, in the order of m.outputs
with np.load(v["expected"]) as z:
    for o, got in zip(m.outputs, outputs):
        np.testing.assert_allclose(got, z[o["name"]], rtol=v["rtol"], atol=v["atol"])
print("outputs match ONNX Runtime:", ", ".join(o["name"] for o in m.outputs))'''


def check_snippet(run_md: str) -> str:
    """The Python check in a RUN.md (the text between the lines `python3 -c '` and `'`)."""
    lines = run_md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.rstrip().endswith("python3 -c '"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == "'")
    return "\n".join(line[4:] if line.startswith("    ") else line for line in lines[start + 1:end])


def tvm_files(manifest: dict) -> tuple[str, str]:
    """(requirements-runtime.txt, RUN.md) of a TVM artifact."""
    t = manifest["target"]
    name, cuda, arch = t["name"], t["device"] == "cuda", _arch(manifest)
    tvm_v = manifest["versions"]["tvm"]
    ffi_v = metadata.version("apache-tvm-ffi")
    ort_segments = _onnxruntime_segments(manifest)
    ort_v = (manifest.get("runtime_dependencies") or {}).get("onnxruntime") or manifest["versions"].get("onnxruntime")
    library = manifest.get("library") or "segments/"

    req = [
        f"# What {name} artifacts need on the device ({arch} Linux). Written by autoglm-compile {manifest['versions']['autoglm_compile']}.",
        NUMPY,
        f"# The TVM runtime that reads {library}: the versions that built it. Only the runtime library is used",
        "# (TVM_USE_RUNTIME_LIB=1); `autoglm-compile bundle-runtime` writes it alone (no compiler) instead of these wheels.",
        f"apache-tvm=={tvm_v}",
        f"apache-tvm-ffi=={ffi_v}",
    ]
    if ort_segments:
        req += [f"# {ort_segments} segment(s) run on ONNX Runtime's CPU provider (verified with {ort_v})", f"onnxruntime>={ort_v}"]
    if cuda:
        req += [f"# CUDA: {CUDA_LIBS} on the loader path.",
                "# No CUDA compiler: the library holds the kernels compiled for " + str(t["tvm"].get("arch")) + "."]
    req += ["# autoglm_compile's runtime modules: from the runtime bundle (autoglm-compile bundle-runtime), or this",
            "# project's wheel installed with pip install --no-deps."]

    needs = ["numpy", "TVM's runtime library (not the compiler)"]
    if ort_segments:
        needs.append(f"onnxruntime ({ort_segments} segment(s) run on ONNX Runtime)")
    run = [
        f"# Running this artifact on {name}",
        "",
        f"`{library}` was compiled by TVM {tvm_v} for {name} ({arch}{', CUDA ' + str(t['tvm'].get('arch')) if cuda else ', CPU'}). "
        f"On the device it needs Python 3, {', '.join(needs)}, and autoglm_compile's runtime modules "
        "(`autoglm_compile.runtime`, which imports neither the TVM compiler nor pydantic, typer or rich).",
        "",
        "## Install",
        "",
        "The runtime bundle (TVM's runtime libraries, tvm_ffi, autoglm_compile's runtime modules; no compiler), written",
        "on the build machine and copied to the device with this folder:",
        "",
        f"    autoglm-compile bundle-runtime --target {name} -o tvm-runtime   # add --python X.Y for the device's Python",
        f"    # on the device: pip install {NUMPY.split('>')[0]}{' onnxruntime' if ort_segments else ''}",
        "    export PYTHONPATH=/path/to/tvm-runtime TVM_USE_RUNTIME_LIB=1",
        "",
        f"Or `pip install -r {REQUIREMENTS}`: the apache-tvm wheel carries the compiler too (libtvm_compiler.so, 259 MB), which",
        "TVM_USE_RUNTIME_LIB=1 leaves unloaded; autoglm_compile then comes from the bundle's `autoglm_compile/` folder or",
        "this project's wheel (`pip install --no-deps`).",
    ]
    if cuda:
        run += ["", f"CUDA: the library holds the kernels compiled at build time for {t['tvm'].get('arch')} (a fatbin), so the device",
                f"needs no CUDA compiler (no nvcc, no NVRTC): only {CUDA_LIBS},",
                "which TVM's CUDA runtime (libtvm_runtime_cuda.so, in the bundle) loads. autoglm_compile.load loads that",
                "runtime itself when TVM runs without its compiler."]
    run += [
        "",
        "## Run",
        "",
        "From this folder; the check runs the stored verification inputs and compares with ONNX Runtime's outputs:",
        "",
        "    TVM_USE_RUNTIME_LIB=1 python3 -c '",
        *("    " + line for line in CHECK.splitlines()),
        "    '",
        "",
        f"Inputs: {_io(manifest['inputs'])}. Outputs: {_io(manifest['outputs'])}.",
        "`autoglm_compile.load(path)` returns a model: call it with a dict of arrays (or keywords); it returns a list of arrays.",
        "Where the whole package is installed: `autoglm-compile run . --check`.",
    ]
    return "\n".join(req) + "\n", "\n".join(run) + "\n"


def vendor_files(manifest: dict, runner_cfg: dict) -> tuple[str, str]:
    """(requirements-runtime.txt, RUN.md) of a vendor-onnx artifact (NPU targets; runner.py runs it)."""
    name, v = manifest["target"]["name"], manifest["vendor"]
    ort_v = manifest["versions"].get("onnxruntime")
    req = [
        f"# What {name} artifacts need: runner.py runs model.onnx. Written by autoglm-compile {manifest['versions']['autoglm_compile']}.",
        NUMPY,
        f"# ONNX Runtime's CPU provider runs model.onnx where the NPU runtime is absent (verified with {ort_v}).",
    ]
    if runner_cfg["runtime"] == "onnxruntime":
        req += [f"# On the device, {runner_cfg['install']}: it replaces this line.", f"onnxruntime>={ort_v}"]
    else:
        req += [f"onnxruntime>={ort_v}", f"# On the device, {runner_cfg['install']} (not on PyPI)."]
    run = [
        f"# Running this artifact on {name}",
        "",
        f"`model.onnx` runs on {v['execution_provider']} through `runner.py` (numpy and ONNX Runtime, or the vendor runtime;",
        "no TVM). README.md has the runtime options and the offline conversion (`convert.sh`).",
        "",
        f"    pip install -r {REQUIREMENTS}",
        "    python3 runner.py --check      # the stored verification inputs, compared with ONNX Runtime's outputs",
        "    python3 runner.py --runs 100   # latency",
        "",
        f"On the device: {runner_cfg['install']}. Without it runner.py uses ONNX Runtime's CPU provider and says so.",
        f"Inputs: {_io(manifest['inputs'])}. Outputs: {_io(manifest['outputs'])}.",
    ]
    return "\n".join(req) + "\n", "\n".join(run) + "\n"


def write_run_files(root: Path, manifest: dict) -> None:
    """Write requirements-runtime.txt and RUN.md into the artifact folder `root`, from its manifest."""
    if manifest.get("backend") == "vendor-onnx":
        req, run = vendor_files(manifest, json.loads((root / "runner.json").read_text()))
    else:
        req, run = tvm_files(manifest)
    (root / REQUIREMENTS).write_text(req)
    (root / RUN).write_text(run)
