"""The report: a typed schema (written as report.json), a Markdown rendering, and a rich console table."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from .estimate import EstimateReport
from .partition import BackendChoice, FallbackReport, markdown as fallback_markdown, summary_row as fallback_row
from .pass_manager import PassRecord
from .precision import Budget, QuantizationReport

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
    metric: float | None = Field(None, description="the accuracy budget's metric (fp16/int8/mixed builds)")


class AccuracyReport(BaseModel):
    reference: str = "onnxruntime (CPU) on the source model"
    inputs: str = ""
    rtol: float
    atol: float
    ok: bool
    outputs: list[OutputError]
    budget: Budget | None = Field(None, description="fp16/int8/mixed: the accuracy budget checked instead of rtol/atol")

    def check_text(self) -> str:
        """What `ok` was decided by."""
        if self.budget is None:
            return f"rtol {self.rtol:g}, atol {self.atol:g}"
        values = [o.metric for o in self.outputs if o.metric is not None]
        worst = None
        for v in values:
            worst = v if worst is None else self.budget.worse(worst, v)
        return f"budget {self.budget.describe()}" + ("" if worst is None else f": {self.budget.metric} {worst:.6g}")


class LatencyReport(BaseModel):
    status: str  # measured | estimate | not measured
    reason: str | None = None
    estimate_ms: float | None = Field(None, description="with status 'estimate': the roofline estimate (see Report.estimate)")
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
    intermediate_bytes: int | None = Field(None, description="sum of the tensors TVM's VM materializes (each kernel's output), before the plan's reuse; against planned_activation_bytes it is what planning saved")
    workspace_bytes: int | None = Field(None, description="the largest global scratch space of one kernel")

    @property
    def planning_saved_bytes(self) -> int | None:
        if self.intermediate_bytes is None or self.planned_activation_bytes is None:
            return None
        return self.intermediate_bytes - self.planned_activation_bytes


class MemoryFitReport(BaseModel):
    """needed = weights + inputs + peak activations + workspace, against the target's usable memory (memory_fit.py)."""

    basis: str = Field(description="where the activations come from: TVM's static memory plan, or the ONNX graph liveness estimate made before building")
    weight_bytes: int
    input_bytes: int
    activation_bytes: int = Field(description="peak activations (outputs included)")
    workspace_bytes: int = 0
    needed_bytes: int
    graph_activation_bytes: int = Field(description="the graph liveness estimate of the activations, made before building")
    capacity_bytes: int | None = None
    capacity_source: str
    reserve_bytes: int | None = None
    reserve_rule: str = ""
    usable_bytes: int | None = None
    fits: bool | None = Field(None, description="None: the target gives no capacity")
    unknown_tensors: list[str] = Field(default_factory=list, description="tensors shape inference could not size (not counted)")
    note: str | None = None


class BucketReport(BaseModel):
    """One shape bucket of the artifact (variants/<name>): its latency and its error against ONNX Runtime."""

    name: str
    path: str
    inputs: list[dict[str, Any]]
    batch: int | None = Field(None, description="the first input's leading dim, when it differs between buckets")
    latency: LatencyReport | None = None
    baseline_p50_ms: float | None = None
    samples_per_s: float | None = Field(None, description="throughput x batch")
    accuracy_ok: bool | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    needed_bytes: int | None = None


class CpuNode(BaseModel):
    """A node that the target's runtime has no kernel for, which runs on the CPU (--fallback onnxruntime)."""

    name: str
    op: str
    domain: str = ""


class VendorReport(BaseModel):
    """The vendor-onnx backend (NPU targets): what the artifact holds for the vendor's runtime."""

    vendor: str
    runtime: str = Field(description="what runs model.onnx on the device, e.g. ONNX Runtime with CANNExecutionProvider")
    execution_provider: str
    provider_options: dict[str, Any] = {}
    opset: int
    ir_version: int
    op_list: str = Field(description="the supported-op list checked against, and its source")
    fallback: str = "none"
    cpu_nodes: list[CpuNode] = Field(default_factory=list, description="nodes outside the op list, run on the CPU")
    offline_command: str | None = None
    files: list[str] = []


