"""eliminate-noops: remove nodes that compute nothing (Identity, inference Dropout, Cast to the same type)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from autoglm_compile.pass_manager import GraphPass, PassContext, PassOptions, PassResult, register_pass

from ._graph import bypass


def _is_noop(node: gs.Node) -> bool:
    if node.op == "Identity":
        return True
    if node.op == "Dropout":
        # In inference Dropout is the identity, unless training_mode is given (a 3rd input) or its mask is used.
        mask_used = len(node.outputs) > 1 and len(node.outputs[1].outputs) > 0
        return len(node.inputs) < 3 and not mask_used
    if node.op == "Cast":
        dtype = node.inputs[0].dtype
        try:
            return dtype is not None and onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)) == node.attrs.get("to")
        except (TypeError, KeyError, ValueError):  # a dtype numpy does not know
            return False
    return False


@register_pass("eliminate-noops")
class EliminateNoops(GraphPass):
    """Remove Identity, inference-mode Dropout and Cast to the same dtype."""

    class Options(PassOptions):
        pass

    def run(self, graph: gs.Graph, opts: Options, ctx: PassContext) -> PassResult:
        removed: dict[str, int] = {}
        for node in list(graph.nodes):
            if len(node.inputs) >= 1 and node.outputs and _is_noop(node):
                if len(node.outputs) > 1:
                    node.outputs = node.outputs[:1]  # the unused Dropout mask
                if bypass(graph, node):
                    removed[node.op] = removed.get(node.op, 0) + 1
        return PassResult(changed=bool(removed), stats={"removed": removed})
