"""The vendor-onnx backend: for NPU targets (backend: vendor-onnx), the artifact is an ONNX model for the vendor's own
runtime and a runner, instead of a TVM library. Its stages (pipeline.VENDOR_STAGES):

    load → validate → passes → verify → coverage → package → measure → report

- passes: the config's passes, with pin-shapes (static shapes) and, where the descriptor prefers float16 and
  --precision does not say otherwise, convert-float16 (float32 inputs and outputs); then decompose-ops and
  convert-opset to the descriptor's opset (adapt_config). decompose-ops rewrites what the vendor lacks among the
  ops it knows (LayerNormalization and Gelu below their opsets, com.microsoft Gelu/FastGelu, HardSwish, Mish).
- verify: the vendor ONNX against the source model on ONNX Runtime CPU, with the precision's tolerances.
- coverage: every node against the vendor's supported-op list (npu.op_list, targets/ops/<vendor>.yaml). A node
  outside it is an error (exit 2) that lists the nodes, unless --fallback onnxruntime allows the CPU and the
  vendor runtime can hand nodes to it (an ONNX Runtime provider can: ONNX Runtime gives the CPU provider every node
  the NPU provider does not take; MagicMind cannot). The report then lists those nodes one by one.
- package: model.onnx (its IR version lowered to the lowest that carries its opsets, for older vendor parsers),
  runner.json (runtime, provider and options, inputs, outputs, tolerances), runner.py, convert.sh (the offline
  conversion: Ascend's atc; for Cambricon, build_magicmind.py), README.md, verify/, manifest.json.
- measure: runner.py's Runner, as a user runs it: here ONNX Runtime on the CPU (no NPU here), compared with the
  reference. Latency is measured only where the NPU runtime ran (on the device); elsewhere it is an estimate
  where autoglm_compile.estimate gives one, else "not measured".
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
import resource
import shlex
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict, ValidationError

from .config import PassSpec, PipelineConfig
from .errors import InputError, UnsupportedError
from .report import CpuNode, LatencyReport, MemoryReport, VendorReport
from .target import TargetDescriptor

FALLBACKS = ("onnxruntime", "none")
RUNNERS = "autoglm_compile.runners"
MODEL = "model.onnx"
MAGICMIND_MODEL = "model.mm"
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with room

# The runtime's precision setting for the graph's precision, where the descriptor's provider_options leave it out.
# Ascend (atc --precision_mode and the CANN provider's precision_mode): allow_fp32_to_fp16 keeps the nodes that
# convert-float16 left in float32 in float32 where CANN has a float32 kernel; must_keep_origin_dtype keeps an fp32
# graph fp32. Cambricon (MagicMind BuilderConfig precision_config.precision_mode), as in its samples.
PRECISION_MODES = {
    "huawei-ascend": {"fp16": "allow_fp32_to_fp16", "fp32": "must_keep_origin_dtype"},
    "cambricon": {"fp16": "force_float16", "fp32": "force_float32"},
}
INSTALL = {
    "huawei-ascend": "pip install onnxruntime-cann (ONNX Runtime built with the CANN provider), with the CANN toolkit installed and its set_env.sh sourced",
    "cambricon": "install Cambricon's MagicMind (its Python wheel, magicmind.python.runtime) and build model.mm with build_magicmind.py",
}


class OpList(BaseModel):
    """targets/ops/<vendor>.yaml: the ONNX ops a vendor runtime supports."""

    model_config = ConfigDict(extra="forbid")
    vendor: str
    source: str
    approximate: bool
    ops: list[str]


def uses_onnxruntime(target: TargetDescriptor) -> bool:
    """Whether the vendor runtime is an ONNX Runtime execution provider (which hands unsupported nodes to the CPU)."""
    return target.npu.execution_provider.endswith("ExecutionProvider")


def runtime_name(target: TargetDescriptor) -> str:
    ep = target.npu.execution_provider
    return f"ONNX Runtime with {ep}" if uses_onnxruntime(target) else f"Cambricon {ep}" if target.npu.vendor == "cambricon" else ep


# ---------------------------------------------------------------------------------------------- the op list

def op_list_file(target: TargetDescriptor):
    """(the op list's file, how to name it): beside a user's descriptor file if it is there, else in targets/."""
    name = target.npu.op_list
    if target.source and not target.source.startswith("targets/"):
        beside = Path(target.source).parent / name
        if beside.is_file():
            return beside, str(beside)
    shipped = resources.files("autoglm_compile.targets").joinpath(name)
    if shipped.is_file():
        return shipped, f"targets/{name}"
    raise InputError(f"target '{target.name}': op list {name} not found", "npu.op_list is relative to targets/ or to the descriptor's folder")


def load_op_list(target: TargetDescriptor) -> OpList | None:
    if target.npu is None or target.npu.op_list is None:
        return None
    path, where = op_list_file(target)
    import yaml

    try:
        return OpList.model_validate(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValidationError) as e:
        raise InputError(f"{where}: not a valid op list ({str(e).splitlines()[0]})", "see targets/ops/huawei-ascend.yaml") from None


def op_list_label(target: TargetDescriptor, ops: OpList | None) -> str:
    if ops is None:
        return "none (the descriptor names no op list: coverage not checked)"
    where = op_list_file(target)[1]
    return f"{where} ({len(ops.ops)} ops; from {ops.source}" + ("; transcribed, approximate)" if ops.approximate else ")")


# -------------------------------------------------------------------------------------------- configuration

def default_precision(target: TargetDescriptor, precision: str | None) -> str | None:
    """--precision as given, else fp16 where the NPU descriptor prefers it."""
    if precision is None and target.npu is not None and target.npu.prefer_fp16:
        return "fp16"
    return precision


def adapt_config(cfg: PipelineConfig, target: TargetDescriptor) -> PipelineConfig:
    """The config's passes, with pin-shapes first (the vendor ONNX has static shapes) and decompose-ops and
    convert-opset to the descriptor's opset last."""
    from .pass_manager import registered_passes

    passes = list(cfg.passes)
    if "pin-shapes" not in [p.name for p in passes]:
        passes.insert(0, PassSpec(name="pin-shapes"))
    ops = load_op_list(target)
    known = registered_passes()["decompose-ops"].known_rewrites
    lacking = [op for op in known if ops is not None and op not in ops.ops]
    passes.append(PassSpec(name="decompose-ops", options={"ops": lacking, "opset": target.npu.opset}))
    passes.append(PassSpec(name="convert-opset", options={"opset": target.npu.opset}))
    return cfg.model_copy(update={"passes": passes})


def resolve_fallback(target: TargetDescriptor, fallback: str | None) -> str:
    """--fallback on an NPU target: 'none' (the default) or 'onnxruntime', where the vendor runtime can honour it.
    (TVM targets: partition.resolve_fallback.)"""
    if fallback is None:
        return "none"
    if fallback not in FALLBACKS:
        raise InputError(f"unknown --fallback '{fallback}'", f"valid values: {', '.join(FALLBACKS)}")
    if fallback == "onnxruntime":
        if not uses_onnxruntime(target):
            raise UnsupportedError(
                f"target '{target.name}' runs on {runtime_name(target)}, which cannot hand nodes to the CPU: --fallback onnxruntime cannot be honoured",
                "leave it out; a node outside the op list then has to be replaced in the model (or written as a MagicMind plugin)",
            )
    return fallback


# ------------------------------------------------------------------------------------------------- coverage

def _key(node: onnx.NodeProto) -> tuple[str, str]:
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    return domain, (f"{domain}.{node.op_type}" if domain else node.op_type)


def unsupported_nodes(model: onnx.ModelProto, ops: set[str]) -> list[CpuNode]:
    """The nodes (subgraphs included) whose op is not in `ops`, in graph order."""
    out = []

    def walk(graph: onnx.GraphProto, prefix: str) -> None:
        for i, node in enumerate(graph.node):
            domain, key = _key(node)
            name = prefix + (node.name or f"#{i} (unnamed)")
            if key not in ops:
                out.append(CpuNode(name=name, op=node.op_type, domain=domain))
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    walk(sub, f"{name}/{attr.name}/")

    walk(model.graph, "")
    return out


def stage_coverage(job) -> None:
    target, r = job.target, job.report
    ops = load_op_list(target)
    label = op_list_label(target, ops)
    cpu: list[CpuNode] = []
    if ops is None:
        r.warnings.append(f"target '{target.name}' names no supported-op list: the operator coverage was not checked")
    else:
        cpu = unsupported_nodes(job.model, set(ops.ops))
        if cpu and job.fallback == "none":
            shown = ", ".join(f"'{n.name}' ({n.domain + '.' if n.domain else ''}{n.op})" for n in cpu[:20])
            more = f" and {len(cpu) - 20} more" if len(cpu) > 20 else ""
            hint = "allow them on ONNX Runtime's CPU provider with --fallback onnxruntime, or change the model" if uses_onnxruntime(target) else "replace them in the model (MagicMind has no CPU fallback)"
            if any(n.domain == "com.microsoft" for n in cpu):
                hint += "; com.microsoft ops are ONNX Runtime's own (the -O3 fusions make some: use -O2 for NPU targets)"
            hint += f"; the op list is {label}: if your runtime has the op, edit a copy"
            raise UnsupportedError(f"target '{target.name}': {len(cpu)} node(s) use ops outside the {target.npu.vendor} supported-op list: {shown}{more}", hint)
    if cpu:
        r.warnings.append(f"{len(cpu)} node(s) outside the {target.npu.vendor} op list run on ONNX Runtime's CPU provider, not on the NPU (--fallback onnxruntime); the offline converter (atc) will reject them: see the vendor section")
    r.vendor = VendorReport(
        vendor=target.npu.vendor,
        runtime=runtime_name(target),
        execution_provider=target.npu.execution_provider,
        provider_options=provider_options(target, job.config.precision),
        opset=target.npu.opset,
        ir_version=vendor_ir_version(job.model),
        op_list=label,
        fallback=job.fallback,
        cpu_nodes=cpu,
    )


# -------------------------------------------------------------------------------------------------- package

def provider_options(target: TargetDescriptor, precision: str) -> dict:
    opts = dict(target.npu.provider_options)
    if "precision_mode" not in opts and precision in PRECISION_MODES.get(target.npu.vendor, {}):
        opts["precision_mode"] = PRECISION_MODES[target.npu.vendor][precision]
    return opts


def vendor_ir_version(model: onnx.ModelProto) -> int:
    """The lowest IR version that carries the model's opsets (IR 6 for opset 11), if below the model's."""
    return min(model.ir_version, onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True))


