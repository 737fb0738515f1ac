"""The compile pipeline, as one straight list of stages:

    load → validate → passes → verify → import → schedule → build → package → measure → report

Each stage is a function of the Job; the loop in `compile_model` times it and shows progress. The artifact is
staged beside the output path and swapped in only when every check has passed (a failed budget still writes it,
since the build is correct; a failed accuracy check does not).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx

from . import __version__
from .artifact import REPORT_FILES, Staging, dir_size, file_hashes, sha256, write_archive
from .config import PipelineConfig, apply_tune_flags, load_config
from .errors import AccuracyError, BudgetError, CompileError, InputError
from .frontends import LoadedModel, load
from .inputs import RANDOM_INPUT_RULE, InputSpec, index_ranges, random_inputs, resolve_inputs
from .measure import compare, has_qdq, ort_session, run_ort, time_runs
from .pass_manager import PassContext, run_passes
from .report import BaselineReport, LatencyReport, MemoryReport, Report, StageTiming, to_markdown
from .runtime import FORMAT_VERSION, LIBRARY, MANIFEST
from .target import TargetDescriptor, resolve_target
from .toolchain import check_toolchain
from . import vendor


@dataclass
class CompileOptions:
    source: str
    target: str = "host"
    output: Path | None = None
    preset: str = "O2"
    config_path: Path | None = None
    input_shapes: list[str] = field(default_factory=list)
    dims: list[str] = field(default_factory=list)
    trust_pickle: bool = False
    weights: str | None = None
    archive: bool = False
    seed: int | None = None
    runs: int | None = None
    verify_each_pass: bool = False
    precision: str | None = None  # fp16: convert-float16, or ToMixedPrecision on CUDA targets; None: what the config says
    cuda_graph: bool | None = None  # --cuda-graph / --no-cuda-graph (CUDA targets); None: the config's, else on
    max_latency_ms: float | None = None
    max_error: float | None = None
    max_memory_mb: float | None = None  # budget on the memory the model needs (memory_fit; MB = 10^6 bytes; exit 4)
    fallback: str | None = None  # onnxruntime | none (NPU targets: nodes outside the vendor's op list); None: none
    tune: bool = False  # --tune: schedule.strategy 'tune'; each tune_* below implies it
    tune_trials: int | None = None
    tune_time: str | float | None = None  # seconds or a duration: '90s', '10m', '1h30m'
    tuning_db: Path | None = None
    tune_strict: bool = False
    tune_export: Path | None = None  # --tune-export DIR: tasks missing from the database, for tuning on the target
    backend: str = "tvm"  # --backend auto: package ONNX Runtime instead when it is faster (partition.choose_backend)
    sample_inputs: Path | None = None  # --sample-inputs: an .npz (arrays by input name) or a folder of them
    input_values: list[str] = field(default_factory=list)  # --input-value NAME=V: scalar inputs frozen as constants
    calib_data: Path | None = None  # --calib-data (int8/mixed): an .npz or a folder of them, as --sample-inputs
    calib_method: str | None = None  # --calib-method minmax|entropy|percentile
    calib_synthetic: bool = False  # --calib-synthetic: random calibration data, marked "not representative"
    accuracy_budget: str | None = None  # --accuracy-budget METRIC>=X / METRIC<=X (fp16/int8/mixed; exit 4 if unmet)

    def resolved_output(self) -> Path:
        if self.output is not None:
            return Path(self.output)
        stem = Path(self.source.split(":")[-1]).stem if ":" in self.source else Path(self.source).stem
        return Path("build") / stem


class Progress:
    """Silent progress; the CLI passes a rich one."""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        yield

    def note(self, text: str) -> None:
        pass

    def update(self, text: str) -> None:
        """The running stage's status line (e.g. tuning: tasks done, trials, best latency)."""


