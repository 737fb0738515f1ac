"""What the graph stage does to real models: nodes after each pass, and TVM host latency before and after it.

    python benchmarks/graph_passes.py --models resnet50 bert gpt2 --runs 3 --write docs/graph-passes.md

For each model (built in code by autoglm_compile.zoo, seeded random weights, batch 1, sequence 128):
- "before": the model compiled with O0 (pin-shapes only, so that TVM gets static shapes), or why TVM cannot
  import it without the graph stage;
- "after": the model compiled with O3 (every pass, each one verified against ONNX Runtime), with the node count
  after each pass;
and ONNX Runtime's latency on the source model, measured in the same build. Untuned TVM (default schedules),
TVM alone (--no-fallback: nothing falls back to ONNX Runtime).
The load average at the start of each build is recorded: figures taken on a busy machine are not comparable.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from autoglm_compile import zoo
from autoglm_compile.errors import CompileError
from autoglm_compile.pipeline import CompileOptions, compile_model

DIMS = {"resnet50": ["batch=1"], "bert": ["batch=1", "sequence=128"], "gpt2": ["batch=1", "sequence=128"]}
BUILDERS = {"resnet50": zoo.resnet50, "bert": zoo.bert, "gpt2": zoo.gpt2}


def build(model: Path, preset: str, dims: list[str], runs: int, out: Path) -> dict:
    load = os.getloadavg()[0]
    started = time.perf_counter()
    try:
        r = compile_model(CompileOptions(source=str(model), output=out, preset=preset, dims=dims, runs=runs, fallback="none"))
    except CompileError as e:
        return {"preset": preset, "ok": False, "error": str(e).splitlines()[0][:300], "load_avg_1m": load}
    lat = r.latency.stats if r.latency else None
    return {
        "preset": preset, "ok": True, "load_avg_1m": load, "seconds": round(time.perf_counter() - started, 1),
        "nodes_in": r.passes[0].nodes_before if r.passes else None,
        "nodes_out": r.passes[-1].nodes_after if r.passes else None,
        "passes": [{"name": p.name, "nodes_before": p.nodes_before, "nodes_after": p.nodes_after, "seconds": round(p.seconds, 2),
                    "stats": p.stats} for p in r.passes],
        "tvm_p50_ms": lat.p50_ms if lat else None, "tvm_min_ms": lat.min_ms if lat else None, "runs": lat.runs if lat else 0,
        "ort_p50_ms": r.baseline.stats.p50_ms if r.baseline else None,
        "max_abs_error": max((o.max_abs for o in r.accuracy.outputs), default=None) if r.accuracy else None,
        "accuracy_ok": r.accuracy.ok if r.accuracy else None,
        "planned_activation_bytes": r.memory.planned_activation_bytes if r.memory else None,
    }


def markdown(results: dict, command: str) -> str:
    lines = ["# The graph stage on real models", "", f"Command: `{command}`", "",
             f"Machine: {results['machine']}. Untuned TVM {results['tvm']} (default schedules), "
             f"ONNX Runtime {results['onnxruntime']} (all graph optimizations) on the source model in the same build. "
             "Models from `autoglm_compile.zoo` (transformers configs, seeded random weights), batch 1, sequence 128.", "",
             "## Latency before and after the graph stage", "",
             "| model | nodes in | nodes after O3 | TVM p50 before (O0) | TVM p50 after (O3) | ONNX Runtime p50 | O3 max abs error | load avg |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in results["models"].items():
        before, after = m["O0"], m["O3"]
        b = f"{before['tvm_p50_ms']:.1f} ms" if before["ok"] else f"does not build: {before['error'][:120]}"
        a = f"{after['tvm_p50_ms']:.1f} ms" if after["ok"] else f"fails: {after['error'][:120]}"
        ort = after.get("ort_p50_ms") or before.get("ort_p50_ms")
        err = f"{after['max_abs_error']:.2e}" if after.get("max_abs_error") is not None else "-"
        lines.append(f"| {name} | {m['nodes_in']} | {after.get('nodes_out', '-')} | {b} | {a} | "
                     f"{f'{ort:.1f} ms' if ort else '-'} | {err} | {before['load_avg_1m']:.1f} / {after['load_avg_1m']:.1f} |")
    lines += ["", "## Nodes after each pass (O3)", ""]
    for name, m in results["models"].items():
        after = m["O3"]
        if not after["ok"]:
            continue
        lines += [f"### {name}", "", "| pass | nodes before | nodes after | seconds | stats |", "|---|---:|---:|---:|---|"]
        for p in after["passes"]:
            stats = json.dumps(p["stats"], sort_keys=True)
            lines.append(f"| {p['name']} | {p['nodes_before']} | {p['nodes_after']} | {p['seconds']:.2f} | `{stats[:160]}` |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path("build/models"), help="where the exported models are kept")
    ap.add_argument("--write", type=Path, help="write Markdown here, and JSON next to it")
    args = ap.parse_args()

    import onnx
    import onnxruntime
    import tvm

    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
               "tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = args.cache / f"{name}.onnx"
            if not path.exists():
                BUILDERS[name](path)
            entry = {"nodes_in": len(onnx.load(str(path), load_external_data=False).graph.node)}
            for preset in ("O0", "O3"):
                print(f"[{name}] {preset} ...", file=sys.stderr, flush=True)
                entry[preset] = build(path, preset, DIMS[name], args.runs, Path(tmp) / f"{name}-{preset}")
                print(f"[{name}] {preset}: {json.dumps({k: v for k, v in entry[preset].items() if k != 'passes'})}", file=sys.stderr, flush=True)
            results["models"][name] = entry
    command = "python benchmarks/graph_passes.py " + " ".join(sys.argv[1:])
    text = markdown(results, command)
    print(text)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)
        args.write.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
