"""cancel-transposes: merge consecutive Transposes, drop those that compose to the identity, and fold a Transpose
on a MatMul/Gemm operand into the constant or into Gemm's transA/transB."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from autoglm_compile.pass_manager import GraphPass, PassContext, PassOptions, PassResult, register_pass

from ._graph import bypass


def perm_of(node: gs.Node) -> list[int] | None:
    """The Transpose's permutation; without the attribute it reverses the axes, which needs the input's rank."""
    if "perm" in node.attrs:
        return [int(p) for p in node.attrs["perm"]]
    shape = node.inputs[0].shape
    return list(range(len(shape)))[::-1] if shape is not None else None


def compose(first: list[int], second: list[int]) -> list[int]:
    """The single permutation equal to Transpose(perm=first) followed by Transpose(perm=second)."""
    return [first[p] for p in second]


def _rewire(node: gs.Node, index: int, tensor: gs.Tensor) -> None:
    node.inputs[index] = tensor  # SynchronizedList.__setitem__ keeps the tensor's consumer list in step


def merge_transposes(graph: gs.Graph) -> tuple[int, int]:
    """Each Transpose that reads another Transpose reads that one's input instead, with the composed permutation;
    one that then permutes nothing is bypassed. Returns (merged, cancelled)."""
    merged = cancelled = 0
    graph.toposort()  # a chain T1 -> T2 -> T3 folds in one sweep when producers come first
    for node in list(graph.nodes):
        if node.op != "Transpose" or not node.inputs or not node.outputs:
            continue
        src = node.inputs[0]
        if len(src.inputs) != 1 or src.inputs[0].op != "Transpose":
            continue
        first_node = src.inputs[0]
        first, second = perm_of(first_node), perm_of(node)
        if first is None or second is None or len(first) != len(second):
            continue
        perm = compose(first, second)
        _rewire(node, 0, first_node.inputs[0])
        node.attrs["perm"] = perm
        if perm == list(range(len(perm))) and bypass(graph, node):
            cancelled += 1
        else:
            merged += 1
    return merged, cancelled


def fold_operand_transposes(graph: gs.Graph) -> tuple[int, int]:
    """A Transpose of a constant that feeds a MatMul or Gemm becomes the transposed constant; a 2-D Transpose
    of a computed tensor that feeds Gemm's A or B becomes transA/transB. Returns (into_constant, into_flag)."""
    outputs = {t.name for t in graph.outputs}
    into_constant = into_flag = 0
    for node in list(graph.nodes):
        if node.op != "Transpose" or not node.inputs or len(node.outputs) != 1 or node.outputs[0].name in outputs:
            continue
        src, out = node.inputs[0], node.outputs[0]
        consumers = [c for c in out.outputs if c.op in ("MatMul", "Gemm")]
        perm = perm_of(node)
        if not consumers or perm is None:
            continue
        if isinstance(src, gs.Constant):
            folded = gs.Constant(f"{out.name}__transposed", np.ascontiguousarray(np.transpose(src.values, perm)))
            for consumer in list(out.outputs):  # every reader gets the constant: the Transpose is then dead
                for i, t in enumerate(consumer.inputs):
                    if t is out:
                        _rewire(consumer, i, folded)
            into_constant += 1
        elif perm == [1, 0]:
            for gemm in consumers:
                if gemm.op != "Gemm":
                    continue
                for i, flag in ((0, "transA"), (1, "transB")):
                    if i < len(gemm.inputs) and gemm.inputs[i] is out:
                        _rewire(gemm, i, src)
                        gemm.attrs[flag] = 1 - int(gemm.attrs.get(flag, 0))
                        into_flag += 1
    return into_constant, into_flag


@register_pass("cancel-transposes")
class CancelTransposes(GraphPass):
    """Merge consecutive Transposes, remove pairs that cancel, and fold Transposes into MatMul/Gemm operands.

    Consecutive Transposes become one with the composed permutation (the first stays only if something else reads
    it); an identity result is removed. A Transpose of a constant read by MatMul or Gemm is folded into a new
    constant; a Transpose [1, 0] of a computed Gemm operand is folded into transA/transB."""

    class Options(PassOptions):
        pass

    def run(self, graph: gs.Graph, opts: Options, ctx: PassContext) -> PassResult:
        merged, cancelled = merge_transposes(graph)
        into_constant, into_flag = fold_operand_transposes(graph)
        stats = {"merged": merged, "cancelled": cancelled, "into_constant": into_constant, "into_gemm_flag": into_flag}
        return PassResult(changed=any(stats.values()), stats=stats)