@dataclass
class Job:
    opts: CompileOptions
    config: PipelineConfig
    target: TargetDescriptor
    progress: Progress
    staging: Staging
    loaded: LoadedModel | None = None
    model: onnx.ModelProto | None = None  # the current graph
    inputs: list[InputSpec] = field(default_factory=list)
    feeds: dict[str, np.ndarray] = field(default_factory=dict)
    reference: list[np.ndarray] = field(default_factory=list)  # ONNX Runtime on the source model
    output_names: list[str] = field(default_factory=list)
    relax_mod: object = None
    lowered: object = None
    tvm_target: object = None
    build: object = None
    report: Report | None = None
    fallback: str = "none"
    input_rule: str = RANDOM_INPUT_RULE  # where the verification inputs came from (stated in the report)
    samples: list = field(default_factory=list)  # (file, feeds, reference) of the sample inputs after the first
    partition: object = None  # partition.Plan when some nodes run on ONNX Runtime (--fallback onnxruntime)
    int8: object = None  # int8_kernels.Int8Summary: the int8 x int8 -> int32 rewrite of a QDQ model (CPU and CUDA targets)


# ------------------------------------------------------------------------------------------------------ stages

def stage_load(job: Job) -> None:
    job.loaded = load(job.opts.source, job.opts.input_shapes, job.opts.trust_pickle, job.opts.weights)
    if job.opts.input_values:  # before the passes, so control flow on a frozen input folds
        from .samples import freeze_inputs

        job.loaded.model = freeze_inputs(job.loaded.model, job.opts.input_values)
    job.model = job.loaded.model


def stage_validate(job: Job) -> None:
    model = job.model
    # PyTorch entries were given their shapes at export; ONNX models take --input-shape / --dim here.
    shapes = job.opts.input_shapes if job.loaded.frontend == "onnx" else []
    samples = []
    if job.opts.sample_inputs is not None:
        from . import samples as _samples

        samples = _samples.load_samples(job.opts.sample_inputs)
        if job.loaded.frontend == "onnx":  # dynamic dims left open take the first sample's
            given = {s.split("=")[0] for s in shapes}
            shapes = list(shapes) + _samples.sample_shapes(model, samples[0][1], given)
    job.inputs = resolve_inputs(model, shapes, job.opts.dims)
    job.output_names = [o.name for o in model.graph.output]
    from .memory_fit import check_graph

    check_graph(job)  # before anything is allocated for the reference run: a model too large for the target fails here
    if samples:
        _samples.check_samples(samples, job.inputs)
        job.feeds = samples[0][1]
        job.input_rule = _samples.describe(job.opts.sample_inputs, len(samples))
    else:
        seed = job.config.verify.seed if job.opts.seed is None else job.opts.seed
        job.feeds = random_inputs(job.inputs, seed, index_ranges(model))
    try:
        job.reference = run_ort(model, job.feeds)
        job.samples = [(f, feeds, run_ort(model, feeds)) for f, feeds in samples[1:]]
    except Exception as e:
        raise InputError(f"ONNX Runtime cannot run the source model: {str(e).strip().splitlines()[0][:300]}", "the reference run failed: check the model and the input shapes") from None


def _check_graph(job: Job, model: onnx.ModelProto, what: str, budget=None):
    """The graph against the source model on ONNX Runtime: rtol/atol, or the accuracy budget where one is given."""
    v = job.config.verify
    try:
        got = run_ort(model, job.feeds)
    except Exception as e:
        raise AccuracyError(f"{what}: ONNX Runtime cannot run the optimized graph: {str(e).strip().splitlines()[0][:300]}", "run with -O0 to skip the graph passes, and report the bug") from None
    return compare(got, job.reference, job.output_names, v.rtol, v.atol, budget)


