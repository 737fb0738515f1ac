"""convert-float16: run the model in float16, keeping numerically sensitive ops in float32 behind Casts.

Written on onnx-graphsurgeon rather than with onnxconverter-common's float16 converter (1.16, installable here),
which got two things wrong on this project's models: with keep_io_types it made BERT's `last_hidden_state` float16
(a block-listed LayerNormalization writes that output, and the converter retypes it), and it finds the tensors to
cast from ONNX shape inference alone, which knows no com.microsoft op, so blocked ops fed by fuse-gelu's or
fuse-attention's nodes got no Cast.

The rules:
- Every float32 tensor that a converted node reads or writes becomes float16. A node is converted unless its op is
  in `op_block_list`, its name is in `keep_fp32`, it holds a subgraph (If, Loop, Scan) or it is in a domain other
  than ONNX's and com.microsoft. Kept nodes read and write float32: a Cast to float32 goes in front of each float16
  input they read, and a Cast to float16 behind each output a converted node reads. One Cast per tensor and side.
- Constants are converted where converted nodes read them and stay float32 where kept nodes read them (a copy
  each way when both do). Values beyond float16's range are clamped to +-65504 (infinities stay infinite); the
  count is in the stats. Inputs that ONNX requires in float32 whatever the data type (Resize and Upsample scales)
  stay float32.
- Cast(to=float) in a converted node becomes Cast(to=float16); Constant and ConstantOfShape values are converted.
- keep_io_types: graph inputs and outputs keep float32, with Casts behind the inputs and in front of the outputs
  (the output names do not change). Without it they become float16, and the caller must feed float16.
- Tensors that shape inference cannot type (outputs of com.microsoft ops) take the type of the node's first input.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from autoglm_compile.pass_manager import GraphPass, PassContext, PassOptions, PassResult, register_pass

from ._graph import inferred

FP16_MAX = float(np.finfo(np.float16).max)
CONVERTIBLE_DOMAINS = ("", "ai.onnx", "com.microsoft")

# Ops whose accuracy suffers in float16: exponentials and normalizations (Softmax, LayerNormalization), reductions
# that sum many terms, Pow (overflows), ops that compute shapes or coordinates (Range, Resize), and
# NonMaxSuppression, which ONNX defines for float32 only.
DEFAULT_OP_BLOCK_LIST = [
    "Softmax", "LogSoftmax", "LayerNormalization",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "CumSum",
    "Exp", "Pow", "Range", "Resize", "NonMaxSuppression",
]
# Ops whose output type is an attribute that defaults to float32.
FLOAT_BY_DEFAULT = ("RandomNormal", "RandomUniform")

# Inputs that ONNX types as float32 (tensor(float)) whatever the node's data type.
FLOAT32_ONLY_INPUTS = {"Resize": {2}, "Upsample": {1}}


def _is_f32(t: gs.Tensor) -> bool:
    return t.dtype is not None and np.dtype(t.dtype) == np.float32


def _has_subgraph(node: gs.Node) -> bool:
    return any(isinstance(v, gs.Graph) or (isinstance(v, list) and v and isinstance(v[0], gs.Graph)) for v in node.attrs.values())


def _subgraph_reads(graph: gs.Graph) -> set[str]:
    """Names of the tensors that nodes inside subgraphs read (outer-scope tensors among them)."""
    names = set()
    for node in graph.nodes:
        for v in node.attrs.values():
            for sub in (v if isinstance(v, list) else [v]):
                if isinstance(sub, gs.Graph):
                    names |= {t.name for n in sub.nodes for t in n.inputs} | _subgraph_reads(sub)
    return names


def to_fp16(values: np.ndarray) -> tuple[np.ndarray, int]:
    """float32 -> float16, clamping finite values beyond +-65504; returns (array, number clamped)."""
    v = np.asarray(values, dtype=np.float32)
    over = np.isfinite(v) & (np.abs(v) > FP16_MAX)
    return np.clip(v, -FP16_MAX, FP16_MAX, where=np.isfinite(v), out=v.copy()).astype(np.float16), int(over.sum())


def _fill_unknown_dtypes(graph: gs.Graph) -> None:
    for node in graph.nodes:  # topologically sorted by the runner
        src = next((t for t in node.inputs if t.dtype is not None), None)
        for out in node.outputs:
            if out.dtype is None and src is not None:
                out.dtype = src.dtype


class _Converter:
    def __init__(self, graph: gs.Graph, opts: "ConvertFloat16.Options"):
        self.graph, self.opts = graph, opts
        self.casts: dict[tuple[str, int], gs.Variable] = {}  # (tensor name, onnx dtype) -> cast output
        self.const16: dict[str, gs.Constant] = {}
        self.stats = {"converted_nodes": 0, "kept_fp32": {}, "casts": 0, "clamped_values": 0}

    def keep(self, node: gs.Node, pinned: set[str]) -> bool:
        return (
            node.op in self.opts.op_block_list
            or node.name in self.opts.keep_fp32
            or (node.domain or "") not in CONVERTIBLE_DOMAINS
            or _has_subgraph(node)
            or any(t.name in pinned for t in node.outputs)
        )

    def cast(self, t: gs.Tensor, to: int) -> gs.Variable:
        key = (t.name, to)
        if key not in self.casts:
            suffix = "fp16" if to == onnx.TensorProto.FLOAT16 else "fp32"
            out = gs.Variable(f"{t.name}/to_{suffix}", dtype=np.float16 if suffix == "fp16" else np.float32, shape=t.shape)
            self.graph.nodes.append(gs.Node("Cast", name=f"{t.name}/Cast_to_{suffix}", attrs={"to": to}, inputs=[t], outputs=[out]))
            self.casts[key] = out
            self.stats["casts"] += 1
        return self.casts[key]

    def constant16(self, c: gs.Constant) -> gs.Constant:
        if c.name not in self.const16:
            values, clamped = to_fp16(c.values)
            self.stats["clamped_values"] += clamped
            self.const16[c.name] = gs.Constant(f"{c.name}/fp16", values)
        return self.const16[c.name]

    def convert_attrs(self, node: gs.Node) -> None:
        """Attributes that make a node write float32 (Cast's `to`, a `value`, a `dtype`) now make it write float16."""
        f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
        if node.op == "Cast" and node.attrs.get("to") == f32:
            node.attrs["to"] = f16
        elif node.op in ("Constant", "ConstantOfShape"):
            value = node.attrs.get("value")
            if value is None and node.op == "ConstantOfShape":  # the default value is a float32 zero
                node.attrs["value"] = gs.Constant(f"{node.name}/value", np.zeros(1, np.float16))
            elif isinstance(value, gs.Constant) and np.dtype(value.dtype) == np.float32:
                node.attrs["value"] = self.constant16(value)
        elif node.attrs.get("dtype") == f32 or node.op in FLOAT_BY_DEFAULT and "dtype" not in node.attrs:
            node.attrs["dtype"] = f16

    def run(self) -> dict:
        g, f16, f32 = self.graph, onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
        pinned = _subgraph_reads(g)
        nodes = list(g.nodes)
        kept = {id(n) for n in nodes if self.keep(n, pinned)}
        # 1. Retype the float32 tensors that converted nodes write, and the graph inputs unless kept as they are.
        converted: set[str] = set()
        for node in nodes:
            if id(node) not in kept:
                for out in node.outputs:
                    if _is_f32(out):
                        out.dtype = np.float16
                        converted.add(out.name)
        if not self.opts.keep_io_types:
            for inp in g.inputs:
                if _is_f32(inp):
                    inp.dtype = np.float16
                    converted.add(inp.name)
        # 2. Rewire inputs: converted nodes read float16, kept nodes read float32.
        for node in nodes:
            is_kept = id(node) in kept
            fp32_only = FLOAT32_ONLY_INPUTS.get(node.op, set())
            for i, t in enumerate(node.inputs):
                if isinstance(t, gs.Constant):
                    if not is_kept and i not in fp32_only and np.dtype(t.dtype) == np.float32:
                        node.inputs[i] = self.constant16(t)
                elif t.name in converted and (is_kept or i in fp32_only):
                    node.inputs[i] = self.cast(t, f32)
                elif _is_f32(t) and not is_kept and i not in fp32_only:
                    node.inputs[i] = self.cast(t, f16)
            if is_kept:
                self.stats["kept_fp32"][node.op] = self.stats["kept_fp32"].get(node.op, 0) + 1
            else:
                self.convert_attrs(node)
                self.stats["converted_nodes"] += 1
        # 3. Graph outputs: float32 with keep_io_types, else float16; the names stay.
        want = np.float32 if self.opts.keep_io_types else np.float16
        for k, out in enumerate(g.outputs):
            if out.dtype is None or np.dtype(out.dtype) not in (np.float16, np.float32) or np.dtype(out.dtype) == want:
                continue
            if out.name not in converted and want == np.float32:
                continue  # an original float16 output
            inner = gs.Variable(f"{out.name}/{'fp16' if want == np.float32 else 'fp32'}", dtype=out.dtype, shape=out.shape)
            for node in list(out.inputs):
                node.outputs[node.outputs.index(out)] = inner
            for node in list(out.outputs):
                node.inputs[node.inputs.index(out)] = inner
            out.dtype = want
            g.nodes.append(gs.Node("Cast", name=f"{out.name}/Cast_to_output", attrs={"to": f32 if want == np.float32 else f16}, inputs=[inner], outputs=[out]))
            self.stats["casts"] += 1
        return self.stats


@register_pass("convert-float16")
class ConvertFloat16(GraphPass):
    """Convert float32 tensors to float16, keeping sensitive ops (op_block_list, keep_fp32) in float32 behind Casts."""

    class Options(PassOptions):
        keep_io_types: bool = True  # graph inputs and outputs stay float32 (the pipeline feeds the source model's types)
        op_block_list: list[str] = DEFAULT_OP_BLOCK_LIST
        keep_fp32: list[str] = []  # node names to keep in float32

    def run(self, graph: gs.Graph, opts: Options, ctx: PassContext) -> PassResult:
        graph = inferred(graph, ctx.ir_version)
        _fill_unknown_dtypes(graph)
        if not any(_is_f32(t) or isinstance(t, gs.Constant) and np.dtype(t.dtype) == np.float32 for t in graph.tensors().values()):
            return PassResult(changed=False, stats={"converted_nodes": 0})
        stats = _Converter(graph, opts).run()
        if stats["clamped_values"]:
            ctx.log(f"convert-float16: {stats['clamped_values']} constant value(s) beyond float16's range clamped to +-65504")
        return PassResult(changed=True, stats=stats, graph=graph)
