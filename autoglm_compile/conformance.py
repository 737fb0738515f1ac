"""Conformance on the ONNX backend node tests, a suite that nobody here wrote.

Every test goes through the pipeline for the host (graph passes → TVM import → lowering → build → run) and its
outputs are compared with the suite's expected outputs at the suite's tolerances. Each test runs in a worker
subprocess under a timeout, so a crash or a hang in TVM is classified, never fatal. Separately, for every test, the
graph passes alone are checked not to change ONNX Runtime's outputs.

    python -m autoglm_compile.conformance --write docs/conformance.md      # the full run (make conformance)
    python -m autoglm_compile.conformance --only test_abs test_relu         # a few tests
"""
from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

RESULTS = (
    "pass",
    "unsupported-import",  # TVM's importer has no converter for the op, or refuses its attributes
    "unsupported-type",  # an input/output type TVM does not take (strings, sequences, optionals, float8, ...)
    "numeric-mismatch",
    "compile-error",  # lowering or building failed
    "runtime-error",  # the built module raised when run
    "pass-error",  # one of our graph passes failed (our bug)
    "crash",  # the worker process died
    "timeout",
)
PASSES_KEEP = ("yes", "no", "ort-cannot-run")
DEFAULT_TIMEOUT = 60.0
PRESET = "O3"  # the whole pass library runs on every test; "passes keep ORT" checks the passes together
# Inputs at these positions are parameters (shapes, axes, sizes). The node tests feed them as graph inputs; a
# deployed model holds them constant, and TVM needs them constant. A test input used only at such positions is
# frozen to its test value (TVM still computes the op itself).
PARAMETER_INPUTS = {
    "Reshape": {1}, "Expand": {1}, "Tile": {1}, "ConstantOfShape": {0}, "Range": {0, 1, 2}, "Slice": {1, 2, 3, 4},
    "Pad": {1, 2, 3}, "Unsqueeze": {1}, "Squeeze": {1}, "Split": {1}, "TopK": {1}, "Resize": {1, 2, 3},
    "Upsample": {1}, "OneHot": {1}, "CenterCropPad": {1}, "Trilu": {1}, "CumSum": {1}, "Col2Im": {1, 2},
    "NonMaxSuppression": {2, 3, 4}, "ReduceSum": {1}, "ReduceMean": {1}, "ReduceMax": {1}, "ReduceMin": {1},
    "ReduceProd": {1}, "ReduceL1": {1}, "ReduceL2": {1}, "ReduceLogSum": {1}, "ReduceLogSumExp": {1},
    "ReduceSumSquare": {1}, "Compress": {1}, "DFT": {1, 2}, "STFT": {1, 2}, "BlackmanWindow": {0},
    "HannWindow": {0}, "HammingWindow": {0}, "MelWeightMatrix": {0, 1, 2, 3, 4},
}


@dataclass
class Outcome:
    name: str
    result: str
    passes_keep_ort: str
    detail: str = ""
    seconds: float = 0.0
    with_fallback: str = ""  # for an unsupported-import: the result with --fallback onnxruntime (fallback_result)

    def as_json(self) -> str:
        return json.dumps(self.__dict__)


# ------------------------------------------------------------------------------------------------ the worker

def _load_cases() -> dict:
    import warnings

    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {t.name: t for t in load_model_tests(kind="node")}


def _io_supported(model) -> str | None:
    import onnx

    ok = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
          onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT8,
          onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}
    for vi in list(model.graph.input) + list(model.graph.output):
        if not vi.type.HasField("tensor_type"):
            return f"{vi.name}: {vi.type.WhichOneof('value')} type"
        if vi.type.tensor_type.elem_type not in ok:
            return f"{vi.name}: {onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type)}"
    return None


def _allclose(actual, expected, rtol, atol) -> str | None:
    import numpy as np

    if len(actual) != len(expected):
        return f"{len(actual)} outputs, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        a, e = np.asarray(a), np.asarray(e)
        if a.shape != e.shape:
            return f"output {i}: shape {a.shape}, expected {e.shape}"
        if e.dtype.kind in "fc":
            if not np.allclose(a.astype(np.float64), e.astype(np.float64), rtol=rtol, atol=atol, equal_nan=True):
                return f"output {i}: max abs {float(np.nanmax(np.abs(a.astype(np.float64) - e.astype(np.float64)))):.3g}"
        elif not np.array_equal(a, e):
            return f"output {i}: values differ"
    return None


