"""int8 on the PP-OCRv4 text recognizer (trained weights, `make models`), on text lines rendered in code.

    make models        # build/models/real/ppocrv4-rec.onnx
    python benchmarks/int8_ppocr_rec.py --out /tmp/int8-rec --json /tmp/int8-rec.json --markdown /tmp/int8-rec.md

1. Renders text lines with int8_ppocr.py's 5x7 bitmap font (1 to 3 random words of capitals and digits, random
   scale, position and colours on a noisy light background), 48 pixels high, normalized and padded to 320 as
   PP-OCR's recognizer expects ((x/255 - 0.5)/0.5, zeros on the right): `--calib` lines (seed 1) as calibration
   data, `--samples` others (seed 2) as the sample inputs on which the budget is checked, and `--eval` others
   (seed 3) for the figures below.
2. Compiles the recognizer for the host with --precision int8 (calibration on those lines, the default budget
   cosine>=0.99).
3. On every evaluation line, int8 (ONNX Runtime on the QDQ model.opt.onnx, and the TVM build) against ONNX Runtime
   fp32 on the source model: the share of timesteps whose argmax agrees, the share of lines whose greedy CTC
   decoding (argmax, repeats merged, blanks dropped) is the same label sequence, and the cosine of the output (the
   softmax probabilities, [1, 40, 6625]); and, with the model's own character list (its metadata), the share of
   lines each one reads exactly as rendered (spaces at the ends ignored). Latency: p50 over those calls (same
   threads), and the compile report's.
The load average is recorded at the start and the end: figures taken on a busy machine are not comparable.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from int8_ppocr import FONT, render

H, W = 48, 320


def text_line(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A 48x320 normalized CHW line, as PP-OCR's recognizer takes it, and its text."""
    scale = int(rng.integers(3, 6))  # glyphs 21 to 35 pixels high
    step = 6 * scale
    room = (W - 8) // step
    chars = list(FONT)
    words, used = [], 0
    for _ in range(rng.integers(1, 4)):
        n = int(rng.integers(2, 8))
        if used + n + (1 if words else 0) > room:
            break
        words.append("".join(rng.choice(chars, n)))
        used += n + (1 if len(words) > 1 else 0)
    text = " ".join(words) or "".join(rng.choice(chars, 2))
    width = min(W, len(text) * step + 8 + int(rng.integers(0, 16)))  # the line as cropped by the detector
    img = np.empty((H, width, 3), np.float32)
    img[:] = rng.integers(170, 256, size=3)
    img += rng.normal(0, 6, img.shape)
    x0 = int(rng.integers(2, max(3, width - len(text) * step)))
    y0 = int(rng.integers(2, max(3, H - 7 * scale - 2)))
    colour = rng.integers(0, 90, size=3)
    for i, word in enumerate(text.split(" ")):
        render(img, word, y0, x0, scale, colour)
        x0 += (len(word) + 1) * step
    line = np.zeros((3, H, W), np.float32)  # PP-OCR pads the normalized image with zeros on the right
    line[:, :, :width] = (np.clip(img, 0, 255) / 255.0 - 0.5).transpose(2, 0, 1) / 0.5
    return line[None], text


def ctc_greedy(probs: np.ndarray) -> list[int]:
    """Greedy CTC decoding of one [T, C] output: argmax per timestep, repeats merged, blank (0) dropped."""
    idx = probs.argmax(-1)
    return [int(c) for j, c in enumerate(idx) if c != 0 and (j == 0 or c != idx[j - 1])]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def run_all(fn, feeds: list[dict[str, np.ndarray]]) -> tuple[list[np.ndarray], list[float]]:
    """fn's first output on every feed (one warm-up call first), and each call's milliseconds."""
    fn(feeds[0])
    outs, times = [], []
    for f in feeds:
        t0 = time.perf_counter()
        outs.append(np.asarray(fn(f)[0])[0])
        times.append((time.perf_counter() - t0) * 1e3)
    return outs, times


