"""Ours against the peers, in one run on one machine: `make bench` writes docs/benchmarks.md and docs/benchmarks.json.

    python benchmarks/bench.py host [--models resnet50 bert] [--runs 20] [--threads N] [--tune-time 10m | '']
                                    [--tuning-db DIR] [--cache build/models] [--write docs/benchmarks.md]
    python benchmarks/bench.py gpu BUILD_DIR [BUILD_DIR ...] --out results.json [--max-autotune] [--peers P ...]
    python benchmarks/bench.py table RESULTS.json [...] --write docs/benchmarks.md

host: for each model (transformers ResNetConfig() / BertConfig() at seq 128, batch 1, seeded random weights):
  - ours: the CLI (`autoglm-compile MODEL`, with `--tune-time T` when one is given), so the build (+ tune) time is what a user waits; then the
    artifact is timed in a fresh process through autoglm_compile.load(), like every peer;
  - ONNX Runtime: the same ONNX file, all graph optimizations, intra-op threads = N;
  - PyTorch eager and torch.compile (default mode): the same transformers model and seed, torch.set_num_threads(N),
    no_grad; torch.compile's compile time is its first call.
  Each contender runs in its own process, one after another: p50 over the runs after warm-up, and the process's
  peak RSS (interpreter and libraries included).
gpu (on the GPU machine, TVM runtime only): builds from benchmarks/roofline_calibration.py gpu-build (weights as
  parameters) or artifact folders of the CLI (int8: the weights are in the library; see ours_artifact), timed against PyTorch eager fp32/fp16 and torch.compile fp16 (default; max-autotune with
  --max-autotune; --peers picks them), accuracy of ours against ONNX Runtime CPU on the same inputs (max abs error,
  lowest cosine, allclose at --rtol/--atol).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "resnet50": {"zoo": "resnet50", "dims": ["batch=1"], "preset": 2, "label": "ResNet-50 (ResNetConfig(), 1x3x224x224)"},
    "bert": {"zoo": "bert", "dims": ["batch=1", "sequence=128"], "preset": 3, "label": "BERT-base (BertConfig(), seq 128)"},
}


def timed(fn, warmup: int, max_runs: int, max_seconds: float) -> dict:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (time.perf_counter() - start < max_seconds or len(times) < 3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"runs": len(times), "p50_ms": statistics.median(times), "min_ms": min(times)}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------- contenders (host)

def torch_model(name: str):
    """(module, example inputs): the model and seed autoglm_compile.zoo exports to the ONNX file the others run."""
    sys.path.insert(0, str(ROOT))  # the GPU machine has the repository, not the package installed
    from autoglm_compile import zoo

    return zoo.resnet50_module() if name == "resnet50" else zoo.bert_module()


def contender(kind: str, model: str, path: str, threads: int, runs: int, max_seconds: float) -> dict:
    """One contender in this process; returns its figures (the parent runs each in a fresh process)."""
    out: dict = {"kind": kind}
    if kind == "ours":
        import autoglm_compile

        m = autoglm_compile.load(path, threads=threads)
        with np.load(os.path.join(path, "verify", "inputs.npz")) as z:
            feeds = {k: z[k] for k in z.files}
        out.update(timed(lambda: m(feeds), 2, runs, max_seconds))
    elif kind == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        _, args = torch_model(model)
        feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
        out.update(timed(lambda: sess.run(None, feeds), 3, runs, max_seconds))
        out["version"] = ort.__version__
    else:
        import torch

        torch.set_num_threads(threads)
        fwd, args = torch_model(model)
        if kind == "torch.compile":
            fwd = torch.compile(fwd)
            t0 = time.perf_counter()
            with torch.no_grad():
                fwd(*args)
            out["compile_s"] = time.perf_counter() - t0
        with torch.no_grad():
            out.update(timed(lambda: fwd(*args), 3, runs, max_seconds))
        out["version"] = torch.__version__
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def run_contender(kind: str, model: str, path: str, threads: int, runs: int, max_seconds: float) -> dict:
    cmd = [sys.executable, __file__, "contender", kind, model, path, "--threads", str(threads), "--runs", str(runs),
           "--max-seconds", str(max_seconds)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TVM_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"kind": kind, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ours_build(model: str, onnx_path: Path, out: Path, args) -> dict:
    spec = MODELS[model]
    cmd = [str(Path(sys.executable).parent / "autoglm-compile"), str(onnx_path), "-O", str(spec["preset"]), "-o", str(out),
           "--runs", "1", "--json", *sum((["--dim", d] for d in spec["dims"]), [])]
    if args.tune_time:
        cmd += ["--tune-time", args.tune_time]
    if args.tuning_db:
        cmd += ["--tuning-db", str(args.tuning_db)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TVM_NUM_THREADS": str(args.threads)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:300], "command": " ".join(cmd[1:])}
    rep = json.loads(proc.stdout)
    tuning = rep.get("tuning") or {}
    return {"command": "autoglm-compile " + " ".join(cmd[1:]), "build_s": wall, "compile_peak_rss_mib": rep["memory"]["compile_peak_rss_bytes"] / 2**20,
            "max_abs_err": max((o["max_abs"] for o in (rep.get("accuracy") or {}).get("outputs", [])), default=None), "tuning": {k: tuning.get(k) for k in ("tasks", "hits", "misses", "trials", "seconds", "fell_back")} if tuning else None,
            "artifact_mib": rep["memory"].get("artifact_bytes", 0) / 2**20}


def host(args) -> None:
    import onnxruntime
    import torch

    import tvm

    cache = Path(args.cache)
    results = {"mode": "host", "machine": machine(), "threads": args.threads, "date": time.strftime("%Y-%m-%d %H:%M"),
               "versions": {"tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
               "command": "python benchmarks/bench.py " + " ".join(sys.argv[1:]), "models": []}
    for model in args.models:
        onnx_path = cache / f"{model}.onnx"
        if not onnx_path.exists():
            subprocess.run([sys.executable, "-m", "autoglm_compile.zoo", MODELS[model]["zoo"], str(onnx_path)], check=True, capture_output=True)
        print(f"{model}: building ours", flush=True)
        art = ROOT / "build" / "bench" / model
        row = {"model": model, "label": MODELS[model]["label"], "load_before": os.getloadavg()[0], "ours_build": ours_build(model, onnx_path, art, args), "contenders": []}
        kinds = (["ours"] if "error" not in row["ours_build"] else []) + ["onnxruntime", "torch eager", "torch.compile"]
        for kind in kinds:
            print(f"{model}: timing {kind}", flush=True)
            row["contenders"].append(run_contender(kind, model, str(art if kind == "ours" else onnx_path), args.threads, args.runs, args.max_seconds))
        row["load_after"] = os.getloadavg()[0]
        results["models"].append(row)
        print(json.dumps(row, indent=1), flush=True)
    write(results, args.write)


# ------------------------------------------------------------------------------------------------ GPU machine

def gpu(args) -> None:
    """On the GPU machine: ours (runtime only) and the torch peers, per build folder."""
    import ctypes

    import torch

    import tvm

    ctypes.CDLL(str(Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_LOCAL)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    results = {"mode": "gpu", "machine": smi, "date": time.strftime("%Y-%m-%d %H:%M"),
               "versions": {"tvm": tvm.__version__, "torch": torch.__version__}, "command": "python benchmarks/bench.py " + " ".join(sys.argv[1:]), "models": []}
    done = set()
    for b in args.builds:
        build = Path(b)
        # an artifact folder of the CLI (int8 builds: the rewrite needs the weights in the library), or a gpu-build one
        try:
            model, entry = ours_artifact(build) if (build / "manifest.json").exists() else gpu_build_entry(build, args)
        except Exception as e:  # the other builds and the peers still run
            model = "resnet50" if "r50" in build.name or "resnet" in build.name else "bert"
            entry = {"kind": f"ours {build.name}", "error": f"{type(e).__name__}: {e}"[:500]}
        row = next((r for r in results["models"] if r["model"] == model), None)
        if row is None:
            row = {"model": model, "label": MODELS[model]["label"] if model in MODELS else model, "contenders": []}
            results["models"].append(row)
        row["contenders"].append(entry)
        print(json.dumps(entry), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")  # what a call cut short by its time limit leaves
        if model in done or model not in MODELS:
            continue
        done.add(model)
        peers = {"eager-fp32": ("torch eager fp32", torch.float32, None), "eager-fp16": ("torch eager fp16", torch.float16, None),
                 "compile": ("torch.compile fp16", torch.float16, "default"), "max-autotune": ("torch.compile max-autotune fp16", torch.float16, "max-autotune")}
        for label, dtype, mode in [peers[p] for p in dict.fromkeys(args.peers + (["max-autotune"] if args.max_autotune else []))]:
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            fwd, targs = torch_model(model)
            fwd.to("cuda", dtype)
            targs = tuple(a.cuda().to(dtype) if a.is_floating_point() else a.cuda() for a in targs)
            entry = {"kind": label}
            if mode:
                fwd = torch.compile(fwd, mode=mode)
                t0 = time.perf_counter()
                with torch.no_grad():
                    fwd(*targs)
                torch.cuda.synchronize()
                entry["compile_s"] = time.perf_counter() - t0

            def call():
                fwd(*targs)
                torch.cuda.synchronize()

            with torch.no_grad():
                entry.update(timed(call, 10, 500, 5.0))
            entry["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
            row["contenders"].append(entry)
            print(json.dumps(entry), flush=True)
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


def gpu_build_entry(build: Path, args) -> tuple[str, dict]:
    """(model, contender) for a gpu-build folder (weights as parameters, drawn from meta.json): timed, and checked
    against ONNX Runtime CPU on graph.onnx with the same inputs and weights."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from roofline_device import feeds_for, run_ort, run_tvm

    meta = json.loads((build / "meta.json").read_text())
    model = "resnet50" if "resnet" in meta["model"] else "bert"
    inputs, weights = feeds_for(meta, np.random.default_rng(0))
    then = feeds_for(meta, np.random.default_rng(1))[0]
    outs, t = run_tvm(build, meta, inputs, weights, then)
    if not (build / "graph.onnx").exists():  # gpu-build-int8: random lifted weights, no reference to check against
        t.pop("then_outputs")
        return model, {"kind": f"ours {meta['variant']}", **t, "accuracy": "not checked (weights drawn at random)", "build_s": meta.get("build_seconds"),
                       "int8_kernels": meta.get("int8_kernels"), "schedule": meta.get("schedule")}
    ref = run_ort(build, inputs, weights)
    then_ref = run_ort(build, then, weights)
    t["then_max_abs_err_vs_ort_cpu"] = max(float(np.abs(a.astype(np.float64) - r).max()) for a, r in zip(t.pop("then_outputs"), then_ref))
    err = max(float(np.abs(a.astype(np.float64) - r).max()) for a, r in zip(outs, ref))
    cos = min(float(np.dot(a.ravel().astype(np.float64), r.ravel()) / (np.linalg.norm(a.astype(np.float64)) * np.linalg.norm(r) + 1e-30)) for a, r in zip(outs, ref))
    ok = all(np.allclose(a, r, rtol=args.rtol, atol=args.atol) for a, r in zip(outs, ref))
    return model, {"kind": f"ours {meta.get('variant', build.name)}", **t, "max_abs_err_vs_ort_cpu": err, "min_cosine_vs_ort_cpu": cos,
                   f"allclose_rtol{args.rtol:g}_atol{args.atol:g}": ok, "build_s": meta.get("build_seconds"), "tuning": meta.get("tuning")}


