"""decompose-contrib: ONNX Runtime's fused com.microsoft ops -> the standard ONNX ops they fuse, which TVM imports.

A model saved after ONNX Runtime's graph optimizations (or exported for it) carries ops that only ONNX Runtime
knows. Those that fuse standard ops, with the same arithmetic, are written back as those ops, so that TVM can take
them rather than ONNX Runtime (the fallback) running them:

| op (com.microsoft) | becomes |
|---|---|
| FusedConv | Conv, Add of its sum input Z, then its activation |
| FusedGemm | Gemm, then its activation (Relu, Tanh, Sigmoid; others are left) |
| FusedMatMul | Transpose of the last two axes where transA/transB, MatMul, Mul by alpha (transBatchA/B are left) |
| QuickGelu | x * Sigmoid(alpha * x) |
| DynamicQuantizeMatMul | DynamicQuantizeLinear, MatMulInteger, Cast, Mul by the scales, Add of the bias |
| MatMulIntegerToFloat | MatMulInteger, Cast, Mul by the scales, Add of the bias |

What has no exact standard form (QLinearConv's requantization, QAttention, ...) is left to the fallback.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from autoglm_compile.pass_manager import GraphPass, PassContext, PassOptions, PassResult, register_pass


MS = "com.microsoft"
DQL_OPSET = 11  # DynamicQuantizeLinear; MatMulInteger is opset 10; Clip's bounds as inputs from 11


def _present(node: gs.Node, i: int) -> gs.Tensor | None:
    return node.inputs[i] if i < len(node.inputs) and node.inputs[i].name else None


class _Builder:
    """Makes the nodes that replace one contrib node; the last one writes the node's outputs."""

    def __init__(self, graph: gs.Graph, node: gs.Node):
        self.graph, self.node, self.nodes = graph, node, []
        self.base = node.name or node.outputs[0].name

    def add(self, op: str, inputs: list, attrs: dict | None = None, dtype=None, outputs: int = 1) -> list[gs.Variable]:
        k = len(self.nodes)
        outs = [gs.Variable(f"{self.base}__{op.lower()}{k}_{j}", dtype=dtype) for j in range(outputs)]
        name = f"{self.node.name}__{op}{k}" if self.node.name else ""
        self.nodes.append(gs.Node(op, name=name, attrs=attrs or {}, inputs=list(inputs), outputs=outs))
        self.graph.nodes.append(self.nodes[-1])
        return outs

    def const(self, tag: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(f"{self.base}__{tag}", np.asarray(value))

    def finish(self) -> bool:
        """Make the last node made write the contrib node's output instead, and detach the contrib node."""
        out = self.node.outputs[0]
        producer = self.nodes[-1]
        self.node.inputs.clear()
        self.node.outputs.clear()
        producer.outputs.clear()
        producer.outputs.append(out)
        return True


def _activation(b: _Builder, x: gs.Tensor, kind: str, params: list[float], opset: int, dtype) -> gs.Tensor | None:
    """x through ONNX Runtime's fused activation `kind` (MLAS_ACTIVATION); None for one it has no rewrite for."""
    if kind == "":
        return x
    if kind in ("Relu", "Tanh", "Sigmoid"):
        return b.add(kind, [x], dtype=dtype)[0]
    if kind == "LeakyRelu" and len(params) == 1:
        return b.add("LeakyRelu", [x], {"alpha": float(params[0])}, dtype=dtype)[0]
    if kind == "HardSigmoid" and len(params) == 2:
        return b.add("HardSigmoid", [x], {"alpha": float(params[0]), "beta": float(params[1])}, dtype=dtype)[0]
    if kind == "Clip" and len(params) == 2:
        if opset >= DQL_OPSET:
            lo, hi = (b.const(f"clip_{t}", np.array(v, dtype=dtype)) for t, v in (("min", params[0]), ("max", params[1])))
            return b.add("Clip", [x, lo, hi], dtype=dtype)[0]
        return b.add("Clip", [x], {"min": float(params[0]), "max": float(params[1])}, dtype=dtype)[0]
    return None


def _str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def fused_conv(b: _Builder, opset: int) -> bool:
    node = b.node
    kind, params = _str(node.attrs.get("activation", "")), list(node.attrs.get("activation_params", []))
    if kind not in ("", "Relu", "Tanh", "Sigmoid", "LeakyRelu", "HardSigmoid", "Clip"):  # onnxruntime 1.32's list
        return False
    dtype = _float_dtype(node.outputs[0], node.inputs[0], node.inputs[1])
    if dtype is None:
        return False
    attrs = {k: v for k, v in node.attrs.items() if k not in ("activation", "activation_params")}
    bias, z = _present(node, 2), _present(node, 3)
    y = b.add("Conv", list(node.inputs[:2]) + ([bias] if bias is not None else []), attrs, dtype=dtype)[0]
    if z is not None:
        y = b.add("Add", [y, z], dtype=dtype)[0]
    return _activation(b, y, kind, params, opset, dtype) is not None and b.finish()


def fused_gemm(b: _Builder, opset: int) -> bool:
    node = b.node
    kind = _str(node.attrs.get("activation", ""))
    if kind not in ("", "Relu", "Tanh", "Sigmoid"):
        return False
    dtype = _float_dtype(node.outputs[0], node.inputs[0], node.inputs[1])
    attrs = {k: v for k, v in node.attrs.items() if k in ("alpha", "beta", "transA", "transB")}
    y = b.add("Gemm", [t for t in node.inputs if t.name], attrs, dtype=dtype)[0]
    _activation(b, y, kind, [], opset, dtype)
    return b.finish()


def fused_matmul(b: _Builder, opset: int) -> bool:
    node = b.node
    if node.attrs.get("transBatchA", 0) or node.attrs.get("transBatchB", 0):
        return False
    dtype = _float_dtype(node.outputs[0], node.inputs[0], node.inputs[1])
    if dtype is None:
        return False
    ins = []
    for t, flag in zip(node.inputs[:2], ("transA", "transB")):
        if node.attrs.get(flag, 0):
            rank = len(t.shape) if t.shape is not None else None
            if rank is None or rank < 2:  # the perm needs the rank
                return False
            perm = list(range(rank - 2)) + [rank - 1, rank - 2]
            t = b.add("Transpose", [t], {"perm": perm}, dtype=dtype)[0]
        ins.append(t)
    y = b.add("MatMul", ins, dtype=dtype)[0]
    alpha = float(node.attrs.get("alpha", 1.0))
    if alpha != 1.0:
        b.add("Mul", [y, b.const("alpha", np.array(alpha, dtype=dtype))], dtype=dtype)
    return b.finish()


def quick_gelu(b: _Builder, opset: int) -> bool:
    node = b.node
    x = node.inputs[0]
    dtype = _float_dtype(node.outputs[0], x)
    if dtype is None:
        return False
    ax = b.add("Mul", [x, b.const("alpha", np.array(node.attrs.get("alpha", 1.702), dtype=dtype))], dtype=dtype)[0]
    s = b.add("Sigmoid", [ax], dtype=dtype)[0]
    b.add("Mul", [x, s], dtype=dtype)
    return b.finish()


def _scaled(b: _Builder, product: gs.Tensor, scale: gs.Tensor, bias: gs.Tensor | None, dtype) -> bool:
    """float(product) * scale (+ bias), written to the contrib node's output."""
    f = b.add("Cast", [product], {"to": onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))}, dtype=dtype)[0]
    y = b.add("Mul", [f, scale], dtype=dtype)[0]
    if bias is not None:
        b.add("Add", [y, bias], dtype=dtype)
    return b.finish()


