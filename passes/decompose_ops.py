"""decompose-ops: replace ops that a runtime lacks by the standard ops that compute them (known rewrites only).

What it rewrites, and into what (every new node is in ONNX's domain and exists at opset 7 or later, except
ReduceMean, which takes its axes as an attribute below opset 18 and as an input from 18, as the graph's opset wants):

    LayerNormalization (17)         mean = ReduceMean(x); d = x - mean; var = ReduceMean(d * d);
                                    y = d / Sqrt(var + eps) [* scale] [+ bias]     (Mean and InvStdDev outputs too)
    Gelu (20), com.microsoft.Gelu   x * 0.5 * (1 + Erf(x * 1/sqrt 2))
    Gelu approximate=tanh (20),     x * 0.5 * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
      com.microsoft.FastGelu          (FastGelu's optional bias is added to x first)
    com.microsoft.BiasGelu          Gelu(a + bias), erf form
    HardSwish (14)                  x * HardSigmoid(x, alpha=1/6, beta=0.5)
    Mish (18)                       x * Tanh(Softplus(x))

Which nodes: every node of an op in `ops`, and, with `opset`, every node of an op that has no version at that opset
(the ONNX-domain ops above that came later). The vendor-onnx backend asks for both: the ops missing from the
vendor's supported-op list, and the ops newer than the vendor's opset, which onnx.version_converter cannot convert
("No Previous Version of LayerNormalization exists").

The constants take the dtype of the node's input, so a float16 Gelu stays float16. A LayerNormalization reading
float16 with stash_type=1 (the default) computes in float32, as the op's definition says, behind Casts. A node whose
input rank is unknown (LayerNormalization needs it for the axes) is left as it is, and listed in the stats.
"""
from __future__ import annotations

import math
from typing import Callable, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from pydantic import field_validator

from autoglm_compile.pass_manager import GraphPass, PassContext, PassOptions, PassResult, register_pass

from ._graph import inferred

MS = "com.microsoft"


def op_key(node: gs.Node) -> str:
    """'LayerNormalization' for ONNX's domain, 'com.microsoft.Gelu' for others."""
    domain = node.domain or ""
    return node.op if domain in ("", "ai.onnx") else f"{domain}.{node.op}"


def exists_at(op: str, opset: int) -> bool:
    """Whether the ONNX-domain op has a version at `opset`."""
    try:
        onnx.defs.get_schema(op, opset, "")
        return True
    except onnx.defs.SchemaError:
        return False


class _Builder:
    """Writes the nodes that replace one node, named after it, with constants of the input's dtype."""

    def __init__(self, graph: gs.Graph, node: gs.Node, dtype):
        self.graph, self.node, self.dtype, self.count = graph, node, dtype, 0

    def const(self, value, dtype=None) -> gs.Constant:
        self.count += 1
        return gs.Constant(f"{self.node.name}/decomposed/c{self.count}", np.array(value, dtype=dtype or self.dtype))

    def op(self, op: str, inputs: list, out: gs.Variable | None = None, dtype=None, **attrs) -> gs.Variable:
        self.count += 1
        name = f"{self.node.name}/decomposed/{op}_{self.count}"
        if out is None:
            out = gs.Variable(f"{name}_out", dtype=dtype or self.dtype)
        self.graph.nodes.append(gs.Node(op, name=name, attrs=attrs, inputs=list(inputs), outputs=[out]))
        return out

    def reduce_mean(self, x, axes: list[int], out=None, dtype=None) -> gs.Variable:
        if self.graph.opset >= 18:
            return self.op("ReduceMean", [x, self.const(axes, np.int64)], out, dtype, keepdims=1)
        return self.op("ReduceMean", [x], out, dtype, axes=axes, keepdims=1)


def _output(node: gs.Node, i: int) -> gs.Variable | None:
    """The node's i-th output if something reads it (a consumer or the graph output), else None."""
    if i >= len(node.outputs) or node.outputs[i].name == "":
        return None
    return node.outputs[i]


def _used(graph: gs.Graph, t: gs.Variable | None) -> bool:
    return t is not None and (bool(t.outputs) or t in graph.outputs)


def _layernorm(graph: gs.Graph, node: gs.Node) -> str | None:
    x = node.inputs[0]
    if x.shape is None:
        return "input rank unknown"
    rank = len(x.shape)
    axis = int(node.attrs.get("axis", -1))
    axis = axis + rank if axis < 0 else axis
    axes = list(range(axis, rank))
    eps = float(node.attrs.get("epsilon", 1e-5))
    dtype = np.dtype(x.dtype) if x.dtype is not None else np.dtype(np.float32)
    stash32 = int(node.attrs.get("stash_type", 1)) == 1 and dtype != np.float32 and dtype != np.float64
    work = np.dtype(np.float32) if stash32 else dtype
    b = _Builder(graph, node, work)
    y, mean_out, inv_out = node.outputs[0], _output(node, 1), _output(node, 2)
    xin = b.op("Cast", [x], to=onnx.TensorProto.FLOAT) if stash32 else x
    mean = b.reduce_mean(xin, axes, out=mean_out if _used(graph, mean_out) else None)
    d = b.op("Sub", [xin, mean])
    var = b.reduce_mean(b.op("Mul", [d, d]), axes)
    std = b.op("Sqrt", [b.op("Add", [var, b.const(eps)])])
    if _used(graph, inv_out):
        b.op("Reciprocal", [std], out=inv_out)
    scale = node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name != "" else None
    cast = (lambda t: b.op("Cast", [t], to=onnx.TensorProto.FLOAT)) if stash32 else (lambda t: t)
    res = b.op("Mul", [b.op("Div", [d, std]), cast(scale)])
    if bias is not None:
        res = b.op("Add", [res, cast(bias)])
    if stash32:
        b.op("Cast", [res], out=y, to=onnx.helper.np_dtype_to_tensor_dtype(dtype))
    else:
        _rename_into(graph, res, y)
    return None


