"""eliminate-dead-code: remove nodes, outputs and initializers that no graph output depends on."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from autoglm_compile.pass_manager import GraphPass, PassContext, PassOptions, PassResult, register_pass


@register_pass("eliminate-dead-code")
class EliminateDeadCode(GraphPass):
    """Remove nodes and initializers that do not reach a graph output (graph inputs are kept)."""

    class Options(PassOptions):
        pass

    def run(self, graph: gs.Graph, opts: Options, ctx: PassContext) -> PassResult:
        nodes, tensors = len(graph.nodes), len(graph.tensors())
        graph.cleanup(remove_unused_node_outputs=True, remove_unused_graph_inputs=False)
        removed_nodes, removed_tensors = nodes - len(graph.nodes), tensors - len(graph.tensors())
        return PassResult(
            changed=bool(removed_nodes or removed_tensors),
            stats={"removed_nodes": removed_nodes, "removed_tensors": removed_tensors},
        )
