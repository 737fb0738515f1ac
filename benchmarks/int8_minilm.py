"""int8 on all-MiniLM-L6-v2 (trained weights, `make models`), on real English sentences.

    make models        # build/models/real/minilm-l6: weights, config and tokenizer
    python benchmarks/int8_minilm.py --out /tmp/int8-minilm --json /tmp/int8-minilm.json --markdown /tmp/int8-minilm.md

1. Tokenizes the sentences of benchmarks/data with the model's own tokenizer (realmodels.minilm_tokenize, padded to
   the build's sequence 128): calibration_sentences.txt as --calib-data (one .npz, a leading sample dim), and
   `--samples` sentences of sentences.txt, evenly spaced, as --sample-inputs (the budget is checked on them). The two
   files share no sentence.
2. Compiles the PyTorch entry autoglm_compile.realmodels:minilm for the host with --precision int8 (run it from the
   repository root: the entry reads build/models/real/minilm-l6).
3. For every sentence of sentences.txt, the sentence embedding (output 2, mean-pooled and L2-normalized) of: ONNX
   Runtime fp32 on the exported source model, ONNX Runtime on the artifact's model.opt.onnx (the QDQ model), and the
   TVM artifact; each one's cosine to the fp32 torch module's embedding (min, p5, mean), and whether each sentence's
   nearest neighbour among the others is the one fp32 finds. Latency: p50 over those calls (batch 1, same threads),
   and the compile report's figures.
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

DATA = Path(__file__).parent / "data"


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def nearest(emb: np.ndarray) -> np.ndarray:
    """Each row's nearest other row by cosine."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)


def embed(fn, feeds: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, list[float]]:
    """Output 2 of fn on every feed (one warm-up call first), and each call's milliseconds."""
    fn(feeds[0])
    rows, times = [], []
    for f in feeds:
        t0 = time.perf_counter()
        out = fn(f)
        times.append((time.perf_counter() - t0) * 1e3)
        rows.append(np.asarray(out[1])[0])
    return np.stack(rows), times


