"""Calibrate the roofline estimate (autoglm_compile.estimate) against measured latencies.

Commands:

  host MODEL.onnx [--dim k=v ...]
      Compile for `host` (the report has the measured TVM and ONNX Runtime latencies and the estimate) and print
      estimate / measured ratios. Slow: untuned TVM on CPU takes seconds per ResNet-50 run.

  gpu-build-int8 MODEL.onnx OUT_DIR [--dim k=v ...] [--target nvidia-h100] [--no-cuda-graph] [--int8-attention]
                 [--split-k-min K]
      An int8 build (synthetic calibration, the int8 rewrite) with its constants lifted into parameters, for timing
      on the GPU machine with random weights (gpu_build_int8); the CLI artifact of a smaller model checks accuracy.

  estimate MODEL.onnx [--dim k=v ...] --target T [--target T2 ...] [--bandwidth-gbps B]
      Print the estimate of the optimized graph for each target (B replaces the descriptor's bandwidth).

  gpu-build MODEL.onnx OUT_DIR [--dim k=v ...] [--target nvidia-h100] [-O O3] [--precision fp16 [--fp16 graph|graph32|relax]]
            [--cuda-graph] [--tile ROWSxCOLS] [--split-k SMS] [--no-attention-kernel] [--conv-layout NCHW]
      Build for a CUDA target here, with the weights kept as parameters (graph inputs) so that the library holds
      code only and fits the GPU machine's 64 MiB transfer limit. Writes OUT_DIR/{model.so, graph.onnx, meta.json}:
      graph.onnx is the optimized graph with the weights as inputs (for the ONNX Runtime reference there), and
      meta.json holds each weight's shape, dtype, mean and std (integer tensors: their values; tvm_dtype float16:
      the library takes it in float16), the inputs, and the roofline estimate for the target.
      benchmarks/roofline_device.py and benchmarks/bench.py gpu run it on the GPU. --cuda-graph marks the weights
      as fixed (the function's num_input), so that RewriteCUDAGraph captures the kernels that read them, as it does
      with the constant weights of a normal build.

The optimized graph is the one `autoglm-compile --target T` builds (the O2 passes); the CUDA schedule is the
default one (DLight), untuned, the same as the pipeline's `default` strategy.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoglm_compile.estimate import estimate, roofline_for, skeleton  # noqa: E402
from autoglm_compile.target import resolve_target  # noqa: E402

# The H200 the device tool lends: the H100 SXM's GH100 compute (same SM count and clocks, NVIDIA H200 datasheet:
# 67 TFLOP/s fp32, 989 TFLOP/s dense bf16/fp16) with HBM3e at 4.8 TB/s.
H200_BANDWIDTH_GBPS = 4800.0


def optimized(model_path: str, dims: list[str], preset: str = "O2", precision: str | None = None, kind: str | None = None):
    """(optimized ONNX, input specs): what the pipeline's load/validate/passes stages produce (for a target of this
    kind: the preset's passes less those config.PRESET_SKIPS lists for it)."""
    from autoglm_compile.config import adapt_to_target, load_config
    from autoglm_compile.frontends import load
    from autoglm_compile.inputs import resolve_inputs
    from autoglm_compile.pass_manager import PassContext, run_passes

    loaded = load(model_path)
    specs = resolve_inputs(loaded.model, [], dims)
    ctx = PassContext(input_shapes={s.name: list(s.shape) for s in specs}, input_dtypes={s.name: s.dtype for s in specs},
                      ir_version=loaded.model.ir_version, log=lambda _: None)
    cfg = load_config(preset, precision=precision)
    if kind:
        adapt_to_target(cfg, kind)
    model, _ = run_passes(loaded.model, cfg.passes, ctx)
    return model, specs


