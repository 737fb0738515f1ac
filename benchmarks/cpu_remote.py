"""Host-CPU int8 on a CPU this machine lacks: artifacts cross-built here, timed there against ONNX Runtime in one run.

    python benchmarks/device_artifacts.py pack ARTIFACT [ARTIFACT ...] -o DIR --with-onnx     (here)
        DIR/<name>.tar.xz of each artifact, model.opt.onnx included (ONNX Runtime runs it there)
    python benchmarks/cpu_remote.py run DIR --pairs NAME=INT8,FP32 ... --threads 2 16 --rounds 3 [--runs 50 --max-seconds 4] --out results.json
        (there, with the TVM runtime and onnxruntime importable)

For each pair (our int8 artifact, our fp32 artifact of the same model) and each thread count, in `--rounds`
alternating rounds, each contender in its own process:
  - ours int8 / ours fp32: autoglm_compile.load(artifact, threads=T) on its stored verification inputs; the outputs are
    checked against the stored ONNX Runtime outputs (the manifest's rtol/atol, and the lowest cosine);
  - ONNX Runtime int8: the int8 artifact's model.opt.onnx (the QDQ model, its protected nodes in float), and ONNX
    Runtime fp32: the fp32 artifact's model.opt.onnx; all graph optimizations, intra-op threads T, inter-op 1.
With T below the machine's cores every process runs under `taskset` on the same last T cores. p50 and min over
`--runs` runs (or those that fit in `--max-seconds`, at least 5) after 10 warm-up runs. `--profile N` adds where
the time goes over N more runs: our VM's functions, and ONNX Runtime's nodes from its profiler.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / ((np.linalg.norm(a) * np.linalg.norm(b)) or 1.0))


def one(args) -> None:
    """One contender in this process: prints a JSON line."""
    art = Path(args.artifact)
    v = json.loads((art / "manifest.json").read_text())["verify"]
    with np.load(art / v["inputs"]) as z:
        feeds = {k: z[k] for k in z.files}
    row: dict = {"kind": args.kind}
    if args.kind == "ours":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's autoglm_compile (runtime only)
        import autoglm_compile

        m = autoglm_compile.load(art, threads=args.threads)
        call = lambda: m(feeds)  # noqa: E731
        names = [o["name"] for o in m.outputs]
    else:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = args.threads, 1, 3
        sess = ort.InferenceSession(str(art / "model.opt.onnx"), so, providers=["CPUExecutionProvider"])
        call = lambda: sess.run(None, feeds)  # noqa: E731
        names = [o.name for o in sess.get_outputs()]
        row["onnxruntime"] = ort.__version__
    outputs = call()
    with np.load(art / v["expected"]) as z:
        expected = [z[n] for n in names]
    row["min_cosine_to_stored"] = min(_cosine(g, e) for g, e in zip(outputs, expected))
    row["allclose"] = all(np.allclose(g, e, rtol=v["rtol"], atol=v["atol"]) for g, e in zip(outputs, expected))
    for _ in range(10):
        call()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < args.runs and (time.perf_counter() - start < args.max_seconds or len(times) < 5):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    row.update(p50_ms=statistics.median(times), min_ms=min(times), runs=len(times))
    if args.profile:
        row["profile"] = _profile(args, m if args.kind == "ours" else None, art, feeds)
    print(json.dumps(row))


def _profile(args, model, art: Path, feeds: dict) -> list[dict]:
    """Where the time goes, the 20 slowest first (ms per run over --profile runs): our VM's functions (runtime.profile),
    or ONNX Runtime's nodes from its own profiler (the "Node" events, summed per node), then its totals per op type."""
    if model is not None:
        return [{"name": k.name, "calls": k.calls, "ms": k.ms} for k in model.profile(feeds, args.profile)][:20]
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = args.threads, 1, 3
    so.enable_profiling, so.profile_file_prefix = True, "/tmp/cpu_remote_ort"
    sess = ort.InferenceSession(str(art / "model.opt.onnx"), so, providers=["CPUExecutionProvider"])
    for _ in range(args.profile + 1):
        sess.run(None, feeds)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    first = min((e for e in trace if e.get("name") == "model_run"), key=lambda e: e["ts"])  # a warm-up run, left out
    nodes: dict[str, list] = {}
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > first["ts"] + first["dur"]:
            n = nodes.setdefault(e["name"].removesuffix("_kernel_time"), [e["args"].get("op_name", "?"), 0, 0.0])
            n[1] += 1
            n[2] += e["dur"] / 1e3
    rows = [{"name": f"{op} {name}", "calls": c // args.profile, "ms": ms / args.profile} for name, (op, c, ms) in nodes.items()]
    ops: dict[str, dict] = {}
    for op, c, ms in nodes.values():  # and every op type's total, so that the top 20 nodes are not all there is
        t = ops.setdefault(op, {"name": f"{op} (all)", "calls": 0, "ms": 0.0})
        t["calls"] += c // args.profile
        t["ms"] += ms / args.profile
    return sorted(rows, key=lambda r: -r["ms"])[:20] + sorted(ops.values(), key=lambda r: -r["ms"])


def run(args) -> None:
    work = Path("/tmp/cpu_remote")
    work.mkdir(exist_ok=True)
    for tx in sorted(Path(args.dir).glob("*.tar.xz")):
        with tarfile.open(tx) as tar:
            tar.extractall(work)
    cores = len(os.sched_getaffinity(0))
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    flags = next((line.split(":", 1)[1].split() for line in cpu.splitlines() if line.startswith("Flags")), [])
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    results = {"cpu": model_name, "cores": cores, "python": platform.python_version(),
               "int8_flags": sorted(f for f in flags if "vnni" in f or f.startswith("amx") or f == "avx512f"), "rows": []}
    print(json.dumps({k: results[k] for k in ("cpu", "cores", "int8_flags")}), flush=True)
    for pair in args.pairs:
        name, arts = pair.split("=", 1)
        int8, fp32 = (work / a for a in arts.split(","))
        contenders = [("ours int8", "ours", int8), ("ours fp32", "ours", fp32), ("ORT int8 (QDQ model)", "ort", int8), ("ORT fp32", "ort", fp32)]
        for threads in args.threads:
            pin = ["taskset", "-c", f"{cores - threads}-{cores - 1}"] if threads < cores else []
            for r in range(args.rounds):
                for label, kind, art in contenders:
                    proc = subprocess.run(pin + [sys.executable, __file__, "one", kind, str(art), "--threads", str(threads), "--runs", str(args.runs),
                                                 "--max-seconds", str(args.max_seconds), "--profile", str(args.profile)],
                                          capture_output=True, text=True)
                    row = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-1500:]}
                    row.update(model=name, contender=label, threads=threads, round=r + 1)
                    print(json.dumps(row), flush=True)
                    results["rows"].append(row)
                    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")  # after each row: a run cut short keeps them


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("run")
    b.add_argument("dir")
    b.add_argument("--pairs", nargs="+", required=True, help="NAME=INT8_ARTIFACT,FP32_ARTIFACT (folder names in DIR)")
    b.add_argument("--threads", type=int, nargs="+", default=[2])
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--runs", type=int, default=50)
    b.add_argument("--max-seconds", type=float, default=4.0)
    b.add_argument("--profile", type=int, default=0, help="N: also where the time goes, over N runs (the 20 slowest kernels/nodes)")
    b.add_argument("--out", required=True)
    c = sub.add_parser("one")
    c.add_argument("kind", choices=["ours", "ort"])
    c.add_argument("artifact")
    c.add_argument("--threads", type=int, required=True)
    c.add_argument("--runs", type=int, required=True)
    c.add_argument("--max-seconds", type=float, required=True)
    c.add_argument("--profile", type=int, default=0)
    args = p.parse_args()
    {"run": run, "one": one}[args.cmd](args)


if __name__ == "__main__":
    main()
