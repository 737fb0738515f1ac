"""The roofline latency estimate: what a model should take on a target, from the target's peak FLOP/s per dtype
and its memory bandwidth alone.

For each node of the optimized ONNX (after shape inference):

    t_op = max(flops / peak[dtype], bytes / bandwidth)        (compute-bound when the first term is larger)
    L    = Σ t_op + kernels × launch_overhead

- FLOPs count a multiply-add as 2. Conv, ConvTranspose, MatMul, Gemm and attention count their multiply-adds;
  normalizations, softmax, elementwise ops, reductions and pooling count a few FLOPs per element (the constants
  are in `_ELEMENTWISE_FLOPS` and the counters below).
- Bytes are every distinct input (weights included) and output, at their dtype's size, read or written once: the
  ideal of a kernel that streams its operands through the memory hierarchy once. Caches are not modelled. Gather
  and Slice read only what they output (an embedding lookup does not read the whole table).
- Views (Reshape, Flatten, Squeeze, Unsqueeze, Identity) and shape computations launch no kernel and cost nothing.
- Every other node is one kernel, with a per-kind launch overhead (`LAUNCH_OVERHEAD_US`). Fusion is not modelled:
  an elementwise op after a Conv is charged its own memory traffic and launch, as an unfused runtime would.

This is a lower bound for a good implementation, not a prediction of TVM's untuned schedules: see
docs/roofline.md for how far measured latencies are from it on this machine and on an H200.
"""
from __future__ import annotations

import contextlib
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, helper
from pydantic import BaseModel, Field

from .target import TargetDescriptor

# Per-kernel launch overhead, by target kind (microseconds). CUDA: a kernel launch from TVM's VM (the driver's
# launch latency, ~2-4 us, plus the VM's dispatch of a packed function). CPU: the VM's dispatch plus the fork/join
# of TVM's thread pool for a parallel loop. NPU: a vendor runtime's op dispatch. Assumptions, stated in every report.
LAUNCH_OVERHEAD_US = {"cuda": 5.0, "cpu": 2.0, "npu-onnx": 10.0}

# Nodes that are views or shape arithmetic: no kernel, no traffic.
_FREE = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Size", "Constant", "Dropout"}

# FLOPs per output element for elementwise ops (1 unless listed). Transcendentals are counted as a few FLOPs:
# they are memory-bound on every target here, so the exact figure does not move the estimate.
_ELEMENTWISE_FLOPS = {
    "Erf": 8, "Tanh": 8, "Exp": 4, "Log": 4, "Sigmoid": 4, "Gelu": 8, "FastGelu": 10, "BiasGelu": 9,
    "QuickGelu": 5, "HardSigmoid": 3, "HardSwish": 4, "Softplus": 5, "Mish": 12, "Elu": 4, "Selu": 5,
    "LeakyRelu": 2, "PRelu": 2, "Clip": 2, "Pow": 4, "Sqrt": 4, "Reciprocal": 1, "Where": 1,
}
_ZERO_FLOP_COPIES = {
    "Transpose", "Concat", "Split", "Slice", "Gather", "GatherElements", "GatherND", "Expand", "Pad", "Cast",
    "Tile", "DepthToSpace", "SpaceToDepth", "Resize", "Upsample", "ScatterND", "ScatterElements", "Trilu",
    "ConstantOfShape", "Range", "OneHot", "NonZero", "TopK", "CumSum",
}
_READS_OUTPUT_SIZED = {"Gather", "GatherElements", "GatherND", "Slice"}
_REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
               "ReduceSumSquare", "ReduceLogSumExp", "ArgMax", "ArgMin", "GlobalAveragePool", "GlobalMaxPool"}

_DTYPE = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16",
          TensorProto.INT8: "int8", TensorProto.UINT8: "int8", TensorProto.DOUBLE: "fp64"}


# ----------------------------------------------------------------------------------------------- report schema

