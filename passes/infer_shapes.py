"""infer-shapes: ONNX shape and type inference with data propagation."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from autoglm_compile.pass_manager import GraphPass, PassContext, PassOptions, PassResult, register_pass

from ._graph import inferred


def _known(graph: gs.Graph) -> int:
    return sum(1 for t in graph.tensors().values() if isinstance(t, gs.Variable) and t.shape is not None)


@register_pass("infer-shapes")
class InferShapes(GraphPass):
    """Annotate every tensor with its shape and dtype (onnx.shape_inference, data propagation on)."""

    class Options(PassOptions):
        pass

    def run(self, graph: gs.Graph, opts: Options, ctx: PassContext) -> PassResult:
        before = _known(graph)
        new = inferred(graph, ctx.ir_version)
        after = _known(new)
        return PassResult(changed=after != before, stats={"shaped_tensors": after}, graph=new)
