"""merge-parallel-matmuls: MatMuls of one activation by constant 2-D weights (attention's Q, K and V projections)
become one MatMul by the concatenated weights, then a Split; their constant bias Adds merge the same way."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from autoglm_compile.pass_manager import GraphPass, PassContext, PassOptions, PassResult, register_pass


def _bias(y: gs.Variable, n: int, outputs: set[str]):
    """(add, bias values as [n]) where y's only consumer is an Add of a constant that broadcasts along the last dim
    to [n] (shape [n] or [1, ..., 1, n]); None otherwise."""
    if len(y.outputs) != 1 or y.name in outputs or y.outputs[0].op != "Add":
        return None
    add = y.outputs[0]
    if len(add.inputs) != 2 or add.inputs[0] is add.inputs[1]:
        return None
    c = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    if not isinstance(c, gs.Constant) or c.values.shape[-1:] != (n,) or any(d != 1 for d in c.values.shape[:-1]):
        return None
    return add, c.values.reshape(n)


def groups(graph: gs.Graph, min_size: int) -> list[list[gs.Node]]:
    """MatMul nodes grouped by their activation input: each by a constant floating [K, N_i] weight of one dtype and
    K; groups of at least min_size."""
    by_input: dict[tuple[int, str, int], list[gs.Node]] = defaultdict(list)
    for node in graph.nodes:
        if node.op != "MatMul" or len(node.inputs) != 2 or len(node.outputs) != 1:
            continue
        a, w = node.inputs
        if isinstance(a, gs.Constant) or not isinstance(w, gs.Constant) or w.values.ndim != 2 or not np.issubdtype(w.values.dtype, np.floating):
            continue
        by_input[(id(a), w.values.dtype.str, w.values.shape[0])].append(node)
    return [g for g in by_input.values() if len(g) >= min_size]


@register_pass("merge-parallel-matmuls")
class MergeParallelMatMuls(GraphPass):
    """Merge MatMuls that share their input (Q, K, V) into one MatMul by the concatenated weights and a Split.

    One GEMM of N = N_1 + ... + N_k instead of k GEMMs: on a GPU at batch 1, BERT-base's three 128 x 768 projections
    each launch too few thread blocks to fill the SMs, and each is a kernel launch of its own. Where every MatMul is
    followed by an Add of a constant bias, the Adds merge too (one Add of the concatenated bias before the Split).
    The Split's outputs take the names of the tensors they replace, so graph outputs keep theirs.
    """

    class Options(PassOptions):
        min_group: int = 2

    def run(self, graph: gs.Graph, opts: Options, ctx: PassContext) -> PassResult:
        outputs = {t.name for t in graph.outputs}
        merged = matmuls = 0
        for group in groups(graph, opts.min_group):
            a = group[0].inputs[0]
            weights = [mm.inputs[1].values for mm in group]
            sizes = [w.shape[1] for w in weights]
            biases = [_bias(mm.outputs[0], n, outputs) for mm, n in zip(group, sizes)]
            with_bias = all(b is not None for b in biases)
            first = group[0].name or f"merged_matmul_{merged}"
            w = gs.Constant(f"{first}_merged_weight", np.concatenate(weights, axis=1))
            y = gs.Variable(f"{first}_merged_out", dtype=weights[0].dtype)
            nodes = [gs.Node("MatMul", name=f"{first}_merged", inputs=[a, w], outputs=[y])]
            if with_bias:
                b = gs.Constant(f"{first}_merged_bias", np.concatenate([v for _add, v in biases]).astype(weights[0].dtype))
                yb = gs.Variable(f"{first}_merged_biased", dtype=weights[0].dtype)
                nodes.append(gs.Node("Add", name=f"{first}_merged_add", inputs=[y, b], outputs=[yb]))
                y = yb
                old = [add.outputs[0] for add, _v in biases]
                for add, _v in biases:
                    add.inputs.clear()
                    add.outputs.clear()
            else:
                old = [mm.outputs[0] for mm in group]
            for mm in group:
                mm.inputs.clear()
                mm.outputs.clear()
            split_sizes = np.array(sizes, np.int64)
            if graph.opset >= 13:  # Split's sizes are an input from opset 13, an attribute before
                split = gs.Node("Split", name=f"{first}_split", attrs={"axis": -1}, inputs=[y, gs.Constant(f"{first}_split_sizes", split_sizes)], outputs=old)
            else:
                split = gs.Node("Split", name=f"{first}_split", attrs={"axis": -1, "split": split_sizes.tolist()}, inputs=[y], outputs=old)
            graph.nodes += nodes + [split]
            merged += 1
            matmuls += len(group)
        if merged:
            graph.cleanup().toposort()
        return PassResult(changed=merged > 0, stats={"groups": merged, "matmuls": matmuls})
