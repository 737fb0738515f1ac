"""The report: a typed schema (written as report.json), a Markdown rendering, and a rich console table."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from .pass_manager import PassRecord

REPORT_VERSION = 1


class LatencyStats(BaseModel):
    runs: int
    warmup: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    throughput_per_s: float


class OutputError(BaseModel):
    name: str
    max_abs: float
    max_rel: float
    ok: bool
    shape_mismatch: bool = False


class AccuracyReport(BaseModel):
    reference: str = "onnxruntime (CPU) on the source model"
    inputs: str = ""
    rtol: float
    atol: float
    ok: bool
    outputs: list[OutputError]


class LatencyReport(BaseModel):
    status: str  # measured | estimate | not measured
    reason: str | None = None
    threads: int | None = None
    stats: LatencyStats | None = None


class BaselineReport(BaseModel):
    runtime: str
    threads: int | None = None
    stats: LatencyStats
    ratio: float = Field(description="our p50 / baseline p50 (below 1 is faster than the baseline)")


class MemoryReport(BaseModel):
    weight_bytes: int
    planned_activation_bytes: int | None = Field(None, description="sum of the storages of TVM's static memory plan")
    planned_storages: int | None = None
    artifact_bytes: int | None = None
    compile_peak_rss_bytes: int


class StageTiming(BaseModel):
    name: str
    seconds: float


class Report(BaseModel):
    report_version: int = REPORT_VERSION
    tool_version: str
    model: str
    frontend: str
    target: str
    target_kind: str
    config: str
    precision: str = "fp32"
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    stages: list[StageTiming] = []
    passes: list[PassRecord] = []
    graph_verify: AccuracyReport | None = None
    accuracy: AccuracyReport | None = None
    accuracy_reason: str | None = Field(None, description="why the build's outputs were not compared with ONNX Runtime")
    latency: LatencyReport | None = None
    baseline: BaselineReport | None = None
    memory: MemoryReport | None = None
    output_summary: list[dict[str, Any]] = Field(default_factory=list, description="per output: shape, mean, std, sum of |x| on the seeded inputs")
    warnings: list[str] = []
    result: str = "ok"  # ok | accuracy-failed | budget-failed


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} ms" if x < 10 else f"{x:.1f} ms"


def summary_rows(r: Report) -> list[tuple[str, str]]:
    """The headline figures, shared by the console table and the Markdown."""
    rows = [("model", f"{r.model} ({r.frontend})"), ("target", f"{r.target} ({r.target_kind})"), ("config", f"{r.config} ({r.precision})")]
    lat = r.latency
    if lat is not None and lat.stats is not None:
        s = lat.stats
        rows.append(("latency", f"p50 {_ms(s.p50_ms)}  mean {_ms(s.mean_ms)}  p90 {_ms(s.p90_ms)}  p99 {_ms(s.p99_ms)}  min {_ms(s.min_ms)}  max {_ms(s.max_ms)}  ({s.runs} runs, {lat.threads} threads)"))
        rows.append(("throughput", f"{s.throughput_per_s:.2f} /s"))
    elif lat is not None:
        rows.append(("latency", f"{lat.status}" + (f" ({lat.reason})" if lat.reason else "")))
    if r.baseline is not None:
        b = r.baseline
        rows.append(("baseline", f"{b.runtime} p50 {_ms(b.stats.p50_ms)}; ours / baseline = {b.ratio:.2f}x"))
    if r.memory is not None:
        m = r.memory
        rows.append(("memory", f"weights {_mib(m.weight_bytes)}, planned activations {_mib(m.planned_activation_bytes)} in {m.planned_storages} storages, artifact {_mib(m.artifact_bytes)}, compile peak RSS {_mib(m.compile_peak_rss_bytes)}"))
    if r.accuracy is not None:
        a = r.accuracy
        worst = max(a.outputs, key=lambda o: o.max_abs, default=None)
        rows.append(("accuracy", f"{'PASS' if a.ok else 'FAIL'} vs {a.reference} (rtol {a.rtol:g}, atol {a.atol:g})" + (f"; max abs {worst.max_abs:.3g}, max rel {max(o.max_rel for o in a.outputs):.3g}" if worst else "")))
    elif r.accuracy_reason is not None:
        rows.append(("accuracy", f"not checked ({r.accuracy_reason})"))
    if r.graph_verify is not None:
        rows.append(("graph verify", f"{'PASS' if r.graph_verify.ok else 'FAIL'} (optimized vs source on onnxruntime)"))
    rows.append(("result", r.result))
    return rows


def to_markdown(r: Report) -> str:
    lines = [f"# autoglm-compile report: {r.model}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(r)]
    lines += ["", "## Stages", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {s.name} | {s.seconds:.2f} |" for s in r.stages]
    if r.passes:
        lines += ["", "## Graph passes", "", "| pass | changed | nodes before | nodes after | ops before | ops after | seconds |", "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {p.name} | {p.changed} | {p.nodes_before} | {p.nodes_after} | {len(p.ops_before)} | {len(p.ops_after)} | {p.seconds:.2f} |" for p in r.passes]
    if r.accuracy is not None:
        lines += ["", f"## Accuracy (rtol {r.accuracy.rtol:g}, atol {r.accuracy.atol:g}; inputs: {r.accuracy.inputs})", "", "| output | max abs | max rel | ok |", "|---|---:|---:|---|"]
        lines += [f"| {o.name} | {o.max_abs:.3g} | {o.max_rel:.3g} | {o.ok} |" for o in r.accuracy.outputs]
    if r.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in r.warnings]
    return "\n".join(lines) + "\n"


def print_report(r: Report, console) -> None:
    from rich.table import Table

    table = Table(title=f"autoglm-compile: {r.model}", show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    for k, v in summary_rows(r):
        style = "red" if ("FAIL" in v or (k == "result" and v != "ok")) else None
        table.add_row(k, v, style=style)
    console.print(table)
    if r.passes:
        pt = Table(title="graph passes", title_justify="left")
        for col in ("pass", "nodes", "ops", "seconds", "stats"):
            pt.add_column(col)
        for p in r.passes:
            stats = ", ".join(f"{k}={v}" for k, v in p.stats.items())
            pt.add_row(p.name, f"{p.nodes_before} → {p.nodes_after}", f"{len(p.ops_before)} → {len(p.ops_after)}", f"{p.seconds:.2f}", stats)
        console.print(pt)
    st = Table(title="stages", title_justify="left")
    st.add_column("stage")
    st.add_column("seconds", justify="right")
    for s in r.stages:
        st.add_row(s.name, f"{s.seconds:.2f}")
    console.print(st)
    for w in r.warnings:
        console.print(f"[yellow]warning:[/] {w}")
