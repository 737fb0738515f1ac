"""fuse-conv-bn: fold an inference BatchNormalization into the Conv or ConvTranspose that feeds it."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from autoglm_compile.pass_manager import GraphPass, PassContext, PassOptions, PassResult, register_pass

CONVS = ("Conv", "ConvTranspose")


def match_conv_bn(graph: gs.Graph) -> list[tuple[gs.Node, gs.Node]]:
    """(conv, bn) pairs that can be folded: the conv output feeds only the BN and is no graph output, and the
    conv weight and bias and the BN's scale, bias, mean and variance are all constants."""
    outputs = {t.name for t in graph.outputs}
    pairs = []
    for bn in graph.nodes:
        if bn.op != "BatchNormalization" or len(bn.inputs) != 5 or not bn.outputs:
            continue
        if bn.attrs.get("training_mode", 0) or bn.attrs.get("spatial", 1) != 1:
            continue
        if any(t.outputs or t.name in outputs for t in bn.outputs[1:]):  # running mean/var outputs are used: not inference
            continue
        if not all(isinstance(t, gs.Constant) for t in bn.inputs[1:]):
            continue
        x = bn.inputs[0]
        if len(x.inputs) != 1 or x.inputs[0].op not in CONVS or len(x.outputs) != 1 or x.name in outputs:
            continue
        conv = x.inputs[0]
        if len(conv.inputs) < 2 or not all(isinstance(t, gs.Constant) for t in conv.inputs[1:]):
            continue
        w = conv.inputs[1].values
        if w.ndim < 3 or not np.issubdtype(w.dtype, np.floating):
            continue
        channels = w.shape[0] if conv.op == "Conv" else w.shape[1] * conv.attrs.get("group", 1)
        if any(t.values.shape != (channels,) for t in bn.inputs[1:]):
            continue
        pairs.append((conv, bn))
    return pairs


def fold_into_conv(conv: gs.Node, bn: gs.Node) -> None:
    """Scale the conv's weight per output channel and fold the BN shift into its bias; the conv then writes the
    BN's output. New constants are made, so a weight shared with another node is left as it was."""
    w = conv.inputs[1].values
    scale, shift, mean, var = (t.values.astype(np.float64) for t in bn.inputs[1:])
    factor = scale / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
    group = conv.attrs.get("group", 1)
    kernel = (1,) * (w.ndim - 2)
    w64 = w.astype(np.float64)
    if conv.op == "Conv":  # [C_out, C_in/group, k...]: output channels are the first axis
        w_new = w64 * factor.reshape(-1, 1, *kernel)
    else:  # ConvTranspose [C_in, C_out/group, k...]: output channel g*(C_out/group)+j lives in group g, column j
        c_in, c_out_g = w.shape[0], w.shape[1]
        w_new = (w64.reshape(group, c_in // group, c_out_g, *w.shape[2:]) * factor.reshape(group, 1, c_out_g, *kernel)).reshape(w.shape)
    b = conv.inputs[2].values.astype(np.float64) if len(conv.inputs) > 2 else np.zeros(factor.shape)
    b_new = (b - mean) * factor + shift
    name = conv.name or conv.outputs[0].name
    x = conv.inputs[0]
    conv.inputs.clear()  # gs keeps tensor<->node links in step only through the list methods, not assignment
    conv.inputs.extend([x, gs.Constant(f"{name}__bn_weight", w_new.astype(w.dtype)), gs.Constant(f"{name}__bn_bias", b_new.astype(w.dtype))])
    out = bn.outputs[0]
    bn.inputs.clear()
    bn.outputs.clear()
    conv.outputs.clear()
    conv.outputs.append(out)


@register_pass("fuse-conv-bn")
class FuseConvBN(GraphPass):
    """Fold inference BatchNormalization into the Conv or ConvTranspose before it (weights and bias rescaled).

    Numerics change by rounding only (the fold is computed in float64 and cast back to the weight dtype)."""

    class Options(PassOptions):
        pass

    def run(self, graph: gs.Graph, opts: Options, ctx: PassContext) -> PassResult:
        folded: dict[str, int] = {}
        for conv, bn in match_conv_bn(graph):
            fold_into_conv(conv, bn)
            folded[conv.op] = folded.get(conv.op, 0) + 1
        return PassResult(changed=bool(folded), stats={"folded": folded})