class TuningTask(BaseModel):
    name: str
    weight: int = Field(description="how many calls of the model run this task's kernel")
    status: str = Field(description="cached (in the database, no trials now), tuned (in this run) or untuned (default schedule)")
    trials: int = Field(0, description="trials spent on this task, in this run and before (counted in the database)")
    best_us: float | None = Field(None, description="the schedule's measured time while tuning")
    default_schedule: bool = Field(False, description="the default schedule measured faster than every tuned one, and is kept")


class TuningReport(BaseModel):
    database: str = Field(description="this target's folder in the tuning database")
    target_key: str
    strict: bool = False
    tasks: int
    hits: int = Field(description="tasks found in the database (no trials)")
    shipped: int = Field(0, description="of the hits, tasks whose records came from a database shipped in the package")
    misses: int = Field(description="tasks to tune: not in the database, or tuned there with fewer trials than trials_per_task (resumed)")
    resumed: int = Field(0, description="misses that had records, tuned further from them")
    trials: int = Field(0, description="candidates measured in this run")
    trials_budget: int
    time_budget_s: float | None = None
    seconds: float = Field(0.0, description="the schedule stage: lookup, tuning and applying the database")
    stopped_by: str | None = Field(None, description="'time budget' when the budget ended tuning before the trials did")
    fell_back: bool = Field(False, description="the tuning subprocess crashed or timed out; tasks it had not measured use default schedules")
    reason: str | None = None
    untuned: list[str] = Field(default_factory=list, description="tasks left with their default schedule")
    exported: str | None = Field(None, description="--tune-export: the folder the missing tasks were written to, for tuning on the target")
    per_task: list[TuningTask] = Field(default_factory=list)


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
    estimate: EstimateReport | None = Field(None, description="roofline estimate from the target's peak FLOP/s and bandwidth")
    memory: MemoryReport | None = None
    tuning: TuningReport | None = None
    schedule: list[str] = Field(default_factory=list, description="what the schedule stage did beyond its strategy (GPU: split-K)")
    output_summary: list[dict[str, Any]] = Field(default_factory=list, description="per output: shape, mean, std, sum of |x| on the seeded inputs")
    vendor: VendorReport | None = None
    fallback: FallbackReport | None = Field(None, description="TVM / ONNX Runtime segments, when some nodes fell back (--fallback onnxruntime)")
    backend_choice: BackendChoice | None = Field(None, description="--backend auto: the TVM build against ONNX Runtime, and which the artifact runs")
    quantization: QuantizationReport | None = Field(None, description="int8/mixed: calibration, the accuracy budget, and the nodes kept in float")
    memory_fit: MemoryFitReport | None = Field(None, description="the memory the model needs against the target's capacity")
    buckets: list[BucketReport] = Field(default_factory=list, description="shape buckets: one compiled variant per set of input shapes")
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
    elif lat is not None and lat.estimate_ms is not None:
        rows.append(("latency", f"estimate {_ms(lat.estimate_ms)} (roofline, not measured: {lat.reason})"))
    elif lat is not None:
        rows.append(("latency", f"{lat.status}" + (f" ({lat.reason})" if lat.reason else "")))
    if r.estimate is not None:
        e = r.estimate
        rows.append(("roofline estimate", f"{_ms(e.total_ms)}: {_ms(e.compute_bound_ms)} compute-bound + {_ms(e.memory_bound_ms)} memory-bound + {_ms(e.overhead_ms)} launch ({e.kernels} kernels); {e.figures_from}"))
    if r.baseline is not None:
        b = r.baseline
        rows.append(("baseline", f"{b.runtime} p50 {_ms(b.stats.p50_ms)}; ours / baseline = {b.ratio:.2f}x"))
    if r.memory is not None:
        m = r.memory
        planned = "" if m.planned_activation_bytes is None else f", planned activations {_mib(m.planned_activation_bytes)} in {m.planned_storages} storages"
        rows.append(("memory", f"weights {_mib(m.weight_bytes)}{planned}, artifact {_mib(m.artifact_bytes)}, compile peak RSS {_mib(m.compile_peak_rss_bytes)}"))
        if m.planning_saved_bytes is not None and m.intermediate_bytes:
            rows.append(("memory planning", f"intermediate tensors {_mib(m.intermediate_bytes)} -> planned {_mib(m.planned_activation_bytes)}: saved {_mib(m.planning_saved_bytes)} ({m.planning_saved_bytes / m.intermediate_bytes:.0%})"))
    if r.memory_fit is not None:
        rows.append(("memory fit", fit_text(r.memory_fit)))
    if r.schedule:
        rows.append(("schedule", "; ".join(r.schedule)))
    if r.tuning is not None:
        t = r.tuning
        line = f"{t.tasks} tasks: {t.hits} cached" + (f" ({t.shipped} from the package's pre-tuned database)" if t.shipped else "") + f", {t.misses} missed" + (f" ({t.resumed} resumed)" if t.resumed else "") + f"; {t.trials} trials in {t.seconds:.1f} s; {len(t.untuned)} untuned"
        if t.stopped_by:
            line += f"; stopped by the {t.stopped_by}"
        if t.fell_back:
            line += f"; FELL BACK: {t.reason}"
        rows.append(("tuning", line + f" (database {t.database})"))
    for b in r.buckets:
        rows.append((f"bucket {b.name}", bucket_text(b)))
    if r.accuracy is not None:
        a = r.accuracy
        worst = max(a.outputs, key=lambda o: o.max_abs, default=None)
        rows.append(("accuracy", f"{'PASS' if a.ok else 'FAIL'} vs {a.reference} ({a.check_text()})" + (f"; max abs {worst.max_abs:.3g}, max rel {max(o.max_rel for o in a.outputs):.3g}" if worst else "")))
    elif r.accuracy_reason is not None:
        rows.append(("accuracy", f"not checked ({r.accuracy_reason})"))
    if r.vendor is not None:
        v = r.vendor
        rows.append(("vendor", f"{v.runtime}, opset {v.opset}; {len(v.cpu_nodes)} node(s) on the CPU (--fallback {v.fallback})"))
    if r.fallback is not None:
        rows.append(fallback_row(r.fallback))
    if r.backend_choice is not None:
        c = r.backend_choice
        rows.append(("backend (--backend auto)", f"packaged {c.chosen}: TVM build p50 {_ms(c.tvm_p50_ms)}, {c.runtime} p50 {_ms(c.onnxruntime_p50_ms)}"))
    if r.quantization is not None:
        rows += quantization_rows(r.quantization)
    if r.graph_verify is not None:
        rows.append(("graph verify", f"{'PASS' if r.graph_verify.ok else 'FAIL'} (optimized vs source on onnxruntime" + (f"; {r.graph_verify.check_text()})" if r.graph_verify.budget else ")")))
    rows.append(("result", r.result))
    return rows


