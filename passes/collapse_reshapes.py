"""collapse-reshapes: a chain of Reshape/Flatten/Squeeze/Unsqueeze becomes one Reshape to its static final shape."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from autoglm_compile.pass_manager import GraphPass, PassContext, PassOptions, PassResult, register_pass

from ._graph import bypass, inferred_shapes

RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


def is_static(shape) -> bool:
    return shape is not None and all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape)


def reshape_chains(graph: gs.Graph) -> list[list[gs.Node]]:
    """Maximal chains, head first, of reshape-like nodes each reading the previous one's result as its data input,
    where every intermediate result has no other reader and is no graph output. Single nodes count as chains."""
    outputs = {t.name for t in graph.outputs}

    def feeds_next(t: gs.Tensor) -> bool:  # t is an intermediate of a chain: its only reader is a reshape-like node
        return len(t.outputs) == 1 and t.outputs[0].op in RESHAPES and t.outputs[0].inputs[0] is t and t.name not in outputs

    chains = []
    for node in graph.nodes:
        if node.op not in RESHAPES or not node.inputs or len(node.outputs) != 1 or feeds_next(node.outputs[0]):
            continue
        chain = [node]
        while True:
            src = chain[0].inputs[0]
            if len(src.inputs) != 1 or src.inputs[0].op not in RESHAPES or not feeds_next(src):
                break
            chain.insert(0, src.inputs[0])
        chains.append(chain)
    return chains


@register_pass("collapse-reshapes")
class CollapseReshapes(GraphPass):
    """Collapse chains of Reshape/Flatten/Squeeze/Unsqueeze into one Reshape, and remove reshapes that keep the shape.

    Shapes come from ONNX shape inference; a chain whose final shape is not fully static (or has a 0 dim, which
    Reshape would read as 'copy') is left alone. When the final shape equals the chain's input shape, the whole
    chain is removed."""

    class Options(PassOptions):
        pass

    def run(self, graph: gs.Graph, opts: Options, ctx: PassContext) -> PassResult:
        chains = reshape_chains(graph)
        if not chains:
            return PassResult(changed=False, stats={"collapsed": 0, "removed": 0})
        shapes = inferred_shapes(graph, ctx.ir_version)
        collapsed = removed = 0
        for chain in chains:
            head, tail = chain[0], chain[-1]
            x, y = head.inputs[0], tail.outputs[0]
            final = shapes.get(y.name)
            if not is_static(final) or 0 in final:
                continue
            if shapes.get(x.name) is not None and list(shapes[x.name]) == list(final):
                kept = list(tail.inputs)
                tail.inputs.clear()
                tail.inputs.append(x)
                if bypass(graph, tail):
                    removed += len(chain)
                    continue
                tail.inputs.clear()  # x is a graph input and y a graph output: one node has to stay
                tail.inputs.extend(kept)
            if len(chain) == 1:
                continue
            tail.op = "Reshape"
            tail.attrs.clear()
            tail.inputs.clear()
            tail.inputs.extend([x, gs.Constant(f"{tail.name or y.name}__shape", np.array(final, dtype=np.int64))])
            collapsed += len(chain) - 1
        return PassResult(changed=bool(collapsed or removed), stats={"collapsed": collapsed, "removed": removed})