def _flatten(value) -> list:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    out = []
    for v in value:
        out.extend(_flatten(v))
    return out


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Error converting operator") or "not supported" in ln.lower():
            return f"{type(e).__name__}: {ln[:200]}"
    return f"{type(e).__name__}: {(lines[-1] if lines else '')[:200]}"


def freeze_parameter_inputs(model, feeds: dict):
    """A copy of the model with the inputs that only feed parameter positions turned into initializers."""
    import onnx
    from onnx import numpy_helper

    uses: dict[str, list[bool]] = {}
    for node in model.graph.node:
        params = PARAMETER_INPUTS.get(node.op_type, set())
        for i, name in enumerate(node.input):
            uses.setdefault(name, []).append(i in params)
    frozen = [n for n in feeds if uses.get(n) and all(uses[n])]
    if not frozen:
        return model, []
    out = onnx.ModelProto.FromString(model.SerializeToString())
    keep = [vi for vi in out.graph.input if vi.name not in frozen]
    del out.graph.input[:]
    out.graph.input.extend(keep)
    out.graph.initializer.extend(numpy_helper.from_array(feeds[n], n) for n in frozen)
    return out, frozen


def run_case(case) -> Outcome:
    """One test through the pipeline, in this process."""
    import numpy as np
    import onnx

    from .config import load_config
    from .inputs import InputSpec
    from .measure import run_ort
    from .pass_manager import PassContext, run_passes

    t0 = time.perf_counter()
    model = case.model
    feeds_list = []
    real_inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    for inputs, expected in case.data_sets:
        feeds_list.append(({vi.name: np.asarray(x) for vi, x in zip(real_inputs, inputs)}, expected))

    def done(result, keep, detail=""):
        return Outcome(case.name, result, keep, detail, time.perf_counter() - t0)

    bad_type = _io_supported(model)
    if bad_type or not feeds_list or any(not isinstance(x, np.ndarray) for f, _ in feeds_list for x in f.values()):
        return done("unsupported-type", "ort-cannot-run", bad_type or "non-tensor test data")
    if len(feeds_list) == 1:
        model, frozen = freeze_parameter_inputs(model, feeds_list[0][0])
        feeds_list = [({k: v for k, v in f.items() if k not in frozen}, e) for f, e in feeds_list]
    feeds0 = feeds_list[0][0]
    specs = [InputSpec(n, tuple(a.shape), a.dtype.name) for n, a in feeds0.items()]
    ctx = PassContext(input_shapes={s.name: list(s.shape) for s in specs}, input_dtypes={s.name: s.dtype for s in specs}, ir_version=model.ir_version)
    try:
        optimized, _ = run_passes(model, load_config(PRESET).passes, ctx)
    except Exception as e:
        return done("pass-error", "ort-cannot-run", _first_line(e))
    # Our passes alone must not change ONNX Runtime's outputs.
    try:
        ref = run_ort(model, feeds0)
        try:
            got = run_ort(optimized, feeds0)
            keep = "yes" if _allclose(got, ref, case.rtol, case.atol) is None else "no"
        except Exception:
            keep = "no"
    except Exception:
        keep = "ort-cannot-run"
    from .tvm_build import build, import_relax, lower, unsupported_nodes
    from .target import resolve_target

    missing = unsupported_nodes(optimized)
    if missing:
        outcome = done("unsupported-import", keep, "no converter: " + ", ".join(sorted({m.split(" (")[1][:-1] for m in missing})))
        outcome.with_fallback = fallback_result(optimized, feeds_list, case)
        return outcome
    try:
        mod = import_relax(optimized, specs)
    except Exception as e:
        return done("unsupported-import", keep, _first_line(e))
    try:
        lowered, target = lower(mod, resolve_target("host"), "default")
        built = build(lowered, target)
    except Exception as e:
        return done("compile-error", keep, _first_line(e))
    import tvm

    try:
        vm = tvm.runtime.vm.VirtualMachine(built.executable, tvm.cpu())
        for feeds, expected in feeds_list:
            args = [tvm.runtime.tensor(np.require(feeds[s.name], requirements="C")) for s in specs]
            outputs = _flatten(vm["main"](*args))
            mismatch = _allclose(outputs, expected, case.rtol, case.atol)
            if mismatch:
                return done("numeric-mismatch", keep, mismatch)
    except Exception as e:
        return done("runtime-error", keep, _first_line(e))
    return done("pass", keep)


