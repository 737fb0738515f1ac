"""Fallback to ONNX Runtime per subgraph (--fallback onnxruntime, the default on TVM targets).

The optimized graph is cut, in its topological order, into a linear sequence of segments that alternate between
TVM and ONNX Runtime: a node that TVM's importer has no converter for starts (or extends) an ONNX Runtime segment,
every other node runs on TVM. Each segment is an ONNX subgraph with explicit inputs (graph inputs or tensors of
earlier segments) and outputs (tensors that later segments or the graph's outputs use). The shapes and dtypes of
the tensors at the cuts come from one ONNX Runtime run of the optimized graph on the verification inputs.

Each TVM segment is imported, lowered and built on its own, into its own library (segments/NN.tvm.so): one
library per segment keeps each import independent (from_onnx names its function 'main' and its kernels by op, so
merging modules would need renaming) and reuses the single-model path unchanged. Each ONNX Runtime segment is
an .onnx file (segments/NN.ort.onnx). The manifest lists the segments in order and records onnxruntime as a
runtime dependency; autoglm_compile.fallback_runtime runs them.

A TVM segment that still fails to import (the importer accepts the op but cannot convert this use of it) moves
whole to ONNX Runtime, with a warning in the report, rather than surfacing a TVM traceback.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper
from pydantic import BaseModel, Field

from .errors import InputError, UnsupportedError
from .inputs import InputSpec

FALLBACKS = ("onnxruntime", "none")
TVM, ORT = "tvm", "onnxruntime"


class FallbackNode(BaseModel):
    name: str
    op: str
    domain: str = ""
    segment: int
    reason: str = "no converter in TVM's ONNX importer"


class SegmentReport(BaseModel):
    index: int
    backend: str
    nodes: int
    inputs: list[str]
    outputs: list[str]
    file: str
    ms: float | None = Field(None, description="measured p50 of this segment, on this machine")


class FallbackReport(BaseModel):
    """What ran where: the segments in order, each fallback node, and the share of nodes (and time) per backend."""

    mode: str = "onnxruntime"
    segments: list[SegmentReport] = []
    fallback_nodes: list[FallbackNode] = []
    nodes: dict[str, int] = Field(default_factory=dict, description="nodes per backend")
    node_share: dict[str, float] = Field(default_factory=dict)
    time_ms: dict[str, float] = Field(default_factory=dict, description="measured p50 time per backend (sum of its segments)")
    time_share: dict[str, float] = Field(default_factory=dict)
    time_note: str | None = None


@dataclass
class Segment:
    index: int
    backend: str
    nodes: list[onnx.NodeProto]
    indices: list[int] = field(default_factory=list)  # the nodes' positions in the whole graph
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    model: onnx.ModelProto | None = None
    file: str = ""
    build: object = None  # tvm_build.BuildResult for a TVM segment
    lowered: object = None
    relax_mod: object = None


@dataclass
class Plan:
    segments: list[Segment]
    tensor_types: dict[str, tuple[list[int], str]]  # shape, dtype of every tensor at a cut
    fallback_nodes: list[FallbackNode]
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------- switches

def resolve_fallback(fallback: str | None) -> str:
    """--fallback on a TVM target: 'onnxruntime' (the default) or 'none'."""
    if fallback is None:
        return "onnxruntime"
    if fallback not in FALLBACKS:
        raise InputError(f"unknown --fallback '{fallback}'", f"valid values: {', '.join(FALLBACKS)}")
    return fallback


def unsupported(model: onnx.ModelProto) -> list[tuple[int, onnx.NodeProto]]:
    """(index, node) of the nodes that TVM's importer has no converter for."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    from .tvm_build import IMPORTER_DOMAINS

    known = _get_convert_map()
    return [(i, n) for i, n in enumerate(model.graph.node) if n.domain not in IMPORTER_DOMAINS or n.op_type not in known]


