"""Small matching helpers for the pattern-fusion passes (not a pass: it registers nothing).

Matchers built on these are pure functions of the graph: they return what they found and change nothing.
"""
from __future__ import annotations

import os

import numpy as np
import onnx_graphsurgeon as gs


def producer(t: gs.Tensor, *ops: str) -> gs.Node | None:
    """The node that writes `t`, if it is one of `ops` (any op when none is given)."""
    if isinstance(t, gs.Constant) or not t.inputs:
        return None
    node = t.inputs[0]
    return node if not ops or node.op in ops else None


def sole_consumer(t: gs.Tensor, graph: gs.Graph, *ops: str) -> gs.Node | None:
    """The only node that reads `t` (and reads it once), if `t` is no graph output and that node is one of `ops`."""
    if t in graph.outputs or len(t.outputs) != 1:
        return None
    node = t.outputs[0]
    return node if not ops or node.op in ops else None


def private(t: gs.Tensor, graph: gs.Graph, readers: int = 1) -> bool:
    """True when `t` is an intermediate read by exactly `readers` node inputs and is no graph output."""
    return t not in graph.outputs and len(t.outputs) == readers


def const_value(t: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (an initializer or a Constant node's output), else None."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    node = producer(t, "Constant")
    if node is not None and "value" in node.attrs and isinstance(node.attrs["value"], gs.Constant):
        return np.asarray(node.attrs["value"].values)
    return None


def scalar(t: gs.Tensor) -> float | None:
    """The value of a constant with exactly one element, else None."""
    v = const_value(t)
    return float(v.reshape(-1)[0]) if v is not None and v.size == 1 and np.issubdtype(v.dtype, np.floating) else None


def is_scalar(t: gs.Tensor, value: float, rtol: float = 1e-3) -> bool:
    """A one-element float constant close to `value`. rtol 1e-3 accepts constants stored in fp16."""
    v = scalar(t)
    return v is not None and abs(v - value) <= rtol * abs(value)


def split_const(node: gs.Node) -> tuple[gs.Tensor, gs.Tensor] | None:
    """For a binary node with exactly one constant operand: (the other operand, the constant)."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    a_const, b_const = const_value(a) is not None, const_value(b) is not None
    if a_const == b_const:
        return None
    return (b, a) if a_const else (a, b)


def other_input(node: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    """For a binary node that reads `t` once: its other operand."""
    if len(node.inputs) != 2 or node.inputs[0] is node.inputs[1]:
        return None
    if node.inputs[0] is t:
        return node.inputs[1]
    if node.inputs[1] is t:
        return node.inputs[0]
    return None


def fused_name(graph: gs.Graph, nodes: list[gs.Node], op: str) -> str:
    """A name for the node that replaces `nodes`: their common scope plus the op ('/m/layer.0/LayerNorm/LayerNormalization')."""
    names = [n.name for n in nodes if n.name]
    scope = os.path.commonprefix(names).rpartition("/")[0] if names else ""
    base = f"{scope}/{op}" if scope else op
    taken = {n.name for n in graph.nodes}
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def replace(graph: gs.Graph, old_last: gs.Node, new: gs.Node) -> None:
    """Put `new` in place of the subgraph that ends in `old_last`: `new` writes old_last's outputs, and the rest of the
    subgraph, now unread, is removed by the runner's cleanup."""
    outputs = list(old_last.outputs)
    old_last.outputs.clear()
    new.outputs = outputs
    graph.nodes.append(new)
