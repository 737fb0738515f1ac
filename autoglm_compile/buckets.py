"""Shape buckets: one artifact that holds one compiled variant per set of input shapes.

    --input-shape x=1x3x224x224,8x3x224x224        two buckets for input x (the same: --input-shape given twice)
    --input-shape ids=1x128,8x128:int64             a dtype applies to every shape of the list
    --dim batch=1,4,8                               three buckets: the symbolic dim 'batch' set to 1, then 4, then 8
    --dim batch=1..8                                a range: 1, 2, 4, 8 (from A, doubling, up to B; B included)

Bucket k takes the k-th value of every option that lists several values; an option with one value applies to every
bucket. Options that list several values must list the same number: they are zipped, not crossed (batch 8 of
input_ids goes with batch 8 of attention_mask). A build where nothing lists several values is the ordinary
single-shape build, artifact layout unchanged.

The artifact:

    ARTIFACT/manifest.json        the buckets (name, folder, input and output shapes), hashes of every variant's files
    ARTIFACT/variants/b0/...      a complete single-shape artifact: model.so, manifest.json, verify/, report.json, ...
    ARTIFACT/variants/b1/...
    ARTIFACT/report.json, report.md   latency, throughput and error per bucket

Each variant is built by the whole pipeline at its shapes, so each is verified against ONNX Runtime and measured on
its own, and every feature of a single build (fallback segments, tuning, --backend auto, other targets) works per
bucket. autoglm_compile.load() returns a BucketedModel (bucket_runtime.py) that picks the variant whose input shapes
equal the inputs' and loads it on its first use; a shape outside every bucket is an ArtifactError naming the buckets.

Why one TVM build per bucket rather than one build with a symbolic batch dim (TVM Relax's dynamic shapes):
- a static shape is what the rest of the pipeline measures and checks: TVM's static memory plan (the memory-fit
  check and the planned-memory figures need sizes known at build time; with a symbolic dim the storages are sized at
  run time), MetaSchedule tuning (its tasks are static workloads) and the fallback partition's cut tensors;
- and on this machine the dynamic build was not faster. `python benchmarks/dynamic_shapes.py --batches 1 4 8
  --size 64 --runs 10` (zoo.small_cnn at 64x64, default lowering, 2 threads, 2-core AMD EPYC znver4, a shared
  machine at load average 10.2) measured dynamic / static p50: batch 1 1.14x, batch 4 1.08x, batch 8 1.28x; an
  earlier run with --batches 1 8 --runs 5 at load 3.6: 1.26x and 0.88x. Static and dynamic were timed back to back
  for each batch, and their outputs were identical.
The cost is size: each variant holds its own copy of the weights (in model.so and model.opt.onnx).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import AccuracyError, BudgetError, CompileError, InputError
from .inputs import parse_dim, parse_input_shape

VARIANTS = "variants"
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


@dataclass(frozen=True)
class Bucket:
    name: str
    input_shapes: list[str]  # single-shape --input-shape texts
    dims: list[str]  # single-value --dim texts

    @property
    def label(self) -> str:
        return " ".join([*self.input_shapes, *self.dims])


def _split_shape(text: str) -> tuple[str, list[str]]:
    """'x=1x3,8x3:int64' -> ('x', ['x=1x3:int64', 'x=8x3:int64']), each checked by inputs.parse_input_shape."""
    name, sep, rest = text.strip().partition("=")
    if not sep or not name or not rest:
        parse_input_shape(text)  # raises the usual message
    dims, colon, dtype = rest.partition(":")
    suffix = f":{dtype}" if colon else ""
    shapes = [f"{name}={d.strip()}{suffix}" for d in dims.split(",")]
    for s in shapes:
        try:
            parse_input_shape(s)
        except InputError as e:
            raise InputError(f"bad --input-shape '{text}': {e}", "write NAME=1x3x224x224 or, for several buckets, NAME=1x3x224x224,8x3x224x224[:dtype]") from None
    return name, shapes


def _expand_range(text: str, lo: int, hi: int) -> list[int]:
    if lo <= 0 or hi < lo:
        raise InputError(f"bad --dim range '{text}'", "write DIM=A..B with 0 < A <= B, e.g. --dim batch=1..8 (1, 2, 4, 8)")
    out, v = [], lo
    while v < hi:
        out.append(v)
        v *= 2
    return out + [hi]


def _split_dim(text: str) -> tuple[str, list[str]]:
    """'batch=1,4,8' or 'batch=1..8' -> ('batch', ['batch=1', ...]), each checked by inputs.parse_dim."""
    name, sep, value = text.strip().partition("=")
    values: list[int] = []
    for part in value.split(",") if sep else [value]:
        m = _RANGE.match(part.strip())
        if m:
            values += _expand_range(text, int(m[1]), int(m[2]))
        else:
            values.append(parse_dim(f"{name}={part.strip()}")[1] if sep and name else parse_dim(text)[1])
    if len(set(values)) != len(values):
        raise InputError(f"--dim '{text}' lists a value twice", "give each value once")
    return name, [f"{name}={v}" for v in values]


def plan_buckets(opts) -> list[Bucket] | None:
    """The buckets asked for by opts.input_shapes and opts.dims; None when nothing lists several values (and no range
    or repeated name is used), i.e. an ordinary single-shape build with the options as they are."""
    special = any("," in t for t in opts.input_shapes) or any("," in t or ".." in t for t in opts.dims)
    names = [t.partition("=")[0].strip() for t in opts.input_shapes]
    dim_names = [t.partition("=")[0].strip() for t in opts.dims]
    if not special and len(set(names)) == len(names) and len(set(dim_names)) == len(dim_names):
        return None
    lists: dict[tuple[str, str], list[str]] = {}
    for text in opts.input_shapes:
        name, shapes = _split_shape(text)
        lists.setdefault(("--input-shape", name), []).extend(shapes)
    for text in opts.dims:
        name, values = _split_dim(text)
        lists.setdefault(("--dim", name), []).extend(values)
    for (opt, name), values in lists.items():
        seen = [v for i, v in enumerate(values) if v in values[:i]]
        if seen:
            raise InputError(f"{opt} gives {seen[0]} twice", "list each shape or value once")
    counts = {key: len(v) for key, v in lists.items() if len(v) > 1}
    n = max(counts.values(), default=1)
    if any(c != n for c in counts.values()):
        listed = ", ".join(f"{opt} {name}: {c}" for (opt, name), c in counts.items())
        raise InputError(f"options that list several values must list the same number ({listed})", "bucket k takes the k-th value of each: give every multi-valued --input-shape and --dim the same number of values")
    buckets = []
    for k in range(n):
        pick = {key: values[k if len(values) > 1 else 0] for key, values in lists.items()}
        buckets.append(Bucket(f"b{k}", [v for (opt, _), v in pick.items() if opt == "--input-shape"], [v for (opt, _), v in pick.items() if opt == "--dim"]))
    return buckets


# ------------------------------------------------------------------------------------------------------- build

def _leading_batch(reports) -> list[int | None]:
    """The first input's leading dim per bucket, when it differs between buckets (the batch), else None."""
    firsts = [r.inputs[0]["shape"][0] if r.inputs and r.inputs[0]["shape"] else None for r in reports]
    return firsts if None not in firsts and len(set(firsts)) > 1 else [None] * len(reports)