def gpu_build(args) -> None:
    from autoglm_compile.inputs import InputSpec
    from autoglm_compile.tvm_build import ScheduleContext, build, import_relax, lower
    from autoglm_compile.toolchain import check_toolchain, export_library

    desc = resolve_target(args.target)
    check_toolchain(desc)
    if args.tile:
        from autoglm_compile import gpu_schedules

        gpu_schedules.DEFAULT_TILE = {f"{t.rows}x{t.cols}": t for t in gpu_schedules.TILES}[args.tile]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    relax_fp16 = args.precision == "fp16" and args.fp16 == "relax"
    model, specs = optimized(args.model, args.dim, args.preset, None if relax_fp16 else args.precision, desc.kind)
    shapes = {s.name: list(s.shape) for s in specs}
    # Weights become graph inputs named w0, w1, ...: TVM names the kernels' parameters after them, and a folded
    # constant's name ("/m/embeddings/Gather_output_0") is no C identifier.
    rename = {t.name: f"w{i}" for i, t in enumerate(t for t in model.graph.initializer if math.prod(t.dims) >= args.min_elements)}
    for node in model.graph.node:
        for j, x in enumerate(node.input):
            if x in rename:
                node.input[j] = rename[x]
    for t in model.graph.initializer:
        t.name = rename.get(t.name, t.name)
    if not args.weights_as_is:
        transpose_matmul_weights(model)
        if args.conv_layout == "NHWC":
            transpose_conv_weights(model)
    skel = skeleton(model, min_elements=args.min_elements, input_shapes=shapes)
    data_inputs = [s.as_dict() for s in specs]
    weights = []
    for t in model.graph.initializer:
        if math.prod(t.dims) < args.min_elements:
            continue
        a = numpy_helper.to_array(t)
        w = {"name": t.name, "shape": list(a.shape), "dtype": a.dtype.name}
        if np.issubdtype(a.dtype, np.floating):
            w.update(mean=float(a.mean()), std=float(a.std()))
        else:
            w["values"] = a.ravel().tolist()  # position ids and the like: small, and their values matter
        weights.append(w)
    all_specs = list(specs) + [InputSpec(w["name"], tuple(w["shape"]), w["dtype"]) for w in weights]
    onnx.save(skel, str(out / "graph.onnx"))
    mod = import_relax(skel, all_specs)
    if relax_fp16:
        mod = relax_fp16_weights(mod, weights)
    elif args.precision == "fp16" and args.fp16 == "graph32":
        mod = accumulate_in_float32(mod)
    if args.cuda_graph:  # the weights are fixed across calls: RewriteCUDAGraph may capture the kernels that read them
        mod["main"] = mod["main"].with_attr("num_input", len(specs))
    if args.split_k is not None:
        desc.cuda.sm_count = args.split_k or None
    if args.split_k_min is not None:
        from autoglm_compile import gpu_schedules

        gpu_schedules.SPLIT_K_MIN = args.split_k_min
    sched = ScheduleContext(desc=desc, cuda_graph=args.cuda_graph, split_k=True, attention_kernel=not args.no_attention_kernel,
                            conv_layout=args.conv_layout)
    tuning = None
    if args.tuning_db:
        from autoglm_compile.config import TuneConfig

        sched.tune = TuneConfig(database=args.tuning_db, export=args.tune_export)
        lowered, target = lower(mod, desc, "tune", sched)
        tuning = {k: getattr(sched.tuning, k) for k in ("tasks", "hits", "misses")}
        print(f"tuning database: {tuning['hits']} of {tuning['tasks']} tasks found" + "".join(f"; {w}" for w in sched.warnings))
    else:
        lowered, target = lower(mod, desc, "default", sched)
    built = build(lowered, target)
    export_library(built.executable, str(out / "model.so"), desc, target)
    build_s = time.perf_counter() - t0
    est = estimate(model, roofline_for(desc), shapes)
    roof = roofline_for(desc)
    h200 = estimate(model, type(roof)(roof.peak_flops, H200_BANDWIDTH_GBPS, roof.launch_overhead_us, "nvidia-h100 descriptor, bandwidth 4.8 TB/s (H200 HBM3e)"), shapes)
    meta = {
        "model": Path(args.model).name, "target": desc.name, "tvm_target": desc.tvm_target(), "inputs": data_inputs,
        "weights": weights, "outputs": [o.name for o in model.graph.output], "build_seconds": build_s,
        "estimate": est.model_dump(), "estimate_h200": h200.model_dump(), "preset": args.preset, "tuning": tuning,
        "variant": args.variant or ("tuned" if args.tuning_db else "untuned"),
        "precision": args.precision or "fp32", "fp16": args.fp16 if args.precision == "fp16" else None, "cuda_graph": args.cuda_graph,
        "split_k_sms": desc.cuda.sm_count, "conv_layout": args.conv_layout, "schedule": sched.notes,
    }
    (out / "meta.json").write_text(json.dumps(meta) + "\n")
    print(f"{args.model}: built for {desc.name} in {build_s:.1f} s, library {(out / 'model.so').stat().st_size / 2**20:.1f} MiB, "
          f"{len(weights)} weights as parameters; estimate {est.total_ms:.3f} ms (H100), {h200.total_ms:.3f} ms (H200 bandwidth)")