def atc_command(target: TargetDescriptor, inputs, options: dict) -> str:
    """Ascend's offline conversion of model.onnx to model.om (ATC, the CANN toolkit's model converter)."""
    shapes = ";".join(f"{s.name}:{','.join(str(d) for d in s.shape)}" for s in inputs)
    args = ["atc", "--framework=5", f"--model={MODEL}", "--output=model", f"--soc_version={target.npu.soc_version}", f"--input_shape={shlex.quote(shapes)}"]
    for key, flag in (("precision_mode", "precision_mode"), ("op_select_impl_mode", "op_select_implmode"), ("optypelist_for_implmode", "optypelist_for_implmode")):
        if key in options:
            args.append(f"--{flag}={shlex.quote(str(options[key]))}")
    return " ".join(args + ["--log=error"])


def offline_command(target: TargetDescriptor, inputs, options: dict) -> str:
    if target.npu.vendor == "huawei-ascend":
        return atc_command(target, inputs, options)
    return "python3 build_magicmind.py"


def _readme(job, runner_cfg: dict, command: str) -> str:
    t, v = job.target, job.report.vendor
    lines = [
        f"# {t.name}: {Path(job.opts.source).name} for {runtime_name(t)}",
        "",
        f"Built by autoglm-compile's vendor-onnx backend. `{MODEL}` is the vendor-ready ONNX: static shapes, opset {t.npu.opset} "
        f"(IR version {v.ir_version}), {job.config.precision} (inputs and outputs in their source types), checked against {v.op_list}.",
        "",
        "## Run",
        "",
        "    python runner.py --check        # the stored verification inputs, compared with ONNX Runtime on the source model",
        "    python runner.py --runs 100     # latency on this machine's runtime",
        "",
        f"runner.py reads runner.json. Without the NPU runtime it runs {MODEL} on ONNX Runtime's CPUExecutionProvider and says so.",
        f"On the device: {INSTALL[t.npu.vendor]}.",
    ]
    if uses_onnxruntime(t):
        lines += ["", f"Session: {t.npu.execution_provider} with provider_options {json.dumps(runner_cfg['provider_options'])}, then CPUExecutionProvider."]
    lines += ["", "## Offline conversion (on the device's toolkit)", "", f"    sh convert.sh       # {command}", ""]
    if t.npu.vendor == "huawei-ascend":
        lines += [
            "atc writes model.om for CANN's own runtime (ACL); Ascend's ais_bench tool runs and times it. "
            "The atc flags mirror the provider options above.",
        ]
    else:
        lines += [
            f"build_magicmind.py parses {MODEL} with MagicMind's ONNX parser and builds {MAGICMIND_MODEL} for "
            f"{runner_cfg['magicmind']['arch']} ({runner_cfg['magicmind']['precision_mode']}); MagicMind's mm_run tool "
            f"times it (mm_run --magicmind_model {MAGICMIND_MODEL} --iterations 1000 --batch 1 --devices 0). "
            "It follows Cambricon's magicmind_cloud samples and was not run where it was written (no MLU).",
        ]
    if v.cpu_nodes:
        lines += ["", f"## Nodes on the CPU (--fallback {v.fallback})", "",
                  f"These {len(v.cpu_nodes)} node(s) are outside the op list. ONNX Runtime runs them on its CPU provider; "
                  "the offline converter will reject them (replace them, or write custom operators).", ""]
        lines += [f"- {n.name} ({n.domain + '.' if n.domain else ''}{n.op})" for n in v.cpu_nodes]
    return "\n".join(lines) + "\n"


