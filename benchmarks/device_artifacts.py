"""Full-size artifacts built here, run on the GPU machine with the runtime bundle alone (issue 9's closing figures).

    python benchmarks/device_artifacts.py prepare MODEL.onnx OUT.onnx [--levels 4]
        MODEL.onnx with every float weight rounded to LEVELS values per tensor (mean + std * a few steps), so that
        an artifact holding the weights compresses under the device tool's 64 MiB transfer limit. Latency does not
        depend on the values; ONNX Runtime's reference outputs come from the same rounded model.
    python benchmarks/device_artifacts.py pack ARTIFACT [ARTIFACT ...] -o DIR [--with-onnx]
        DIR/<name>.tar.xz of each artifact without model.opt.onnx (not needed to run it; --with-onnx keeps it, for
        ONNX Runtime there: benchmarks/cpu_remote.py)
    python benchmarks/device_artifacts.py run DIR --bundle BUNDLE --out results.json     (on the GPU machine)
        unpack, then in a fresh `python -S` process with only BUNDLE and numpy on the path (TVM_USE_RUNTIME_LIB=1,
        compiling CUDA source at load refused): autoglm_compile.load() each artifact, and for each of its buckets
        run the stored verification inputs, compare with the stored ONNX Runtime outputs (the manifest's rtol/atol, and
        the cosine that fp16/int8 budgets check) and time 200 runs of the call from NumPy arrays (host copies included)
        and 200 of the model alone on inputs already on the device (prepare/run_prepared).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

CHECK = r'''
import json, sys, time
from pathlib import Path
import numpy as np, autoglm_compile, tvm
calls = []
def refuse(*a):
    calls.append(1); raise RuntimeError("CUDA source compiled at load")
tvm.register_global_func("tvm_callback_cuda_compile", refuse, override=True)
root = Path(sys.argv[1])
m = autoglm_compile.load(root)
mf = json.loads((root / "manifest.json").read_text())
variants = [(b["name"], root / b["path"]) for b in mf["buckets"]] if "buckets" in mf else [("single", root)]
rows = []
for name, folder in variants:
    v = json.loads((folder / "manifest.json").read_text())["verify"]
    with np.load(folder / v["inputs"]) as z: feeds = {k: z[k] for k in z.files}
    t0 = time.perf_counter(); outputs = m(feeds); first = (time.perf_counter() - t0) * 1e3
    with np.load(folder / v["expected"]) as z:
        exp = [z[o["name"]] for o in m.outputs]
    err = max(float(np.abs(g.astype(np.float64) - e).max()) for g, e in zip(outputs, exp))
    ok = all(np.allclose(g, e, rtol=v["rtol"], atol=v["atol"]) for g, e in zip(outputs, exp))
    flat = [(g.astype(np.float64).ravel(), e.astype(np.float64).ravel()) for g, e in zip(outputs, exp)]
    cos = min(float(g @ e / (np.linalg.norm(g) * np.linalg.norm(e) or 1.0)) for g, e in flat)
    for _ in range(20): m(feeds)
    ts = []
    for _ in range(200):
        t0 = time.perf_counter(); m(feeds); ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    args = m.prepare(feeds)  # device-resident inputs: the model alone, without the host copies
    for _ in range(20): m.run_prepared(args)
    tp = []
    for _ in range(200):
        t0 = time.perf_counter(); m.run_prepared(args); tp.append((time.perf_counter() - t0) * 1e3)
    tp.sort()
    rows.append({"bucket": name, "shapes": {k: list(a.shape) for k, a in feeds.items()}, "max_abs": err, "ok": ok, "min_cosine": cos, "budget": v.get("budget"),
                 "rtol": v["rtol"], "atol": v["atol"], "first_call_ms": first, "p50_ms": ts[100], "min_ms": ts[0],
                 "p50_prepared_ms": tp[100], "min_prepared_ms": tp[0]})
print(json.dumps({"artifact": root.name, "buckets": rows, "cuda_compile_calls": len(calls), "runtime_only": tvm.base._RUNTIME_ONLY,
                  "libs": sorted(tvm.base._LOADED_LIBS), "compiler_mapped": "libtvm_compiler" in open("/proc/self/maps").read()}))
'''


def prepare(args) -> None:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(args.model)
    steps = np.linspace(-1.5, 1.5, args.levels)
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype != np.float32 or a.size < 1024:
            continue
        mean, std = float(a.mean()), float(a.std()) or 1.0
        idx = np.clip(np.rint(((a - mean) / std - steps[0]) / (steps[1] - steps[0])), 0, args.levels - 1).astype(np.int64)
        t.CopyFrom(numpy_helper.from_array((mean + std * steps[idx]).astype(np.float32), t.name))
    onnx.save(model, args.out)
    print(f"{args.out}: float weights rounded to {args.levels} levels per tensor")


def pack(args) -> None:
    out = Path(args.o)
    out.mkdir(parents=True, exist_ok=True)
    for a in args.artifacts:
        src = Path(a)
        dest = out / f"{src.name}.tar.xz"
        with tarfile.open(dest, "w:xz", preset=6) as tar:
            tar.add(src, arcname=src.name, filter=lambda ti: None if ti.name.endswith("model.opt.onnx") and not args.with_onnx else ti)
        print(f"{dest}: {dest.stat().st_size / 2**20:.1f} MiB")


def run(args) -> None:
    import numpy as np

    work = Path("/tmp/devart")
    work.mkdir(exist_ok=True)
    np_dir = Path("/tmp/np")
    np_dir.mkdir(exist_ok=True)
    import typing_extensions  # tvm_ffi imports it

    numpy_dir = Path(np.__file__).resolve().parent
    for src in (numpy_dir, numpy_dir.with_name("numpy.libs"), Path(typing_extensions.__file__).resolve()):
        if src.exists() and not (np_dir / src.name).exists():
            (np_dir / src.name).symlink_to(src)
    results = []
    for tx in sorted(Path(args.dir).glob("*.tar.xz")):
        with tarfile.open(tx) as tar:
            tar.extractall(work)
        art = work / tx.name.removesuffix(".tar.xz")
        env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TVM_USE_RUNTIME_LIB": "1", "PYTHONPATH": f"{Path(args.bundle).resolve()}:{np_dir}"}
        if os.environ.get("LD_LIBRARY_PATH"):
            env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
        proc = subprocess.run([sys.executable, "-S", "-c", CHECK, str(art)], capture_output=True, text=True, env=env)
        row = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"artifact": art.name, "error": proc.stderr[-1500:]}
        row["packed_mib"] = tx.stat().st_size / 2**20
        row["size_mib"] = sum(f.stat().st_size for f in art.rglob("*") if f.is_file()) / 2**20
        print(json.dumps(row), flush=True)
        results.append(row)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    Path(args.out).write_text(json.dumps({"gpu": smi, "python": sys.version.split()[0], "results": results}, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("model")
    a.add_argument("out")
    a.add_argument("--levels", type=int, default=4)
    b = sub.add_parser("pack")
    b.add_argument("artifacts", nargs="+")
    b.add_argument("-o", required=True)
    b.add_argument("--with-onnx", action="store_true", help="keep model.opt.onnx")
    c = sub.add_parser("run")
    c.add_argument("dir")
    c.add_argument("--bundle", required=True)
    c.add_argument("--out", required=True)
    args = p.parse_args()
    {"prepare": prepare, "pack": pack, "run": run}[args.cmd](args)


if __name__ == "__main__":
    main()