def markdown(r: dict, command: str) -> str:
    q = r["quantization"]
    ops: dict[str, int] = {}
    for p in q["protected"]:
        ops[p["op"]] = ops.get(p["op"], 0) + 1
    kept = ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1]))
    a, lat = r["agreement"], r["p50_ms"]
    lines = [
        f"Command (load average {r['load_avg_1m_at_start']:.2f} at the start, {r['load_avg_1m_at_end']:.2f} at the end; "
        f"{r['threads']} threads): `{command}`", "",
        f"{r['calibration']['samples']} calibration lines (seed 1, {r['calibration']['method']}), {r['sample_inputs']} sample "
        f"inputs for the budget `{q['budget']}` (seed 2), {r['lines']} evaluation lines (seed 3), {r['timesteps']} timesteps each.", "",
        "| | ONNX Runtime int8 (model.opt.onnx) | ours (TVM) |", "|---|---:|---:|",
        f"| timesteps whose argmax agrees with fp32 | {a['ort_int8']['timestep_argmax'] * 100:.2f} % | {a['tvm_int8']['timestep_argmax'] * 100:.2f} % |",
        f"| lines whose CTC label sequence equals fp32's | {a['ort_int8']['ctc_same'] * 100:.1f} % | {a['tvm_int8']['ctc_same'] * 100:.1f} % |",
        f"| output cosine to fp32: min / mean | {a['ort_int8']['cosine_min']:.4f} / {a['ort_int8']['cosine_mean']:.4f} | {a['tvm_int8']['cosine_min']:.4f} / {a['tvm_int8']['cosine_mean']:.4f} |",
        f"| lines read exactly as rendered (fp32: {r['read_exactly']['ort_fp32'] * 100:.1f} %) | {r['read_exactly']['ort_int8'] * 100:.1f} % | {r['read_exactly']['tvm_int8'] * 100:.1f} % |",
        f"| p50, batch 1 (ONNX Runtime fp32, source model: {lat['ort_fp32']:.1f} ms) | {lat['ort_int8']:.1f} ms | **{lat['tvm_int8']:.1f} ms** |", "",
        "| | |", "|---|---|",
        f"| nodes quantized / kept in float | {q['quantized_nodes']} / {len(q['protected'])}{f' ({kept})' if kept else ''} |",
        f"| budget metric, every node quantized / final (ONNX Runtime, worst sample input) | {q['value_before']:.4f} / {q['value']:.4f} |",
        f"| protection rounds | {len(q['rounds']) - 1} |",
        f"| int8 kernels (the report's words) | {q['int8_kernels']} |",
        f"| compile report: ours / ONNX Runtime int8 p50 | {r['report_tvm_int8_p50_ms']:.1f} / {r['report_ort_int8_p50_ms']:.1f} ms |",
        f"| quantization step{' / whole compile' if r['compile_seconds'] else ''} | {q['seconds']:.1f} s"
        + (f" / {r['compile_seconds']:.0f} s |" if r["compile_seconds"] else " |"),
    ]
    if r["budget_unmet"]:
        lines += ["", f"Budget not met: {r['budget_unmet']}"]
    if q["rounds"]:
        lines += ["", "| round | tensors in float | nodes in float | metric |", "|---:|---:|---:|---:|"]
        lines += [f"| {x['round']} | {x['tensors']} | {x['float_nodes']} | {x['value']:.4f} |" for x in q["rounds"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="build/models/real/ppocrv4-rec.onnx")
    ap.add_argument("--out", default="/tmp/int8-rec")
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--eval", type=int, default=64)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--calib-method", default=None, help="minmax | entropy | percentile (default: the config's)")
    ap.add_argument("--accuracy-budget", default=None, help="e.g. top1-agree>=0.97 (per-timestep argmax)")
    ap.add_argument("--config", default=None, help="pipeline YAML (e.g. precision: {scan: 64})")
    ap.add_argument("--reuse", action="store_true", help="evaluate the artifact already in --out (its report.json) instead of compiling")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()

    import onnx

    from autoglm_compile.errors import BudgetError
    from autoglm_compile.measure import ort_session
    from autoglm_compile.pipeline import CompileOptions, compile_model
    from autoglm_compile.report import Report
    from autoglm_compile.runtime import load, restore_affinity

    out = Path(args.out)
    data = out.parent / f"{out.name}-data"
    (data / "samples").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    np.savez(data / "calib.npz", x=np.stack([text_line(rng)[0] for _ in range(args.calib)]))
    rng = np.random.default_rng(2)
    for f in (data / "samples").glob("*.npz"):
        f.unlink()
    for i in range(args.samples):
        np.savez(data / "samples" / f"{i:02d}.npz", x=text_line(rng)[0])
    rng = np.random.default_rng(3)
    lines = [text_line(rng) for _ in range(args.eval)]
    feeds = [{"x": x} for x, _ in lines]

    load_avg = os.getloadavg()[0]
    t0 = time.perf_counter()
    if args.reuse:
        report = Report.model_validate_json((out / "report.json").read_text())
        unmet = "the accuracy budget is not met (report.json)" if report.result == "budget-failed" else None
    else:
        try:
            report, unmet = compile_model(CompileOptions(
                source=args.model, output=out, input_shapes=[f"x=1x3x{H}x{W}"], precision="int8", runs=args.runs,
                calib_data=data / "calib.npz", calib_method=args.calib_method, accuracy_budget=args.accuracy_budget, sample_inputs=data / "samples",
                config_path=Path(args.config) if args.config else None,
            )), None
        except BudgetError as e:  # a budget given with --accuracy-budget and not met: the artifact is written
            report, unmet = e.report, str(e)
    seconds = None if args.reuse else time.perf_counter() - t0
    q, threads = report.quantization, report.latency.threads

    source = onnx.load(args.model)
    charset = ["blank", *next(p.value for p in source.metadata_props if p.key == "character").splitlines(), " "]
    fp32, qdq = ort_session(source, threads=threads), ort_session(onnx.load(str(out / "model.opt.onnx")), threads=threads)
    outs, times = {}, {}
    outs["ort_fp32"], times["ort_fp32"] = run_all(lambda f: fp32.run(None, f), feeds)
    outs["ort_int8"], times["ort_int8"] = run_all(lambda f: qdq.run(None, f), feeds)
    outs["tvm_int8"], times["tvm_int8"] = run_all(load(out, threads=threads), feeds)
    restore_affinity()

    ref = outs["ort_fp32"]
    agreement = {}
    for k in ("ort_int8", "tvm_int8"):
        cos = [cosine(o, r) for o, r in zip(outs[k], ref)]
        agreement[k] = {
            "timestep_argmax": float(np.mean([(o.argmax(-1) == r.argmax(-1)).mean() for o, r in zip(outs[k], ref)])),
            "ctc_same": float(np.mean([ctc_greedy(o) == ctc_greedy(r) for o, r in zip(outs[k], ref)])),
            "cosine_min": float(min(cos)), "cosine_mean": float(np.mean(cos)),
        }
    read = {k: ["".join(charset[c] for c in ctc_greedy(o)) for o in v] for k, v in outs.items()}
    result = {
        "machine": f"{platform.processor() or platform.machine()} {os.cpu_count()} cores", "threads": threads,
        "load_avg_1m_at_start": load_avg, "load_avg_1m_at_end": os.getloadavg()[0], "compile_seconds": seconds, "budget_unmet": unmet,
        "lines": len(lines), "timesteps": int(ref[0].shape[0]), "sample_inputs": args.samples,
        "calibration": q.calibration.model_dump(), "quantization": q.model_dump(), "agreement": agreement,
        "read_exactly": {k: float(np.mean([t.strip() == text for t, (_, text) in zip(v, lines)])) for k, v in read.items()},
        "examples": [{"rendered": text, **{k: read[k][i] for k in read}} for i, (_, text) in enumerate(lines[:8])],
        "p50_ms": {k: float(np.percentile(v, 50)) for k, v in times.items()},
        "report_tvm_int8_p50_ms": report.latency.stats.p50_ms, "report_ort_int8_p50_ms": report.baseline.stats.p50_ms,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "quantization"}, indent=2, ensure_ascii=False))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if args.markdown:
        flags = [(k.replace("_", "-"), v) for k, v in vars(args).items() if k in ("calib", "samples", "eval", "calib_method", "accuracy_budget", "config", "reuse") and v not in (None, False, ap.get_default(k))]
        command = "python benchmarks/int8_ppocr_rec.py" + "".join(f" --{k}" if v is True else f" --{k} {v}" for k, v in flags)
        Path(args.markdown).write_text(markdown(result, command))


if __name__ == "__main__":
    main()
