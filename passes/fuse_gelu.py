"""fuse-gelu: the decomposed GELU of exports below opset 20 -> one Gelu node.

    erf:  0.5 * x * (1 + Erf(x / sqrt(2)))                                  (x / sqrt 2 also as x * 0.70710678)
    tanh: 0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))           (x^3 as Pow(x, 3) or x * (x * x))

The product 0.5 * x * (1 + ...) is matched in each association and operand order that exporters emit:
(x * (1 + ...)) * 0.5 (torch.nn.functional.gelu), (x * 0.5) * (1 + ...) (transformers' NewGELUActivation) and
x * ((1 + ...) * 0.5).

What each form becomes, and why:
- opset >= 20: the standard Gelu, with approximate="tanh" for the tanh form. TVM imports it as one
  relax.nn.gelu / relax.nn.gelu_tanh; ONNX Runtime runs it natively.
- opset < 20: com.microsoft Gelu (erf) and com.microsoft FastGelu (tanh), ONNX Runtime's contrib ops. TVM's
  importer converts Gelu to relax.nn.gelu and FastGelu to its elementwise formula, which Relax fuses into one
  kernel; ONNX Runtime's CPU provider runs both, in float32 and float16. The model's opset is left as it is:
  moving it to opset 20 would change how other ops import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import onnx_graphsurgeon as gs

from autoglm_compile.pass_manager import GraphPass, PassContext, PassOptions, PassResult, register_pass

from ._match import fused_name, is_scalar, other_input, private, producer, replace, sole_consumer, split_const

GELU_OPSET = 20
SQRT_2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@dataclass
class GeluMatch:
    form: Literal["erf", "tanh"]
    x: gs.Tensor
    nodes: list[gs.Node]  # the matched nodes, the one that writes the result last


def _half_x_times(a: gs.Tensor, x: gs.Tensor, graph: gs.Graph) -> list[gs.Node] | None:
    """The nodes that compute 0.5 * x * a from `a`, in any association; the last one writes the result."""
    m1 = sole_consumer(a, graph, "Mul")
    if m1 is None:
        return None
    other = other_input(m1, a)
    if other is x:  # (x * a) * 0.5
        m2 = sole_consumer(m1.outputs[0], graph, "Mul")
        pair = split_const(m2) if m2 is not None else None
        return [m1, m2] if pair and pair[0] is m1.outputs[0] and is_scalar(pair[1], 0.5) else None
    if other is not None and is_scalar(other, 0.5):  # x * (a * 0.5)
        m2 = sole_consumer(m1.outputs[0], graph, "Mul")
        return [m1, m2] if m2 is not None and other_input(m2, m1.outputs[0]) is x else None
    h = producer(other, "Mul") if other is not None else None  # (x * 0.5) * a
    pair = split_const(h) if h is not None else None
    if pair and pair[0] is x and is_scalar(pair[1], 0.5) and private(h.outputs[0], graph):
        return [h, m1]
    return None


def _one_plus(t: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    add = sole_consumer(t, graph, "Add")
    pair = split_const(add) if add is not None else None
    return add if pair and pair[0] is t and is_scalar(pair[1], 1.0) else None


def _match_erf(erf: gs.Node, graph: gs.Graph) -> GeluMatch | None:
    scaled = erf.inputs[0]
    p = producer(scaled, "Div", "Mul")
    pair = split_const(p) if p is not None and private(scaled, graph) else None
    if pair is None:
        return None
    x, c = pair
    if not (p.op == "Div" and p.inputs[0] is x and is_scalar(c, SQRT_2) or p.op == "Mul" and is_scalar(c, 1 / SQRT_2)):
        return None
    add = _one_plus(erf.outputs[0], graph)
    tail = _half_x_times(add.outputs[0], x, graph) if add is not None else None
    return GeluMatch("erf", x, [p, erf, add, *tail]) if tail else None


def _cube_of(t: gs.Tensor, graph: gs.Graph) -> tuple[gs.Tensor, list[gs.Node]] | None:
    """(x, nodes) when `t` is Pow(x, 3), x * (x * x) or (x * x) * x."""
    node = producer(t, "Pow", "Mul")
    if node is None or len(node.inputs) != 2:
        return None
    if node.op == "Pow":
        return (node.inputs[0], [node]) if is_scalar(node.inputs[1], 3.0) else None
    for x, sq in (node.inputs, reversed(node.inputs)):
        sq_node = producer(sq, "Mul")
        if sq_node is not None and sq_node.inputs[0] is x and sq_node.inputs[1] is x and private(sq, graph):
            return x, [sq_node, node]
    return None


def _match_tanh(tanh: gs.Node, graph: gs.Graph) -> GeluMatch | None:
    p = producer(tanh.inputs[0], "Mul")
    pair = split_const(p) if p is not None and private(tanh.inputs[0], graph) else None
    if pair is None or not is_scalar(pair[1], SQRT_2_OVER_PI):
        return None
    inner = producer(pair[0], "Add")
    if inner is None or len(inner.inputs) != 2 or not private(pair[0], graph):
        return None
    for x, k in (inner.inputs, reversed(inner.inputs)):
        k_node = producer(k, "Mul")
        kpair = split_const(k_node) if k_node is not None else None
        if kpair is None or not is_scalar(kpair[1], 0.044715) or not private(k, graph):
            continue
        cube = _cube_of(kpair[0], graph)
        if cube is None or cube[0] is not x or not private(kpair[0], graph):
            continue
        add = _one_plus(tanh.outputs[0], graph)
        tail = _half_x_times(add.outputs[0], x, graph) if add is not None else None
        if tail:
            return GeluMatch("tanh", x, [*cube[1], k_node, inner, p, tanh, add, *tail])
    return None


def match_gelu(graph: gs.Graph, forms: list[str]) -> list[GeluMatch]:
    """Every decomposed GELU of the given forms. Pure: changes nothing."""
    found = []
    for node in graph.nodes:
        if node.op == "Erf" and "erf" in forms:
            m = _match_erf(node, graph)
        elif node.op == "Tanh" and "tanh" in forms:
            m = _match_tanh(node, graph)
        else:
            continue
        if m is not None:
            found.append(m)
    return found


def target_op(form: str, opset: int) -> tuple[str, str | None, dict]:
    """(op, domain, attrs) of the node that replaces a GELU of this form in a model of this opset."""
    if opset >= GELU_OPSET:
        return "Gelu", None, ({"approximate": "tanh"} if form == "tanh" else {})
    return ("Gelu" if form == "erf" else "FastGelu"), "com.microsoft", {}


@register_pass("fuse-gelu")
class FuseGelu(GraphPass):
    """Fuse decomposed GELU (erf and tanh forms) into Gelu (opset 20) or com.microsoft Gelu/FastGelu."""

    class Options(PassOptions):
        forms: list[Literal["erf", "tanh"]] = ["erf", "tanh"]

    def run(self, graph: gs.Graph, opts: Options, ctx: PassContext) -> PassResult:
        matches = match_gelu(graph, opts.forms)
        fused: dict[str, int] = {}
        for m in matches:
            op, domain, attrs = target_op(m.form, graph.opset)
            node = gs.Node(op, name=fused_name(graph, m.nodes, op), attrs=attrs, inputs=[m.x], domain=domain)
            replace(graph, m.nodes[-1], node)
            key = f"{domain}.{op}" if domain else op
            fused[key] = fused.get(key, 0) + 1
        return PassResult(changed=bool(matches), stats={"fused": fused})