def stage_package(job) -> None:
    import onnxruntime

    from . import __version__
    from .artifact import REPORT_FILES, file_hashes, sha256
    from .runtime import FORMAT_VERSION, MANIFEST

    root, t, v = job.staging.path, job.target, job.report.vendor
    model = onnx.ModelProto()
    model.CopyFrom(job.model)
    model.ir_version = v.ir_version
    big = model.ByteSize() > EXTERNAL_DATA_BYTES
    onnx.save(model, str(root / MODEL), save_as_external_data=big, location=f"{MODEL}.data")
    (root / "verify").mkdir()
    np.savez(root / "verify" / "inputs.npz", **job.feeds)
    np.savez(root / "verify" / "expected.npz", **dict(zip(job.output_names, job.reference)))
    inputs = [s.as_dict() for s in job.inputs]
    outputs = [{"name": n, "shape": list(a.shape), "dtype": a.dtype.name} for n, a in zip(job.output_names, job.reference)]
    verify = {"inputs": "verify/inputs.npz", "expected": "verify/expected.npz", "rtol": job.config.verify.rtol, "atol": job.config.verify.atol}
    if job.config.accuracy_budget is not None:  # fp16/int8: runner.py --check uses the budget instead of rtol/atol
        verify["budget"] = job.config.accuracy_budget.model_dump()
    runner_cfg = {
        "target": t.name,
        "vendor": t.npu.vendor,
        "soc_version": t.npu.soc_version,
        "model": MODEL,
        "runtime": "onnxruntime" if uses_onnxruntime(t) else "magicmind",
        "execution_provider": t.npu.execution_provider,
        "provider_options": v.provider_options,
        "install": INSTALL[t.npu.vendor],
        "precision": job.config.precision,
        "inputs": inputs,
        "outputs": outputs,
        "verify": verify,
        "cpu_nodes": [n.model_dump() for n in v.cpu_nodes],
    }
    scripts = ["runner.py"]
    if not uses_onnxruntime(t):
        runner_cfg["magicmind_model"] = MAGICMIND_MODEL
        runner_cfg["magicmind"] = {"arch": t.npu.soc_version, "precision_mode": v.provider_options.get("precision_mode")}
        scripts.append("build_magicmind.py")
    command = offline_command(t, job.inputs, v.provider_options)
    v.offline_command = command
    (root / "runner.json").write_text(json.dumps(runner_cfg, indent=2) + "\n")
    for script in scripts:
        (root / script).write_text(resources.files(RUNNERS).joinpath(script).read_text())
        (root / script).chmod(0o755)
    (root / "convert.sh").write_text(f'#!/bin/sh\n# Offline conversion for {t.name}: {runtime_name(t)}.\nset -e\ncd "$(dirname "$0")"\n{command}\n')
    (root / "convert.sh").chmod(0o755)
    (root / "README.md").write_text(_readme(job, runner_cfg, command))
    v.files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "backend": "vendor-onnx",
        "library": MODEL,
        "inputs": inputs,
        "outputs": outputs,
        "target": {"name": t.name, "kind": t.kind, "device": "npu", "descriptor": t.model_dump(exclude={"source"})},
        "vendor": {
            "vendor": t.npu.vendor,
            "runtime": v.runtime,
            "execution_provider": t.npu.execution_provider,
            "provider_options": v.provider_options,
            "soc_version": t.npu.soc_version,
            "opset": t.npu.opset,
            "ir_version": v.ir_version,
            "op_list": v.op_list,
            "fallback": v.fallback,
            "cpu_nodes": [n.model_dump() for n in v.cpu_nodes],
            "offline_command": command,
            "runner": {"script": "runner.py", "config": "runner.json"},
        },
        "verify": verify,
        "versions": {"autoglm_compile": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
        "source": {"model": job.opts.source, "frontend": job.loaded.frontend, "sha256": sha256(job.loaded.source_file) if job.loaded.source_file else None},
        "config": job.config.model_dump(),
        "files": file_hashes(root),
        "reports": list(REPORT_FILES),
    }
    from .runfiles import write_run_files

    write_run_files(root, manifest)  # requirements-runtime.txt and RUN.md, hashed and listed with the rest
    manifest["files"] = file_hashes(root)
    v.files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