def compile_buckets(opts, buckets: list[Bucket], progress):
    """Build every bucket with the whole pipeline into variants/<name> of one staged artifact; then write the
    manifest that lists them, check that load() dispatches each bucket's inputs to its variant, and report."""
    from .artifact import Staging, dir_size, write_archive
    from .pipeline import check_budgets, compile_model, stage_report
    from .runtime import FORMAT_VERSION, MANIFEST
    from .target import resolve_target

    target = resolve_target(opts.target)  # a bad target fails before any work
    if opts.sample_inputs is not None:
        raise InputError("--sample-inputs cannot be combined with shape buckets yet", "build one artifact per shape with --sample-inputs, or leave it out: each bucket is verified on seeded inputs")
    staging = Staging(opts.resolved_output())
    reports, manifests = [], []
    try:
        for b in buckets:
            sub = dataclasses.replace(opts, input_shapes=b.input_shapes, dims=b.dims, output=staging.path / VARIANTS / b.name,
                                      archive=False, max_latency_ms=None, max_error=None, max_memory_mb=None)
            progress.note(f"bucket {b.name}: {b.label}")
            try:
                r = compile_model(sub, progress)
            except CompileError as e:
                wrapped = type(e)(f"bucket {b.name} ({b.label}): {e}", e.hint)
                wrapped.report = getattr(e, "report", None)
                raise wrapped from None
            same = next((o for o, ro in zip(buckets, reports) if ro.inputs == r.inputs), None)
            if same is not None:
                raise InputError(f"buckets {same.name} ({same.label}) and {b.name} ({b.label}) give the model the same input shapes",
                                 "check the names: --dim takes a symbolic dim of the model, --input-shape an input name")
            reports.append(r)
            manifests.append(json.loads((staging.path / VARIANTS / b.name / MANIFEST).read_text()))
        root = staging.path
        manifest = bucket_manifest(buckets, manifests, FORMAT_VERSION)
        manifest["files"].update(write_bucket_run_files(root, buckets, manifests))
        (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        report = combined_report(buckets, reports, manifests)
        report.memory.artifact_bytes = dir_size(root) if report.memory is not None else None
        if target.not_runnable_here() is None:
            check_dispatch(root, manifest)
        failures = []
        for b, r in zip(buckets, reports):
            failures += [f"bucket {b.name}: {f}" for f in check_budgets(r, opts)]
        job = _ReportJob(staging, report)
        if failures:
            report.result = "budget-failed"
        stage_report(job)
        staging.commit()
        if opts.archive:
            write_archive(staging.output)
        if failures:
            error = BudgetError("; ".join(failures), f"the artifact was written to {staging.output}; the budget is not met")
            error.report = report
            raise error
        return report
    except CompileError as e:
        if getattr(e, "report", None) is None:
            e.report = reports[-1] if reports else None
        raise
    finally:
        staging.discard()


@dataclass
class _ReportJob:  # what pipeline.stage_report reads
    staging: object
    report: object


def write_bucket_run_files(root: Path, buckets: list[Bucket], manifests: list[dict]) -> dict[str, str]:
    """requirements-runtime.txt (every variant's lines, once) and RUN.md at the top of a bucketed artifact; returns
    their hashes for the manifest. Each variant keeps its own pair, for a device that gets one variant only."""
    from .artifact import sha256
    from .runfiles import REQUIREMENTS, RUN

    lines: list[str] = []
    for b in buckets:
        for line in (root / VARIANTS / b.name / REQUIREMENTS).read_text().splitlines():
            if line not in lines:
                lines.append(line)
    (root / REQUIREMENTS).write_text("\n".join(lines) + "\n")
    shapes = "\n".join(f"- `{b.name}` ({VARIANTS}/{b.name}): " + ", ".join(f"{i['name']} {i['dtype']}[{','.join(map(str, i['shape']))}]" for i in m["inputs"])
                       for b, m in zip(buckets, manifests))
    (root / RUN).write_text(f"""# Running this artifact

It holds {len(buckets)} shape buckets, each a complete artifact of its own:

{shapes}

Install what requirements-runtime.txt lists (or carry `autoglm-compile bundle-runtime` output), then

    import autoglm_compile
    model = autoglm_compile.load(".")      # picks the bucket by the inputs' shapes; loads a variant on first use
    outputs = model({{"name": array, ...}})  # a shape outside every bucket is an error naming the buckets

`autoglm-compile run . --check` runs and checks every bucket's stored inputs; each variants/<bucket>/RUN.md has the
check for that bucket alone.
""")
    return {name: sha256(root / name) for name in (REQUIREMENTS, RUN)}


def bucket_manifest(buckets: list[Bucket], manifests: list[dict], format_version: int) -> dict:
    """The top-level manifest: the buckets in order, the inputs with their shape per bucket, the variants' files
    (hashed in each variant's manifest; the variants' manifests and reports, which hold created_at and measurements,
    are not hashed, as in a single artifact)."""
    first = manifests[0]

    def per_bucket(key: str) -> list[dict]:
        return [{"name": io["name"], "dtype": io["dtype"], "shapes": [next(x["shape"] for x in m[key] if x["name"] == io["name"]) for m in manifests]} for io in first[key]]

    files = {f"{VARIANTS}/{b.name}/{rel}": digest for b, m in zip(buckets, manifests) for rel, digest in sorted(m["files"].items())}
    reports = [f"{VARIANTS}/{b.name}/{rel}" for b, m in zip(buckets, manifests) for rel in m.get("reports", [])]
    return {
        "format_version": format_version,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "library": None,
        "backend": "buckets",
        "buckets": [{"name": b.name, "path": f"{VARIANTS}/{b.name}", "inputs": m["inputs"], "outputs": m["outputs"], "backend": m.get("backend", "tvm")}
                    for b, m in zip(buckets, manifests)],
        "inputs": per_bucket("inputs"),
        "outputs": per_bucket("outputs"),
        "target": first["target"],
        "versions": first["versions"],
        "source": first["source"],
        "config": first["config"],
        "verify": [{"bucket": b.name, **{k: (f"{VARIANTS}/{b.name}/{v}" if k in ("inputs", "expected") else v) for k, v in m["verify"].items()}} for b, m in zip(buckets, manifests)],
        "files": files,
        "reports": ["report.json", "report.md", *reports],
    }


def combined_report(buckets: list[Bucket], reports: list, manifests: list[dict]):
    """One report for the artifact: the first bucket's report for what all share (model, target, passes), the
    stages of every bucket, the worst error over the buckets, and a row per bucket with its latency and error."""
    from .pipeline import _worst
    from .report import BucketReport, LatencyReport, StageTiming

    top = reports[0].model_copy(deep=True)
    shared = bucket_manifest(buckets, manifests, 0)
    top.inputs, top.outputs = shared["inputs"], shared["outputs"]
    top.stages = [StageTiming(name=f"{b.name}: {s.name}", seconds=s.seconds) for b, r in zip(buckets, reports) for s in r.stages]
    top.latency = LatencyReport(status="per bucket", reason="one variant per bucket: see the bucket rows")
    top.baseline = None
    top.estimate = None
    top.backend_choice = None
    top.output_summary = []
    checked = [r.accuracy for r in reports if r.accuracy is not None]
    top.accuracy = None
    if len(checked) == len(reports):
        acc = checked[0]
        for a in checked[1:]:
            acc = _worst(acc, a)
        top.accuracy = acc.model_copy(update={"inputs": f"every bucket's own seeded inputs ({len(reports)} buckets)"})
    batches = _leading_batch(reports)
    rows = []
    for b, r, batch in zip(buckets, reports, batches):
        acc = r.accuracy
        stats = r.latency.stats if r.latency is not None else None
        rows.append(BucketReport(
            name=b.name, path=f"{VARIANTS}/{b.name}", inputs=r.inputs, batch=batch, latency=r.latency,
            baseline_p50_ms=r.baseline.stats.p50_ms if r.baseline is not None else None,
            samples_per_s=stats.throughput_per_s * batch if stats is not None and batch is not None else None,
            accuracy_ok=acc.ok if acc is not None else None,
            max_abs=max((o.max_abs for o in acc.outputs), default=0.0) if acc is not None else None,
            max_rel=max((o.max_rel for o in acc.outputs), default=0.0) if acc is not None else None,
            needed_bytes=r.memory_fit.needed_bytes if r.memory_fit is not None else None,
        ))
    top.buckets = rows
    top.warnings = [f"bucket {b.name}: {w}" for b, r in zip(buckets, reports) for w in r.warnings]
    fits = [r.memory_fit for r in reports if r.memory_fit is not None]
    if fits:
        big = max(fits, key=lambda f: f.needed_bytes)
        total = sum(f.needed_bytes for f in fits)
        size = f"{total / 1e9:.2f} GB" if total >= 1e9 else f"{total / 1e6:.2f} MB"
        note = f"the largest bucket's; a variant is loaded on its first use, and all {len(fits)} loaded at once need {size}"
        top.memory_fit = big.model_copy(update={"note": note})
        if big.usable_bytes is not None and total > big.usable_bytes:
            top.warnings.append(f"every bucket fits alone, but all {len(fits)} variants loaded at once need {total / 1e9:.2f} GB, more than the {big.usable_bytes / 1e9:.2f} GB usable; load() loads a variant on its first use")
    if top.memory is not None:
        mems = [r.memory for r in reports if r.memory is not None]
        top.memory = top.memory.model_copy(update={
            "planned_activation_bytes": max((m.planned_activation_bytes or 0) for m in mems),
            "intermediate_bytes": max((m.intermediate_bytes or 0) for m in mems) if any(m.intermediate_bytes is not None for m in mems) else None,
            "compile_peak_rss_bytes": max(m.compile_peak_rss_bytes for m in mems),
        })
    return top


def check_dispatch(root: Path, manifest: dict) -> None:
    """Load the bucketed artifact as a user would, run each bucket's stored verification inputs through it and check
    that they reach their own variant and match ONNX Runtime's outputs stored beside them."""
    from .measure import compare
    from .runtime import load

    model = load(root)
    names = [o["name"] for o in manifest["outputs"]]
    for v in manifest["verify"]:
        with np.load(root / v["inputs"]) as z:
            feeds = {k: z[k] for k in z.files}
        with np.load(root / v["expected"]) as z:
            expected = [z[n] for n in names]
        chosen = model.bucket_for(feeds)["name"]
        if chosen != v["bucket"]:
            raise AccuracyError(f"the bucketed artifact sent bucket {v['bucket']}'s inputs to bucket {chosen}", "report the bug")
        result = compare(model(feeds), expected, names, v["rtol"], v["atol"])
        model.unload(chosen)
        if not result.ok:
            bad = next(o for o in result.outputs if not o.ok)
            raise AccuracyError(f"bucket {chosen}, run through the bucketed artifact, does not match ONNX Runtime: output '{bad.name}' max abs {bad.max_abs:.3g}", "report the bug")