class OpEstimate(BaseModel):
    name: str
    op_type: str
    dtype: str
    flops: float
    bytes: float
    ms: float = Field(description="max(compute, memory), without the launch overhead")
    bound: str = Field(description="compute | memory")
    intensity: float = Field(description="FLOPs per byte")


class EstimateReport(BaseModel):
    status: str = "estimate"
    method: str = "roofline: sum over ops of max(flops / peak[dtype], bytes / bandwidth) + kernels x launch overhead"
    total_ms: float
    compute_bound_ms: float = Field(description="the part of the sum spent in compute-bound ops")
    memory_bound_ms: float = Field(description="the part of the sum spent in memory-bound ops")
    overhead_ms: float
    kernels: int
    total_flops: float
    total_bytes: float
    peak_flops: dict[str, float] = Field(description="peak FLOP/s used, per dtype that occurs in the model")
    memory_bandwidth_gbps: float
    launch_overhead_us: float
    ridge_point: float = Field(description="FLOPs per byte above which an fp32 op is compute-bound")
    figures_from: str = Field(description="where the peak and bandwidth come from")
    assumptions: list[str] = []
    top_ops: list[OpEstimate] = []
    op_types: dict[str, float] = Field(default_factory=dict, description="estimated ms per op type (without overhead)")
    skipped: list[str] = Field(default_factory=list, description="nodes left out: shapes unknown after inference")


# ---------------------------------------------------------------------------------------------- the roofline

@dataclass(frozen=True)
class Roofline:
    peak_flops: dict[str, float]  # FLOP/s per dtype
    bandwidth_gbps: float
    launch_overhead_us: float
    figures_from: str
    assumptions: tuple[str, ...] = ()

    def peak(self, dtype: str) -> tuple[float, str | None]:
        """The peak for `dtype`, and a note when another dtype's peak stands in for it."""
        if dtype in self.peak_flops:
            return self.peak_flops[dtype], None
        for alt in ("fp32", "fp16", "bf16"):
            if alt in self.peak_flops:
                return self.peak_flops[alt], f"no {dtype} peak: the {alt} peak is used for {dtype} ops"
        raise ValueError("no peak FLOP/s")


# FP32 FLOP per cycle per core, by LLVM CPU name: FMA units x SIMD lanes x 2. Zen 4 executes AVX-512 on its two
# 256-bit FMA pipes (AMD "Software Optimization Guide for the AMD Zen4 Microarchitecture", 57647), so it has the
# rate of AVX2; Intel server cores with two 512-bit FMA units reach 64 (Intel optimization manual).
_FLOP_PER_CYCLE = [
    (r"znver5", 64), (r"znver[234]", 32), (r"znver1", 16),
    (r"skylake-avx512|cascadelake|cooperlake|icelake-server|sapphirerapids|emeraldrapids|graniterapids", 64),
    (r"neoverse-v1", 32), (r"neoverse-(v2|n2)|cortex-a7[68]|cortex-x", 16),
]
# Sustained DRAM bandwidth one core draws (GB/s): limited by the misses one core keeps in flight, not by the
# channels. 20 GB/s is typical of one Zen 4 / Ice Lake core (STREAM-like copy, one thread); see docs/roofline.md
# for what numpy measured on this machine.
HOST_BANDWIDTH_PER_CORE_GBPS = 20.0


