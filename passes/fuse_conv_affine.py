"""fuse-conv-affine: fold a per-channel affine map (Mul/Add/Sub/Div by a constant, inference BatchNormalization)
into the Conv beside it.

After a Conv or ConvTranspose, `conv(x) * s + t` (any chain of such nodes, each by a constant that is a scalar or
broadcasts along the output channels) is the conv with its weight scaled per output channel and its bias
shifted: exporters write a conv bias as a separate Add (Paddle2ONNX), a learnable scale and shift after a conv
as Mul and Add, and leave a BatchNormalization after such an Add. Before a Conv with no padding, `conv(x * s + t)`
is the conv with its weight scaled per input channel and `t` folded into its bias (with padding, the padded zeros
would be shifted too, so that case is left).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from autoglm_compile.pass_manager import GraphPass, PassContext, PassOptions, PassResult, register_pass

from ._graph import inferred_shapes
from ._match import const_value, private, producer, split_const

CONVS = ("Conv", "ConvTranspose")
AFFINE = ("Add", "Sub", "Mul", "Div")


def _weights(conv: gs.Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The conv's constant weight and bias (None when it has none), or None when either is not a constant."""
    if len(conv.inputs) < 2 or len(conv.outputs) != 1:
        return None
    w = const_value(conv.inputs[1])
    if w is None or w.ndim < 3 or not np.issubdtype(w.dtype, np.floating):
        return None
    if len(conv.inputs) > 2 and conv.inputs[2].name:
        b = const_value(conv.inputs[2])
        return None if b is None else (w, b)
    return w, None


