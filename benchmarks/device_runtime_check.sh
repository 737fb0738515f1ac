#!/usr/bin/env bash
# On the GPU machine: run DIR/art (a CUDA artifact) with the runtime bundle DIR/rt<python X.Y> and numpy alone
# (python -S, a clean environment, no nvcc on PATH, CUDA source compilation at load refused), check it against its
# stored ONNX Runtime outputs, time 200 runs, print one JSON line.
# Prepared on the build machine (build/ is git-ignored; the device Python is unknown beforehand, so one bundle each):
#   for py in 3.10 3.11 3.12; do autoglm-compile bundle-runtime --target nvidia-h100 --python $py -o build/devrt/rt$py; done
#   autoglm-compile MODEL.onnx --target nvidia-h100 -o build/devrt/art
# Then on the device, carrying build/devrt:   bash benchmarks/device_runtime_check.sh build/devrt
set -u
cd "${1:?usage: device_runtime_check.sh DIR}"
PY=$(python3 -c 'import sys;print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
echo "python $PY"; nvidia-smi -L
NP=$(python3 -c 'import numpy,os;print(os.path.dirname(os.path.dirname(numpy.__file__)))')
mkdir -p /tmp/np && for d in "$NP"/numpy "$NP"/numpy.libs; do [ -e "$d" ] && ln -sfn "$d" /tmp/np/; done
echo "libcudart on the loader path:"; ldconfig -p | grep -E "libcudart.so.13|libcuda.so.1" || echo none
find / -name 'libcudart.so.13*' -not -path '/proc/*' 2>/dev/null | head -3
cd art && env -i PATH=/usr/bin:/bin HOME=/tmp TVM_USE_RUNTIME_LIB=1 PYTHONPATH=../rt$PY:/tmp/np ${LD_LIBRARY_PATH:+LD_LIBRARY_PATH=$LD_LIBRARY_PATH} python3 -S -c '
import json, sys, time, shutil, numpy as np, autoglm_compile, tvm
calls = []
def refuse(*a):
    calls.append(1); raise RuntimeError("CUDA source compiled at load")
tvm.register_global_func("tvm_callback_cuda_compile", refuse, override=True)
m = autoglm_compile.load(".")
v = m.manifest["verify"]
with np.load(v["inputs"]) as z: feeds = {k: z[k] for k in z.files}
outputs = m(feeds)
with np.load(v["expected"]) as z:
    err = max(float(np.abs(got - z[o["name"]]).max()) for o, got in zip(m.outputs, outputs))
    for o, got in zip(m.outputs, outputs): np.testing.assert_allclose(got, z[o["name"]], rtol=v["rtol"], atol=v["atol"])
args = m.prepare(feeds)
for _ in range(20): m.run_prepared(args)
ts = []
for _ in range(200):
    t0 = time.perf_counter(); m.run_prepared(args); ts.append((time.perf_counter() - t0) * 1e3)
print(json.dumps({"max_abs": err, "p50_ms": sorted(ts)[100], "device": str(m.device), "runtime_only": tvm.base._RUNTIME_ONLY,
  "libs": sorted(tvm.base._LOADED_LIBS), "cuda_compile_calls": len(calls),
  "nvcc_on_path": shutil.which("nvcc"), "tvm": tvm.__file__, "numpy": np.__file__, "compiler_mapped": "libtvm_compiler" in open("/proc/self/maps").read()}))
'