def markdown(r: dict, command: str) -> str:
    q = r["quantization"]
    ops: dict[str, int] = {}
    for p in q["protected"]:
        ops[p["op"]] = ops.get(p["op"], 0) + 1
    kept = ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1]))
    lines = [
        f"Command (load average {r['load_avg_1m_at_start']:.2f} at the start, {r['load_avg_1m_at_end']:.2f} at the end; "
        f"{r['threads']} threads): `{command}`", "",
        f"{r['sentences']} evaluation sentences (benchmarks/data/sentences.txt, {r['tokens_min']}-{r['tokens_max']} tokens "
        f"with [CLS]/[SEP], none cut), {r['calibration']['samples']} calibration sentences "
        f"(calibration_sentences.txt, {r['calibration']['method']}), {r['sample_inputs']} of the evaluation sentences as "
        f"--sample-inputs; budget `{q['budget']}`, checked on both outputs (hidden states and embedding).", "",
        "| | |", "|---|---|",
        f"| nodes quantized / kept in float | {q['quantized_nodes']} / {len(q['protected'])}{f' ({kept})' if kept else ''} |",
        f"| budget metric, every node quantized / final (ONNX Runtime, worst sample input) | {q['value_before']:.4f} / {q['value']:.4f} |",
        f"| protection rounds | {len(q['rounds']) - 1} |",
        f"| int8 kernels (the report's words) | {q['int8_kernels']} |",
    ]
    for name, s in r["embedding_cosine_to_torch_fp32"].items():
        lines.append(f"| embedding cosine to torch fp32, {name}: min / p5 / mean (sentences below 0.99) | {s['min']:.4f} / {s['p5']:.4f} / {s['mean']:.4f} ({s['below_0.99']}) |")
    for name, v in r["nearest_neighbour_agrees_with_fp32"].items():
        lines.append(f"| nearest other sentence same as fp32's, {name} | {v * 100:.1f} % |")
    lat = r["p50_ms"]
    lines += [
        f"| ONNX Runtime fp32 p50 (source model) | {lat['ort_fp32']:.1f} ms |",
        f"| ONNX Runtime int8 p50 (model.opt.onnx) | {lat['ort_int8']:.1f} ms |",
        f"| **our int8 p50 (TVM, untuned)** | **{lat['tvm_int8']:.1f} ms** (ours / ONNX Runtime int8 = {lat['tvm_int8'] / lat['ort_int8']:.1f}x) |",
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
    ap.add_argument("--out", default="/tmp/int8-minilm")
    ap.add_argument("--sentences", type=Path, default=DATA / "sentences.txt")
    ap.add_argument("--calib-sentences", type=Path, default=DATA / "calibration_sentences.txt")
    ap.add_argument("--samples", type=int, default=4, help="evaluation sentences given as --sample-inputs")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--calib-method", default=None, help="minmax | entropy | percentile (default: the config's)")
    ap.add_argument("--accuracy-budget", default=None)
    ap.add_argument("--config", default=None, help="pipeline YAML (e.g. precision: {max_rounds: 10})")
    ap.add_argument("--reuse", action="store_true", help="evaluate the artifact already in --out (its report.json) instead of compiling")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()

    import onnx
    import torch

    from autoglm_compile import realmodels
    from autoglm_compile.frontends import load as load_source
    from autoglm_compile.errors import BudgetError
    from autoglm_compile.measure import ort_session
    from autoglm_compile.pipeline import CompileOptions, compile_model
    from autoglm_compile.report import Report
    from autoglm_compile.runtime import load, restore_affinity

    sentences, calib = read_lines(args.sentences), read_lines(args.calib_sentences)
    if set(sentences) & set(calib):
        raise SystemExit("the calibration and evaluation sentences overlap")
    seq = 128  # realmodels.MINILM_INPUTS
    enc, cal = realmodels.minilm_tokenize(sentences, seq=seq), realmodels.minilm_tokenize(calib, seq=seq)
    lengths = enc["attention_mask"].sum(1)
    feeds = [{k: v[i:i + 1] for k, v in enc.items()} for i in range(len(sentences))]

    out = Path(args.out)
    data = out.parent / f"{out.name}-data"
    (data / "samples").mkdir(parents=True, exist_ok=True)
    np.savez(data / "calib.npz", **{k: v[:, None] for k, v in cal.items()})  # [N, 1, 128]: N samples
    picks = np.linspace(0, len(sentences) - 1, args.samples).round().astype(int)
    for f in (data / "samples").glob("*.npz"):
        f.unlink()
    for j, i in enumerate(picks):
        np.savez(data / "samples" / f"{j:02d}.npz", **feeds[i])

    load_avg = os.getloadavg()[0]
    t0 = time.perf_counter()
    if args.reuse:
        report = Report.model_validate_json((out / "report.json").read_text())
        unmet = "the accuracy budget is not met (report.json)" if report.result == "budget-failed" else None
    else:
        try:
            report, unmet = compile_model(CompileOptions(
                source=realmodels.MINILM_ENTRY, output=out, input_shapes=list(realmodels.MINILM_INPUTS), precision="int8", runs=args.runs,
                calib_data=data / "calib.npz", calib_method=args.calib_method, accuracy_budget=args.accuracy_budget,
                sample_inputs=data / "samples", config_path=Path(args.config) if args.config else None,
            )), None
        except BudgetError as e:  # a budget given with --accuracy-budget and not met: the artifact is written
            report, unmet = e.report, str(e)
    seconds = None if args.reuse else time.perf_counter() - t0
    q, threads = report.quantization, report.latency.threads

    with torch.no_grad():
        ref = realmodels.minilm()(*(torch.from_numpy(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids")))[1].numpy()
    source = load_source(realmodels.MINILM_ENTRY, list(realmodels.MINILM_INPUTS)).model
    fp32, qdq = ort_session(source, threads=threads), ort_session(onnx.load(str(out / "model.opt.onnx")), threads=threads)
    emb, times = {}, {}
    emb["ort_fp32"], times["ort_fp32"] = embed(lambda f: fp32.run(None, f), feeds)
    emb["ort_int8"], times["ort_int8"] = embed(lambda f: qdq.run(None, f), feeds)
    ours = load(out, threads=threads)
    emb["tvm_int8"], times["tvm_int8"] = embed(ours, feeds)
    restore_affinity()

    def stats(c: np.ndarray) -> dict:
        return {"min": float(c.min()), "p5": float(np.percentile(c, 5)), "mean": float(c.mean()), "below_0.99": int((c < 0.99).sum()),
                "worst_sentence": sentences[int(c.argmin())]}

    nn_ref = nearest(ref)
    result = {
        "machine": f"{platform.processor() or platform.machine()} {os.cpu_count()} cores", "threads": threads,
        "load_avg_1m_at_start": load_avg, "load_avg_1m_at_end": os.getloadavg()[0], "compile_seconds": seconds, "budget_unmet": unmet,
        "sentences": len(sentences), "tokens_min": int(lengths.min()), "tokens_max": int(lengths.max()),
        "truncated": int((lengths == seq).sum()), "sample_inputs": len(picks), "calibration": q.calibration.model_dump(),
        "quantization": q.model_dump(),
        "embedding_cosine_to_torch_fp32": {k: stats(cosine_rows(v, ref)) for k, v in emb.items()},
        "nearest_neighbour_agrees_with_fp32": {k: float((nearest(v) == nn_ref).mean()) for k, v in emb.items()},
        "p50_ms": {k: float(np.percentile(v, 50)) for k, v in times.items()},
        "report_tvm_int8_p50_ms": report.latency.stats.p50_ms, "report_ort_int8_p50_ms": report.baseline.stats.p50_ms,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "quantization"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        flags = [(k.replace("_", "-"), v) for k, v in vars(args).items() if k in ("samples", "calib_method", "accuracy_budget", "config", "reuse") and v not in (None, False, ap.get_default(k))]
        command = "python benchmarks/int8_minilm.py" + "".join(f" --{k}" if v is True else f" --{k} {v}" for k, v in flags)
        Path(args.markdown).write_text(markdown(result, command))


if __name__ == "__main__":
    main()