def transpose_matmul_weights(model: onnx.ModelProto) -> int:
    """Each 2-D weight W[K, N] that only MatMuls read as their B becomes W^T [N, K] behind a Transpose node. The CLI's
    builds have constant weights, which gpu_schedules.split_k reads transposed (folded at build time); with the
    weights as parameters (here) it takes permute_dims(W^T) in the same way, and the library reads W^T. Returns how
    many weights were transposed."""
    return _store_weights_transposed(model, "MatMul", store=(1, 0), read=(1, 0), suffix="kn")


def transpose_conv_weights(model: onnx.ModelProto) -> int:
    """Each 4-D weight W[O, I, H, W] that only Convs read becomes W[O, H, W, I] behind a Transpose node: with
    `--conv-layout NHWC` the build's convs take OHWI weights (gpu_schedules.nhwc_convs), whose transpose folds into
    this one, so that the library reads the parameter as it is, as a CLI build's folded constants. Returns how many."""
    return _store_weights_transposed(model, "Conv", store=(0, 2, 3, 1), read=(0, 3, 1, 2), suffix="oihw")


def _store_weights_transposed(model: onnx.ModelProto, op_type: str, store: tuple, read: tuple, suffix: str) -> int:
    """Each initializer of len(store) dims that only op_type nodes read as their input 1 is stored transposed by
    `store`, and read through a Transpose by `read` (its inverse) inserted first in the graph. Returns how many."""
    from onnx import helper

    inits = {t.name: t for t in model.graph.initializer if len(t.dims) == len(store)}
    users: dict[str, list] = {}
    for node in model.graph.node:
        for j, x in enumerate(node.input):
            if x in inits:
                users.setdefault(x, []).append((node, j))
    nodes = []
    for name, uses in users.items():
        if not all(node.op_type == op_type and j == 1 for node, j in uses):
            continue
        t = inits[name]
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(t).transpose(store)), name))
        for node, j in uses:
            node.input[j] = f"{name}_{suffix}"
        nodes.append(helper.make_node("Transpose", [name], [f"{name}_{suffix}"], perm=list(read), name=f"{name}_transpose"))
    for node in reversed(nodes):
        model.graph.node.insert(0, node)
    return len(nodes)


