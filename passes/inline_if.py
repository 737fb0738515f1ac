"""inline-if: replace an If whose condition is a constant with the nodes of the branch it takes (TVM 0.27's Relax
importer has no If converter; a condition becomes constant once shapes are pinned and folded)."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from autoglm_compile.pass_manager import GraphPass, PassContext, PassOptions, PassResult, register_pass


def _all_graphs(graph: gs.Graph):
    """The graph and every subgraph nested in it (depth first)."""
    yield graph
    for node in graph.nodes:
        for value in node.attrs.values():
            for sub in value if isinstance(value, list) else [value]:
                if isinstance(sub, gs.Graph):
                    yield from _all_graphs(sub)


def _names(graph: gs.Graph) -> dict[str, set[int]]:
    """Every tensor name used anywhere in the model, subgraphs included, with the objects that carry it."""
    out: dict[str, set[int]] = {}
    for g in _all_graphs(graph):
        for t in [*g.inputs, *g.outputs, *(t for n in g.nodes for t in [*n.inputs, *n.outputs])]:
            if t.name:
                out.setdefault(t.name, set()).add(id(t))
        for n in g.nodes:
            if n.name:
                out.setdefault(n.name, set()).add(id(n))
    return out


def constant_condition(node: gs.Node) -> bool | None:
    """The If's condition when it is a one-element constant, else None."""
    cond = node.inputs[0] if node.inputs else None
    if not isinstance(cond, gs.Constant):
        return None
    values = np.asarray(cond.values)
    return bool(values.reshape(-1)[0]) if values.size == 1 else None


def _index(items, obj) -> int:
    """Position by identity (onnx-graphsurgeon's tensors and nodes compare equal by value)."""
    return next(i for i, x in enumerate(items) if x is obj)


class _Namer:
    def __init__(self, names: dict[str, set[int]]):
        self.names = names

    def unique(self, base: str, obj) -> str:
        name, k = base, 1
        while name in self.names and self.names[name] != {id(obj)}:
            k += 1
            name = f"{base}_{k}"
        self.names.setdefault(name, set()).add(id(obj))
        return name


def inline(graph: gs.Graph, node: gs.Node, taken: bool, namer: _Namer, label: str) -> None:
    """Put the nodes of the taken branch into graph where the If node was (branches are topologically sorted, and
    read only tensors made before the If, so the graph stays sorted)."""
    branch: gs.Graph = node.attrs["then_branch" if taken else "else_branch"]
    prefix = f"{label}/{'then' if taken else 'else'}"
    produced = {id(t) for n in branch.nodes for t in n.outputs}
    # Names: every tensor made in the branch gets the If's prefix, so it cannot collide with the outer graph's.
    # A constant of the branch keeps its name unless another tensor carries that name; tensors of the outer
    # scope (the same objects in onnx-graphsurgeon) are referenced, never renamed.
    for n in branch.nodes:
        n.name = namer.unique(f"{prefix}/{n.name or n.op}", n)
        for t in n.outputs:
            if t.name:
                namer.names.get(t.name, set()).discard(id(t))
                t.name = namer.unique(f"{prefix}/{t.name}", t)
    for t in list(branch.tensors().values()):
        if isinstance(t, gs.Constant) and namer.names.get(t.name, set()) - {id(t)}:
            # A new Constant, not a rename: onnx-graphsurgeon's export writes a renamed constant's name into the
            # TensorProto it was lazily loaded from, which would corrupt the source model the reference runs on.
            fresh = gs.Constant("", np.array(t.values))
            fresh.name = namer.unique(f"{prefix}/{t.name}", fresh)
            for consumer in list(t.outputs):
                for i, x in enumerate(consumer.inputs):
                    if x is t:
                        consumer.inputs[i] = fresh
            for outputs in (branch.outputs,):
                for i, x in enumerate(outputs):
                    if x is t:
                        outputs[i] = fresh

    outputs = list(node.outputs)
    node.inputs.clear()
    node.outputs.clear()
    moved: dict[int, gs.Tensor] = {}  # branch output -> the If output that now carries it
    extra = []
    for if_out, b_out in zip(outputs, branch.outputs):
        if if_out.dtype is None and b_out.dtype is not None:
            if_out.dtype = b_out.dtype
        if id(b_out) in produced and id(b_out) not in moved:
            # The branch's producer writes the If's output tensor directly; branch consumers read it from there.
            producer = b_out.inputs[0]
            producer.outputs[_index(producer.outputs, b_out)] = if_out
            for consumer in list(b_out.outputs):
                for i, t in enumerate(consumer.inputs):
                    if t is b_out:
                        consumer.inputs[i] = if_out
            moved[id(b_out)] = if_out
        else:
            # An outer-scope tensor, a constant, or an output already written: an Identity (eliminate-noops
            # removes it where the graph allows).
            src = moved.get(id(b_out), b_out)
            identity = gs.Node("Identity", inputs=[src], outputs=[if_out])
            identity.name = namer.unique(f"{prefix}/output", identity)
            extra.append(identity)
    at = _index(graph.nodes, node)
    graph.nodes[at:at + 1] = [*branch.nodes, *extra]
    branch.nodes = []  # the branch is spent: its nodes live in graph now


@register_pass("inline-if")
class InlineIf(GraphPass):
    """Inline every If whose condition is a constant: the taken branch's nodes replace it.

    Run it after fold-constants (with the input shapes pinned, shape-derived conditions fold to constants). Tensors
    made in the branch are renamed under the If's name, so nothing collides with the outer graph; references to
    outer-scope tensors are kept. Ifs nested in subgraphs (Loop bodies, other Ifs) are inlined into their own graph.
    An If whose condition is not constant is left, with the reason in the stats."""

    class Options(PassOptions):
        max_inlined: int = 1000  # a bound on the work: an inlined branch may hold Ifs of its own
        recurse_subgraphs: bool = True

    def run(self, graph: gs.Graph, opts: Options, ctx: PassContext) -> PassResult:
        taken = {"then": 0, "else": 0}
        namer = _Namer(_names(graph))
        for _ in range(opts.max_inlined):
            found = _next_constant_if(graph, opts.recurse_subgraphs)
            if found is None:
                break
            g, node, cond = found
            inline(g, node, cond, namer, node.name or "If")
            taken["then" if cond else "else"] += 1
        left = {}
        for g in (_all_graphs(graph) if opts.recurse_subgraphs else [graph]):
            for k, node in enumerate(n for n in g.nodes if n.op == "If"):
                left[node.name or f"If#{k}"] = "the condition is not a constant (pin the input shapes and run fold-constants first)"
        if left:
            ctx.log(f"inline-if: {len(left)} If node(s) left: {', '.join(left)}")
        count = taken["then"] + taken["else"]
        return PassResult(changed=count > 0, stats={"inlined": count, "branches": taken, "left": left})


def _next_constant_if(graph: gs.Graph, recurse: bool):
    for g in (_all_graphs(graph) if recurse else [graph]):
        for node in g.nodes:
            if node.op == "If" and (node.domain or "") in ("", "ai.onnx"):
                cond = constant_condition(node)
                if cond is not None:
                    return g, node, cond
    return None
