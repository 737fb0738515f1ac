"""int8 on the PP-OCRv4 text detector (trained weights, `make models`), on images with text rendered in code.

    python benchmarks/int8_ppocr.py --model build/models/real/ppocrv4-det.onnx --out /tmp/int8-det --json docs/int8.json

1. Renders text images (a 5x7 bitmap font, random words, sizes, positions and colours on a noisy light background;
   no font files or Pillow needed) and normalizes them as PP-OCR's detector expects (ImageNet mean/std, CHW):
   `--calib` of them (seed 1) as calibration data, `--samples` others (seed 2) as the sample inputs on which the
   accuracy budget is checked.
2. Compiles the detector for the host with --precision int8 (calibration on those images, the default budget
   cosine>=0.99), and prints: the cosine to fp32 (ONNX Runtime on the QDQ model, and the TVM build), the nodes kept
   in float, our int8 p50 against ONNX Runtime's on the same QDQ model (the artifact's model.opt.onnx), and ONNX
   Runtime's fp32 p50 on the source model, all with the same thread count; plus the share of pixels whose
   text/no-text decision (map > 0.3, PP-OCR's threshold) agrees with fp32.
The load average at the start is recorded: figures taken on a busy machine are not comparable.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

FONT = {
    "A": "01110 10001 10001 11111 10001 10001 10001", "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110", "D": "11110 10001 10001 10001 10001 10001 11110",
    "E": "11111 10000 10000 11110 10000 10000 11111", "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111", "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110", "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001", "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001", "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110", "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101", "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110", "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110", "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010", "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 01010 00100 00100 00100 00100", "Z": "11111 00001 00010 00100 01000 10000 11111",
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11111 00010 00100 00010 00001 10001 01110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
}
GLYPHS = {c: np.array([[int(b) for b in row] for row in s.split()], dtype=bool) for c, s in FONT.items()}
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def render(img: np.ndarray, text: str, y: int, x: int, scale: int, colour) -> None:
    for i, ch in enumerate(text):
        glyph = np.kron(GLYPHS[ch], np.ones((scale, scale), dtype=bool))
        x0 = x + i * 6 * scale
        h, w = glyph.shape
        if y + h > img.shape[0] or x0 + w > img.shape[1]:
            break
        img[y:y + h, x0:x0 + w][glyph] = colour


def text_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An HxWx3 image in [0, 255]: 3 to 8 random words on a noisy light background."""
    img = np.empty((h, w, 3), np.float32)
    img[:] = rng.integers(180, 256, size=3)
    img += rng.normal(0, 6, img.shape)
    chars = list(FONT)
    for _ in range(rng.integers(3, 9)):
        word = "".join(rng.choice(chars, rng.integers(3, 12)))
        scale = int(rng.integers(2, 7))
        render(img, word, int(rng.integers(0, h - 7 * scale)), int(rng.integers(0, max(1, w - 18 * scale))), scale, rng.integers(0, 90, size=3))
    return np.clip(img, 0, 255)


def det_input(img: np.ndarray) -> np.ndarray:
    return ((img / 255.0 - MEAN) / STD).transpose(2, 0, 1)[None].astype(np.float32)


def p50(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.percentile(np.array(times) * 1e3, 50))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="build/models/real/ppocrv4-det.onnx")
    ap.add_argument("--out", default="/tmp/int8-det")
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--config", default=None, help="pipeline YAML (e.g. precision: {scan: 64})")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from autoglm_compile.measure import ort_session
    from autoglm_compile.pipeline import CompileOptions, compile_model
    from autoglm_compile.precision import metric_value
    from autoglm_compile.runtime import load

    out = Path(args.out)
    data = out.parent / f"{out.name}-data"
    (data / "samples").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    np.savez(data / "calib.npz", x=np.stack([det_input(text_image(rng, args.size, args.size)) for _ in range(args.calib)]))
    rng = np.random.default_rng(2)
    for i in range(args.samples):
        np.savez(data / "samples" / f"{i:02d}.npz", x=det_input(text_image(rng, args.size, args.size)))
    load_avg = os.getloadavg()[0]
    t0 = time.perf_counter()
    report = compile_model(CompileOptions(
        source=args.model, output=out, input_shapes=[f"x=1x3x{args.size}x{args.size}"], precision="int8", runs=args.runs,
        calib_data=data / "calib.npz", sample_inputs=data / "samples", config_path=Path(args.config) if args.config else None,
    ))
    seconds = time.perf_counter() - t0
    q = report.quantization
    import onnx

    source, qdq = onnx.load(args.model), onnx.load(str(out / "model.opt.onnx"))
    threads = report.latency.threads
    feeds = [dict(np.load(f)) for f in sorted((data / "samples").glob("*.npz"))]
    fp32_sess, qdq_sess, ours = ort_session(source, threads=threads), ort_session(qdq, threads=threads), load(out)
    rows = []
    for f in feeds:
        ref, o, t = fp32_sess.run(None, f)[0], qdq_sess.run(None, f)[0], ours(f)[0]
        rows.append({"cosine_ort_int8": metric_value("cosine", o, ref), "cosine_tvm_int8": metric_value("cosine", t, ref),
                     "text_pixels_fp32": float((ref > 0.3).mean()),
                     "decision_agree_ort": float(((o > 0.3) == (ref > 0.3)).mean()), "decision_agree_tvm": float(((t > 0.3) == (ref > 0.3)).mean())})
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "load_avg_1m_at_start": load_avg, "compile_seconds": seconds,
        "threads": threads, "calibration": q.calibration.model_dump(), "budget": q.budget, "value_before": q.value_before, "value": q.value,
        "rounds": [r.model_dump() for r in q.rounds], "scanned": q.scanned, "candidates": q.candidates, "quantized_nodes": q.quantized_nodes,
        "protected": [p.model_dump() for p in q.protected], "per_image": rows,
        "tvm_int8_p50_ms": report.latency.stats.p50_ms, "ort_int8_p50_ms_same_qdq_model": report.baseline.stats.p50_ms,
        "ort_fp32_p50_ms_source_model": p50(lambda: fp32_sess.run(None, feeds[0]), args.runs),
        "int8_kernels": q.int8_kernels,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