def host_roofline(desc: TargetDescriptor) -> Roofline:
    """Figures derived for this machine when its descriptor has none (detect_host): cores x clock x FLOP/cycle of
    its core type, and a per-core bandwidth."""
    cpu = desc.cpu
    cores = (cpu.cores if cpu and cpu.cores else None) or 1
    mcpu = (cpu.mcpu if cpu else None) or "generic"
    ghz = _cpu_ghz()
    fpc = next((f for pat, f in _FLOP_PER_CYCLE if re.fullmatch(pat, mcpu)), None)
    notes = []
    if fpc is None:
        from .target import cpu_flags

        flags = set(cpu_flags())
        fpc = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 16 if "asimd" in flags or "avx" in flags else 8
        notes.append(f"FLOP/cycle for CPU '{mcpu}' guessed from its ISA flags: {fpc}")
    peak = cores * ghz * 1e9 * fpc
    bw = cores * HOST_BANDWIDTH_PER_CORE_GBPS
    src = (f"derived for this machine: {cores} cores x {ghz:.2f} GHz x {fpc} fp32 FLOP/cycle ({mcpu}) = "
           f"{peak / 1e9:.0f} GFLOP/s; bandwidth {cores} x {HOST_BANDWIDTH_PER_CORE_GBPS:g} GB/s per core")
    return Roofline({"fp32": peak, "int8": 4 * peak}, bw, LAUNCH_OVERHEAD_US["cpu"], src, tuple(notes))


def _cpu_ghz() -> float:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) / 1000
    except (OSError, ValueError):
        pass
    return 2.5  # pragma: no cover - no /proc/cpuinfo


def roofline_for(desc: TargetDescriptor, launch_overhead_us: float | None = None) -> Roofline:
    """The descriptor's figures; for a detected host without figures, figures derived for this machine."""
    overhead = LAUNCH_OVERHEAD_US.get(desc.kind, 5.0) if launch_overhead_us is None else launch_overhead_us
    if desc.peak_flops and desc.memory_bandwidth_gbps:
        src = f"target descriptor {desc.source or desc.name}"
        return Roofline(dict(desc.peak_flops), desc.memory_bandwidth_gbps, overhead, src)
    if desc.kind == "cpu" and desc.detect_host:
        r = host_roofline(desc)
        return Roofline(r.peak_flops, r.bandwidth_gbps, overhead, r.figures_from, r.assumptions)
    raise ValueError(f"target '{desc.name}' has no peak_flops / memory_bandwidth_gbps for a roofline estimate")


# ------------------------------------------------------------------------------------------ shapes and counts

def skeleton(model: onnx.ModelProto, min_elements: int = 64, input_shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """A copy of the graph without its weights: initializers of at least `min_elements` become graph inputs of
    the same type and shape (small ones, such as Reshape targets, stay, so shape inference can read them). Input
    shapes are pinned from `input_shapes`. Cheap for large models: no weight data is copied."""
    g = model.graph
    big = [t for t in g.initializer if math.prod(t.dims) >= min_elements]
    big_names = {t.name for t in big}
    inputs = []
    for vi in g.input:
        if vi.name in big_names:
            continue
        if input_shapes and vi.name in input_shapes:
            vi = helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, list(input_shapes[vi.name]))
        inputs.append(vi)
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in big]
    graph = helper.make_graph(list(g.node), g.name, inputs, list(g.output),
                              initializer=[t for t in g.initializer if t.name not in big_names],
                              value_info=list(g.value_info))
    out = helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    out.functions.extend(model.functions)
    return out