# -------------------------------------------------------------------------------------------------- measure

def _estimate(job):
    """The roofline estimate of the vendor ONNX on the target, where autoglm_compile.estimate exists and gives one."""
    try:
        from .estimate import estimate_for_target
    except ImportError:
        return None
    try:
        return estimate_for_target(job.model, job.target, {s.name: list(s.shape) for s in job.inputs})
    except ValueError as e:
        job.report.warnings.append(f"no roofline estimate: {e}")
        return None


def stage_measure(job) -> None:
    from .artifact import dir_size
    from .measure import compare, time_runs
    from .pipeline import _worst, summarize
    from .runners.runner import Runner

    r, v = job.report, job.config.verify
    r.memory = MemoryReport(
        weight_bytes=sum(onnx.numpy_helper.to_array(t).nbytes for t in job.model.graph.initializer),
        artifact_bytes=dir_size(job.staging.path),
        compile_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    # The artifact as a user runs it: runner.py's Runner, from the folder (here: ONNX Runtime CPU, with a note).
    runner = Runner(job.staging.path, log=job.progress.note)
    outputs = runner(job.feeds)
    budget = job.config.accuracy_budget  # fp16/int8: the accuracy budget instead of rtol/atol
    r.accuracy = compare(outputs, job.reference, job.output_names, v.rtol, v.atol, budget)
    for _file, feeds, ref in job.samples:  # the other --sample-inputs files: the worst error per output
        r.accuracy = _worst(r.accuracy, compare(runner(feeds), ref, job.output_names, v.rtol, v.atol, budget))
    r.accuracy.inputs = job.input_rule
    r.accuracy.reference = f"onnxruntime (CPU) on the source model; the vendor ONNX ran on {runner.device}"
    r.output_summary = [summarize(n, a) for n, a in zip(job.output_names, outputs)]
    on_npu = runner.note is None
    if job.config.precision == "fp16" and not on_npu:
        r.warnings.append("ONNX Runtime's CPU provider runs float16 nodes that it has no float16 kernel for in float32 (it inserts Casts): the check covers the graph's conversions and float16 rounding of tensors, not the NPU's float16 arithmetic")
    if not r.accuracy.ok:
        return
    if on_npu and job.config.measure.enabled:
        m = job.config.measure
        runs = job.opts.runs or m.runs
        arrays = runner.check_inputs(job.feeds)
        r.latency = LatencyReport(status="measured", stats=time_runs(lambda: runner._run(arrays), m.warmup, runs, min(m.min_runs, runs), m.max_seconds))
        return
    why = f"no {runtime_name(job.target)} on this machine ({runner.device} ran the check); time it on the device with 'python runner.py --runs 100'"
    est = _estimate(job)
    if est is not None and "estimate_ms" in LatencyReport.model_fields and "estimate" in type(r).model_fields:
        r.estimate = est
        r.latency = LatencyReport(status="estimate", reason=why, estimate_ms=est.total_ms)
    else:
        r.latency = LatencyReport(status="not measured", reason=why)