def gpu_build_int8(args) -> None:
    """An int8 build for a CUDA target with its constants lifted into parameters: the CLI's stages up to the import
    (quantization with synthetic calibration, the int8 rewrite), then every constant of at least --min-elements
    elements (int8 weights, their zero-point corrections and scales, the float embeddings) becomes a parameter, so the
    library holds code only (BERT-base int8 with its weights is over the GPU machine's 64 MiB transfer limit).
    meta.json describes each parameter (floats: mean and std; integers: their range), and the GPU machine draws them
    at random: the timing does not depend on the values, and there is no reference to check the outputs against (the
    CLI artifact of a smaller model with the same layers checks the kernels: docs/int8.md)."""
    import autoglm_compile.pipeline as P
    from autoglm_compile.target import resolve_target
    from autoglm_compile.toolchain import check_toolchain, export_library
    from autoglm_compile.tvm_build import ScheduleContext, build, lower

    from autoglm_compile import int8_kernels

    int8_kernels.CUDA_ACTIVATION_MATMULS = args.int8_attention
    if args.split_k_min is not None:
        from autoglm_compile import gpu_schedules

        gpu_schedules.SPLIT_K_MIN = args.split_k_min
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    opts = P.CompileOptions(source=args.model, target=args.target, output=out / "unused", dims=args.dim, precision=args.precision, calib_synthetic=True)
    desc = resolve_target(args.target)
    check_toolchain(desc)
    cfg = P.resolve_config(opts, desc)
    job = P.Job(opts=opts, config=cfg, target=desc, progress=P.Progress(), staging=P.Staging(opts.output))
    job.report = P.Report(tool_version="bench", model=args.model, frontend="?", target=desc.name, target_kind=desc.kind, config=cfg.name,
                          precision=cfg.precision, inputs=[], outputs=[])
    try:
        for name, fn in P.STAGES:
            fn(job)
            if name == "import":
                break
    finally:
        job.staging.discard()
    mod, weights = lift_constants(job.relax_mod, args.min_elements, transpose_2d=not args.weights_as_is)
    mod["main"] = mod["main"].with_attr("num_input", len(job.inputs))  # the lifted weights are fixed: CUDA graphs capture their kernels
    # attention_kernel: the QDQ model leaves self-attention float on CUDA (quantize.attention_nodes), and the kernel runs it
    sched = ScheduleContext(desc=desc, cuda_graph=not args.no_cuda_graph, split_k=True, attention_kernel=True, fp16=cfg.relax_fp16)  # fp16: mixed
    lowered, target = lower(mod, desc, "default", sched)
    if args.kernels:  # the kernels main launches, in order
        import re

        Path(args.kernels).write_text("\n".join(re.findall(r"= cls\.(\w+)\(", lowered["main"].script())) + "\n")
    from autoglm_compile.int8_kernels import describe, dot_kernels

    kernels = describe(job.int8, dot_kernels(lowered, cuda=True))
    export_library(build(lowered, target).executable, str(out / "model.so"), desc, target)
    build_s = time.perf_counter() - t0
    meta = {"model": Path(args.model).name, "target": desc.name, "tvm_target": desc.tvm_target(), "inputs": [s.as_dict() for s in job.inputs],
            "weights": weights, "outputs": job.output_names, "build_seconds": build_s, "variant": args.variant or f"{args.precision} (weights lifted, random)",
            "precision": args.precision, "cuda_graph": not args.no_cuda_graph, "split_k_sms": desc.cuda.sm_count, "reference": None, "int8_kernels": kernels,
            "schedule": sched.notes}
    (out / "meta.json").write_text(json.dumps(meta) + "\n")
    print(f"{args.model}: {args.precision} built for {desc.name} in {build_s:.1f} s, library {(out / 'model.so').stat().st_size / 2**20:.1f} MiB, "
          f"{len(weights)} constants lifted; {kernels}")


