"""fuse-hardswish: the decomposed hard-sigmoid and hard-swish of exports -> HardSigmoid / HardSwish.

Exporters write hard-sigmoid as Clip(x + 3, 0, 6) / 6 (or * 1/6) and hard-swish as x * Clip(x + 3, 0, 6) / 6 (in
either association): four nodes where ONNX has one. HardSigmoid(alpha=1/6, beta=0.5) computes the first at every
opset; HardSwish (opset 14) the second. Below opset 14, hard-swish becomes x * HardSigmoid(x): two nodes.
Clip's bounds are attributes below opset 11 and inputs from 11 on; both are matched.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from autoglm_compile.pass_manager import GraphPass, PassContext, PassOptions, PassResult, register_pass

from ._match import fused_name, is_scalar, other_input, private, producer, replace, scalar, split_const

HARDSWISH_OPSET = 14
ALPHA, BETA = 1.0 / 6.0, 0.5


def _clip_bounds(clip: gs.Node) -> tuple[float | None, float | None]:
    if len(clip.inputs) > 1:  # opset >= 11: optional min and max inputs (an empty name is absent)
        lo = scalar(clip.inputs[1]) if clip.inputs[1].name else None
        hi = scalar(clip.inputs[2]) if len(clip.inputs) > 2 and clip.inputs[2].name else None
        return lo, hi
    return clip.attrs.get("min"), clip.attrs.get("max")


def relu6_plus3(t: gs.Tensor, graph: gs.Graph) -> tuple[gs.Tensor, list[gs.Node]] | None:
    """For t = Clip(x + 3, 0, 6) whose Add result is read by the Clip alone: (x, [add, clip])."""
    clip = producer(t, "Clip")
    if clip is None:
        return None
    lo, hi = _clip_bounds(clip)
    if lo != 0.0 or hi != 6.0:
        return None
    add = producer(clip.inputs[0], "Add")
    if add is None or not private(clip.inputs[0], graph):
        return None
    pair = split_const(add)
    if pair is None or not is_scalar(pair[1], 3.0, rtol=1e-6):
        return None
    return pair[0], [add, clip]


def divided_by_6(node: gs.Node) -> gs.Tensor | None:
    """For node = Div(a, 6) or Mul(a, 1/6) (either order): a."""
    pair = split_const(node)
    if pair is None:
        return None
    a, c = pair
    if node.op == "Div" and node.inputs[0] is a and is_scalar(c, 6.0, rtol=1e-6):
        return a
    if node.op == "Mul" and is_scalar(c, ALPHA, rtol=1e-6):
        return a
    return None


def _hardsigmoid(graph: gs.Graph, x: gs.Tensor, nodes: list[gs.Node], out: gs.Tensor | None = None) -> gs.Node:
    name = fused_name(graph, nodes, "HardSigmoid")
    return gs.Node("HardSigmoid", name=name, attrs={"alpha": ALPHA, "beta": BETA}, inputs=[x], outputs=[out] if out is not None else [])


def match_hardsigmoid(node: gs.Node, graph: gs.Graph):
    """Div(Clip(x + 3, 0, 6), 6) or its * 1/6: (x, the matched nodes, this one last)."""
    if node.op not in ("Div", "Mul") or len(node.outputs) != 1:
        return None
    a = divided_by_6(node)
    if a is None or not private(a, graph):
        return None
    inner = relu6_plus3(a, graph)
    if inner is None:
        return None
    x, nodes = inner
    return x, nodes + [node]


def match_hardswish(node: gs.Node, graph: gs.Graph):
    """Div(x * Clip(x + 3, 0, 6), 6) or its * 1/6, the inner Mul in either order: (x, the matched nodes, this one last)."""
    if node.op not in ("Div", "Mul") or len(node.outputs) != 1:
        return None
    a = divided_by_6(node)
    mul = producer(a, "Mul") if a is not None and private(a, graph) else None
    if mul is None:
        return None
    for r6 in mul.inputs:
        inner = relu6_plus3(r6, graph) if private(r6, graph) else None
        if inner is not None and other_input(mul, r6) is inner[0]:
            return inner[0], inner[1] + [mul, node]
    return None


def match_x_hardsigmoid(node: gs.Node, graph: gs.Graph):
    """x * HardSigmoid(x) with alpha 1/6 and beta 1/2 (what this pass writes below opset 14): (x, matched nodes)."""
    if node.op != "Mul" or len(node.outputs) != 1:
        return None
    for hs_out in node.inputs:
        hs = producer(hs_out, "HardSigmoid")
        if hs is None or not private(hs_out, graph) or other_input(node, hs_out) is not hs.inputs[0]:
            continue
        if abs(hs.attrs.get("alpha", 0.2) - ALPHA) <= 1e-6 and abs(hs.attrs.get("beta", 0.5) - BETA) <= 1e-6:
            return hs.inputs[0], [hs, node]
    return None


@register_pass("fuse-hardswish")
class FuseHardSwish(GraphPass):
    """Fuse Clip(x + 3, 0, 6) / 6 into HardSigmoid, and x * that into HardSwish (opset >= 14) or x * HardSigmoid(x).

    HardSigmoid computes max(0, min(1, x/6 + 1/2)): equal to the decomposed form but for rounding. An existing
    x * HardSigmoid(x) (alpha 1/6, beta 1/2) becomes HardSwish at opset >= 14 as well."""

    class Options(PassOptions):
        pass

    def run(self, graph: gs.Graph, opts: Options, ctx: PassContext) -> PassResult:
        swish = graph.opset >= HARDSWISH_OPSET
        counts = {"HardSwish": 0, "HardSigmoid": 0}
        made: set[str] = set()  # HardSigmoid nodes written here, which a later match may turn into HardSwish
        for node in list(graph.nodes):  # topological order: a match's last node is seen after its other nodes
            if not node.outputs:  # rewritten earlier in this loop
                continue
            m = match_hardswish(node, graph) or (match_x_hardsigmoid(node, graph) if swish else None)
            if m is not None and swish:
                x, nodes = m
                replace(graph, node, gs.Node("HardSwish", name=fused_name(graph, nodes, "HardSwish"), inputs=[x]))
                counts["HardSwish"] += 1
                counts["HardSigmoid"] -= nodes[0].op == "HardSigmoid" and nodes[0].name in made
            elif m is not None:  # below opset 14: x * HardSigmoid(x)
                x, nodes = m
                hs_out = gs.Variable(f"{node.outputs[0].name}__hardsigmoid", dtype=node.outputs[0].dtype)
                graph.nodes.append(_hardsigmoid(graph, x, nodes, hs_out))
                made.add(graph.nodes[-1].name)
                replace(graph, node, gs.Node("Mul", name=fused_name(graph, nodes, "Mul"), inputs=[x, hs_out]))
                counts["HardSigmoid"] += 1
            elif (m := match_hardsigmoid(node, graph)) is not None:
                x, nodes = m
                hs = _hardsigmoid(graph, x, nodes)
                replace(graph, node, hs)
                made.add(hs.name)
                counts["HardSigmoid"] += 1
        # The matched nodes are read no more: the runner's cleanup removes them.
        return PassResult(changed=any(counts.values()), stats={"fused": {k: v for k, v in counts.items() if v}})
