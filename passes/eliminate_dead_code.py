"""eliminate-dead-code: remove nodes, outputs and initializers that no graph output depends on."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from autoglm_compile.pass_manager import GraphPass, PassContext, PassOptions, PassResult, register_pass


def _has_subgraph(node: gs.Node) -> bool:
    return any(isinstance(v, gs.Graph) for v in node.attrs.values())


def drop_unused_trailing_outputs(graph: gs.Graph) -> int:
    """Drop the unused optional outputs at the end of a node's output list (Dropout's mask, MaxPool's indices).

    Not for nodes with subgraphs: a Loop's or If's outputs are tied to its body's outputs. (gs's
    cleanup(remove_unused_node_outputs=True) drops those too, which breaks the model.)"""
    outputs = {t.name for t in graph.outputs}
    dropped = 0
    for node in graph.nodes:
        if _has_subgraph(node):
            continue
        while len(node.outputs) > 1 and not node.outputs[-1].outputs and node.outputs[-1].name not in outputs:
            node.outputs.pop()
            dropped += 1
    return dropped


@register_pass("eliminate-dead-code")
class EliminateDeadCode(GraphPass):
    """Remove nodes and initializers that do not reach a graph output (graph inputs are kept)."""

    class Options(PassOptions):
        pass

    def run(self, graph: gs.Graph, opts: Options, ctx: PassContext) -> PassResult:
        nodes, tensors = len(graph.nodes), len(graph.tensors())
        outputs = drop_unused_trailing_outputs(graph)
        graph.cleanup(remove_unused_node_outputs=False, remove_unused_graph_inputs=False)
        removed_nodes, removed_tensors = nodes - len(graph.nodes), tensors - len(graph.tensors())
        return PassResult(
            changed=bool(removed_nodes or removed_tensors or outputs),
            stats={"removed_nodes": removed_nodes, "removed_tensors": removed_tensors, "removed_outputs": outputs},
        )