def _float_dtype(*tensors):
    for t in tensors:
        if t is not None and t.dtype is not None and np.issubdtype(np.dtype(t.dtype), np.floating):
            return np.dtype(t.dtype)
    return None


def dynamic_quantize_matmul(b: _Builder, opset: int) -> bool:
    node = b.node
    if opset < DQL_OPSET:
        return False
    a, w, w_scale = node.inputs[:3]
    w_zp, bias = _present(node, 3), _present(node, 4)
    dtype = _float_dtype(node.outputs[0], a, w_scale)
    if dtype is None:
        return False
    aq, a_scale, a_zp = b.add("DynamicQuantizeLinear", [a], outputs=3)
    aq.dtype, a_scale.dtype, a_zp.dtype = np.uint8, dtype, np.uint8
    product = b.add("MatMulInteger", [aq, w, a_zp] + ([w_zp] if w_zp is not None else []), dtype=np.int32)[0]
    scale = b.add("Mul", [a_scale, w_scale], dtype=dtype)[0]
    return _scaled(b, product, scale, bias, dtype)


def matmul_integer_to_float(b: _Builder, opset: int) -> bool:
    node = b.node
    a, w, a_scale, w_scale = node.inputs[:4]
    a_zp, w_zp, bias = _present(node, 4), _present(node, 5), _present(node, 6)
    dtype = _float_dtype(node.outputs[0], a_scale, w_scale)
    if dtype is None:
        return False
    if a_zp is None and w_zp is not None:  # MatMulInteger's a_zero_point is positional: an absent one is ''
        a_zp = gs.Variable.empty()
    zps = [a_zp, w_zp] if w_zp is not None else [a_zp] if a_zp is not None else []
    product = b.add("MatMulInteger", [a, w] + zps, dtype=np.int32)[0]
    scale = b.add("Mul", [a_scale, w_scale], dtype=dtype)[0]
    return _scaled(b, product, scale, bias, dtype)


ContribOp = Literal["FusedConv", "FusedGemm", "FusedMatMul", "QuickGelu", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"]
REWRITES = {
    "FusedConv": fused_conv,
    "FusedGemm": fused_gemm,
    "FusedMatMul": fused_matmul,
    "QuickGelu": quick_gelu,
    "DynamicQuantizeMatMul": dynamic_quantize_matmul,
    "MatMulIntegerToFloat": matmul_integer_to_float,
}


@register_pass("decompose-contrib")
class DecomposeContrib(GraphPass):
    """Rewrite ONNX Runtime's fused com.microsoft ops (FusedConv, FusedGemm, FusedMatMul, QuickGelu, DynamicQuantizeMatMul, MatMulIntegerToFloat) as standard ops.

    A node whose variant has no exact rewrite (an activation without one, transBatchA/B, an unknown rank or dtype)
    is left for ONNX Runtime. The ops used are standard ONNX (DynamicQuantizeLinear and Clip's inputs need opset 11)."""

    class Options(PassOptions):
        ops: list[ContribOp] | None = None  # which of the ops to rewrite (default: all)

    def run(self, graph: gs.Graph, opts: Options, ctx: PassContext) -> PassResult:
        wanted = set(REWRITES if opts.ops is None else opts.ops)
        done: dict[str, int] = {}
        left: dict[str, int] = {}
        for node in list(graph.nodes):
            if node.domain != MS or node.op not in wanted or len(node.outputs) != 1:
                continue
            b = _Builder(graph, node)
            if REWRITES[node.op](b, graph.opset):
                done[node.op] = done.get(node.op, 0) + 1
            else:
                for n in b.nodes:  # a rewrite that gave up part-way: drop what it made
                    n.inputs.clear()
                    n.outputs.clear()
                left[node.op] = left.get(node.op, 0) + 1
        return PassResult(changed=bool(done), stats={"decomposed": done, "left": left})