def _rename_into(graph: gs.Graph, produced: gs.Variable, y: gs.Variable) -> None:
    """Make the node that writes `produced` write `y` instead (the replaced node's output keeps its name)."""
    writer = produced.inputs[0]
    writer.outputs[writer.outputs.index(produced)] = y


def _gelu_erf(b: _Builder, x, y) -> None:
    e = b.op("Erf", [b.op("Mul", [x, b.const(1.0 / math.sqrt(2.0))])])
    b.op("Mul", [b.op("Mul", [x, b.op("Add", [e, b.const(1.0)])]), b.const(0.5)], out=y)


def _gelu_tanh(b: _Builder, x, y) -> None:
    cube = b.op("Mul", [b.op("Mul", [x, x]), x])
    inner = b.op("Mul", [b.op("Add", [x, b.op("Mul", [cube, b.const(0.044715)])]), b.const(math.sqrt(2.0 / math.pi))])
    t = b.op("Tanh", [inner])
    b.op("Mul", [b.op("Mul", [x, b.op("Add", [t, b.const(1.0)])]), b.const(0.5)], out=y)


def _dtype(t: gs.Tensor):
    return np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)


def _gelu(graph: gs.Graph, node: gs.Node) -> str | None:
    x, y = node.inputs[0], node.outputs[0]
    b = _Builder(graph, node, _dtype(x))
    tanh = node.attrs.get("approximate", "none") == "tanh" or (node.op == "FastGelu")
    if node.op in ("FastGelu", "BiasGelu") and len(node.inputs) > 1 and node.inputs[1].name != "":
        x = b.op("Add", [x, node.inputs[1]])
    (_gelu_tanh if tanh else _gelu_erf)(b, x, y)
    return None


def _hardswish(graph: gs.Graph, node: gs.Node) -> str | None:
    x, y = node.inputs[0], node.outputs[0]
    b = _Builder(graph, node, _dtype(x))
    b.op("Mul", [x, b.op("HardSigmoid", [x], alpha=1.0 / 6.0, beta=0.5)], out=y)
    return None


def _mish(graph: gs.Graph, node: gs.Node) -> str | None:
    x, y = node.inputs[0], node.outputs[0]
    b = _Builder(graph, node, _dtype(x))
    b.op("Mul", [x, b.op("Tanh", [b.op("Softplus", [x])])], out=y)
    return None


# op key -> the rewrite; it returns None when done, or why it left the node as it is.
REWRITES: dict[str, Callable[[gs.Graph, gs.Node], str | None]] = {
    "LayerNormalization": _layernorm,
    "Gelu": _gelu,
    f"{MS}.Gelu": _gelu,
    f"{MS}.FastGelu": _gelu,
    f"{MS}.BiasGelu": _gelu,
    "HardSwish": _hardswish,
    "Mish": _mish,
}


def wanted(node: gs.Node, ops: set[str], opset: int | None) -> bool:
    key = op_key(node)
    if key not in REWRITES:
        return False
    if key in ops:
        return True
    return opset is not None and (node.domain or "") in ("", "ai.onnx") and not exists_at(node.op, opset)


@register_pass("decompose-ops")
class DecomposeOps(GraphPass):
    """Decompose ops a runtime lacks (LayerNormalization, Gelu, FastGelu, HardSwish, Mish) into standard ops."""

    known_rewrites: ClassVar[tuple[str, ...]] = tuple(REWRITES)

    class Options(PassOptions):
        ops: list[str] = []  # op names ("Gelu", "com.microsoft.FastGelu") to decompose whatever the opset
        opset: int | None = None  # also decompose the ops that have no version at this opset

        @field_validator("ops")
        @classmethod
        def _known(cls, v: list[str]) -> list[str]:
            unknown = [o for o in v if o not in REWRITES]
            if unknown:
                raise ValueError(f"no known rewrite for {', '.join(unknown)}; known: {', '.join(REWRITES)}")
            return v

    def run(self, graph: gs.Graph, opts: Options, ctx: PassContext) -> PassResult:
        ops = set(opts.ops)
        if not any(wanted(n, ops, opts.opset) for n in graph.nodes):
            return PassResult(changed=False, stats={"decomposed": {}})
        graph = inferred(graph, ctx.ir_version)  # dtypes and ranks for the constants and the axes
        done: dict[str, int] = {}
        left: list[str] = []
        for node in list(graph.nodes):
            if not wanted(node, ops, opts.opset):
                continue
            why = REWRITES[op_key(node)](graph, node)
            if why is not None:
                left.append(f"{node.name} ({op_key(node)}): {why}")
                continue
            node.inputs.clear()
            node.outputs.clear()
            done[op_key(node)] = done.get(op_key(node), 0) + 1
        stats = {"decomposed": done}
        if left:
            stats["left"] = left
        return PassResult(changed=bool(done), stats=stats, graph=graph)
