"""merge-parallel-matmuls: the exact nodes after the pass, equal outputs under ONNX Runtime (the merged GEMM sums
the same products in the same order: rtol 1e-5, atol 1e-5), the names of the replaced tensors kept, and no change
on near misses."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from autoglm_compile.config import PassSpec
from autoglm_compile.pass_manager import PassContext, run_passes
from conftest import make_model


def apply(model):
    out, records = run_passes(model, [PassSpec(name="merge-parallel-matmuls")], PassContext())
    return out, records[0]


def run(model, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def qkv(opset: int, bias=(True, True, True), k: int = 16, sizes=(16, 16, 8), k_of_last: int | None = None):
    """x[2, 5, k] -> three MatMuls (+ bias Adds where asked) -> Relu each; the Relus are the outputs."""
    rng = np.random.default_rng(0)
    nodes, inits, outputs = [], [], []
    for i, (n, has_bias) in enumerate(zip(sizes, bias)):
        kk = k_of_last if (k_of_last and i == len(sizes) - 1) else k
        inits.append(numpy_helper.from_array(rng.standard_normal((kk, n)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"mm{i}"], name=f"proj{i}"))
        y = f"mm{i}"
        if has_bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"b{i}"))
            nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"biased{i}"], name=f"bias{i}"))
            y = f"biased{i}"
        nodes.append(helper.make_node("Relu", [y], [f"out{i}"]))
        outputs.append(helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, [2, 5, n]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, k])
    return make_model(nodes, [x], outputs, inits, opset=opset)


def feeds(k: int = 16):
    return {"x": np.random.default_rng(1).standard_normal((2, 5, k)).astype(np.float32)}


@pytest.mark.parametrize("opset", [17, 11])
def test_three_projections_with_biases_become_one_matmul_one_add_one_split(opset):
    model = qkv(opset)
    out, rec = apply(model)
    assert rec.changed and rec.stats == {"groups": 1, "matmuls": 3}
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("MatMul") == 1 and ops.count("Add") == 1 and ops.count("Split") == 1 and ops.count("Relu") == 3
    split = next(n for n in out.graph.node if n.op_type == "Split")
    assert list(split.output) == ["biased0", "biased1", "biased2"]  # the replaced tensors keep their names
    assert (len(split.input) == 2) == (opset >= 13)  # sizes: an input from opset 13, an attribute before
    w = next(numpy_helper.to_array(i) for i in out.graph.initializer if i.name.endswith("_merged_weight"))
    assert w.shape == (16, 40)
    for e, g in zip(run(model, feeds()), run(out, feeds())):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_without_every_bias_the_adds_stay_after_the_split():
    model = qkv(17, bias=(True, False, True))
    out, rec = apply(model)
    assert rec.stats["matmuls"] == 3
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("MatMul") == 1 and ops.count("Add") == 2
    assert list(next(n for n in out.graph.node if n.op_type == "Split").output) == ["mm0", "mm1", "mm2"]
    for e, g in zip(run(model, feeds()), run(out, feeds())):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_near_misses_are_left_alone():
    lone = qkv(17, bias=(True,), sizes=(16,))
    assert not apply(lone)[1].changed  # one MatMul: nothing to merge
    # two MatMuls whose weights have different K cannot read the same activation: build them on two inputs
    rng = np.random.default_rng(0)
    w = [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), f"w{i}") for i in range(2)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a"]), helper.make_node("MatMul", ["y", "w1"], ["b"])]
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 16]) for n in ("x", "y")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 8]) for n in ("a", "b")]
    assert not apply(make_model(nodes, ins, outs, w))[1].changed
    # a weight that is a graph input is not constant
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a"]), helper.make_node("MatMul", ["x", "y"], ["b"])]
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16]), helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 8])]
    assert not apply(make_model(nodes, ins, outs, w[:1]))[1].changed


def test_a_graph_output_between_matmul_and_add_keeps_the_add_separate():
    model = qkv(17)
    model.graph.output.append(helper.make_tensor_value_info("mm1", TensorProto.FLOAT, [2, 5, 16]))
    out, rec = apply(model)
    assert rec.changed and [o.name for o in out.graph.output] == ["out0", "out1", "out2", "mm1"]
    assert [n.op_type for n in out.graph.node].count("Add") == 3
    for e, g in zip(run(model, feeds()), run(out, feeds())):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
