"""Helpers shared by passes (not a pass: it registers nothing)."""
from __future__ import annotations

import logging

import onnx
import onnx_graphsurgeon as gs
import onnxruntime

from autoglm_compile.pass_manager import export_model

gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
onnxruntime.set_default_logger_severity(3)  # constant folding runs ORT sessions that warn about nothing useful


def inferred(graph: gs.Graph, ir_version: int) -> gs.Graph:
    """A copy of the graph with ONNX shape inference applied (data propagation on, so Shape->Gather chains fold)."""
    model = export_model(graph, ir_version)
    model = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    return gs.import_onnx(model)


def inferred_shapes(graph: gs.Graph, ir_version: int) -> dict:
    """Tensor name -> shape (None where unknown) after ONNX shape inference; the graph itself is not changed."""
    return {name: t.shape for name, t in inferred(graph, ir_version).tensors().items()}


def bypass(graph: gs.Graph, node: gs.Node) -> bool:
    """Remove a single-input, single-output no-op node by wiring its input to its consumers.

    When the node's output is a graph output, the producer of the input is made to write the graph output
    instead, so graph output names never change. Returns False where that is impossible (the input is a graph
    input, a constant, or itself a graph output)."""
    src, dst = node.inputs[0], node.outputs[0]
    if dst in graph.outputs:
        if src in graph.inputs or src in graph.outputs or isinstance(src, gs.Constant) or not src.inputs:
            return False
        producer = src.inputs[0]
        producer.outputs[producer.outputs.index(src)] = dst
        for consumer in list(src.outputs):
            consumer.inputs[consumer.inputs.index(src)] = dst
    else:
        for consumer in list(dst.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is dst:
                    consumer.inputs[i] = src
    node.inputs.clear()
    node.outputs.clear()
    return True


def constant_nodes_to_initializers(graph: gs.Graph) -> int:
    """Replace each Constant node that holds a tensor ('value') by an initializer of the same name.

    onnx.version_converter writes Squeeze/Unsqueeze/ReduceX axes as new Constant nodes: this keeps them out of the
    node count, where the runner's cleanup would otherwise leave them. Returns how many were replaced."""
    count = 0
    for node in list(graph.nodes):
        value = node.attrs.get("value") if node.op == "Constant" and len(node.outputs) == 1 else None
        if not isinstance(value, gs.Constant):
            continue
        out = node.outputs[0]
        const = gs.Constant(out.name, value.values)
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = const
        if out in graph.outputs:  # a graph output must stay a node's output
            continue
        node.outputs.clear()
        count += 1
    return count
