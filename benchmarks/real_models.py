"""The real models of issue 7 through the host pipeline: what runs where, our node count against onnxslim's, and
TVM's latency against ONNX Runtime alone.

    make models      # once: build/models/real (PP-OCRv4 det/rec, PP-OCR cls, MiniLM-L6)
    python benchmarks/real_models.py --models det rec cls minilm --runs 3 --write docs/real-models.md

Each model is compiled with -O3 for the host, with --sample-inputs (written here, seeded: a synthetic page of dark
text lines on white, normalized as PP-OCR does, (x/255 - 0.5)/0.5; for MiniLM a sentence of 40 random word ids
between [CLS] and [SEP], padded to 128 with the attention mask 0) and the default --fallback onnxruntime. From the
report: the nodes after the graph stage, the nodes on TVM and on ONNX Runtime, the fallback nodes and why, the
accuracy check, TVM's p50 and ONNX Runtime's p50 on the source model (same build, same threads). onnxslim
(dev extra) slims the same source model with the same input shapes pinned, for the node count. Untuned TVM
(default schedules). The load average is recorded before and after each build: figures taken on a busy machine
are not comparable.
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

import numpy as np

from autoglm_compile import realmodels
from autoglm_compile.errors import CompileError
from autoglm_compile.pipeline import CompileOptions, compile_model

REAL = Path("build/models/real")
OCR = {"det": ("ppocrv4-det.onnx", (1, 3, 640, 640)), "rec": ("ppocrv4-rec.onnx", (1, 3, 48, 320)), "cls": ("ppocr-cls.onnx", (1, 3, 48, 192))}
MODELS = [*OCR, "minilm"]


def page(shape, seed: int) -> np.ndarray:
    """A synthetic text image: white, with dark horizontal strokes in rows of 'text', and some noise."""
    rng = np.random.default_rng(seed)
    _, c, h, w = shape
    img = np.full((h, w), 235.0) + rng.normal(0, 8, (h, w))
    line_h = max(6, h // 12) if h >= 96 else max(4, h // 3)
    y = line_h
    while y + line_h < h:
        x = int(rng.integers(2, max(3, w // 10)))
        while x < w - 8:
            glyph = int(rng.integers(3, 9))
            img[y : y + line_h, x : x + glyph] = rng.uniform(20, 70)
            x += glyph + int(rng.integers(2, 6))
            if rng.random() < 0.12:
                x += int(rng.integers(8, 24))  # a space between words
        y += 2 * line_h if h >= 96 else h
    img = np.clip(img, 0, 255)
    x = (np.repeat(img[None], c, axis=0) / 255.0 - 0.5) / 0.5
    return x[None].astype(np.float32)


def sentence(seq: int, seed: int, words: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.zeros((1, seq), np.int64)
    ids[0, : words + 2] = [101, *rng.integers(1000, 30000, words), 102]  # [CLS] ... [SEP], then [PAD] = 0
    mask = (ids != 0).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros((1, seq), np.int64)}


def source_and_samples(name: str, tmp: Path):
    """(source for compile_model, --input-shape flags, sample .npz, the source as ONNX for onnxslim)."""
    import onnx

    samples = tmp / f"{name}.npz"
    if name in OCR:
        file, shape = OCR[name]
        path = REAL / file
        if not path.is_file():
            sys.exit(f"{path} not found: run `make models` first")
        np.savez(samples, x=page(shape, seed=0))
        flags = [f"x={'x'.join(map(str, shape))}"]
        model = onnx.load(str(path))
        for d, v in zip(model.graph.input[0].type.tensor_type.shape.dim, shape):
            d.Clear()
            d.dim_value = v
        return str(path), flags, samples, model
    from autoglm_compile.frontends import load

    np.savez(samples, **sentence(128, seed=0))
    flags = list(realmodels.MINILM_INPUTS)
    return realmodels.MINILM_ENTRY, flags, samples, load(realmodels.MINILM_ENTRY, flags).model


def slim_nodes(model) -> int:
    import onnxslim

    return len(onnxslim.slim(model).graph.node)


def build(name: str, runs: int, tmp: Path) -> dict:
    source, flags, samples, onnx_model = source_and_samples(name, tmp)
    entry: dict = {"source": source, "input_shapes": flags, "nodes_in": len(onnx_model.graph.node)}
    entry["onnxslim_nodes"] = slim_nodes(onnx_model)
    entry["load_avg_1m_before"] = os.getloadavg()[0]
    started = time.perf_counter()
    try:
        r = compile_model(CompileOptions(source=source, output=tmp / name, preset="O3", input_shapes=flags, sample_inputs=samples, runs=runs))
    except CompileError as e:
        entry.update(ok=False, error=str(e).splitlines()[0][:300], load_avg_1m_after=os.getloadavg()[0])
        return entry
    fb = r.fallback
    ours = r.passes[-1].nodes_after if r.passes else entry["nodes_in"]
    entry.update(
        ok=True, seconds=round(time.perf_counter() - started, 1), load_avg_1m_after=os.getloadavg()[0],
        nodes_ours=ours,
        nodes_tvm=fb.nodes.get("tvm", 0) if fb else ours, nodes_onnxruntime=fb.nodes.get("onnxruntime", 0) if fb else 0,
        segments=len(fb.segments) if fb else 1,
        fallback=[{"name": n.name, "op": (f"{n.domain}." if n.domain else "") + n.op, "reason": n.reason} for n in fb.fallback_nodes] if fb else [],
        time_ms=fb.time_ms if fb else None,
        accuracy_ok=r.accuracy.ok if r.accuracy else None,
        max_abs_error=max((o.max_abs for o in r.accuracy.outputs), default=None) if r.accuracy else None,
        tvm_p50_ms=r.latency.stats.p50_ms if r.latency and r.latency.stats else None,
        ort_p50_ms=r.baseline.stats.p50_ms if r.baseline else None,
        runs=r.latency.stats.runs if r.latency and r.latency.stats else 0,
        passes=[{"name": p.name, "nodes_after": p.nodes_after, "stats": p.stats} for p in r.passes if p.changed],
        warnings=r.warnings,
    )
    return entry


def _ms(x):
    return "-" if x is None else f"{x:.1f} ms"


def markdown(results: dict, command: str) -> str:
    lines = [
        "# Real models (issue 7)", "",
        f"Command: `{command}` (after `make models`).", "",
        f"Machine: {results['machine']}. TVM {results['tvm']} untuned (default schedules), ONNX Runtime "
        f"{results['onnxruntime']} (CPU, all graph optimizations) on the source model in the same build, same threads; "
        f"onnxslim {results['onnxslim']}. -O3, host target, `--sample-inputs` (synthetic: see the script), "
        "`--fallback onnxruntime` (the default).", "",
        "| model | nodes in | ours (O3) | onnxslim | on TVM | on ONNX Runtime | TVM p50 | ONNX Runtime p50 | TVM / ORT | max abs error | load avg before / after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in results["models"].items():
        if not m.get("ok"):
            lines.append(f"| {name} | {m['nodes_in']} | fails: {m.get('error', '')[:150]} | {m['onnxslim_nodes']} | | | | | | | {m['load_avg_1m_before']:.1f} |")
            continue
        ratio = f"{m['tvm_p50_ms'] / m['ort_p50_ms']:.1f}x" if m.get("tvm_p50_ms") and m.get("ort_p50_ms") else "-"
        err = f"{m['max_abs_error']:.2e}" if m.get("max_abs_error") is not None else "-"
        lines.append(f"| {name} | {m['nodes_in']} | {m['nodes_ours']} | {m['onnxslim_nodes']} | {m['nodes_tvm']} | {m['nodes_onnxruntime']} | "
                     f"{_ms(m['tvm_p50_ms'])} | {_ms(m['ort_p50_ms'])} | {ratio} | {err} | {m['load_avg_1m_before']:.1f} / {m['load_avg_1m_after']:.1f} |")
    lines += ["", "TVM p50 is the whole artifact (TVM segments and, where some nodes fell back, the ONNX Runtime segments "
              "between them); the accuracy check (rtol 1e-3, atol 1e-4 against ONNX Runtime on the source model) passed "
              "where an error is given. The load average is the 1-minute one: above the core count, other work shared "
              "the cores, and both latencies are inflated (the ratio less so, the two being measured in the same build).",
              "", "## What falls back, and why", ""]
    for name, m in results["models"].items():
        if not m.get("ok"):
            continue
        if not m["fallback"]:
            lines.append(f"- {name}: nothing; every node runs on TVM ({m['segments']} segment).")
        else:
            ops: dict[str, int] = {}
            for n in m["fallback"]:
                ops[f"{n['op']} ({n['reason']})"] = ops.get(f"{n['op']} ({n['reason']})", 0) + 1
            lines.append(f"- {name}: " + "; ".join(f"{k} x{v}" for k, v in ops.items()))
    lines += ["", "## The passes that changed each model (O3)", ""]
    for name, m in results["models"].items():
        if m.get("ok"):
            lines.append(f"- {name}: " + ", ".join(f"{p['name']} -> {p['nodes_after']}" for p in m["passes"]))
    return "\n".join(lines) + "\n"


def machine() -> str:
    from autoglm_compile.target import detect_host_cpu

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    avx512 = "avx512f" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else False
    return f"{cpu} ({detect_host_cpu().mcpu}{', AVX-512' if avx512 else ''}), {os.cpu_count()} cores, {platform.platform()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--write", type=Path, help="write Markdown here, and JSON next to it")
    ap.add_argument("--markdown-from", type=Path, help="only rewrite the Markdown from this JSON (an earlier --write)")
    args = ap.parse_args()
    if args.markdown_from:
        results = json.loads(args.markdown_from.read_text())
        text = markdown(results, results["command"])
        print(text)
        if args.write:
            args.write.write_text(text)
        return

    import onnxruntime
    import onnxslim
    import tvm

    results = {"machine": machine(), "tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__,
               "onnxslim": onnxslim.__version__, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            print(f"[{name}] ...", file=sys.stderr, flush=True)
            results["models"][name] = build(name, args.runs, Path(tmp))
            print(f"[{name}] {json.dumps({k: v for k, v in results['models'][name].items() if k not in ('passes', 'warnings')})}", file=sys.stderr, flush=True)
    results["command"] = command = "python benchmarks/real_models.py " + " ".join(sys.argv[1:])
    text = markdown(results, command)
    print(text)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)
        args.write.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
