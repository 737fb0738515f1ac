"""TVM stages: Relax import, scheduling (a pluggable strategy), build, and export of the library.

This module imports the TVM compiler. The runtime side (autoglm_compile.runtime) never imports it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import onnx

from .errors import UnsupportedError
from .inputs import InputSpec
from .relax_util import mutate_functions
from .target import TargetDescriptor


# The importer dispatches on op type alone; its converters cover the standard domain and some of ONNX Runtime's
# contrib ops (Attention, SkipLayerNormalization, FastGelu, ...), which live in com.microsoft.
IMPORTER_DOMAINS = ("", "ai.onnx", "com.microsoft")


def unsupported_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes the Relax ONNX importer has no converter for, as 'name (OpType)'."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = _get_convert_map()
    out = []
    for i, node in enumerate(model.graph.node):
        if node.domain not in IMPORTER_DOMAINS or node.op_type not in known:
            domain = f"{node.domain}." if node.domain not in ("", "ai.onnx") else ""
            out.append(f"{node.name or f'#{i}'} ({domain}{node.op_type})")
    return out


def import_relax(model: onnx.ModelProto, inputs: list[InputSpec]):
    from tvm.relax.frontend.onnx import from_onnx

    missing = unsupported_nodes(model)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise UnsupportedError(f"TVM's ONNX importer cannot convert {len(missing)} node(s): {shown}", "these ops are not supported by TVM 0.27's Relax importer")
    shapes = {s.name: list(s.shape) for s in inputs}
    dtypes = {s.name: s.dtype for s in inputs}
    try:
        return from_onnx(model, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=False)
    except Exception as e:  # the importer raises many exception types; report them as one line
        msg = str(e).strip().splitlines()
        detail = next((line for line in msg if line.startswith("Error converting operator")), msg[-1] if msg else "")
        raise UnsupportedError(f"TVM's ONNX importer failed: {type(e).__name__}: {detail[:300]}", "try -O2 or -O3 (constant folding resolves most import gaps), or pin dynamic dims with --input-shape") from None


# ------------------------------------------------------------------------------------------- schedule strategies
# A strategy turns the imported IRModule into a lowered one for the target. The tuning issue adds more.

Strategy = Callable[..., object]  # (IRModule, tvm.target.Target[, ScheduleContext]) -> lowered IRModule
_STRATEGIES: dict[str, Strategy] = {}
_WITH_CONTEXT: set[str] = set()


@dataclass
class ScheduleContext:
    """What a strategy registered with takes_context=True gets besides the module and target, and what it reports."""

    desc: TargetDescriptor
    tune: object = None  # config.TuneConfig
    progress: object = None  # pipeline.Progress (stage/note/update)
    tuning: object = None  # report.TuningReport, set by the tune strategy
    prepack_weights: bool = False  # int8 kernels (int8_kernels.py): let tuning rewrite constant weights' layout
    warnings: list[str] = field(default_factory=list)
    fp16: bool = False  # ToMixedPrecision before scheduling (mixed_precision below)
    cuda_graph: bool = False  # CUDA targets: Relax's RewriteCUDAGraph captures the static kernel sequences
    split_k: bool = False  # CUDA targets, with fp16: gpu_schedules.split_k over the descriptor's cuda.sm_count
    attention_kernel: bool = False  # CUDA targets: self-attention as one kernel (gpu_attention.fuse_attention)
    conv_layout: str = "NCHW"  # CUDA targets: NHWC runs float16 convs as NHWC/OHWI (gpu_schedules.nhwc_convs)
    cpu_kernels: bool = False  # llvm targets: hand-scheduled float32 conv/matmul kernels (cpu_kernels.py)
    winograd: int | str = 0  # with cpu_kernels: the Winograd output tile of 3x3 stride-1 convs, or auto (cpu_kernels.winograd_tile); 0: direct
    notes: list[str] = field(default_factory=list)  # what the schedule stage did beyond the strategy, for the report

    @classmethod
    def from_config(cls, desc: TargetDescriptor, config, progress=None) -> "ScheduleContext":
        """The context for a pipeline build with config (config.PipelineConfig)."""
        sched = config.schedule
        return cls(desc=desc, tune=config.tune, progress=progress, fp16=config.relax_fp16, cuda_graph=bool(sched.cuda_graph), split_k=sched.split_k,
                   attention_kernel=sched.attention_kernel, conv_layout=sched.conv_layout, cpu_kernels=sched.cpu_kernels, winograd=sched.winograd)


def register_strategy(name: str, *, takes_context: bool = False):
    def deco(fn: Strategy) -> Strategy:
        _STRATEGIES[name] = fn
        if takes_context:
            _WITH_CONTEXT.add(name)
        return fn

    return deco


def strategies() -> list[str]:
    return sorted(_STRATEGIES)


@register_strategy("default", takes_context=True)
def _default_strategy(mod, target, ctx: ScheduleContext):
    """The target's default Relax pipeline: fusion + legalization (+ DLight schedules on GPUs, with float16 tensor
    cores for small GEMMs too: autoglm_compile.gpu_schedules; on CPUs with ctx.cpu_kernels, the schedules of
    autoglm_compile.cpu_kernels)."""
    import tvm
    from tvm import relax

    with target:
        if target.kind.name == "llvm":
            from tvm.relax.backend.cpu_generic import pipeline as p

            from .cpu_kernels import schedule_passes

            schedules = schedule_passes(target) if ctx.cpu_kernels else []
            passes = p.library_dispatch_passes(target) + p.legalize_passes(target) + schedules + p.dataflow_lower_passes(target) + p.finalize_passes(target)
            return tvm.transform.Sequential(passes)(mod)
        if target.kind.name != "cuda":
            return relax.get_default_pipeline(target)(mod)
        from tvm.relax.backend.cuda import pipeline as p

        from .tune_worker import gpu_legalize_passes

        legalize, schedules = gpu_legalize_passes(target)
        passes = p.library_dispatch_passes(target) + legalize + schedules + p.dataflow_lower_passes(target) + p.finalize_passes(target)
        return tvm.transform.Sequential(passes)(mod)


@register_strategy("tune", takes_context=True)
def _tune_strategy(mod, target, ctx: ScheduleContext):
    """MetaSchedule tuning (the config's tune: section) with a target-aware tuning cache; default schedules for
    anything untuned. llvm targets. See autoglm_compile/tuning.py."""
    from .tuning import tune_and_lower

    return tune_and_lower(mod, target, ctx)


def make_target(desc: TargetDescriptor):
    import tvm

    spec = desc.tvm_target()
    host = spec.pop("host", None)
    return tvm.target.Target(spec, host=host) if host else tvm.target.Target(spec)


@dataclass
class BuildResult:
    executable: object
    figures: object = None  # memory_fit.PlanFigures: the plan's tensors, storages and kernel workspace

    @property
    def planned_bytes(self) -> int:
        """Sum of the storages of TVM's static memory plan (intermediates that are reused)."""
        return self.figures.storage_bytes if self.figures is not None else 0

    @property
    def storages(self) -> int:
        return self.figures.storages if self.figures is not None else 0


def mixed_precision(mod, fp16_params: list[str] | None = None):
    """fp16 compute with float32 accumulation (TVM's ToMixedPrecision): conv2d and matmul take float16 operands with
    out_dtype float32, elementwise ops follow their inputs, softmax-like ops stay float32; the function's inputs and
    outputs keep their dtypes (constant weights are cast once, by FoldConstant). fp16_params: parameters (weights
    passed as inputs) that become float16. The integer conv2d/matmul of a mixed build (int8_kernels: int8 operands,
    int32 out_dtype) are left as they are: ToMixedPrecision would give them out_dtype float32 and a float16 result
    (its policy for the two ops does not look at the operand types), so they are hidden from it behind a stand-in
    call, and put back after."""
    import tvm
    from tvm import relax

    ops = {tvm.ir.Op.get("relax.matmul"), tvm.ir.Op.get("relax.nn.conv2d")}
    packed = tvm.ir.Op.get("relax.call_pure_packed")
    hidden: dict[str, relax.Call] = {}

    @relax.expr_functor.mutator
    class Hide(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op in ops and not str(call.ty.dtype).startswith(("float", "bfloat")):
                key = f"autoglm.integer_op.{len(hidden)}"
                hidden[key] = call
                return relax.op.call_pure_packed(key, *call.args, ty_args=call.ty)
            return call

    @relax.expr_functor.mutator
    class Restore(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op == packed and isinstance(call.args[0], relax.ExternFunc) and str(call.args[0].global_symbol) in hidden:
                old = hidden[str(call.args[0].global_symbol)]
                return relax.Call(old.op, list(call.args[1:]), old.attrs)
            return call

    mod = mutate_functions(Hide(mod), mod)
    mod = relax.transform.ToMixedPrecision("float32", fp16_params)(mod)
    return mutate_functions(Restore(mod), mod) if hidden else mod


def lower(mod, desc: TargetDescriptor, strategy: str, context: ScheduleContext | None = None):
    """The lowered module and the TVM target. context.fp16 applies mixed_precision first, context.split_k then splits
    the float16 GEMMs that launch too few thread blocks (CUDA targets with cuda.sm_count), context.attention_kernel
    runs self-attention as one kernel (CUDA targets: gpu_attention.fuse_attention); context.cuda_graph sets
    relax.backend.use_cuda_graph for the target's pipeline (its RewriteCUDAGraph pass; no effect on CPU targets)."""
    import tvm

    from .errors import InputError

    if strategy not in _STRATEGIES:
        raise InputError(f"unknown schedule strategy '{strategy}'", f"valid strategies: {', '.join(strategies())}")
    context = context or ScheduleContext(desc=desc)
    target = make_target(desc)
    if context.fp16:
        mod = mixed_precision(mod)
    if context.conv_layout == "NHWC" and target.kind.name == "cuda":
        from .gpu_schedules import float16_convs, nhwc_convs

        convs = float16_convs(mod)
        if convs:
            mod = nhwc_convs(mod)
            context.notes.append(f"{convs} float16 conv(s) as NHWC/OHWI")
    if context.cpu_kernels and target.kind.name == "llvm":
        from .cpu_kernels import rewrite

        mod, kernels = rewrite(mod, target, winograd=context.winograd)
        if kernels.kernels:
            context.notes.append(kernels.describe())
            # erf, exp and tanh as topi's vectorizable approximations: LLVM calls libm per element (a GELU's erf took
            # a third of BERT's FFN-up kernel); ONNX Runtime's MLAS approximates them too
            from tvm import relax

            mod = relax.transform.FastMathTransform()(mod)
    if context.split_k and target.kind.name == "cuda" and desc.cuda is not None and desc.cuda.sm_count:
        from .gpu_schedules import SPLIT_K_WAVES, split_k

        splits: list = []
        mod = split_k(mod, desc.cuda.sm_count, splits=splits)
        if splits:
            factors = sorted({s for _op, s in splits})
            context.notes.append(f"split-K on {sum(op == 'matmul' for op, _ in splits)} matmul(s) and {sum(op == 'conv2d' for op, _ in splits)} conv(s) "
                                 f"that launch fewer than {SPLIT_K_WAVES} waves of thread blocks on {desc.cuda.sm_count} SMs, in {'/'.join(map(str, factors))} slices")
    if context.attention_kernel and target.kind.name == "cuda":
        from .gpu_attention import describe, fuse_attention

        found: list = []
        mod = fuse_attention(mod, found)
        if found:
            context.notes.append(describe(found))
    if target.kind.name == "cuda":
        from .tune_worker import import_tensor_intrinsics

        import_tensor_intrinsics()  # DLight's tensor-core rule imports them: seconds instead of half a minute
    cur = tvm.transform.PassContext.current()  # its settings are kept
    with tvm.transform.PassContext(opt_level=cur.opt_level, required_pass=list(cur.required_pass), disabled_pass=list(cur.disabled_pass),
                                   instruments=list(cur.instruments), config={**cur.config, "relax.backend.use_cuda_graph": context.cuda_graph}):
        lowered = _STRATEGIES[strategy](mod, target, context) if strategy in _WITH_CONTEXT else _STRATEGIES[strategy](mod, target)
    fused = sum(gv.name_hint.startswith("fused_split_k_layer_norm") for gv in lowered.functions)
    if fused:  # gpu_schedules.fuse_split_k_sums, in the CUDA legalize passes
        context.notes.append(f"{fused} split-K sum(s) fused into the layer norm that reads them")
    return lowered, target


def build(lowered, target) -> BuildResult:
    """Compile the lowered module: TIR's passes and the target's codegen (with cp.async for the GEMM pipelines that
    gpu_schedules made asynchronous: gpu_schedules.async_copy_config)."""
    import tvm
    from tvm import relax

    from .gpu_schedules import async_copy_config
    from .memory_fit import plan_figures, workspace_probe

    figures = plan_figures(lowered)
    cur = tvm.transform.PassContext.current()
    with tvm.transform.PassContext(opt_level=cur.opt_level, required_pass=list(cur.required_pass), disabled_pass=list(cur.disabled_pass),
                                   instruments=list(cur.instruments), config={**cur.config, **async_copy_config(target)}):
        with workspace_probe(figures):  # the kernels' scratch space, read after TVM's StorageRewrite pass
            ex = relax.build(lowered, target, relax_pipeline=None)
    return BuildResult(ex, figures)


def export(result: BuildResult, path: str, desc: TargetDescriptor, target) -> None:
    """Write the library: linked for the descriptor's CPU, with CUDA code compiled for its SM (see toolchain)."""
    from .toolchain import export_library

    export_library(result.executable, path, desc, target)