def quantization_rows(q: QuantizationReport) -> list[tuple[str, str]]:
    c = q.calibration
    calib = f"{c.samples} sample(s), {c.method}, from {c.source}" + ("" if c.representative else " (NOT REPRESENTATIVE: synthetic random data)")
    return [
        ("quantization", f"{q.mode}: {q.format}; {q.quantized_nodes} node(s) quantized, {len(q.protected)} kept in float; {q.tool}, opset {q.opset}"),
        ("calibration", calib),
        ("accuracy budget", f"{q.budget}: {'met' if q.ok else 'NOT MET'} on ONNX Runtime with the QDQ model ({q.value:.6g}; {q.value_before:.6g} with every node quantized; {len(q.rounds) - 1} protection trial(s))"),
        ("int8 kernels", q.int8_kernels),
    ]


def quantization_markdown(q: QuantizationReport) -> list[str]:
    lines = ["", f"## Quantization ({q.mode})", ""]
    lines += [f"- {k}: {v}" for k, v in quantization_rows(q)]
    lines += [f"- contribution scan: {q.scanned} of {q.candidates} quantized activation tensors measured one by one; the quantization step took {q.seconds:.1f} s"]
    if q.rounds:
        shown = [p for p in q.rounds if p.round <= 1 or p.holds or p.round == q.rounds[-1].round]
        lines += ["", f"Protection trials: every node quantized (0), every activation in float (1), and those that met "
                      f"{q.search_budget or q.budget} ({len(shown)} of {len(q.rounds)} shown; the report's JSON has all):", "",
                  "| trial | tensors in float | nodes in float | metric | budget |", "|---:|---:|---:|---:|---|"]
        lines += [f"| {p.round} | {p.tensors} | {p.float_nodes} | {p.value:.6g} | {'met' if p.holds else 'not met'} |" for p in shown]
    if q.protected:
        lines += ["", "Nodes kept in float:", "", "| node | op | tensor | metric with it quantized | output cosine with only it in int8 | tensor SQNR (dB) | reason |", "|---|---|---|---:|---:|---:|---|"]
        lines += [f"| {n.name} | {n.op} | {n.tensor or '-'} | {'-' if n.trial_value is None else f'{n.trial_value:.6g}'} | {'-' if n.alone_cosine is None else f'{n.alone_cosine:.6g}'} | {'-' if n.local_sqnr_db is None else f'{n.local_sqnr_db:.1f}'} | {n.reason} |" for n in q.protected]
    return lines


