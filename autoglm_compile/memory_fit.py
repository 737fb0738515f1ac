"""The memory-fit check: does the model, at the shapes asked for, fit in the target's memory?

    needed = weights + inputs + peak activations + workspace

- weights: the graph's initializers and Constant nodes at their dtype's size (on the device they are the
  executable's constants).
- inputs: the input tensors, which the caller holds for the whole run.
- peak activations, at two points of the pipeline:
  1. graph estimate, in the validate stage, before anything is built or run (ONNX Runtime's reference run included,
     so a model far too large for this machine is refused before it is allocated here): a liveness walk over the
     ONNX graph in its topological order. A tensor lives from the node that writes it to the last node that reads
     it, graph outputs to the end; views (Reshape, Flatten, Squeeze, Unsqueeze, Identity) share their input's
     memory; the peak of the live bytes, less the inputs. Shapes come from ONNX shape inference; tensors it cannot
     size are listed and not counted.
  2. TVM's static memory plan, checked right after relax.build and before the library is exported, packaged or
     run: the storages the plan allocates (the outputs are among them) plus tensors allocated outside the plan.
     Workspace: the scratch buffers a kernel allocates in global memory (on the CPU's default lowering, a fused
     kernel's padded input and its intermediates; none on GPUs, where DLight keeps them in shared memory and
     registers), the largest kernel's, since a kernel frees its scratch when it returns. It is read during the
     build, after TVM's StorageRewrite pass has let buffers share memory (a pass instrument); should that pass not
     be seen, the sum of the kernel's buffers before the rewrite stands in (an upper bound), and the report says so.
  The TVM plan, when there is one, decides. A build partitioned into TVM and ONNX Runtime segments keeps the graph
  estimate (ONNX Runtime's arena is not planned ahead).

  Checked on this machine: the conv net of tests/conftest.py at batch 2000 for the host: TVM plan 16.48 MB +
  workspace 24.16 MB = 40.64 MB; the first run of the loaded artifact raised the process's RSS by 40.65 MB (peak
  RSS, reset just before the run, less the RSS before it).
- capacity: the descriptor's memory_capacity_gb (GB = 10^9 bytes); for the detected host, this machine's MemTotal.
  A reserve stays free for the OS and the runtime (driver or CUDA context, TVM's allocator pools, the Python
  process, fragmentation): 10% of the capacity, at least 1 GB, at most half of it. usable = capacity - reserve.
  A target without a capacity is not checked, and the report says so.

A model that does not fit is a MemoryFitError, exit 2 (usage/input), not exit 4 (budget): the capacity is a fact of
the target, not a limit the user chose, and the model at these shapes cannot run there at all, so no artifact is
written. A budget the user chooses is --max-memory-mb (exit 4, the artifact is written, like the other budgets).

The memory that planning saved: the sum of the tensors TVM's VM materializes (each kernel's output) against the
storages of the plan, which reuses a storage once its tensor is dead.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import helper

from .errors import UnsupportedError
from .report import MemoryFitReport
from .target import TargetDescriptor

GB = 10**9
RESERVE_FRACTION = 0.10
RESERVE_MIN_BYTES = 1 * GB
RESERVE_RULE = "10% of the capacity, at least 1 GB, at most half of it, for the OS and the runtime"
VIEWS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}


class MemoryFitError(UnsupportedError):
    """The model needs more memory than the target has (exit 2: see the module docstring)."""


# ----------------------------------------------------------------------------------------------- the graph estimate

@dataclass
class GraphMemory:
    weight_bytes: int
    input_bytes: int
    output_bytes: int
    activation_bytes: int  # peak of the live tensors, inputs excluded (they are counted apart)
    intermediate_bytes: int  # every tensor a node writes (views excluded), graph outputs included
    unknown: list[str] = field(default_factory=list)  # tensors whose size shape inference left unknown


def _itemsize(elem_type: int) -> int:
    if elem_type in (onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16):
        return 2
    try:
        return helper.tensor_dtype_to_np_dtype(elem_type).itemsize
    except (KeyError, TypeError, ValueError):
        return 4


def weight_bytes(model: onnx.ModelProto) -> int:
    """Initializers and Constant node values, from their dims (no weight data is converted)."""
    total = sum(math.prod(t.dims) * _itemsize(t.data_type) for t in model.graph.initializer)
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    total += math.prod(a.t.dims) * _itemsize(a.t.data_type)
    return total


def graph_memory(model: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> GraphMemory:
    """The liveness estimate of the ONNX graph at the given input shapes (see the module docstring)."""
    from .estimate import _infer, skeleton
    from .inputs import graph_inputs
    from .partition import node_inputs

    info = _infer(skeleton(model, input_shapes=input_shapes))
    g = model.graph
    consts = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    unknown: list[str] = []

    def size(name: str) -> int:
        shape, elem = info.get(name, (None, 0))
        if shape is None:
            unknown.append(name)
            return 0
        return math.prod(shape) * _itemsize(elem)

    inputs = {vi.name: math.prod(input_shapes[vi.name]) * _itemsize(vi.type.tensor_type.elem_type) if vi.name in input_shapes else size(vi.name)
              for vi in graph_inputs(model)}
    root: dict[str, str] = {}  # a view's output -> the tensor whose memory it shares
    for node in g.node:
        if node.op_type in VIEWS and node.input and node.input[0] not in consts:
            for out in node.output:
                root[out] = root.get(node.input[0], node.input[0])
    outputs = {root.get(o.name, o.name) for o in g.output}
    last: dict[str, int] = {}
    for i, node in enumerate(g.node):
        for t in node_inputs(node):
            last[root.get(t, t)] = i
    sizes: dict[str, int] = {}
    live = sum(inputs.values())
    peak = live
    intermediate = 0
    for i, node in enumerate(g.node):
        if node.op_type != "Constant":
            for out in node.output:
                if out and out not in root:
                    sizes[out] = size(out)
                    live += sizes[out]
                    intermediate += sizes[out]
        peak = max(peak, live)
        for t in {root.get(t, t) for t in [*node_inputs(node), *node.output]}:
            if t in sizes and t not in outputs and last.get(t, i) <= i:
                live -= sizes.pop(t)
    output_bytes = sum(size(o.name) for o in g.output if o.name not in inputs)
    return GraphMemory(weight_bytes(model), sum(inputs.values()), output_bytes, peak - sum(inputs.values()), intermediate,
                       sorted(set(unknown)))


# ---------------------------------------------------------------------------------------------- TVM's memory plan

@dataclass
class PlanFigures:
    storage_bytes: int = 0  # the storages of the static plan
    storages: int = 0
    tensor_bytes: int = 0  # the tensors placed in them (and allocated outside the plan): before planning's reuse
    tensors: int = 0
    unplanned_bytes: int = 0  # tensors allocated outside the plan (builtin.alloc_tensor)
    workspace_bytes: int = 0  # the largest global scratch space of one kernel
    workspace_kernel: str | None = None
    workspace_source: str = "kernel buffers before TVM's storage rewrite (an upper bound)"
    dynamic: int = 0  # allocations whose size is not static (not counted)
    constant_bytes: int = 0  # the weights as built: packed, and transformed (cpu_kernels' Winograd weights are 1.8-4x the conv's)

    def __add__(self, other: "PlanFigures") -> "PlanFigures":
        big = self if self.workspace_bytes >= other.workspace_bytes else other
        return PlanFigures(self.storage_bytes + other.storage_bytes, self.storages + other.storages, self.tensor_bytes + other.tensor_bytes,
                           self.tensors + other.tensors, self.unplanned_bytes + other.unplanned_bytes, big.workspace_bytes,
                           big.workspace_kernel, big.workspace_source, self.dynamic + other.dynamic, self.constant_bytes + other.constant_bytes)


def _static_bytes(shape, dtype) -> int | None:
    import tvm
    from tvm import relax

    if not isinstance(shape, relax.ShapeExpr) or not all(isinstance(v, tvm.tirx.IntImm) for v in shape.values):
        return None
    dt = tvm.DataType(str(getattr(dtype, "value", dtype)))
    return math.prod(int(v) for v in shape.values) * ((dt.bits + 7) // 8) * dt.lanes


def walk_stmts(stmt, fn) -> None:
    """Call fn on every statement of a TIR body, parents first (TVM 0.27 exposes no TIR post_order_visit to Python)."""
    import tvm

    fn(stmt)
    for attr in ("block", "body", "then_case", "else_case", "init"):
        child = getattr(stmt, attr, None)
        if isinstance(child, tvm.tirx.Stmt):
            walk_stmts(child, fn)
    for child in getattr(stmt, "seq", None) or ():
        walk_stmts(child, fn)


def _kernel_workspace(func) -> int:
    """Bytes of the global-scope buffers a TIR kernel allocates (SBlock alloc_buffers, AllocBuffer statements)."""
    import tvm
    from tvm.s_tir.stmt import SBlock
    from tvm.tirx.stmt import AllocBuffer

    def buffer_bytes(buf) -> int:
        if buf.scope() not in ("global", ""):
            return 0
        if not all(isinstance(d, tvm.tirx.IntImm) for d in buf.shape):
            return 0
        dt = tvm.DataType(str(buf.dtype))
        return math.prod(int(d) for d in buf.shape) * ((dt.bits + 7) // 8) * dt.lanes

    buffers = []

    def collect(node) -> None:
        if isinstance(node, SBlock):
            buffers.extend(node.alloc_buffers)
        elif isinstance(node, AllocBuffer):
            buffers.append(node.buffer)

    walk_stmts(func.body, collect)
    return sum(buffer_bytes(b) for b in buffers)


# The tensor allocations of a lowered Relax module: (index of the shape argument, the dtype follows it; whether the
# tensor sits in a storage of the static plan).
_ALLOC_TENSOR = {"relax.vm.alloc_tensor": (2, True), "relax.memory.alloc_tensor": (2, True), "relax.builtin.alloc_tensor": (0, False)}


def plan_figures(lowered) -> PlanFigures:
    """The static memory plan of a lowered Relax module (before relax.build)."""
    import tvm
    from tvm import relax
    from tvm.ir.expr import Constant

    f = PlanFigures()

    def visit(expr) -> None:
        if isinstance(expr, Constant) and isinstance(expr.value, tvm.runtime.Tensor):  # (post_order_visit visits a shared node once)
            f.constant_bytes += math.prod(expr.value.shape) * _np_itemsize(str(expr.value.dtype))
            return
        if not (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op)):
            return
        name = expr.op.name
        if name.endswith("alloc_storage"):
            shape = expr.args[0]
            if isinstance(shape, relax.ShapeExpr) and all(isinstance(v, tvm.tirx.IntImm) for v in shape.values):
                f.storage_bytes += int(shape.values[0])
                f.storages += 1
            else:
                f.dynamic += 1
        elif name in _ALLOC_TENSOR:
            shape_at, planned = _ALLOC_TENSOR[name]
            n = _static_bytes(expr.args[shape_at], expr.args[shape_at + 1])
            if n is None:
                f.dynamic += 1
            else:
                f.tensor_bytes += n
                f.tensors += 1
                f.unplanned_bytes += 0 if planned else n

    for gv, func in lowered.functions.items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
        elif isinstance(func, tvm.tirx.PrimFunc):
            ws = _kernel_workspace(func)
            if ws > f.workspace_bytes:
                f.workspace_bytes, f.workspace_kernel = ws, gv.name_hint
    return f


STORAGE_REWRITE = "tirx.StorageRewrite"


@contextlib.contextmanager
def workspace_probe(figures: PlanFigures):
    """Around relax.build: a pass instrument reads each kernel's global allocations right after TVM's StorageRewrite
    pass (tvm.s_tir.analysis.calculate_allocated_bytes) and sets figures.workspace_* to the largest kernel's. The
    current PassContext's settings are kept."""
    import tvm
    from tvm.s_tir.analysis import calculate_allocated_bytes

    seen: dict[str, int] = {}

    @tvm.instrument.pass_instrument
    class _AfterStorageRewrite:
        def run_after_pass(self, mod, info):
            if info.name == STORAGE_REWRITE:
                for name, scopes in calculate_allocated_bytes(mod).items():
                    seen[str(name)] = max(seen.get(str(name), 0), int(scopes.get("global", 0)))

    cur = tvm.transform.PassContext.current()
    with tvm.transform.PassContext(opt_level=cur.opt_level, required_pass=list(cur.required_pass), disabled_pass=list(cur.disabled_pass),
                                   instruments=[*cur.instruments, _AfterStorageRewrite()], config=dict(cur.config)):
        yield
    if seen:
        kernel, ws = max(seen.items(), key=lambda kv: kv[1])
        figures.workspace_bytes, figures.workspace_kernel = ws, kernel if ws else None
        figures.workspace_source = "kernel buffers after TVM's StorageRewrite"


