"""Per-kernel times of benchmarks/roofline_calibration.py gpu-build builds, with TVM's runtime only.

    python benchmarks/gpu_profile.py OUT.json BUILD_DIR [BUILD_DIR ...]      (on the GPU machine)

One call of main records every kernel launch and its arguments (a VM instrument); each launch is then re-run 50
times between device syncs. Builds with --cuda-graph show one launch (the graph): profile a build without it.
"""
from __future__ import annotations

import ctypes
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline_device import feeds_for  # noqa: E402


def profile(build: Path, dev) -> dict:
    import tvm
    import tvm.runtime.vm

    meta = json.loads((build / "meta.json").read_text())
    inputs, weights = feeds_for(meta, np.random.default_rng(0))
    dtypes = {w["name"]: w.get("tvm_dtype", w["dtype"]) for w in meta["weights"]}
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(build / "model.so")), dev)
    args = [tvm.runtime.tensor(a, device=dev) for a in inputs.values()] + [tvm.runtime.tensor(a.astype(dtypes[n]), device=dev) for n, a in weights.items()]
    for _ in range(5):
        vm["main"](*args)
    dev.sync()
    calls = []

    def instrument(func, symbol, before, _ret, *a):
        if before and not str(symbol).startswith("vm.builtin"):
            calls.append((str(symbol), func, a))
        return 0  # VMInstrumentReturnKind.NO_OP

    vm.set_instrument(instrument)
    vm["main"](*args)
    dev.sync()
    per: dict[str, tuple[int, float]] = {}
    for symbol, func, a in calls:
        func(*a)
        dev.sync()
        t0 = time.perf_counter()
        for _ in range(50):
            func(*a)
        dev.sync()
        n, us = per.get(symbol, (0, 0.0))
        per[symbol] = (n + 1, us + (time.perf_counter() - t0) / 50 * 1e6)
    total = sum(us for _, us in per.values())
    top = sorted(per.items(), key=lambda kv: -kv[1][1])[:15]
    return {"variant": meta.get("variant"), "launches": len(calls), "sum_us": total,
            "top": [{"kernel": k, "calls": n, "us": us, "share": us / total} for k, (n, us) in top]}


def main() -> None:
    import tvm

    try:  # runtime-only mode loads no CUDA sidecar by itself
        ctypes.CDLL(str(Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_LOCAL)
        dev = tvm.cuda(0)
    except OSError:
        dev = tvm.cpu(0)
    out = {}
    for b in sys.argv[2:]:
        row = out[Path(b).name] = profile(Path(b), dev)
        print(Path(b).name, row["variant"], f"{row['launches']} launches, sum {row['sum_us'] / 1e3:.3f} ms", flush=True)
        for t in row["top"][:12]:
            print(f"  {t['us']:9.1f} us {t['share']:6.1%} x{t['calls']:<3d} {t['kernel']}", flush=True)
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