def _bytes(n: int | None) -> str:  # decimal units, as the descriptors' memory_capacity_gb
    return "-" if n is None else f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def fit_text(f: MemoryFitReport) -> str:
    parts = f"weights {_bytes(f.weight_bytes)} + inputs {_bytes(f.input_bytes)} + activations {_bytes(f.activation_bytes)}" + (f" + workspace {_bytes(f.workspace_bytes)}" if f.workspace_bytes else "")
    text = f"needs {_bytes(f.needed_bytes)} ({parts}; {f.basis})"
    if f.usable_bytes is None:
        text += f"; not checked: {f.capacity_source}"
    else:
        text += f"; usable {_bytes(f.usable_bytes)} of {_bytes(f.capacity_bytes)} ({f.capacity_source}; {_bytes(f.reserve_bytes)} reserved): {'fits' if f.fits else 'DOES NOT FIT'}"
    return text + (f"; {f.note}" if f.note else "")


def bucket_text(b: BucketReport) -> str:
    shapes = " ".join(f"{i['name']}={'x'.join(str(d) for d in i['shape']) or 'scalar'}" for i in b.inputs)
    lat = b.latency
    if lat is not None and lat.stats is not None:
        perf = f"p50 {_ms(lat.stats.p50_ms)}, {lat.stats.throughput_per_s:.2f} runs/s" + (f" ({b.samples_per_s:.1f} samples/s)" if b.samples_per_s is not None else "")
        if b.baseline_p50_ms is not None:
            perf += f", onnxruntime p50 {_ms(b.baseline_p50_ms)}"
    elif lat is not None and lat.estimate_ms is not None:
        perf = f"estimate {_ms(lat.estimate_ms)} (roofline)"
    else:
        perf = lat.status if lat is not None else "not measured"
    acc = "accuracy not checked" if b.accuracy_ok is None else f"{'PASS' if b.accuracy_ok else 'FAIL'} max abs {b.max_abs:.3g}"
    return f"{shapes}: {perf}; {acc}"