def fallback_result(optimized, feeds_list, case) -> str:
    """The test through per-subgraph fallback (autoglm_compile.partition): 'pass', 'pass-all-ort' (no node left on
    TVM), or the failure class. Counted apart from the TVM-alone results."""
    import numpy as np
    import tvm

    from .inputs import InputSpec
    from .measure import run_ort
    from .partition import TVM, plan
    from .target import resolve_target
    from .tvm_build import build, import_relax, lower

    try:
        p = plan(optimized, feeds_list[0][0])
        fns = {}
        for seg in p.segments:
            if seg.backend == TVM:
                specs = [InputSpec(t, tuple(p.tensor_types[t][0]), p.tensor_types[t][1]) for t in seg.inputs]
                lowered, target = lower(import_relax(seg.model, specs), resolve_target("host"), "default")
                fns[seg.index] = tvm.runtime.vm.VirtualMachine(build(lowered, target).executable, tvm.cpu())["main"]
    except Exception:
        return "compile-error"
    try:
        for feeds, expected in feeds_list:
            env = dict(feeds)
            for seg in p.segments:
                if seg.index in fns:
                    outs = _flatten(fns[seg.index](*[tvm.runtime.tensor(np.require(env[t], requirements="C")) for t in seg.inputs]))
                else:
                    outs = run_ort(seg.model, {t: env[t] for t in seg.inputs})
                env.update(zip(seg.outputs, outs))
            if _allclose([env[o.name] for o in optimized.graph.output], expected, case.rtol, case.atol):
                return "numeric-mismatch"
    except Exception:
        return "runtime-error"
    return "pass" if fns else "pass-all-ort"


def worker() -> None:
    """Read test names on stdin, one per line; write one JSON outcome per line on stdout."""
    import logging

    logging.disable(logging.WARNING)
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing else may write to the result channel
    cases = _load_cases()
    out.write("ready\n")
    for line in sys.stdin:
        name = line.strip()
        try:
            outcome = run_case(cases[name])
        except Exception as e:  # an exception that escaped the classification is still a result
            outcome = Outcome(name, "compile-error", "ort-cannot-run", _first_line(e))
        out.write(outcome.as_json() + "\n")


# ------------------------------------------------------------------------------------------------ the parent

class _Worker:
    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "autoglm_compile.conformance", "--worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )
        self.name: str | None = None
        self.started = 0.0
        self.ready = False

    def send(self, name: str) -> None:
        self.name, self.started = name, time.monotonic()
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def run_all(names: list[str], jobs: int, timeout: float, progress=None) -> list[Outcome]:
    pending = list(names)
    results: list[Outcome] = []
    workers = [_Worker() for _ in range(max(1, min(jobs, len(names))))]
    while pending or any(w.name for w in workers):
        for i, w in enumerate(workers):
            if w.ready and w.name is None and pending:
                w.send(pending.pop(0))
        fds = {w.proc.stdout.fileno(): w for w in workers}
        readable, _, _ = select.select(list(fds), [], [], 1.0)
        for fd in readable:
            w = fds[fd]
            line = w.proc.stdout.readline()
            if not line:  # the worker died
                if w.name is not None:
                    results.append(Outcome(w.name, "crash", "ort-cannot-run", f"worker exit code {w.proc.wait()}", time.monotonic() - w.started))
                    if progress:
                        progress(results[-1], len(results), len(names))
                workers[workers.index(w)] = _Worker()
                continue
            if line.strip() == "ready":
                w.ready = True
                continue
            results.append(Outcome(**json.loads(line)))
            w.name = None
            if progress:
                progress(results[-1], len(results), len(names))
        for i, w in enumerate(workers):
            if w.name is not None and time.monotonic() - w.started > timeout:
                w.kill()
                results.append(Outcome(w.name, "timeout", "ort-cannot-run", f"over {timeout:g} s", timeout))
                if progress:
                    progress(results[-1], len(results), len(names))
                workers[i] = _Worker()
    for w in workers:
        w.proc.stdin.close()
        w.kill()
    return sorted(results, key=lambda o: o.name)