# ---------------------------------------------------------------------------------------------------- capacity

def capacity(desc: TargetDescriptor) -> tuple[int | None, str]:
    """(bytes, where the figure comes from); (None, why) when the target has none."""
    if desc.memory_capacity_gb:
        return int(desc.memory_capacity_gb * GB), f"memory_capacity_gb {desc.memory_capacity_gb:g} of {Path(desc.source).name if desc.source else desc.name}"
    if desc.detect_host:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024, "this machine's MemTotal (/proc/meminfo)"
        except (OSError, ValueError, IndexError):
            pass
        return None, "this machine's memory is unknown (no /proc/meminfo)"
    return None, f"target '{desc.name}' gives no memory_capacity_gb"


def reserve(cap: int) -> int:
    return int(min(max(RESERVE_FRACTION * cap, RESERVE_MIN_BYTES), cap / 2))


def fit_report(desc: TargetDescriptor, basis: str, weights: int, inputs: int, activations: int, workspace: int,
               graph_activations: int, unknown: list[str] | None = None) -> MemoryFitReport:
    cap, source = capacity(desc)
    needed = weights + inputs + activations + workspace
    res = reserve(cap) if cap is not None else None
    usable = cap - res if cap is not None else None
    return MemoryFitReport(
        basis=basis, weight_bytes=weights, input_bytes=inputs, activation_bytes=activations, workspace_bytes=workspace,
        needed_bytes=needed, graph_activation_bytes=graph_activations, capacity_bytes=cap, capacity_source=source,
        reserve_bytes=res, reserve_rule=RESERVE_RULE, usable_bytes=usable, fits=None if usable is None else needed <= usable,
        unknown_tensors=list(unknown or [])[:20],
    )