def lift_constants(mod, min_elements: int, transpose_2d: bool = False):
    """(mod, specs): main's constants of at least min_elements elements as parameters w0, w1, ... after its inputs;
    specs describe each (shape, dtype; floats mean and std, integers low and high). transpose_2d: a 2-D int8 constant
    (int8_kernels' MatMul weights) becomes permute_dims of a W^T parameter (gpu_schedules.split_k then reads W^T, as
    it does constant weights)."""
    from tvm import relax

    specs, lifted, keep = [], {}, []

    @relax.expr_functor.mutator
    class Lift(relax.PyExprMutator):
        def visit_generic_const_(self, const):  # TVM 0.27's relax constants (tvm.ir.expr.Constant)
            a = const.value.numpy()
            if a.size < min_elements:
                return const
            key = const.__hash__()  # the object's address (same_as); `keep` holds it, so no other takes it
            if key not in lifted:
                keep.append(const)
                name = f"w{len(specs)}"
                if transpose_2d and a.ndim == 2 and a.dtype == np.int8:  # int8 MatMul weights: W^T, as split-K reads constant ones
                    a = np.ascontiguousarray(a.T)
                    lifted[key] = relax.op.permute_dims(relax.Var(name, relax.TensorType(a.shape, str(a.dtype))), [1, 0])
                else:
                    lifted[key] = relax.Var(name, relax.TensorType(a.shape, str(a.dtype)))
                spec = {"name": name, "shape": list(a.shape), "dtype": str(a.dtype)}
                if np.issubdtype(a.dtype, np.floating):
                    spec.update(mean=float(a.mean()), std=float(a.std()))
                else:
                    spec.update(low=int(a.min()), high=int(a.max()))
                specs.append(spec)
            return lifted[key]

    main = mod["main"]
    body = Lift().visit_expr(main.body)
    params = list(main.params) + [v.args[0] if isinstance(v, relax.Call) else v for v in lifted.values()]
    mod["main"] = relax.Function(params, body, main.ret_ty, main.is_pure, main.attrs)
    return mod, specs


