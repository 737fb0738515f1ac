"""Running an artifact needs numpy and the TVM runtime only: no TVM compiler, pydantic, typer, rich or
onnx-graphsurgeon. Checked in a fresh process where those imports fail and TVM loads its runtime library alone."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

BLOCKED = ("pydantic", "typer", "rich", "onnx_graphsurgeon")

SCRIPT = f"""
import json, sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # any import of these now raises ImportError

import numpy as np
import autoglm_compile

path = sys.argv[1]
m = autoglm_compile.load(path)
with np.load(path + "/verify/inputs.npz") as z:
    inputs = {{k: z[k] for k in z.files}}
out = m(**inputs)
np.savez(sys.argv[2], **{{o["name"]: a for o, a in zip(m.outputs, out)}})

import tvm, tvm.base
maps = open("/proc/self/maps").read()
relax_was_imported = "tvm.relax" in sys.modules
try:
    import tvm.relax
    relax_importable = True
except Exception:
    relax_importable = False
print(json.dumps({{
    "runtime_only": tvm.base._RUNTIME_ONLY,
    "loaded_libs": sorted(tvm.base._LOADED_LIBS),
    "compiler_mapped": "libtvm_compiler" in maps,
    "relax_was_imported": relax_was_imported,
    "relax_importable": relax_importable,
    "blocked_loaded": [n for n in {BLOCKED!r} if sys.modules.get(n) is not None],
    "autoglm_modules": sorted(k for k in sys.modules if k.startswith("autoglm_compile")),
}}))
"""


def test_artifact_runs_with_runtime_library_only(built_artifact, tmp_path):
    out, _, _ = built_artifact
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TVM_USE_RUNTIME_LIB"] = "1"
    saved = tmp_path / "outputs.npz"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(saved)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["runtime_only"] is True
    assert facts["loaded_libs"] == ["tvm_runtime"]
    assert not facts["compiler_mapped"]
    # The module was checked before the probe import: the runtime never imported the compiler's Python side.
    assert not facts["relax_was_imported"]
    assert not facts["relax_importable"]
    assert facts["blocked_loaded"] == []
    assert facts["autoglm_modules"] == ["autoglm_compile", "autoglm_compile.runtime"]

    manifest = json.loads((out / "manifest.json").read_text())
    with np.load(out / "verify" / "expected.npz") as z, np.load(saved) as got:
        assert sorted(got.files) == sorted(z.files) == ["y"]
        for name in z.files:
            assert got[name].shape == z[name].shape and got[name].dtype == z[name].dtype
            np.testing.assert_allclose(got[name], z[name], rtol=manifest["verify"]["rtol"], atol=manifest["verify"]["atol"])


THREADS = """
import json, os, sys
import autoglm_compile
m = autoglm_compile.load(sys.argv[1], threads=int(sys.argv[2]) if len(sys.argv) > 2 else None)
print(json.dumps({"threads": m.threads, "env": os.environ.get("TVM_NUM_THREADS")}))
"""


def test_the_thread_count_reaches_tvms_parallel_loops(built_artifact, tmp_path):
    """TVM's parallel loops size themselves from TVM_NUM_THREADS (default: half the cores); load() sets it from
    `threads`, else keeps the user's value, else takes every core this process may use."""
    out, _, _ = built_artifact
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TVM_NUM_THREADS")}

    def run(env, *args):
        proc = subprocess.run([sys.executable, "-c", THREADS, str(out), *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    assert run(base, "3") == {"threads": 3, "env": "3"}
    assert run({**base, "TVM_NUM_THREADS": "1"}) == {"threads": 1, "env": "1"}
    cores = len(os.sched_getaffinity(0))
    assert run(base) == {"threads": cores, "env": str(cores)}