def _gb(n: int) -> str:
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / 1e6:.2f} MB"


def raise_if_too_large(fit: MemoryFitReport, target: str) -> None:
    if fit.fits is not False:
        return
    parts = f"weights {_gb(fit.weight_bytes)} + inputs {_gb(fit.input_bytes)} + activations {_gb(fit.activation_bytes)}"
    if fit.workspace_bytes:
        parts += f" + workspace {_gb(fit.workspace_bytes)}"
    raise MemoryFitError(
        f"the model needs {_gb(fit.needed_bytes)} ({parts}; {fit.basis}) and target '{target}' has {_gb(fit.usable_bytes)} usable "
        f"({_gb(fit.capacity_bytes)} capacity, from {fit.capacity_source}, less {_gb(fit.reserve_bytes)} reserved for the OS and runtime)",
        "use smaller input shapes (batch, image size, sequence length), a lower precision the target lists (--precision fp16), or a target with more memory",
    )


# ---------------------------------------------------------------------------------------------- pipeline hooks

GRAPH_BASIS = "ONNX graph liveness estimate, before building"
PLAN_BASIS = "TVM static memory plan"


def check_graph(job) -> None:
    """The validate stage, before ONNX Runtime's reference run: the graph estimate against the target's memory."""
    shapes = {s.name: list(s.shape) for s in job.inputs}
    g = graph_memory(job.model, shapes)
    fit = fit_report(job.target, GRAPH_BASIS, g.weight_bytes, g.input_bytes, g.activation_bytes, 0, g.activation_bytes, g.unknown)
    job.report.memory_fit = fit
    raise_if_too_large(fit, job.target.name)


def check_plan(job, figures: PlanFigures) -> None:
    """After TVM's lowering (the whole model on TVM): TVM's plan against the target's memory."""
    earlier = job.report.memory_fit  # the graph estimate of the validate stage
    graph_act = earlier.graph_activation_bytes if earlier is not None else 0
    inputs = sum(math.prod(s.shape) * _np_itemsize(s.dtype) for s in job.inputs)
    fit = fit_report(job.target, PLAN_BASIS, figures.constant_bytes or weight_bytes(job.model), inputs, figures.storage_bytes + figures.unplanned_bytes,
                     figures.workspace_bytes, graph_act)
    job.report.memory_fit = fit
    raise_if_too_large(fit, job.target.name)


def _np_itemsize(dtype: str) -> int:
    import numpy as np

    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
