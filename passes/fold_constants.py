"""fold-constants: evaluate constant subgraphs, shape subgraphs included, until nothing more folds."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from autoglm_compile.pass_manager import GraphPass, PassContext, PassOptions, PassResult, register_pass

from ._graph import inferred


@register_pass("fold-constants")
class FoldConstants(GraphPass):
    """Fold constant and shape subgraphs (onnx-graphsurgeon + ONNX Runtime), repeated to a fixed point."""

    class Options(PassOptions):
        max_iterations: int = 10
        fold_shapes: bool = True
        size_threshold_mb: float | None = None  # leave constants larger than this unfolded

    def run(self, graph: gs.Graph, opts: Options, ctx: PassContext) -> PassResult:
        start = len(graph.nodes)
        threshold = None if opts.size_threshold_mb is None else int(opts.size_threshold_mb * 2**20)
        iterations = 0
        for iterations in range(1, opts.max_iterations + 1):
            before = len(graph.nodes)
            # Shape folding needs the shapes that inference propagates; folding in turn exposes new constants.
            graph = inferred(graph, ctx.ir_version)
            graph.fold_constants(fold_shapes=opts.fold_shapes, error_ok=True, size_threshold=threshold)
            graph.cleanup(remove_unused_graph_inputs=False)
            if len(graph.nodes) == before:
                break
        return PassResult(
            changed=len(graph.nodes) != start,
            stats={"iterations": iterations, "removed_nodes": start - len(graph.nodes)},
            graph=graph,
        )
