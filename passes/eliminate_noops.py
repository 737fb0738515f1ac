"""eliminate-noops: remove nodes that compute nothing (Identity, inference Dropout, Cast to the same type, and
Reshape, Transpose, Expand, Slice and Pad that leave their input as it is)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from autoglm_compile.pass_manager import GraphPass, PassContext, PassOptions, PassResult, register_pass

from ._graph import bypass, inferred_shapes

# Ops whose no-op test needs static shapes; shape inference runs only when the graph has one of them.
SHAPED = ("Reshape", "Expand", "Slice")


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape)


def _same_static_shape(node: gs.Node, shapes: dict) -> bool:
    a, b = shapes.get(node.inputs[0].name), shapes.get(node.outputs[0].name)
    return _static(a) and _static(b) and list(a) == list(b)


def _const(node: gs.Node, index: int) -> np.ndarray | None:
    """The value of an optional constant input; None when it is absent (an empty name) or not constant."""
    if index >= len(node.inputs) or not node.inputs[index].name:
        return None
    t = node.inputs[index]
    return t.values if isinstance(t, gs.Constant) else None


def _absent(node: gs.Node, index: int) -> bool:
    return index >= len(node.inputs) or not node.inputs[index].name


def _whole_slice(node: gs.Node, shapes: dict) -> bool:
    # Steps of 1 (or none given) and an unchanged shape leave every element where it was. Without shapes, starts
    # of 0 and ends past any dim (INT64_MAX, as exporters write for "to the end") also take the whole tensor.
    if len(node.inputs) < 3:  # opset < 10 keeps starts/ends in attributes: not handled
        return False
    steps = _const(node, 4)
    if not (_absent(node, 4) or (steps is not None and np.all(steps == 1))):
        return False
    if _same_static_shape(node, shapes):
        return True
    starts, ends = _const(node, 1), _const(node, 2)
    return starts is not None and ends is not None and np.all(starts == 0) and np.all(ends >= np.iinfo(np.int32).max)


def _is_noop(node: gs.Node, shapes: dict, graph_outputs: list) -> bool:
    if node.op == "Identity":
        return True
    if node.op == "Dropout":
        # In inference Dropout is the identity, unless training_mode is given (a 3rd input) or its mask is used.
        mask = node.outputs[1] if len(node.outputs) > 1 else None
        mask_used = mask is not None and (len(mask.outputs) > 0 or mask in graph_outputs)
        return len(node.inputs) < 3 and not mask_used
    if node.op == "Cast":
        dtype = node.inputs[0].dtype
        try:
            return dtype is not None and onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)) == node.attrs.get("to")
        except (TypeError, KeyError, ValueError):  # a dtype numpy does not know
            return False
    if node.op in ("Reshape", "Expand"):
        return _same_static_shape(node, shapes)
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        return perm is not None and list(perm) == list(range(len(perm)))
    if node.op == "Slice":
        return _whole_slice(node, shapes)
    if node.op == "Pad":
        # Zero pads leave the input as it is in every mode. Opset < 11 keeps the pads in an attribute.
        pads = node.attrs.get("pads") if len(node.inputs) < 2 else _const(node, 1)
        return pads is not None and not np.any(np.asarray(pads))
    return False


@register_pass("eliminate-noops")
class EliminateNoops(GraphPass):
    """Remove Identity, inference Dropout, Cast to the same dtype, and shape-preserving Reshape/Transpose/Expand/Slice/Pad.

    Reshape and Expand are no-ops when their input and output have the same static shape (from ONNX shape
    inference), Transpose when its perm is 0..n-1, Slice when its steps are 1 and it keeps the shape (or starts at
    0 and ends at INT_MAX), Pad when all its pads are zero."""

    class Options(PassOptions):
        pass

    def run(self, graph: gs.Graph, opts: Options, ctx: PassContext) -> PassResult:
        shapes: dict = {}
        if any(n.op in SHAPED for n in graph.nodes):
            shapes = inferred_shapes(graph, ctx.ir_version)
        removed: dict[str, int] = {}
        for node in list(graph.nodes):
            if len(node.inputs) >= 1 and node.outputs and _is_noop(node, shapes, graph.outputs):
                # Only a Dropout has a second output here, and its mask is unused (_is_noop checked): bypass() wires
                # the first output and clears the node, so the mask goes with it.
                if bypass(graph, node):
                    removed[node.op] = removed.get(node.op, 0) + 1
        return PassResult(changed=bool(removed), stats={"removed": removed})
