"""Build ResNet-50 and BERT-base for every target descriptor from this machine, and tabulate what each build gives.

    python benchmarks/all_targets.py --cache /tmp/big --write docs/targets.md

Each build is `autoglm-compile MODEL --target T --no-fallback` (O2, untuned, the target's default precision) with
one timed run where the target is this machine. The table records the exit code, the latency status (measured here,
or the roofline estimate), the accuracy check, and the artifact's size; failures keep their one-line message.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from autoglm_compile import zoo
from autoglm_compile.target import builtin_targets

MODELS = {"resnet50": (zoo.resnet50, ["--dim", "batch=1"]), "bert": (zoo.bert, ["--dim", "batch=1", "--dim", "sequence=128"])}


def build(model: Path, target: str, extra: list[str], out: Path) -> dict:
    cmd = ["autoglm-compile", str(model), "--target", target, "-o", str(out), "--no-fallback", "--runs", "1", "--json", "--quiet", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    row = {"target": target, "exit": proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}
    if proc.returncode not in (0, 4):
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        row["error"] = (lines[-1] if lines else proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?")[:200]
        return row
    r = json.loads(proc.stdout)
    lat = r.get("latency") or {}
    row.update({
        "precision": r.get("precision"),
        "latency_status": lat.get("status"),
        "latency_ms": (lat.get("stats") or {}).get("p50_ms") if lat.get("status") == "measured" else lat.get("estimate_ms"),
        "accuracy": "ok" if (r.get("accuracy") or {}).get("ok") else ("not run here" if r.get("accuracy") is None else "FAIL"),
        "graph_verify": "ok" if (r.get("graph_verify") or {}).get("ok") else "FAIL",
        "artifact_mib": round(((r.get("memory") or {}).get("artifact_bytes") or 0) / 2**20, 1),
    })
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("build/models"))
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--targets", nargs="*", help="default: every descriptor")
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    targets = args.targets or sorted(builtin_targets())
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            builder, extra = MODELS[name]
            path = args.cache / f"{name}.onnx"
            if not path.exists():
                builder(path)
            rows[name] = []
            for t in targets:
                row = build(path, t, extra, Path(tmp) / f"{name}-{t}")
                print(json.dumps({"model": name, **row}), file=sys.stderr, flush=True)
                rows[name].append(row)
    lines = ["# ResNet-50 and BERT-base for every target", "", f"Command: `python benchmarks/all_targets.py {' '.join(sys.argv[1:])}`", "",
             "Built on this machine (2-core x86-64, nvcc 13, Debian's aarch64 cross gcc), O2, untuned, `--no-fallback`.",
             "Latency: measured (p50 of one run) where the target is this machine, else the roofline estimate.", ""]
    for name, rs in rows.items():
        lines += [f"## {name}", "", "| target | exit | precision | latency | graph verify | accuracy vs ORT | artifact | build s | error |",
                  "|---|---:|---|---|---|---|---:|---:|---|"]
        for r in rs:
            lat = f"{r['latency_ms']:.2f} ms ({r['latency_status']})" if r.get("latency_ms") is not None else (r.get("latency_status") or "-")
            lines.append(f"| {r['target']} | {r['exit']} | {r.get('precision', '-')} | {lat} | {r.get('graph_verify', '-')} | "
                         f"{r.get('accuracy', '-')} | {r.get('artifact_mib', '-')} MiB | {r['seconds']} | {r.get('error', '').replace('|', '/')} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.write:
        args.write.write_text(text)
        args.write.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
