"""Alternating rounds of int8 and fp32 timings on this machine, each contender in its own process, all on an int8
artifact's stored verification inputs (2 threads, as the compile's measurement):

    python benchmarks/int8_rounds.py INT8_ARTIFACT FP32_ARTIFACT SOURCE.onnx [--rounds 3] [--runs 20]

ours int8 (the artifact), ONNX Runtime int8 on its model.opt.onnx (the QDQ model), ours fp32 (FP32_ARTIFACT) and
ONNX Runtime fp32 on SOURCE.onnx (all graph optimizations). Prints one JSON line per contender per round (p50 ms),
then the medians; the load average before each round is in its lines.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ONE = r'''
import json, sys, time
import numpy as np
kind, path, inputs, runs, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
with np.load(inputs) as z:
    feeds = {k: z[k] for k in z.files}
if kind == "ours":
    import autoglm_compile
    m = autoglm_compile.load(path, threads=threads)
    fn = lambda: m(feeds)
else:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    fn = lambda: sess.run(None, feeds)
for _ in range(3):
    fn()
t = []
for _ in range(runs):
    t0 = time.perf_counter(); fn(); t.append((time.perf_counter() - t0) * 1e3)
print(json.dumps({"p50_ms": float(np.percentile(t, 50)), "min_ms": min(t)}))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("int8")
    ap.add_argument("fp32")
    ap.add_argument("source")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    inputs = os.path.join(args.int8, "verify", "inputs.npz")
    contenders = [("ours int8", "ours", args.int8), ("onnxruntime int8", "ort", os.path.join(args.int8, "model.opt.onnx")),
                  ("ours fp32", "ours", args.fp32), ("onnxruntime fp32", "ort", args.source)]
    seen: dict[str, list[float]] = {}
    for r in range(1, args.rounds + 1):
        load = os.getloadavg()[0]
        for label, kind, path in contenders:
            out = subprocess.run([sys.executable, "-c", ONE, kind, path, inputs, str(args.runs), str(args.threads)], capture_output=True, text=True, check=True)
            row = {"round": r, "contender": label, "load_1m": round(load, 2), **json.loads(out.stdout.strip().splitlines()[-1])}
            seen.setdefault(label, []).append(row["p50_ms"])
            print(json.dumps(row), flush=True)
    print(json.dumps({k: sorted(v)[len(v) // 2] for k, v in seen.items()}))


if __name__ == "__main__":
    main()