def stage_passes(job: Job) -> None:
    ctx = PassContext(
        input_shapes={s.name: list(s.shape) for s in job.inputs},
        input_dtypes={s.name: s.dtype for s in job.inputs},
        ir_version=job.model.ir_version,
        log=job.progress.note,
    )
    each = job.config.verify.each_pass or job.opts.verify_each_pass
    previous = [job.model]

    def after_pass(name: str, model: onnx.ModelProto) -> None:
        from .config import PRECISION_PASSES

        # A pass that lowers the precision is held to the accuracy budget; the others to rtol/atol.
        result = _check_graph(job, model, f"after pass '{name}'", job.config.accuracy_budget if name in PRECISION_PASSES else None)
        if not result.ok:
            from .bisect import first_differing_node

            bad = next(o for o in result.outputs if not o.ok)
            where = first_differing_node(previous[0], model, job.feeds, result.rtol, result.atol)
            raise AccuracyError(
                f"pass '{name}' changed the outputs: '{bad.name}' max abs error {bad.max_abs:.3g} ({result.check_text()}); first differing node: {where or 'none of the shared tensors'}",
                f"leave '{name}' out of the config and report the bug",
            )
        previous[0] = model

    job.model, records = run_passes(job.model, job.config.passes, ctx, on_pass=lambda n: job.progress.note(f"pass {n}"), after_pass=after_pass if each else None)
    job.report.passes = records
    if job.config.precision in ("int8", "mixed"):  # calibrated QDQ, accuracy-driven protection (quantize.py)
        from .quantize import quantize_graph

        quantize_graph(job)


def stage_verify(job: Job) -> None:
    if not job.config.verify.graph:
        return
    result = _check_graph(job, job.model, "after the graph stage", job.config.accuracy_budget)
    for _file, feeds, ref in job.samples:  # the other sample inputs: the worst error per output
        result = _worst(result, compare(run_ort(job.model, feeds), ref, job.output_names, result.rtol, result.atol, result.budget))
    result.inputs = job.input_rule
    job.report.graph_verify = result
    if not result.ok and _user_budget(job):  # a budget the user gave: exit 4 at the end, the artifact is written
        job.report.warnings.append(f"graph verify: the accuracy budget is not met ({result.check_text()})")
    elif not result.ok:
        bad = next(o for o in result.outputs if not o.ok)
        raise AccuracyError(f"the graph passes changed output '{bad.name}' (max abs {bad.max_abs:.3g})", "rerun with --verify-each-pass to find the pass")


def stage_import(job: Job) -> None:
    from .tvm_build import import_relax
    from . import partition

    if partition.needed(job):  # nodes TVM cannot import: TVM / ONNX Runtime segments (--fallback none: exit 2 here)
        partition.stage_import(job)
        return
    job.relax_mod = import_relax(job.model, job.inputs)
    if job.config.precision in ("int8", "mixed") and job.target.kind in ("cpu", "cuda"):  # int8 kernels where the target has a dot product
        from .int8_kernels import apply

        apply(job)
    if has_qdq(job.model):  # what the int8 rewrite left, or a QDQ model built in float: float kernels on float weights
        from .int8_kernels import fold_dequantized_constants

        job.relax_mod = fold_dequantized_constants(job.relax_mod)


def stage_schedule(job: Job) -> None:
    from .tvm_build import ScheduleContext, lower

    if job.partition is not None:
        from .partition import stage_schedule as schedule_segments

        return schedule_segments(job)
    ctx = ScheduleContext.from_config(job.target, job.config, job.progress)
    ctx.prepack_weights = bool(job.int8 and job.int8.packed)  # int8 kernels read their weights packed (int8_kernels.py)
    try:
        job.lowered, job.tvm_target = lower(job.relax_mod, job.target, job.config.schedule.strategy, ctx)
    except Exception as e:  # --fallback onnxruntime: isolate the nodes TVM cannot lower (partition.recover)
        from .partition import recover

        if not recover(job, e):
            raise
    finally:
        job.report.tuning = ctx.tuning or job.report.tuning
        job.report.warnings += ctx.warnings
        job.report.schedule += ctx.notes
    if job.int8 is not None and job.lowered is not None and job.report.quantization is not None:
        from .int8_kernels import describe, dot_kernels

        job.report.quantization.int8_kernels = describe(job.int8, dot_kernels(job.lowered, cuda=job.target.kind == "cuda"))