def _infer(model: onnx.ModelProto) -> dict[str, tuple[list[int] | None, int]]:
    """name -> (static shape or None, elem type), for every tensor after shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; unknown shapes are reported as skipped
        inferred = model
    if any(n.domain == "com.microsoft" for n in model.graph.node):
        try:  # ONNX Runtime's symbolic inference knows its contrib ops (Attention, SkipLayerNormalization, ...)
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            # On incomplete inference it saves sym_shape_infer_temp.onnx into the working directory: keep that out
            # of the user's folder.
            with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
                inferred = SymbolicShapeInference.infer_shapes(inferred, auto_merge=True)
        except Exception:  # noqa: BLE001
            pass
    info: dict[str, tuple[list[int] | None, int]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim] if tt.HasField("shape") else None
        info[vi.name] = (dims if dims is not None and None not in dims else None, tt.elem_type)
    for t in g.initializer:
        info[t.name] = (list(t.dims), t.data_type)
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    info[n.output[0]] = (list(a.t.dims), a.t.data_type)
    return info


def _size(elem_type: int) -> int:
    return helper.tensor_dtype_to_np_dtype(elem_type).itemsize if elem_type else 4


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def node_flops(node, shapes: list[list[int] | None], out_shapes: list[list[int] | None]) -> float:
    """FLOPs of one node (a multiply-add counts 2), from its input and output shapes."""
    op = node.op_type
    out = out_shapes[0] if out_shapes else None
    n_out = math.prod(out) if out is not None else 0
    if op == "Conv":
        w = shapes[1]  # [Cout, Cin/group, k...]
        flops = 2.0 * n_out * math.prod(w[1:])
        return flops + (n_out if len(shapes) > 2 and shapes[2] is not None else 0)
    if op == "ConvTranspose":
        x, w = shapes[0], shapes[1]  # w: [Cin, Cout/group, k...]; every input element meets Cout/group x k weights
        flops = 2.0 * math.prod(x) * math.prod(w[1:])
        return flops + (n_out if len(shapes) > 2 and shapes[2] is not None else 0)
    if op in ("MatMul", "MatMulInteger", "FusedMatMul"):
        a = shapes[0]
        k = a[-1] if len(a) > 1 else a[0]
        return 2.0 * n_out * k
    if op == "Gemm":
        a = shapes[0]
        k = a[0] if _attr(node, "transA", 0) else a[1]
        return 2.0 * n_out * k + (n_out if len(shapes) > 2 and shapes[2] is not None else 0)
    if op == "Attention":  # com.microsoft: input [B,S,H], weights [H, Dq+Dk+Dv], bias
        x, w = shapes[0], shapes[1]
        b, s, hid = x
        sizes = _attr(node, "qkv_hidden_sizes") or [w[1] // 3] * 3
        skv = s
        proj = 2.0 * b * s * hid * w[1] + b * s * w[1]
        scores = 2.0 * b * s * skv * sizes[0] + 2.0 * b * s * skv * sizes[2]
        return proj + scores + 5.0 * b * int(_attr(node, "num_heads", 1)) * s * skv
    if op == "MultiHeadAttention":  # com.microsoft: query [B,S,D], key [B,L,D], value [B,L,Dv]
        q = shapes[0]
        k = shapes[1] if len(shapes) > 1 and shapes[1] is not None and len(shapes[1]) == 3 else q
        b, s, d = q
        skv = k[1]
        return 4.0 * b * s * skv * d + 5.0 * b * int(_attr(node, "num_heads", 1)) * s * skv
    if op in ("LayerNormalization", "SimplifiedLayerNormalization", "InstanceNormalization", "GroupNormalization"):
        return 8.0 * n_out
    if op in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization"):
        return 9.0 * n_out
    if op == "BatchNormalization":
        return 2.0 * n_out
    if op in ("Softmax", "LogSoftmax"):
        return 5.0 * n_out
    if op in _REDUCTIONS:
        return float(math.prod(shapes[0])) if shapes and shapes[0] is not None else float(n_out)
    if op in ("MaxPool", "AveragePool", "LpPool"):
        return float(n_out * math.prod(_attr(node, "kernel_shape", [1])))
    if op in _ZERO_FLOP_COPIES:
        return 0.0
    return float(n_out * _ELEMENTWISE_FLOPS.get(op, 1))


@dataclass
class _Op:
    name: str
    op_type: str
    dtype: str
    flops: float
    bytes: float


def count_ops(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> tuple[list[_Op], list[str]]:
    """(the kernels of the model with their FLOPs and bytes, the nodes skipped for unknown shapes)."""
    info = _infer(skeleton(model, input_shapes=input_shapes))
    ops, skipped = [], []
    for i, node in enumerate(model.graph.node):
        if node.op_type in _FREE:
            continue
        name = node.name or f"{node.op_type}_{i}"
        ins = [info.get(x, (None, 0)) if x else (None, 0) for x in node.input]
        outs = [info.get(y, (None, 0)) for y in node.output if y]
        if any(s is None for s, _ in outs) or any(s is None for (s, _), x in zip(ins, node.input) if x):
            skipped.append(f"{name} ({node.op_type})")
            continue
        try:
            flops = node_flops(node, [s for s, _ in ins], [s for s, _ in outs])
        except (IndexError, TypeError, ValueError):
            skipped.append(f"{name} ({node.op_type})")
            continue
        distinct = {x: v for x, v in zip(node.input, ins) if x}
        if node.op_type in _READS_OUTPUT_SIZED and node.input[0] in distinct:
            # A gather or slice reads only the elements it outputs, not its whole data input (an embedding table).
            shape, t = outs[0]
            distinct[node.input[0]] = (shape, distinct[node.input[0]][1])
        nbytes = sum(math.prod(s) * _size(t) for s, t in distinct.values()) + sum(math.prod(s) * _size(t) for s, t in outs)
        # The dtype of the arithmetic: the first floating (or int8) input, else the output.
        types = [t for _, t in ins if t in _DTYPE] + [t for _, t in outs if t in _DTYPE]
        dtype = _DTYPE.get(types[0], "fp32") if types else "fp32"
        ops.append(_Op(name, node.op_type, dtype, flops, float(nbytes)))
    return ops, skipped


def estimate(model: onnx.ModelProto, roof: Roofline, input_shapes: dict[str, list[int]] | None = None, top: int = 10) -> EstimateReport:
    """The roofline estimate of `model` (the optimized ONNX) under `roof`."""
    ops, skipped = count_ops(model, input_shapes)
    bw = roof.bandwidth_gbps * 1e9
    notes = list(roof.assumptions)
    rows: list[OpEstimate] = []
    used: dict[str, float] = {}
    for op in ops:
        peak, note = roof.peak(op.dtype)
        if note and note not in notes:
            notes.append(note)
        used[op.dtype] = peak
        tc, tm = op.flops / peak, op.bytes / bw
        rows.append(OpEstimate(name=op.name, op_type=op.op_type, dtype=op.dtype, flops=op.flops, bytes=op.bytes,
                               ms=max(tc, tm) * 1e3, bound="compute" if tc > tm else "memory",
                               intensity=op.flops / op.bytes if op.bytes else 0.0))
    overhead = len(rows) * roof.launch_overhead_us / 1e3
    by_type: dict[str, float] = {}
    for r in rows:
        by_type[r.op_type] = by_type.get(r.op_type, 0.0) + r.ms
    fp32_peak = roof.peak("fp32")[0]
    notes += [
        "FLOPs: a multiply-add counts 2; normalizations, softmax, elementwise ops and reductions a few per element",
        "bytes: each distinct input (weights included) and output moved once at its dtype's size; caches not modelled",
        "no fusion: every node but views and shape ops is one kernel with its own launch and memory traffic",
        f"launch overhead {roof.launch_overhead_us:g} us per kernel",
    ]
    return EstimateReport(
        total_ms=sum(r.ms for r in rows) + overhead,
        compute_bound_ms=sum(r.ms for r in rows if r.bound == "compute"),
        memory_bound_ms=sum(r.ms for r in rows if r.bound == "memory"),
        overhead_ms=overhead,
        kernels=len(rows),
        total_flops=sum(r.flops for r in rows),
        total_bytes=sum(r.bytes for r in rows),
        peak_flops=used or {"fp32": fp32_peak},
        memory_bandwidth_gbps=roof.bandwidth_gbps,
        launch_overhead_us=roof.launch_overhead_us,
        ridge_point=fp32_peak / bw,
        figures_from=roof.figures_from,
        assumptions=notes,
        top_ops=sorted(rows, key=lambda r: -r.ms)[:top],
        op_types=dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
        skipped=skipped,
    )


def estimate_for_target(model: onnx.ModelProto, desc: TargetDescriptor, input_shapes: dict[str, list[int]] | None = None,
                        launch_overhead_us: float | None = None) -> EstimateReport:
    return estimate(model, roofline_for(desc, launch_overhead_us), input_shapes)