def to_markdown(r: Report) -> str:
    lines = [f"# autoglm-compile report: {r.model}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(r)]
    lines += ["", "## Stages", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {s.name} | {s.seconds:.2f} |" for s in r.stages]
    if r.passes:
        lines += ["", "## Graph passes", "", "| pass | changed | nodes before | nodes after | ops before | ops after | seconds |", "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {p.name} | {p.changed} | {p.nodes_before} | {p.nodes_after} | {len(p.ops_before)} | {len(p.ops_after)} | {p.seconds:.2f} |" for p in r.passes]
    if r.buckets:
        lines += ["", "## Shape buckets", "", "| bucket | inputs | p50 | runs/s | samples/s | onnxruntime p50 | max abs | max rel | ok | needs |", "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
        for b in r.buckets:
            s = b.latency.stats if b.latency is not None else None
            shapes = ", ".join(f"{i['name']} {'x'.join(str(d) for d in i['shape'])}" for i in b.inputs)
            lines.append(f"| {b.name} | {shapes} | {_ms(s.p50_ms) if s else (b.latency.status if b.latency else '-')} | {f'{s.throughput_per_s:.2f}' if s else '-'} | "
                         f"{'-' if b.samples_per_s is None else f'{b.samples_per_s:.1f}'} | {_ms(b.baseline_p50_ms)} | {'-' if b.max_abs is None else f'{b.max_abs:.3g}'} | "
                         f"{'-' if b.max_rel is None else f'{b.max_rel:.3g}'} | {'-' if b.accuracy_ok is None else b.accuracy_ok} | {_bytes(b.needed_bytes)} |")
    if r.tuning is not None and r.tuning.per_task:
        lines += ["", "## Tuning tasks", "", "| task | weight | status | schedule | best |", "|---|---:|---|---|---:|"]
        lines += [f"| {t.name} | {t.weight} | {t.status} | {'default (faster)' if t.default_schedule else 'tuned' if t.best_us is not None else 'default (untuned)'} | {'-' if t.best_us is None else f'{t.best_us:.3g} µs'} |" for t in r.tuning.per_task]
    if r.accuracy is not None:
        a = r.accuracy
        metric = f" {a.budget.metric} |" if a.budget else ""
        lines += ["", f"## Accuracy ({a.check_text()}; inputs: {a.inputs})", "", f"| output | max abs | max rel |{metric} ok |", "|---|---:|---:|" + ("---:|" if a.budget else "") + "---|"]
        lines += [f"| {o.name} | {o.max_abs:.3g} | {o.max_rel:.3g} |" + (f" {o.metric:.6g} |" if a.budget and o.metric is not None else " - |" if a.budget else "") + f" {o.ok} |" for o in a.outputs]
    if r.quantization is not None:
        lines += quantization_markdown(r.quantization)
    if r.estimate is not None:
        e = r.estimate
        peaks = ", ".join(f"{k} {v / 1e12:g} TFLOP/s" for k, v in e.peak_flops.items())
        lines += ["", f"## Roofline estimate: {_ms(e.total_ms)}", "", f"Figures: {e.figures_from} ({peaks}; {e.memory_bandwidth_gbps:g} GB/s; ridge point {e.ridge_point:.1f} FLOP/byte).", ""]
        lines += [f"- {a}" for a in e.assumptions]
        lines += ["", "| op | type | MFLOP | MB | FLOP/byte | est. us | bound |", "|---|---|---:|---:|---:|---:|---|"]
        lines += [f"| {o.name} | {o.op_type} | {o.flops / 1e6:.3f} | {o.bytes / 1e6:.3f} | {o.intensity:.1f} | {o.ms * 1e3:.2f} | {o.bound} |" for o in e.top_ops]
        if e.skipped:
            lines += ["", f"Left out (shapes unknown): {', '.join(e.skipped)}"]
    if r.vendor is not None:
        v = r.vendor
        lines += ["", f"## Vendor runtime: {v.runtime}", "", f"- opset {v.opset}, IR version {v.ir_version}; provider options: {v.provider_options}", f"- operator coverage: {v.op_list}"]
        if v.offline_command:
            lines += [f"- offline conversion on the device: `{v.offline_command}`"]
        if v.cpu_nodes:
            lines += ["", f"Nodes outside the op list, on the CPU (--fallback {v.fallback}):", "", "| node | op |", "|---|---|"]
            lines += [f"| {n.name} | {n.domain + '.' if n.domain else ''}{n.op} |" for n in v.cpu_nodes]
    if r.fallback is not None:
        lines += fallback_markdown(r.fallback)
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
    if r.estimate is not None and r.estimate.top_ops:
        et = Table(title=f"roofline estimate: top ops ({r.estimate.figures_from})", title_justify="left")
        for col in ("op", "type", "est. us", "bound", "FLOP/byte"):
            et.add_column(col)
        for o in r.estimate.top_ops[:5]:
            et.add_row(o.name, o.op_type, f"{o.ms * 1e3:.2f}", o.bound, f"{o.intensity:.1f}")
        console.print(et)
    st = Table(title="stages", title_justify="left")
    st.add_column("stage")
    st.add_column("seconds", justify="right")
    for s in r.stages:
        st.add_row(s.name, f"{s.seconds:.2f}")
    console.print(st)
    for w in r.warnings:
        console.print(f"[yellow]warning:[/] {w}")