def summarize(results: list[Outcome]) -> dict:
    counts = Counter(o.result for o in results)
    keep = Counter(o.passes_keep_ort for o in results)
    return {
        "total": len(results),
        "results": {r: counts.get(r, 0) for r in RESULTS},
        "unclassified": sum(v for k, v in counts.items() if k not in RESULTS),
        "passes_keep_ort_outputs": {k: keep.get(k, 0) for k in PASSES_KEEP},
        # TVM alone is 'results'; these add the unsupported-import tests that pass with --fallback onnxruntime
        "pass_with_fallback": counts.get("pass", 0) + sum(o.with_fallback in ("pass", "pass-all-ort") for o in results),
        "pass_with_fallback_all_ort": sum(o.with_fallback == "pass-all-ort" for o in results),
    }


def to_markdown(results: list[Outcome], summary: dict, command: str, versions: str) -> str:
    lines = [
        "# Conformance: ONNX backend node tests",
        "",
        f"Produced by `{command}` ({versions}). Each test runs through the host pipeline ({PRESET} passes → TVM import →",
        "build → run) and is compared with the suite's expected outputs at the suite's rtol/atol. Crashes and hangs",
        "are caught per test (worker subprocesses, a timeout per test). Test inputs used only as shape or axes",
        "parameters (Reshape's shape, Slice's starts, ...) are frozen to their test values, as a deployed model holds",
        "them constant; TVM still computes every op.",
        "",
        "| result | tests |",
        "|---|---:|",
    ]
    lines += [f"| {r} | {n} |" for r, n in summary["results"].items()]
    lines += [f"| **total** | {summary['total']} |", f"| unclassified | {summary['unclassified']} |", ""]
    if "pass_with_fallback" in summary:
        lines += [f"Passes with fallback (--fallback onnxruntime: nodes TVM's importer lacks run on ONNX Runtime): "
                  f"{summary['pass_with_fallback']} of {summary['total']}, of which {summary['pass_with_fallback_all_ort']} "
                  "ran with no node left on TVM (single-op tests of a missing op). The table above counts TVM alone.", ""]
    lines += ["Our graph passes alone, checked under ONNX Runtime on each test's inputs:", "", "| passes keep ONNX Runtime's outputs | tests |", "|---|---:|"]
    lines += [f"| {k} | {n} |" for k, n in summary["passes_keep_ort_outputs"].items()]
    by_op = Counter(o.detail for o in results if o.result == "unsupported-import" and o.detail.startswith("no converter"))
    lines += ["", "## Most frequent missing converters", "", "| missing | tests |", "|---|---:|"]
    lines += [f"| {d.removeprefix('no converter: ')} | {n} |" for d, n in by_op.most_common(25)]
    lines += ["", "## Every test", "", "| test | result | with fallback | passes keep ORT | detail |", "|---|---|---|---|---|"]
    lines += [f"| {o.name} | {o.result} | {o.with_fallback or ('pass' if o.result == 'pass' else '-')} | {o.passes_keep_ort} | {o.detail.replace('|', '/')[:160]} |" for o in results]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description="Run the ONNX backend node tests through autoglm-compile.")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="*", help="test names (default: all node tests)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    ap.add_argument("--write", type=Path, help="write the Markdown table here, and the JSON beside it")
    ap.add_argument("--floor", type=Path, help="a JSON written by an earlier run: fail if fewer tests pass now")
    args = ap.parse_args()
    if args.worker:
        worker()
        return
    floor = json.loads(args.floor.read_text())["summary"]["results"]["pass"] if args.floor else None  # before --write replaces it
    names = args.only or sorted(_load_cases())
    t0 = time.monotonic()

    def progress(o: Outcome, done: int, total: int) -> None:
        print(f"[{done}/{total}] {o.name}: {o.result} {o.detail[:100]}", file=sys.stderr, flush=True)

    results = run_all(names, args.jobs, args.timeout, progress)
    summary = summarize(results)
    summary["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(summary, indent=2))
    if args.write:
        import onnx
        import tvm

        command = "python -m autoglm_compile.conformance " + " ".join(a for a in sys.argv[1:])
        versions = f"onnx {onnx.__version__}, TVM {tvm.__version__}, {summary['seconds']:.0f} s with {args.jobs} workers"
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(to_markdown(results, summary, command, versions))
        args.write.with_suffix(".json").write_text(json.dumps({"summary": summary, "results": {o.name: o.result for o in results}}, indent=1, sort_keys=True) + "\n")
    if floor is not None:
        if summary["results"]["pass"] < floor:
            print(f"conformance regressed: {summary['results']['pass']} pass, the recorded floor is {floor}", file=sys.stderr)
            sys.exit(1)
    if summary["unclassified"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