def _op(node: onnx.NodeProto) -> str:
    return f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def check_none(model: onnx.ModelProto) -> None:
    """--fallback none: any unsupported node is an UnsupportedError listing the nodes (name and op)."""
    bad = unsupported(model)
    if bad:
        shown = ", ".join(f"{n.name or f'#{i}'} ({_op(n)})" for i, n in bad[:20]) + (f" and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise UnsupportedError(f"TVM's ONNX importer cannot convert {len(bad)} node(s): {shown}", "allow ONNX Runtime to run them with --fallback onnxruntime (the default), or change the model")


# --------------------------------------------------------------------------------------------------- partition

def _subgraph_refs(graph: onnx.GraphProto, out: set[str]) -> None:
    """Names that a subgraph (If/Loop/Scan body) uses from outer scopes."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for node in graph.node:
        for t in node.input:
            if t and t not in defined:
                out.add(t)
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
                inner: set[str] = set()
                _subgraph_refs(g, inner)
                out.update(t for t in inner if t not in defined)
        defined.update(node.output)


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """A node's inputs, including the outer-scope names its subgraphs use."""
    names = [t for t in node.input if t]
    refs: set[str] = set()
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
            _subgraph_refs(g, refs)
    return names + sorted(refs - set(names))


def split(model: onnx.ModelProto, bad: set[int], cuts: set[int] = frozenset()) -> list[Segment]:
    """Consecutive nodes of the same backend, in the graph's (topological) order; a node in `cuts` also starts a
    new segment."""
    segments: list[Segment] = []
    for i, node in enumerate(model.graph.node):
        backend = ORT if i in bad else TVM
        if not segments or segments[-1].backend != backend or i in cuts:
            segments.append(Segment(index=len(segments), backend=backend, nodes=[]))
        segments[-1].nodes.append(node)
        segments[-1].indices.append(i)
    return segments


def wire(model: onnx.ModelProto, segments: list[Segment]) -> None:
    """Each segment's inputs (from outside it, not initializers) and outputs (used later or graph outputs)."""
    inits = {i.name for i in model.graph.initializer}
    graph_outputs = [o.name for o in model.graph.output]
    used_after: list[set[str]] = [set() for _ in segments]
    later: set[str] = set(graph_outputs)
    for k in range(len(segments) - 1, -1, -1):
        used_after[k] = set(later)
        for node in segments[k].nodes:
            later.update(node_inputs(node))
    for k, seg in enumerate(segments):
        produced: list[str] = []
        inputs: list[str] = []
        for node in seg.nodes:
            for t in node_inputs(node):
                if t not in inits and t not in produced and t not in inputs:
                    inputs.append(t)
            produced.extend(t for t in node.output if t)
        seg.inputs = inputs
        seg.outputs = [t for t in produced if t in used_after[k]]


def boundary_types(model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, tuple[list[int], str]]:
    """Shape and dtype of each named tensor, from one ONNX Runtime run of the model with them as extra outputs."""
    from .measure import run_ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    extra = [n for n in names if n not in have and n not in feeds]
    for n in extra:
        m.graph.output.append(onnx.ValueInfoProto(name=n))
    outs = run_ort(m, feeds)
    got = dict(zip([o.name for o in m.graph.output], outs))
    got.update(feeds)
    return {n: (list(np.asarray(got[n]).shape), np.asarray(got[n]).dtype.name) for n in names}


def _value_info(name: str, types: dict[str, tuple[list[int], str]]) -> onnx.ValueInfoProto:
    shape, dtype = types[name]
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape)


def segment_model(model: onnx.ModelProto, seg: Segment, types: dict[str, tuple[list[int], str]]) -> onnx.ModelProto:
    used: set[str] = set()
    for node in seg.nodes:
        used.update(node_inputs(node))
    inits = [i for i in model.graph.initializer if i.name in used]
    graph = helper.make_graph(
        list(seg.nodes), f"{model.graph.name or 'model'}_seg{seg.index}",
        [_value_info(t, types) for t in seg.inputs], [_value_info(t, types) for t in seg.outputs], initializer=inits,
    )
    out = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="autoglm-compile")
    out.ir_version = model.ir_version
    return out


