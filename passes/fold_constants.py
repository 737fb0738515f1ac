"""fold-constants: evaluate constant subgraphs, shape subgraphs included, until nothing more folds."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from autoglm_compile.pass_manager import GraphPass, PassContext, PassOptions, PassResult, register_pass

from ._graph import inferred


def split_shape_slices(graph: gs.Graph) -> int:
    """Rewrite Shape(x, start, end) as Slice(Shape(x), [start], [end]).

    onnx-graphsurgeon 0.6.1 folds Shape from the input's static shape but ignores the start/end attributes
    (opset 15), so Shape(x, start=0, end=1) would fold to the whole shape. After this rewrite it folds correctly.
    """
    count = 0
    for node in list(graph.nodes):
        if node.op != "Shape" or ("start" not in node.attrs and "end" not in node.attrs):
            continue
        start, end = node.attrs.pop("start", 0), node.attrs.pop("end", None)
        full = gs.Variable(f"{node.outputs[0].name}__full_shape", dtype=node.outputs[0].dtype)
        sliced = node.outputs[0]
        node.outputs = [full]
        starts = gs.Constant(f"{sliced.name}__start", np.array([start], dtype=np.int64))
        ends = gs.Constant(f"{sliced.name}__end", np.array([end if end is not None else np.iinfo(np.int64).max], dtype=np.int64))
        graph.nodes.append(gs.Node("Slice", name=f"{node.name}__slice" if node.name else "", inputs=[full, starts, ends], outputs=[sliced]))
        count += 1
    return count


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
        split = split_shape_slices(graph)
        iterations = 0
        for iterations in range(1, opts.max_iterations + 1):
            before = len(graph.nodes)
            # Shape folding needs the shapes that inference propagates; folding in turn exposes new constants.
            graph = inferred(graph, ctx.ir_version)
            # flatten_subgraphs=False: gs's inlining of If branches leaves dangling names (seen on the ONNX
            # backend test test_affine_grid_2d_expanded); inlining a constant If is a pass of its own.
            graph.fold_constants(fold_shapes=opts.fold_shapes, error_ok=True, size_threshold=threshold, flatten_subgraphs=False)
            graph.cleanup(remove_unused_graph_inputs=False)
            if len(graph.nodes) == before:
                break
        return PassResult(
            changed=len(graph.nodes) != start,
            stats={"iterations": iterations, "removed_nodes": start - len(graph.nodes), "shape_slices_split": split},
            graph=graph,
        )
