"""fuse-layernorm: the decomposed LayerNorm of exports below opset 17 -> one LayerNormalization (opset 17).

    mean = ReduceMean(x, axes)            d = Sub(x, mean)          var = ReduceMean(Pow(d, 2) | Mul(d, d), axes)
    y = Div(d, Sqrt(Add(var, eps)))       [y = Mul(y, gamma)]       [y = Add(y, beta)]

torch.onnx exports nn.LayerNorm as LayerNormalization at opset >= 17 and as this chain below (transformers'
BERT at opset_version=14: 9 nodes per LayerNorm). TVM imports LayerNormalization as one relax.nn.layer_norm.
LayerNormalization is an opset-17 op, so a model below opset 17 is first upgraded to opset 17 with
onnx.version_converter (ONNX's own adapters) when there is something to fuse; `upgrade_opset: false` leaves such
models as they are, and the pass records why in its stats.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from autoglm_compile.pass_manager import GraphPass, PassContext, PassOptions, PassResult, export_model, register_pass

from ._graph import constant_nodes_to_initializers, inferred
from ._match import const_value, fused_name, is_scalar, private, producer, replace, scalar, sole_consumer, split_const

LAYERNORM_OPSET = 17


@dataclass
class LayerNormMatch:
    x: gs.Tensor
    axis: int  # negative: the first normalized axis counted from the end
    epsilon: float
    gamma: np.ndarray | None
    beta: np.ndarray | None
    nodes: list[gs.Node]  # the matched chain, last node last


def _reduce_axes(node: gs.Node) -> list[int] | None:
    if node.attrs.get("keepdims", 1) != 1:
        return None
    if len(node.inputs) > 1:  # opset 18: axes is an input
        v = const_value(node.inputs[1])
        return None if v is None else [int(a) for a in v.reshape(-1)]
    axes = node.attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


def _trailing_axis(axes: list[int], rank: int | None) -> int | None:
    """The LayerNormalization axis for reduction axes that are the last k axes, as a negative number."""
    if rank is not None:
        axes = [a - rank if a >= 0 else a for a in axes]
    k = len(axes)
    return -k if k and sorted(axes) == list(range(-k, 0)) else None


def _affine(value: np.ndarray, norm_shape: list[int]) -> np.ndarray | None:
    """gamma or beta as a tensor of the normalized shape, if it broadcasts exactly onto it."""
    v = value
    while v.ndim > len(norm_shape) and v.shape[0] == 1:
        v = v.reshape(v.shape[1:])
    if v.ndim > len(norm_shape):
        return None
    try:
        return np.ascontiguousarray(np.broadcast_to(v, norm_shape))
    except ValueError:
        return None


def match_layernorm(graph: gs.Graph) -> list[LayerNormMatch]:
    """Every decomposed LayerNorm whose intermediates nothing else reads. Pure: changes nothing."""
    found = []
    for mean_node in graph.nodes:
        if mean_node.op != "ReduceMean":
            continue
        x = mean_node.inputs[0]
        axes = _reduce_axes(mean_node)
        rank = len(x.shape) if x.shape is not None else None
        axis = None if axes is None else _trailing_axis(axes, rank)
        if axis is None or x.shape is None or not all(isinstance(d, int) for d in x.shape[axis:]):
            continue
        norm_shape = list(x.shape[axis:])
        sub = sole_consumer(mean_node.outputs[0], graph, "Sub")
        if sub is None or sub.inputs[0] is not x or sub.inputs[1] is not mean_node.outputs[0]:
            continue
        d = sub.outputs[0]
        readers = [n for n in d.outputs]
        square = next((n for n in readers if n.op in ("Pow", "Mul")), None)
        div = next((n for n in readers if n.op == "Div"), None)
        if square is None or div is None or d in graph.outputs:
            continue
        if square.op == "Pow" and not (square.inputs[0] is d and is_scalar(square.inputs[1], 2.0) and len(readers) == 2):
            continue
        if square.op == "Mul" and not (square.inputs[0] is d and square.inputs[1] is d and len(readers) == 3):
            continue
        var_node = sole_consumer(square.outputs[0], graph, "ReduceMean")
        if var_node is None or var_node.inputs[0] is not square.outputs[0] or _reduce_axes(var_node) is None:
            continue
        if _trailing_axis(_reduce_axes(var_node), rank) != axis:
            continue
        add_eps = sole_consumer(var_node.outputs[0], graph, "Add")
        pair = split_const(add_eps) if add_eps is not None else None
        eps = scalar(pair[1]) if pair is not None else None
        if eps is None or eps < 0:
            continue
        sqrt = sole_consumer(add_eps.outputs[0], graph, "Sqrt")
        if sqrt is None or sole_consumer(sqrt.outputs[0], graph) is not div or div.inputs[0] is not d:
            continue
        nodes = [mean_node, sub, square, var_node, add_eps, sqrt, div]
        gamma = beta = None
        mul = sole_consumer(div.outputs[0], graph, "Mul")
        pair = split_const(mul) if mul is not None else None
        if pair is not None and pair[0] is div.outputs[0]:
            gamma = _affine(const_value(pair[1]), norm_shape)
            if gamma is None:
                continue
            nodes.append(mul)
        add = sole_consumer(nodes[-1].outputs[0], graph, "Add")
        pair = split_const(add) if add is not None else None
        if pair is not None and pair[0] is nodes[-1].outputs[0]:
            beta = _affine(const_value(pair[1]), norm_shape)
            if beta is None:
                continue
            nodes.append(add)
        if not all(private(n.outputs[0], graph) for n in nodes[2:-1]) or not private(mean_node.outputs[0], graph):
            continue
        found.append(LayerNormMatch(x, axis, eps, gamma, beta, nodes))
    return found


def _dtype(m: LayerNormMatch) -> np.dtype | None:
    for v in (m.gamma, m.beta):
        if v is not None:
            return v.dtype
    return np.dtype(m.x.dtype) if m.x.dtype is not None else None


def fuse(graph: gs.Graph, m: LayerNormMatch) -> None:
    dtype = _dtype(m)
    norm_shape = list(m.x.shape[m.axis:])
    name = fused_name(graph, m.nodes, "LayerNormalization")
    gamma = m.gamma if m.gamma is not None else np.ones(norm_shape, dtype)
    inputs = [m.x, gs.Constant(f"{name}.scale", gamma.astype(dtype))]
    if m.beta is not None:
        inputs.append(gs.Constant(f"{name}.bias", m.beta.astype(dtype)))
    node = gs.Node("LayerNormalization", name=name, attrs={"axis": m.axis, "epsilon": m.epsilon}, inputs=inputs)
    replace(graph, m.nodes[-1], node)


def upgraded(graph: gs.Graph, opset: int, ir_version: int) -> gs.Graph:
    model = onnx.version_converter.convert_version(export_model(graph, ir_version), opset)
    graph = gs.import_onnx(model)
    constant_nodes_to_initializers(graph)  # the converter writes new axes inputs as Constant nodes
    return graph


@register_pass("fuse-layernorm")
class FuseLayerNorm(GraphPass):
    """Fuse decomposed LayerNorm chains (ReduceMean, Sub, Pow, ..., Add beta) into LayerNormalization."""

    class Options(PassOptions):
        upgrade_opset: bool = True  # models below opset 17 are upgraded to 17 when there is something to fuse

    def run(self, graph: gs.Graph, opts: Options, ctx: PassContext) -> PassResult:
        if any(n.op == "ReduceMean" and n.inputs[0].shape is None for n in graph.nodes):
            graph = inferred(graph, ctx.ir_version)  # the matcher needs the normalized dims
        matches = match_layernorm(graph)
        if not matches:
            return PassResult(changed=False, stats={"fused": 0})
        stats: dict = {}
        if graph.opset < LAYERNORM_OPSET:
            if not opts.upgrade_opset:
                why = f"opset {graph.opset} < {LAYERNORM_OPSET} and upgrade_opset is false: {len(matches)} LayerNorm chain(s) left unfused"
                ctx.log(f"fuse-layernorm: {why}")
                return PassResult(changed=False, stats={"fused": 0, "skipped": why})
            try:
                upgraded_graph = upgraded(graph, LAYERNORM_OPSET, ctx.ir_version)
            except Exception as e:  # the converter has no adapter for some op: keep the model as it is, and say so
                why = f"onnx.version_converter could not upgrade opset {graph.opset} to {LAYERNORM_OPSET}: {str(e).strip().splitlines()[0][:200]}"
                ctx.log(f"fuse-layernorm: {why}")
                return PassResult(changed=False, stats={"fused": 0, "skipped": why})
            stats["upgraded_opset"] = f"{graph.opset} -> {LAYERNORM_OPSET}"
            graph = upgraded_graph
            matches = match_layernorm(graph)
        for m in matches:
            fuse(graph, m)
        return PassResult(changed=bool(matches), stats={"fused": len(matches), **stats}, graph=graph)
