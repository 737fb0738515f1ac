"""pin-shapes: make dynamic input dims static from the user's --input-shape."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from autoglm_compile.pass_manager import GraphPass, PassContext, PassOptions, PassResult, register_pass


@register_pass("pin-shapes")
class PinShapes(GraphPass):
    """Pin the graph inputs to the resolved static shapes and drop stale intermediate shapes."""

    class Options(PassOptions):
        pass

    def run(self, graph: gs.Graph, opts: Options, ctx: PassContext) -> PassResult:
        pinned = 0
        for inp in graph.inputs:
            shape = ctx.input_shapes.get(inp.name)
            if shape is not None and list(inp.shape or []) != list(shape):
                inp.shape = list(shape)
                pinned += 1
        if pinned:
            # Symbolic dims inferred earlier are stale now; shape inference recomputes them from the inputs.
            keep = {t.name for t in graph.inputs}
            for t in graph.tensors().values():
                if isinstance(t, gs.Variable) and t.name not in keep:
                    t.shape = None
        return PassResult(changed=pinned > 0, stats={"pinned_inputs": pinned})