def plan(model: onnx.ModelProto, feeds: dict[str, np.ndarray], bad: set[int] | None = None, cuts: set[int] = frozenset()) -> Plan:
    if bad is None:
        bad = {i for i, _ in unsupported(model)}
    segments = split(model, bad, cuts)
    wire(model, segments)
    segments = [s for s in segments if s.outputs]  # dead nodes (none after the passes' dead-code elimination)
    for k, s in enumerate(segments):
        s.index = k
    names = sorted({t for s in segments for t in s.inputs + s.outputs})
    types = boundary_types(model, names, feeds)
    for seg in segments:
        seg.model = segment_model(model, seg, types)
        seg.file = f"segments/{seg.index:02d}.{'tvm.so' if seg.backend == TVM else 'ort.onnx'}"
    nodes = [FallbackNode(name=n.name or f"#{i}", op=n.op_type, domain="" if n.domain in ("", "ai.onnx") else n.domain, segment=s.index)
             for s in segments if s.backend == ORT for i, n in zip(s.indices, s.nodes)]
    return Plan(segments=segments, tensor_types=types, fallback_nodes=nodes)


# ---------------------------------------------------------------------------------------------- pipeline stages

def needed(job) -> bool:
    """Whether the job's graph has nodes TVM cannot import; with --fallback none that is an error here."""
    if job.fallback == "none":
        check_none(job.model)
        return False
    return bool(unsupported(job.model))


MAX_ROUNDS = 200  # compile attempts while isolating nodes that TVM imports but cannot lower or build


def _compile_segment(job, seg: Segment, types) -> object:
    """Import, lower and build one TVM segment: its BuildResult, or the first line of why TVM failed. A CompileError
    other than UnsupportedError (--tune-strict, a bad strategy) is the user's and propagates."""
    from .errors import CompileError
    from .measure import has_qdq
    from .tvm_build import ScheduleContext, build, import_relax, lower

    specs = [InputSpec(t, tuple(types[t][0]), types[t][1]) for t in seg.inputs]
    step = "import"
    try:
        mod = import_relax(seg.model, specs)
        if has_qdq(seg.model):  # as in pipeline.stage_import: float kernels on float weights
            from .int8_kernels import fold_dequantized_constants

            mod = fold_dequantized_constants(mod)
        step = "lowering"
        ctx = ScheduleContext.from_config(job.target, job.config, job.progress)
        try:
            lowered, job.tvm_target = lower(mod, job.target, job.config.schedule.strategy, ctx)
        finally:
            job.report.tuning = ctx.tuning or job.report.tuning  # the last tuned segment's (one report per build)
            job.report.warnings += [w for w in ctx.warnings if w not in job.report.warnings]
            job.report.schedule += [f"segment {seg.index}: {n}" for n in ctx.notes]
        step = "build"
        return build(lowered, job.tvm_target)
    except UnsupportedError as e:
        return f"TVM {step} failed: {e}"
    except CompileError:
        raise
    except Exception as e:  # TVM raises many types; a segment it cannot take runs on ONNX Runtime instead
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "cannot" in ln.lower() or "not supported" in ln.lower()), lines[-1] if lines else "")
        return f"TVM {step} failed: {type(e).__name__}: {detail.strip()[:200]}"