def accumulate_in_float32(mod):
    """conv2d and matmul on float16 operands accumulate in float32 (out_dtype float32, then a cast to float16, which
    FuseOps fuses into the kernel): a float16 graph (convert-float16) keeps its float16 tensors, and DLight's
    tensor-core rule takes float16 x float16 -> float32. The 'graph32' variant of docs/benchmarks.md; the pipeline
    uses ToMixedPrecision instead (as accurate, and faster on BERT-base)."""
    import tvm
    from tvm import relax

    conv2d, matmul = tvm.ir.Op.get("relax.nn.conv2d"), tvm.ir.Op.get("relax.matmul")

    @relax.expr_functor.mutator
    class Accumulate(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op not in (conv2d, matmul) or any(str(a.ty.dtype) != "float16" for a in call.args) or str(call.ty.dtype) != "float16":
                return call
            if call.op == matmul:
                wide = relax.op.matmul(call.args[0], call.args[1], out_dtype="float32")
            else:
                a = call.attrs
                wide = relax.op.nn.conv2d(call.args[0], call.args[1], a.strides, a.padding, a.dilation, a.groups, a.data_layout, a.kernel_layout, a.out_layout, "float32")
            return relax.op.astype(wide, "float16")

    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = Accumulate().visit_expr(func)
    return mod


def relax_fp16_weights(mod, weights: list[dict]):
    """mixed_precision on a module whose weights are parameters: the weights whose every use is a cast to float16
    become float16 parameters (what FoldConstant does to constant weights in a normal build), marked in `weights`
    as tvm_dtype float16 (the runner casts them; ONNX Runtime gets the float32 values)."""
    import tvm
    from tvm import relax

    from autoglm_compile.tvm_build import mixed_precision

    probe = mixed_precision(mod)
    names = {p.name for p in probe["main"].params}
    uses: dict[str, list] = {}

    def visit(e):
        if isinstance(e, relax.Call):
            for a in e.args:
                if isinstance(a, relax.Var) and a.name in names:
                    uses.setdefault(a.name, []).append(e)

    def to_half(c) -> bool:
        return isinstance(c.op, tvm.ir.Op) and c.op.name == "relax.astype" and str(c.attrs.dtype) == "float16"

    relax.analysis.post_order_visit(probe["main"].body, visit)
    transposed = {}  # weight -> the variable bound to permute_dims(weight) (transpose_matmul_weights' W^T)
    for block in probe["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == "relax.permute_dims"
                    and isinstance(value.args[0], relax.Var) and value.args[0].name in names):
                transposed[value.args[0].name] = binding.var
    t_uses: dict[str, list] = {}  # weight -> the calls that read its transpose (by variable identity: names repeat)

    def visit_transposed(e):
        if isinstance(e, relax.Call):
            for a in e.args:
                for name, var in transposed.items():
                    if isinstance(a, relax.Var) and a.same_as(var):
                        t_uses.setdefault(name, []).append(e)

    relax.analysis.post_order_visit(probe["main"].body, visit_transposed)

    def cast_later(name: str) -> bool:  # every use a cast to float16, or one transpose whose every use is
        if all(map(to_half, uses[name])):
            return True
        return len(uses[name]) == 1 and bool(t_uses.get(name)) and all(map(to_half, t_uses[name]))

    half = [w["name"] for w in weights if w["dtype"] == "float32" and uses.get(w["name"]) and cast_later(w["name"])]
    for w in weights:
        if w["name"] in half:
            w["tvm_dtype"] = "float16"
    return mixed_precision(mod, half)


def host(args) -> None:
    from autoglm_compile.pipeline import CompileOptions, compile_model

    out = Path(args.out or f"/tmp/roofline/{Path(args.model).stem}")
    report = compile_model(CompileOptions(source=args.model, output=out, dims=args.dim, runs=args.runs))
    e = report.estimate
    tvm_ms = report.latency.stats.p50_ms
    ort_ms = report.baseline.stats.p50_ms if report.baseline else float("nan")
    print(json.dumps({
        "model": args.model, "estimate_ms": e.total_ms, "figures": e.figures_from, "tvm_p50_ms": tvm_ms,
        "tvm_runs": report.latency.stats.runs, "ort_p50_ms": ort_ms, "threads": report.latency.threads,
        "estimate_over_tvm": e.total_ms / tvm_ms, "estimate_over_ort": e.total_ms / ort_ms,
        "compute_bound_ms": e.compute_bound_ms, "memory_bound_ms": e.memory_bound_ms, "overhead_ms": e.overhead_ms,
        "gflop": e.total_flops / 1e9, "mbytes": e.total_bytes / 1e6, "kernels": e.kernels,
    }, indent=2))


def estimate_cmd(args) -> None:
    """Print the estimate of the optimized graph for each target (optionally with another bandwidth)."""
    model, specs = optimized(args.model, args.dim)
    shapes = {s.name: list(s.shape) for s in specs}
    for name in args.target:
        roof = roofline_for(resolve_target(name))
        if args.bandwidth_gbps:
            roof = type(roof)(roof.peak_flops, args.bandwidth_gbps, roof.launch_overhead_us, f"{roof.figures_from}, bandwidth {args.bandwidth_gbps:g} GB/s")
        e = estimate(model, roof, shapes)
        print(json.dumps({"model": args.model, "target": name, "figures": e.figures_from, "estimate_ms": e.total_ms,
                          "compute_bound_ms": e.compute_bound_ms, "memory_bound_ms": e.memory_bound_ms, "overhead_ms": e.overhead_ms,
                          "kernels": e.kernels, "gflop": e.total_flops / 1e9, "mbytes": e.total_bytes / 1e6,
                          "top_ops": [(o.name, o.op_type, round(o.ms * 1e3, 2), o.bound) for o in e.top_ops[:5]]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("host")
    h.add_argument("model")
    h.add_argument("--dim", action="append", default=[])
    h.add_argument("--runs", type=int, default=5)
    h.add_argument("-o", "--out")
    g = sub.add_parser("gpu-build")
    g.add_argument("model")
    g.add_argument("out")
    g.add_argument("--dim", action="append", default=[])
    g.add_argument("--target", default="nvidia-h100")
    g.add_argument("--min-elements", type=int, default=1024, help="initializers this large become parameters")
    g.add_argument("-O", dest="preset", default="O2", help="pass preset (O2, O3)")
    g.add_argument("--precision", default=None, help="fp16: float16 compute (inputs and outputs stay float32), by --fp16")
    g.add_argument("--fp16", choices=["graph", "graph32", "relax"], default="relax",
                   help="graph: the convert-float16 pass; graph32: the same with float32 accumulation in conv/matmul; relax: ToMixedPrecision")
    g.add_argument("--cuda-graph", action="store_true", help="RewriteCUDAGraph (relax.backend.use_cuda_graph)")
    g.add_argument("--tuning-db", help="schedule with this tuning database (the 'tune' strategy); default schedules otherwise")
    g.add_argument("--tune-export", help="with --tuning-db: write the tasks missing from it here, for tune_worker on the GPU")
    g.add_argument("--variant", help="a label for this build in the benchmark tables")
    g.add_argument("--split-k", type=int, default=None, metavar="SMS",
                   help="split the K of float16 GEMMs that launch fewer thread blocks than SMS (gpu_schedules.split_k); 0: off; default: the descriptor's cuda.sm_count")
    g.add_argument("--split-k-min", type=int, default=None, metavar="K", help="the shortest K slice split-K makes (gpu_schedules.SPLIT_K_MIN)")
    g.add_argument("--weights-as-is", action="store_true", help="keep MatMul weights [K, N] (default: W^T behind a Transpose, as the CLI's builds read them)")
    g.add_argument("--no-attention-kernel", action="store_true", help="attention on the default kernels (no gpu_attention.fuse_attention)")
    g.add_argument("--conv-layout", choices=["NCHW", "NHWC"], default="NHWC",
                   help="NHWC (the CLI's default for CUDA, schedule.conv_layout): float16 convs as NHWC/OHWI (gpu_schedules.nhwc_convs), the conv weights passed OHWI; NCHW: the ONNX layout")
    g.add_argument("--tile", help="ROWSxCOLS: every float16 tensor-core GEMM untuned gets this tile of gpu_schedules.TILES (default: DEFAULT_TILE)")
    q = sub.add_parser("gpu-build-int8")
    q.add_argument("model")
    q.add_argument("out")
    q.add_argument("--dim", action="append", default=[])
    q.add_argument("--target", default="nvidia-h100")
    q.add_argument("--min-elements", type=int, default=1024, help="constants this large become parameters")
    q.add_argument("--variant", help="a label for this build in the benchmark tables")
    q.add_argument("--no-cuda-graph", action="store_true", help="kernels launched one by one (benchmarks/gpu_profile.py times each)")
    q.add_argument("--int8-attention", action="store_true", help="attention's matmuls of two activations in int8 too (int8_kernels.CUDA_ACTIVATION_MATMULS)")
    q.add_argument("--weights-as-is", action="store_true", help="keep 2-D weights [K, N] (default: W^T parameters, as split-K reads constant weights)")
    q.add_argument("--split-k-min", type=int, default=None, metavar="K", help="the shortest K slice split-K makes (gpu_schedules.SPLIT_K_MIN)")
    q.add_argument("--kernels", help="write the names of the kernels main launches, in order, to this file")
    q.add_argument("--precision", choices=["int8", "mixed"], default="int8", help="mixed: what stays float runs in float16 (ToMixedPrecision)")
    e = sub.add_parser("estimate")
    e.add_argument("model")
    e.add_argument("--dim", action="append", default=[])
    e.add_argument("--target", action="append", default=[])
    e.add_argument("--bandwidth-gbps", type=float)
    args = p.parse_args()
    {"host": host, "gpu-build": gpu_build, "gpu-build-int8": gpu_build_int8, "estimate": estimate_cmd}[args.cmd](args)


if __name__ == "__main__":
    main()