def stage_build(job: Job) -> None:
    from .tvm_build import build, export

    if job.partition is not None:
        from .partition import stage_build as build_segments

        return build_segments(job)
    try:
        job.build = build(job.lowered, job.tvm_target)
    except Exception as e:  # --fallback onnxruntime: isolate the nodes TVM cannot build (partition.recover)
        from .partition import recover, stage_build as build_segments

        if not recover(job, e):
            raise
        return build_segments(job)
    from .memory_fit import check_plan

    check_plan(job, job.build.figures)  # TVM's memory plan and kernel workspace against the target's memory
    export(job.build, str(job.staging.path / LIBRARY), job.target, job.tvm_target)


def stage_package(job: Job) -> None:
    root = job.staging.path
    onnx.save(job.model, str(root / "model.opt.onnx"))
    (root / "verify").mkdir()
    np.savez(root / "verify" / "inputs.npz", **job.feeds)
    np.savez(root / "verify" / "expected.npz", **dict(zip(job.output_names, job.reference)))
    import onnxruntime
    import tvm

    manifest = {
        "format_version": FORMAT_VERSION,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "library": LIBRARY,
        "inputs": [s.as_dict() for s in job.inputs],
        "outputs": [{"name": n, "shape": list(a.shape), "dtype": a.dtype.name} for n, a in zip(job.output_names, job.reference)],
        "target": {
            "name": job.target.name,
            "kind": job.target.kind,
            "device": "cuda" if job.target.kind == "cuda" else "cpu",
            "tvm": job.target.tvm_target(),
            "descriptor": job.target.model_dump(exclude={"source"}),
        },
        "verify": {"inputs": "verify/inputs.npz", "expected": "verify/expected.npz", "rtol": job.config.verify.rtol, "atol": job.config.verify.atol,
                   **({"budget": job.config.accuracy_budget.model_dump()} if job.config.accuracy_budget else {})},
        "versions": {"autoglm_compile": __version__, "tvm": tvm.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
        "source": {"model": job.opts.source, "frontend": job.loaded.frontend, "sha256": sha256(job.loaded.source_file) if job.loaded.source_file else None},
        "config": job.config.model_dump(),
        "files": file_hashes(root),
        "reports": list(REPORT_FILES),
    }
    if job.partition is not None:
        from .partition import manifest_entries

        manifest.update(manifest_entries(job))
    from .runfiles import write_run_files

    write_run_files(root, manifest)  # requirements-runtime.txt and RUN.md, hashed with the rest
    manifest["files"] = file_hashes(root)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def stage_measure(job: Job) -> None:
    from .runtime import load as load_artifact, restore_affinity

    r = job.report
    r.memory = MemoryReport(
        # the weights as built (packed, Winograd-transformed) where TVM runs the whole model, else the ONNX model's
        weight_bytes=(job.build.figures.constant_bytes if job.build.figures is not None and job.partition is None else 0)
        or sum(onnx.numpy_helper.to_array(t).nbytes for t in job.model.graph.initializer),
        planned_activation_bytes=job.build.planned_bytes,
        planned_storages=job.build.storages,
        artifact_bytes=dir_size(job.staging.path),
        compile_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        intermediate_bytes=job.build.figures.tensor_bytes if job.build.figures is not None else None,
        workspace_bytes=job.build.figures.workspace_bytes if job.build.figures is not None else None,
    )
    elsewhere = job.target.not_runnable_here()
    r.estimate = roofline_estimate(job)
    if elsewhere is not None:
        # Built for another machine: nothing runs here. The graph verify (optimized ONNX vs source ONNX under ONNX
        # Runtime) still ran; the build itself is checked on the device (autoglm-compile run ARTIFACT --check).
        r.accuracy_reason = f"the build was not run against ONNX Runtime: {elsewhere}; only the optimized ONNX was verified (graph verify), run 'autoglm-compile run ARTIFACT --check' on the device"
        if r.estimate is None:
            r.latency = LatencyReport(status="not measured", reason=f"{elsewhere}, and the target has no figures for a roofline estimate")
        else:
            r.latency = LatencyReport(status="estimate", reason=elsewhere, estimate_ms=r.estimate.total_ms)
        return
    # Run the artifact as a user would: loaded from its folder by the runtime.
    compiled = load_artifact(job.staging.path)
    outputs = compiled(job.feeds)
    v = job.config.verify
    r.accuracy = compare(outputs, job.reference, job.output_names, v.rtol, v.atol, job.config.accuracy_budget)
    for _file, feeds, ref in job.samples:
        r.accuracy = _worst(r.accuracy, compare(compiled(feeds), ref, job.output_names, v.rtol, v.atol, job.config.accuracy_budget))
    r.accuracy.inputs = job.input_rule
    r.output_summary = [summarize(n, a) for n, a in zip(job.output_names, outputs)]
    if not r.accuracy.ok and not _user_budget(job):
        return  # no point timing a wrong build (a build that misses the user's accuracy budget is correct: timed)
    m = job.config.measure
    if not m.enabled:
        r.latency = LatencyReport(status="not measured", reason="measure.enabled is false")
        return
    threads = compiled.threads
    runs = job.opts.runs or m.runs
    args = compiled.prepare(job.feeds)
    with job.progress.stage("measure: TVM"):
        stats = time_runs(lambda: compiled.run_prepared(args), m.warmup, runs, min(m.min_runs, runs), m.max_seconds)
    r.latency = LatencyReport(status="measured", threads=threads, stats=stats)
    if job.partition is not None:
        from .partition import measure_split

        measure_split(job, compiled)
    if m.baseline:
        restore_affinity()
        with job.progress.stage("measure: ONNX Runtime"):
            qdq = job.config.precision in ("int8", "mixed")  # int8: ONNX Runtime's int8 kernels on the same QDQ model
            sess = ort_session(job.model if qdq else job.loaded.model, threads=threads)
            base = time_runs(lambda: sess.run(None, job.feeds), m.warmup, runs, min(m.min_runs, runs), m.max_seconds)
        what = "the QDQ model, model.opt.onnx" if qdq else "source model"
        r.baseline = BaselineReport(runtime=f"onnxruntime (CPU, all graph optimizations, {what})", threads=threads, stats=base, ratio=stats.p50_ms / base.p50_ms)
    if job.opts.backend == "auto":  # package the faster of the TVM build and ONNX Runtime (partition.choose_backend)
        from .partition import choose_backend

        choose_backend(job, compiled)


def _worst(a, b):
    """Two accuracy results on different inputs as one: per output, the larger errors; ok only if both are."""
    outs = [x.model_copy(update={"max_abs": max(x.max_abs, y.max_abs), "max_rel": max(x.max_rel, y.max_rel), "ok": x.ok and y.ok,
                                 "shape_mismatch": x.shape_mismatch or y.shape_mismatch,
                                 "metric": x.metric if a.budget is None or x.metric is None or y.metric is None else a.budget.worse(x.metric, y.metric)})
            for x, y in zip(a.outputs, b.outputs)]
    return a.model_copy(update={"ok": a.ok and b.ok, "outputs": outs})


def _user_budget(job: Job) -> bool:
    """Whether an accuracy budget the user gave is in force (a failure is then exit 4, not 3)."""
    budget = job.config.accuracy_budget
    return budget is not None and budget.source == "user"


def roofline_estimate(job: Job):
    """The roofline estimate of the optimized graph on the target (autoglm_compile.estimate), or None with a
    warning when the target has no peak FLOP/s or bandwidth."""
    from .estimate import estimate_for_target

    try:
        return estimate_for_target(job.model, job.target, {s.name: list(s.shape) for s in job.inputs})
    except ValueError as e:
        job.report.warnings.append(f"no roofline estimate: {e}")
        return None


def summarize(name: str, a: np.ndarray) -> dict:
    a64 = np.asarray(a, dtype=np.float64)
    return {"name": name, "shape": list(a.shape), "dtype": a.dtype.name, "mean": float(a64.mean()), "std": float(a64.std()), "abs_sum": float(np.abs(a64).sum())}


def stage_report(job: Job) -> None:
    root = job.staging.path
    (root / "report.json").write_text(job.report.model_dump_json(indent=2) + "\n")
    (root / "report.md").write_text(to_markdown(job.report))


STAGES: list[tuple[str, Callable[[Job], None]]] = [
    ("load", stage_load),
    ("validate", stage_validate),
    ("passes", stage_passes),
    ("verify", stage_verify),
    ("import", stage_import),
    ("schedule", stage_schedule),
    ("build", stage_build),
    ("package", stage_package),
    ("measure", stage_measure),
    ("report", stage_report),
]

# The vendor-onnx backend (NPU targets, autoglm_compile/vendor.py): the same graph stages, whose passes end with
# decompose-ops and convert-opset to the vendor's opset (vendor.adapt_config); then the vendor's operator coverage
# instead of TVM import, schedule and build; the artifact is the vendor-ready ONNX with a runner.
VENDOR_STAGES: list[tuple[str, Callable[[Job], None]]] = [
    ("load", stage_load),
    ("validate", stage_validate),
    ("passes", stage_passes),
    ("verify", stage_verify),
    ("coverage", vendor.stage_coverage),
    ("package", vendor.stage_package),
    ("measure", vendor.stage_measure),
    ("report", stage_report),
]


def resolve_config(opts: CompileOptions, target: TargetDescriptor | None = None) -> PipelineConfig:
    precision = opts.precision if target is None else vendor.default_precision(target, opts.precision)
    if opts.precision is None and precision is not None and load_config(opts.preset, opts.config_path).precision in ("int8", "mixed"):
        precision = None  # the config's precision.mode int8/mixed wins over an NPU's fp16 preference
    cuda = target is not None and target.kind == "cuda" and target.backend == "tvm"
    cfg = load_config(opts.preset, opts.config_path, precision, relax_fp16=cuda)
    if target is not None and target.backend == "vendor-onnx":
        cfg = vendor.adapt_config(cfg, target)
    if target is not None and opts.config_path is None:
        from .config import adapt_to_target

        adapt_to_target(cfg, target.kind)  # O3 on CUDA: no fuse-attention (the report says so)
    if opts.cuda_graph is not None:
        cfg.schedule.cuda_graph = opts.cuda_graph
    if cfg.schedule.cuda_graph is None and target is not None:
        cfg.schedule.cuda_graph = cuda
    if opts.verify_each_pass:
        cfg.verify.each_pass = True
    if opts.seed is not None:
        cfg.verify.seed = opts.seed
    if opts.tune or opts.tune_trials is not None or opts.tune_time is not None or opts.tuning_db is not None or opts.tune_strict or opts.tune_export is not None:
        apply_tune_flags(cfg, opts.tune_trials, opts.tune_time, opts.tuning_db, opts.tune_strict, opts.tune_export)
    from .quantize import apply_precision_flags

    return apply_precision_flags(cfg, opts)  # --calib-*, --accuracy-budget; int8 without calibration data: exit 2


def compile_model(opts: CompileOptions, progress: Progress | None = None) -> Report:
    """Compile and verify; returns the report. Raises a CompileError subclass on a user error, a failed accuracy
    check (AccuracyError, nothing written) or a failed budget (BudgetError, the artifact is written)."""
    progress = progress or Progress()
    from .buckets import plan_buckets

    buckets = plan_buckets(opts)  # --input-shape x=1x3x224x224,8x3x224x224 or --dim batch=1,4,8: one variant per bucket
    if buckets is not None and len(buckets) > 1:
        from .buckets import compile_buckets

        return compile_buckets(opts, buckets, progress)
    if buckets is not None:
        opts = dataclasses.replace(opts, input_shapes=buckets[0].input_shapes, dims=buckets[0].dims)
    target = resolve_target(opts.target)  # bad target and config fail before any work
    config = resolve_config(opts, target)
    check_toolchain(target)  # a target this machine cannot build for fails here too
    if config.schedule.strategy == "tune":
        from .tuning import check_tunable

        check_tunable(target, config.tune)
    if target.backend == "tvm":
        from .partition import resolve_fallback

        fallback = resolve_fallback(opts.fallback)  # default onnxruntime: per-subgraph fallback (partition.py)
    else:
        fallback = vendor.resolve_fallback(target, opts.fallback)
    if opts.backend != "tvm":
        from .partition import check_backend_option

        check_backend_option(opts.backend, target)
    needed = "int8" if config.precision == "mixed" else config.precision  # mixed: int8, the rest in float
    if needed not in target.precisions:
        raise InputError(f"target '{target.name}' does not support {needed}", f"its precisions: {', '.join(target.precisions)}")
    output = opts.resolved_output()
    staging = Staging(output)
    job = Job(opts=opts, config=config, target=target, progress=progress, staging=staging, fallback=fallback)
    job.report = Report(
        tool_version=__version__, model=opts.source, frontend="?", target=target.name, target_kind=target.kind,
        config=config.name, precision=config.precision, inputs=[], outputs=[],
    )
    from .config import PRESET_SKIPS

    job.report.warnings += [f"pass '{n}' of {config.name} left out on {target.kind} targets: {PRESET_SKIPS[target.kind][n]}" for n in config.skipped]
    try:
        for name, fn in VENDOR_STAGES if target.backend == "vendor-onnx" else STAGES:
            t0 = time.perf_counter()
            with progress.stage(name):
                try:
                    fn(job)
                finally:
                    job.report.stages.append(StageTiming(name=name, seconds=time.perf_counter() - t0))
            if name == "validate":
                job.report.frontend = job.loaded.frontend
                job.report.inputs = [s.as_dict() for s in job.inputs]
                job.report.outputs = [{"name": n, "shape": list(a.shape), "dtype": a.dtype.name} for n, a in zip(job.output_names, job.reference)]
            if name == "measure" and job.report.accuracy is not None and not job.report.accuracy.ok and not _user_budget(job):
                job.report.result = "accuracy-failed"
                bad = next(o for o in job.report.accuracy.outputs if not o.ok)
                raise AccuracyError(
                    f"the build does not match ONNX Runtime: output '{bad.name}' max abs {bad.max_abs:.3g}, max rel {bad.max_rel:.3g} ({job.report.accuracy.check_text()})",
                    "no artifact was written; try -O0 to rule out the graph passes, and report the bug",
                )
        failures = check_budgets(job.report, opts)
        if failures:
            job.report.result = "budget-failed"
            stage_report(job)
        staging.commit()
        if opts.archive:
            write_archive(staging.output)
        if failures:
            raise BudgetError("; ".join(failures), f"the artifact was written to {staging.output}; the budget is not met")
        return job.report
    except CompileError as e:
        e.report = job.report  # the CLI still prints what was measured
        raise
    finally:
        staging.discard()


def check_budgets(report: Report, opts: CompileOptions) -> list[str]:
    failures = []
    if opts.max_latency_ms is not None:
        lat = report.latency
        if lat is None or lat.stats is None:
            failures.append(f"--max-latency-ms {opts.max_latency_ms:g}: latency was not measured ({lat.reason if lat else 'no measurement'})")
        elif lat.stats.p50_ms > opts.max_latency_ms:
            failures.append(f"p50 latency {lat.stats.p50_ms:.3f} ms exceeds --max-latency-ms {opts.max_latency_ms:g}")
    if opts.max_error is not None:
        acc = report.accuracy
        worst = max((o.max_abs for o in acc.outputs), default=0.0) if acc else None
        if worst is None:
            failures.append(f"--max-error {opts.max_error:g}: accuracy was not measured on this machine")
        elif worst > opts.max_error:
            failures.append(f"max abs error {worst:.3g} exceeds --max-error {opts.max_error:g}")
    if opts.max_memory_mb is not None:
        fit = report.memory_fit
        if fit is None:
            failures.append(f"--max-memory-mb {opts.max_memory_mb:g}: the memory the model needs was not estimated")
        elif fit.needed_bytes > opts.max_memory_mb * 1e6:
            failures.append(f"the model needs {fit.needed_bytes / 1e6:.1f} MB ({fit.basis}), more than --max-memory-mb {opts.max_memory_mb:g}")
    from .quantize import accuracy_budget_failures

    failures += accuracy_budget_failures(report)  # a user's accuracy budget (--accuracy-budget) not met
    return failures