def stage_import(job, cause: str | None = None) -> None:
    """Partition the graph, then import, lower and build each TVM segment (all here, so that a node TVM imports
    but cannot lower or build is isolated): a failing segment is bisected until the failing node is found, which
    then runs on ONNX Runtime; the cuts made while searching are dropped once it is found. `cause`: why the
    whole-model build failed, when that sent the job here."""
    bad = {i for i, _ in unsupported(job.model)}
    reasons: dict[int, str] = {}
    cuts: set[int] = set()
    cache: dict[tuple[int, ...], object] = {}
    warnings = [f"the whole-model TVM build failed ({cause}); isolating the nodes TVM cannot take"] if cause else []
    for _ in range(MAX_ROUNDS):
        p = plan(job.model, job.feeds, bad, cuts)
        failed = None
        for seg in p.segments:
            if seg.backend != TVM:
                continue
            key = tuple(seg.indices)
            if key not in cache:
                job.progress.update(f"segment of {len(key)} nodes")
                cache[key] = _compile_segment(job, seg, p.tensor_types)
            if isinstance(cache[key], str):
                failed = (seg, cache[key])
                break
            seg.build = cache[key]
        if failed is None:
            break
        seg, why = failed
        if len(seg.indices) == 1:
            bad.add(seg.indices[0])
            reasons[seg.indices[0]] = why
            cuts = set()  # retry the neighbours whole
        else:
            cuts.add(seg.indices[len(seg.indices) // 2])
    else:  # out of rounds: whatever still fails runs on ONNX Runtime
        for seg in p.segments:
            if seg.backend == TVM and isinstance(cache.get(tuple(seg.indices)), str):
                bad.update(seg.indices)
                reasons.update({i: cache[tuple(seg.indices)] for i in seg.indices})
        p = plan(job.model, job.feeds, bad, cuts)
        for seg in p.segments:
            if seg.backend == TVM:
                seg.build = cache.get(tuple(seg.indices)) or _compile_segment(job, seg, p.tensor_types)
                if isinstance(seg.build, str):
                    raise UnsupportedError(f"TVM cannot build a segment of {len(seg.nodes)} nodes: {seg.build}", "run with --fallback none to see the first failure, and report it")
    for n, i in zip(p.fallback_nodes, (i for s in p.segments if s.backend == ORT for i in s.indices)):
        if i in reasons:
            n.reason = reasons[i]
    for i, why in sorted(reasons.items()):
        node = job.model.graph.node[i]
        warnings.append(f"node {node.name or f'#{i}'} ({_op(node)}) runs on ONNX Runtime: {why}")
    p.warnings = warnings
    job.partition = p
    job.report.warnings += warnings
    job.report.fallback = report(job)
    tvm_nodes = sum(len(s.nodes) for s in p.segments if s.backend == TVM)
    job.progress.note(f"fallback: {len(p.fallback_nodes)} node(s) on ONNX Runtime, {tvm_nodes} on TVM, in {len(p.segments)} segments")


def recover(job, error: BaseException) -> bool:
    """The whole-model lowering or build raised: with --fallback onnxruntime, partition instead (stage_import
    isolates the failing nodes) and return True; otherwise (or for a user error) False, and the caller re-raises."""
    from .errors import CompileError

    if job.fallback != "onnxruntime" or isinstance(error, CompileError) or not isinstance(error, Exception):
        return False
    if isinstance(error, (ImportError, NameError, SyntaxError)):  # a bug in this package, not an op TVM lacks: exit 1
        return False
    lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
    stage_import(job, cause=f"{type(error).__name__}: {(lines[-1] if lines else '').strip()[:200]}")
    return True


def stage_schedule(job) -> None:
    """Nothing left: each TVM segment was lowered and built in stage_import, where a failing node can be isolated."""


def stage_build(job) -> None:
    from .tvm_build import BuildResult, export

    root = job.staging.path
    (root / "segments").mkdir(exist_ok=True)
    figures = None
    for seg in job.partition.segments:
        if seg.backend == TVM:
            export(seg.build, str(root / seg.file), job.target, job.tvm_target)
            figures = seg.build.figures if figures is None else figures + seg.build.figures
        else:
            onnx.save(seg.model, str(root / seg.file))
    job.build = BuildResult(executable=None, figures=figures)


def manifest_entries(job) -> dict:
    """What the manifest of a partitioned artifact adds: the segments in order and the runtime dependencies."""
    import onnxruntime
    import tvm

    p = job.partition

    def io(names):
        return [{"name": t, "shape": p.tensor_types[t][0], "dtype": p.tensor_types[t][1]} for t in names]

    return {
        "library": None,
        "backend": "tvm+onnxruntime",
        "segments": [{"index": s.index, "backend": s.backend, "file": s.file, "nodes": len(s.nodes), "inputs": io(s.inputs), "outputs": io(s.outputs)} for s in p.segments],
        "runtime_dependencies": {"apache-tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
    }


def report(job) -> FallbackReport:
    p = job.partition
    counts = {TVM: 0, ORT: 0}
    for s in p.segments:
        counts[s.backend] += len(s.nodes)
    total = max(1, sum(counts.values()))
    return FallbackReport(
        mode=job.fallback,
        segments=[SegmentReport(index=s.index, backend=s.backend, nodes=len(s.nodes), inputs=s.inputs, outputs=s.outputs, file=s.file) for s in p.segments],
        fallback_nodes=p.fallback_nodes, nodes=counts, node_share={k: v / total for k, v in counts.items()},
    )


def measure_split(job, compiled, runs: int = 5) -> None:
    """Time each segment (p50 of a few runs) and add the per-backend split to the fallback report."""
    fr = job.report.fallback
    if fr is None or not hasattr(compiled, "segment_times"):
        return
    times = compiled.segment_times(job.feeds, runs)
    per = {TVM: 0.0, ORT: 0.0}
    for s, ms in zip(fr.segments, times):
        s.ms = ms
        per[s.backend] += ms
    total = sum(per.values()) or 1.0
    fr.time_ms = per
    fr.time_share = {k: v / total for k, v in per.items()}
    fr.time_note = f"p50 of {runs} runs per segment, on the verification inputs; tensor hand-over between segments not counted"


def markdown(fr: FallbackReport) -> list[str]:
    share = ", ".join(f"{k} {fr.nodes.get(k, 0)} ({fr.node_share.get(k, 0):.0%})" for k in (TVM, ORT))
    lines = ["", f"## Backends (--fallback {fr.mode})", "", f"Nodes: {share}." + (
        " Time: " + ", ".join(f"{k} {v:.3f} ms ({fr.time_share.get(k, 0):.0%})" for k, v in fr.time_ms.items()) + f" ({fr.time_note})." if fr.time_ms else ""), ""]
    lines += ["| segment | backend | nodes | inputs | outputs | p50 |", "|---:|---|---:|---|---|---:|"]
    lines += [f"| {s.index} | {s.backend} | {s.nodes} | {', '.join(s.inputs)} | {', '.join(s.outputs)} | {'-' if s.ms is None else f'{s.ms:.3f} ms'} |" for s in fr.segments]
    if fr.fallback_nodes:
        lines += ["", "Nodes on ONNX Runtime:", "", "| node | op | segment | why |", "|---|---|---:|---|"]
        lines += [f"| {n.name} | {n.domain + '.' if n.domain else ''}{n.op} | {n.segment} | {n.reason} |" for n in fr.fallback_nodes]
    return lines


def summary_row(fr: FallbackReport) -> tuple[str, str]:
    text = f"{fr.nodes.get(TVM, 0)} nodes on TVM ({fr.node_share.get(TVM, 0):.0%}), {fr.nodes.get(ORT, 0)} on ONNX Runtime in {len(fr.segments)} segments"
    if fr.time_ms:
        text += "; time " + ", ".join(f"{k} {fr.time_share.get(k, 0):.0%}" for k in fr.time_ms)
    return ("fallback", text)


# ---------------------------------------------------------------------------------------------- --backend auto

BACKENDS = ("tvm", "auto")


class BackendChoice(BaseModel):
    """--backend auto: the TVM build against the whole optimized model on ONNX Runtime; the faster is packaged.
    The report's latency stays TVM's own either way."""

    chosen: str = Field(description="what the artifact runs: tvm (with any fallback segments) or onnxruntime (the whole model)")
    tvm_p50_ms: float
    onnxruntime_p50_ms: float
    threads: int | None = None
    runtime: str = "onnxruntime (CPU, all graph optimizations, the optimized graph)"


def check_backend_option(backend: str, target) -> None:
    if backend not in BACKENDS:
        raise InputError(f"unknown --backend '{backend}'", f"valid values: {', '.join(BACKENDS)}")
    if backend == "auto":
        if target.backend != "tvm":
            raise InputError(f"--backend auto is for TVM targets; target '{target.name}' uses {target.backend}", "leave it out")
        elsewhere = target.not_runnable_here()
        if elsewhere is not None:
            raise InputError(f"--backend auto measures both backends on this machine, and target '{target.name}' does not run here: {elsewhere}", "leave it out, or build on the device")


def choose_backend(job, compiled) -> None:
    """Time ONNX Runtime on the optimized graph as the TVM build was timed; if it is faster, repackage the artifact
    as one ONNX Runtime segment and check it against the reference."""
    from .artifact import dir_size, file_hashes
    from .errors import AccuracyError
    from .measure import compare, ort_session, time_runs
    from .runtime import LIBRARY, MANIFEST, load as load_artifact, restore_affinity

    r = job.report
    if r.latency is None or r.latency.stats is None:
        r.warnings.append(f"--backend auto: the TVM build was not timed ({r.latency.reason if r.latency else 'no measurement'}); the artifact runs TVM")
        return
    m = job.config.measure
    runs = job.opts.runs or m.runs
    restore_affinity()
    sess = ort_session(job.model, threads=compiled.threads)
    with job.progress.stage("measure: ONNX Runtime (--backend auto)"):
        stats = time_runs(lambda: sess.run(None, job.feeds), m.warmup, runs, min(m.min_runs, runs), m.max_seconds)
    tvm_ms, ort_ms = r.latency.stats.p50_ms, stats.p50_ms
    chosen = ORT if ort_ms < tvm_ms else TVM
    r.backend_choice = BackendChoice(chosen=chosen, tvm_p50_ms=tvm_ms, onnxruntime_p50_ms=ort_ms, threads=compiled.threads)
    if chosen == TVM:
        return
    import shutil

    import onnxruntime
    import tvm

    root = job.staging.path
    (root / LIBRARY).unlink(missing_ok=True)
    shutil.rmtree(root / "segments", ignore_errors=True)
    (root / "segments").mkdir()
    onnx.save(job.model, str(root / "segments" / "00.ort.onnx"))
    manifest = json.loads((root / MANIFEST).read_text())
    manifest.update(
        library=None, backend="onnxruntime",
        segments=[{"index": 0, "backend": ORT, "file": "segments/00.ort.onnx", "nodes": len(job.model.graph.node), "inputs": manifest["inputs"], "outputs": manifest["outputs"]}],
        runtime_dependencies={"apache-tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
    )
    from .runfiles import write_run_files

    write_run_files(root, manifest)  # now onnxruntime is needed: requirements-runtime.txt and RUN.md again
    manifest["files"] = file_hashes(root)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if r.memory is not None:
        r.memory.artifact_bytes = dir_size(root)
    v = job.config.verify
    result = compare(load_artifact(root)(job.feeds), job.reference, job.output_names, v.rtol, v.atol, job.config.accuracy_budget)
    if not result.ok:
        raise AccuracyError("--backend auto: the ONNX Runtime artifact does not match the reference", "leave out --backend auto and report the bug")
    r.warnings.append(f"--backend auto packaged ONNX Runtime (p50 {ort_ms:.3f} ms) over the TVM build (p50 {tvm_ms:.3f} ms); the latency above is TVM's own")