def _channel_vector(c: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """`c` as a float64 vector of `channels` values when it broadcasts along axis 1 of a rank-`rank` tensor without
    changing its shape (a scalar, [1, C, 1, 1], [C, 1, 1], ...; not [C], which numpy broadcasting puts on the
    last axis), else None."""
    if c.ndim > rank or not np.all(np.isfinite(c)):
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    if shape[0] != 1 or shape[1] not in (1, channels) or any(d != 1 for d in shape[2:]):
        return None
    return np.broadcast_to(c.astype(np.float64).reshape(-1), (channels,)).copy()


def _scale_shift(node: gs.Node, x: gs.Tensor, c: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(s, t) with node(x) = x * s + t, for c already a per-channel vector; None when the node is not such a map."""
    first = node.inputs[0] is x
    zero, one = np.zeros_like(c), np.ones_like(c)
    if node.op == "Add":
        return one, c
    if node.op == "Sub":
        return (one, -c) if first else (-one, c)
    if node.op == "Mul":
        return c, zero
    if node.op == "Div" and first and np.all(c != 0):
        return 1.0 / c, zero
    return None


def _batchnorm(node: gs.Node, graph: gs.Graph) -> tuple[np.ndarray, np.ndarray, np.dtype] | None:
    """(s, t, dtype) of an inference BatchNormalization with constant parameters: bn(x) = x * s + t per channel."""
    if len(node.inputs) != 5 or node.attrs.get("training_mode", 0) or node.attrs.get("spatial", 1) != 1:
        return None
    if any(t.outputs or t in graph.outputs for t in node.outputs[1:]):  # running mean/var used: not inference
        return None
    params = [const_value(t) for t in node.inputs[1:]]
    if any(p is None or p.ndim != 1 or not np.issubdtype(p.dtype, np.floating) for p in params):
        return None
    scale, shift, mean, var = (p.astype(np.float64) for p in params)
    s = scale / np.sqrt(var + node.attrs.get("epsilon", 1e-5))
    return s, shift - mean * s, params[0].dtype


def affine(node: gs.Node, graph: gs.Graph) -> tuple[gs.Tensor, object] | None:
    """(x, map) when node computes x * s + t per channel, with map(dtype, rank, channels) -> (s, t) or None."""
    if node.op == "BatchNormalization":
        st = _batchnorm(node, graph)
        if st is None:
            return None
        s, t, bn_dtype = st
        return node.inputs[0], lambda dtype, rank, channels: (s, t) if s.shape == (channels,) and bn_dtype == dtype else None
    if node.op not in AFFINE:
        return None
    pair = split_const(node)
    if pair is None:
        return None
    x, c = pair
    value = const_value(c)

    def per_channel(dtype, rank, channels):
        if value.dtype != dtype:
            return None
        vec = _channel_vector(value, rank, channels)
        return None if vec is None else _scale_shift(node, x, vec)

    return x, per_channel


def _out_channels(conv: gs.Node, w: np.ndarray) -> int:
    return w.shape[0] if conv.op == "Conv" else w.shape[1] * conv.attrs.get("group", 1)


def _set_weights(conv: gs.Node, w: np.ndarray, b: np.ndarray, dtype, tag: str) -> None:
    """New weight and bias constants (a weight shared with another node is left as it was)."""
    name = conv.name or conv.outputs[0].name
    x = conv.inputs[0]
    conv.inputs.clear()  # gs keeps tensor<->node links in step only through the list methods
    conv.inputs.extend([x, gs.Constant(f"{name}__{tag}_weight", w.astype(dtype)), gs.Constant(f"{name}__{tag}_bias", b.astype(dtype))])


def fold_after(graph: gs.Graph, node: gs.Node) -> bool:
    """Fold `node` (an affine map, see affine()) into the Conv/ConvTranspose that writes its input."""
    m = affine(node, graph)
    if m is None or not node.outputs:
        return False
    x, per_channel = m
    conv = producer(x, *CONVS)
    if conv is None or not private(x, graph):
        return False
    wb = _weights(conv)
    if wb is None:
        return False
    w, b = wb
    channels = _out_channels(conv, w)
    st = per_channel(w.dtype, w.ndim, channels)
    if st is None:
        return False
    s, t = st
    kernel = (1,) * (w.ndim - 2)
    w64 = w.astype(np.float64)
    if conv.op == "Conv":  # [C_out, C_in/group, k...]
        w_new = w64 * s.reshape(-1, 1, *kernel)
    else:  # ConvTranspose [C_in, C_out/group, k...]: output channel g*(C_out/group)+j is column j of group g
        group = conv.attrs.get("group", 1)
        c_in, c_out_g = w.shape[0], w.shape[1]
        w_new = (w64.reshape(group, c_in // group, c_out_g, *w.shape[2:]) * s.reshape(group, 1, c_out_g, *kernel)).reshape(w.shape)
    b64 = np.zeros(channels) if b is None else b.astype(np.float64)
    _set_weights(conv, w_new, b64 * s + t, w.dtype, "affine")
    out = node.outputs[0]
    node.inputs.clear()
    node.outputs.clear()
    conv.outputs.clear()
    conv.outputs.append(out)
    return True


def _unpadded(conv: gs.Node) -> bool:
    auto_pad = conv.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    return auto_pad == "VALID" or (auto_pad == "NOTSET" and not any(conv.attrs.get("pads", [])))


def fold_before(graph: gs.Graph, node: gs.Node, shapes: dict) -> bool:
    """Fold `node` (an affine map, see affine()) into every Conv that reads its output, when all its readers are
    unpadded Convs that read it as their data input, with constant weights. The map's input must have the conv's
    input channels already (a constant [1, C, 1, 1] would broadcast a 1-channel input up to C)."""
    m = affine(node, graph)
    if m is None or not node.outputs:
        return False
    x, per_channel = m
    x_shape = shapes.get(x.name)
    y = node.outputs[0]
    if y in graph.outputs or not y.outputs:
        return False
    convs = list(y.outputs)
    if len({id(n) for n in convs}) != len(convs):  # one node reads it twice
        return False
    plans = []
    for conv in convs:
        if conv.op != "Conv" or conv.inputs[0] is not y or any(t is y for t in conv.inputs[1:]) or not _unpadded(conv):
            return False
        wb = _weights(conv)
        if wb is None:
            return False
        w, b = wb
        group = conv.attrs.get("group", 1)
        c_in = w.shape[1] * group
        if x_shape is None or len(x_shape) != w.ndim or x_shape[1] != c_in:
            return False
        st = per_channel(w.dtype, w.ndim, c_in)
        if st is None:
            return False
        plans.append((conv, w, b, group, st))
    for conv, w, b, group, (s, t) in plans:
        c_out, c_in_g = w.shape[0], w.shape[1]
        kernel = (1,) * (w.ndim - 2)
        # Input channel j of group g is global channel g*(C_in/group)+j; output channel o belongs to group o // (C_out/group).
        per_out = np.repeat(np.arange(group), c_out // group)
        idx = per_out[:, None] * c_in_g + np.arange(c_in_g)[None, :]  # [C_out, C_in/group] -> global input channel
        w64 = w.astype(np.float64)
        w_new = w64 * s[idx].reshape(c_out, c_in_g, *kernel)
        shift = (w64 * t[idx].reshape(c_out, c_in_g, *kernel)).reshape(c_out, -1).sum(axis=1)
        b64 = np.zeros(c_out) if b is None else b.astype(np.float64)
        _set_weights(conv, w_new, b64 + shift, w.dtype, "pre_affine")
        conv.inputs[0] = x  # through the list's __setitem__: gs updates x's and y's reader lists
    node.inputs.clear()
    node.outputs.clear()
    return True


@register_pass("fuse-conv-affine")
class FuseConvAffine(GraphPass):
    """Fold per-channel Mul/Add/Sub/Div by constants and BatchNormalization into the weight and bias of the Conv beside them.

    After a Conv or ConvTranspose, or before an unpadded Conv (every reader of the map's result must be one).
    Repeated until nothing more folds, so a chain (conv, Mul, Add) becomes one Conv. The fold is computed in float64
    and cast back to the weight dtype, so numerics change by rounding only."""

    class Options(PassOptions):
        before_conv: bool = True  # also fold an affine map into the unpadded Convs that read it

    def run(self, graph: gs.Graph, opts: Options, ctx: PassContext) -> PassResult:
        after: dict[str, int] = {}
        before: dict[str, int] = {}
        # Folding rewires existing tensors and makes no new ones, so the shapes of the graph as it comes stay valid.
        shapes = inferred_shapes(graph, ctx.ir_version) if opts.before_conv and any(n.op == "Conv" for n in graph.nodes) else {}
        while True:
            changed = False
            for node in list(graph.nodes):
                if node.op not in AFFINE + ("BatchNormalization",) or not node.outputs:
                    continue
                if fold_after(graph, node):
                    after[node.op] = after.get(node.op, 0) + 1
                    changed = True
                elif opts.before_conv and fold_before(graph, node, shapes):
                    before[node.op] = before.get(node.op, 0) + 1
                    changed = True
            if not changed:
                break
        return PassResult(changed=bool(after or before), stats={"folded_after_conv": after, "folded_before_conv": before})