def ours_artifact(build: Path) -> tuple[str, dict]:
    """(model, contender) for an artifact folder of the CLI on the GPU machine: timed with device-resident inputs
    (CompiledModel.run_prepared, as run_tvm), accuracy on its stored verification inputs against the fp32 ONNX Runtime
    outputs stored with them (verify/expected.npz) and, when model.opt.onnx came along (an int8 build's QDQ model),
    against ONNX Runtime CPU on that QDQ model."""
    sys.path.insert(0, str(ROOT))
    import autoglm_compile

    m = autoglm_compile.load(build)
    report = json.loads((build / "report.json").read_text())
    stem = Path(report["model"]).stem  # resnet50, bert: the benchmark models (with torch peers); others get their own row
    model = "resnet50" if stem.startswith("resnet50") else stem
    verify = m.manifest["verify"]
    with np.load(build / verify["inputs"]) as z:
        feeds = {k: z[k] for k in z.files}
    with np.load(build / verify["expected"]) as z:
        expected = [z[o["name"]] for o in m.outputs]
    args = m.prepare(feeds)
    out = m.run_prepared(args)
    outs = [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]

    def cosine(a, r):
        a, r = a.ravel().astype(np.float64), r.ravel().astype(np.float64)
        return float(a @ r / (np.linalg.norm(a) * np.linalg.norm(r) + 1e-30))

    entry = {"kind": f"ours {report['precision']} (CLI artifact)", **timed(lambda: m.run_prepared(args), 10, 500, 5.0),
             "min_cosine_vs_fp32_ort_cpu": min(cosine(a, r) for a, r in zip(outs, expected)),
             "max_abs_err_vs_fp32_ort_cpu": max(float(np.abs(a.astype(np.float64) - r).max()) for a, r in zip(outs, expected)),
             "build_s": sum(st["seconds"] for st in report["stages"]), "int8_kernels": (report.get("quantization") or {}).get("int8_kernels"),
             "schedule": report.get("schedule")}
    if (build / "model.opt.onnx").exists():
        import onnxruntime as ort

        try:
            ref = ort.InferenceSession(str(build / "model.opt.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
        except Exception as e:  # an older ONNX Runtime than the build machine's
            entry["qdq_ort_cpu_error"] = f"{type(e).__name__}: {e}"[:300]
        else:
            entry["min_cosine_vs_qdq_ort_cpu"] = min(cosine(a, r) for a, r in zip(outs, ref))
            entry["max_abs_err_vs_qdq_ort_cpu"] = max(float(np.abs(a.astype(np.float64) - r).max()) for a, r in zip(outs, ref))
    return model, entry


# ---------------------------------------------------------------------------------------------------- tables

def machine() -> str:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def to_markdown(results: dict) -> str:
    lines = [f"### {results['mode']}: {results['machine']}", "",
             f"{results['date']}; " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + (f"; {results['threads']} threads" if "threads" in results else ""),
             "", f"`{results['command']}`", ""]
    for row in results["models"]:
        peers = [c for c in row["contenders"] if not c["kind"].startswith("ours") and "p50_ms" in c]
        best = min(peers, key=lambda c: c["p50_ms"]) if peers else None
        lines += [f"**{row['label']}**" + (f" (load average {row['load_before']:.1f} before, {row['load_after']:.1f} after)" if "load_before" in row else ""), "",
                  "| contender | p50 ms | min ms | / best peer | compile s | peak memory MiB |", "|---|---:|---:|---:|---:|---:|"]
        for c in row["contenders"]:
            if "error" in c:
                lines.append(f"| {c['kind']} | failed: {c['error']} | | | | |")
                continue
            ratio = f"{c['p50_ms'] / best['p50_ms']:.2f}×" if best else ""
            compile_s = c.get("compile_s", c.get("build_s"))
            if c["kind"] == "ours" and compile_s is None and "error" not in row.get("ours_build", {"error": 1}):
                compile_s = row["ours_build"]["build_s"]  # build + tune, through the CLI
            mem = c.get("peak_rss_mib", c.get("peak_gpu_mib"))
            lines.append(f"| {c['kind']} | {c['p50_ms']:.3f} | {c['min_ms']:.3f} | {ratio} | {'' if compile_s is None else f'{compile_s:.1f}'} | {'' if mem is None else f'{mem:.0f}'} |")
        ob = row.get("ours_build")
        if ob:
            if "error" in ob:
                lines += ["", f"ours failed to build: {ob['error']}"]
            else:
                tun = ob.get("tuning")
                lines += ["", f"ours: `{ob['command']}`: build + tune {ob['build_s']:.0f} s, compile peak RSS {ob['compile_peak_rss_mib']:.0f} MiB, "
                          f"artifact {ob['artifact_mib']:.0f} MiB, max abs error vs ONNX Runtime {ob['max_abs_err']}"
                          + (f"; tuning: {tun['tasks']} tasks, {tun['hits']} from the database, {tun['trials']} trials in {tun['seconds']:.0f} s" + (" (fell back)" if tun.get("fell_back") else "") if tun else "")]
        lines.append("")
    return "\n".join(lines)


def write(results: dict, md_path: str | None) -> None:
    text = to_markdown(results)
    print(text)
    if md_path:
        md = Path(md_path)
        js = md.with_suffix(".json")
        data = json.loads(js.read_text()) if js.exists() else {}
        data[results["mode"]] = results
        js.write_text(json.dumps(data, indent=1) + "\n")
        head = md.read_text().split("<!-- results -->")[0] if md.exists() else "# Benchmarks\n\n"
        body = "\n".join(to_markdown(data[k]) for k in ("host", "gpu") if k in data)
        md.write_text(head.rstrip() + "\n\n<!-- results -->\n" + body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("host")
    h.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    h.add_argument("--runs", type=int, default=20)
    h.add_argument("--max-seconds", type=float, default=60.0)
    h.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    h.add_argument("--tune-time", default="", help="ours: --tune-time per model (default '': an untuned build)")
    h.add_argument("--tuning-db", default=None)
    h.add_argument("--cache", default=str(ROOT / "build" / "models"))
    h.add_argument("--write", default=None)
    g = sub.add_parser("gpu")
    g.add_argument("builds", nargs="+")
    g.add_argument("--out", required=True)
    g.add_argument("--max-autotune", action="store_true", help="add torch.compile mode='max-autotune' (minutes of compiling)")
    g.add_argument("--peers", nargs="*", default=["eager-fp32", "eager-fp16", "compile"], choices=["eager-fp32", "eager-fp16", "compile", "max-autotune"],
                   help="the torch peers timed once per model")
    g.add_argument("--rtol", type=float, default=1e-3)
    g.add_argument("--atol", type=float, default=1e-4)
    t = sub.add_parser("table")
    t.add_argument("results", nargs="+")
    t.add_argument("--write", default=None)
    c = sub.add_parser("contender")
    c.add_argument("kind")
    c.add_argument("model")
    c.add_argument("path")
    c.add_argument("--threads", type=int, required=True)
    c.add_argument("--runs", type=int, required=True)
    c.add_argument("--max-seconds", type=float, required=True)
    args = p.parse_args()
    if args.cmd == "contender":
        print(json.dumps(contender(args.kind, args.model, args.path, args.threads, args.runs, args.max_seconds)))
    elif args.cmd == "host":
        host(args)
    elif args.cmd == "gpu":
        gpu(args)
    else:
        for r in args.results:
            write(json.loads(Path(r).read_text()), args.write)


if __name__ == "__main__":
    main()
