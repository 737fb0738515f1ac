"""decompose-ops and convert-opset: the passes that make a vendor-ready ONNX (the vendor-onnx backend runs them last).

Tiny graphs built with onnx.helper: the exact nodes after the pass, equal outputs under ONNX Runtime, and
changed=False where there is nothing to do. Tolerances: a decomposition computes the same formula in other kernels,
rtol 1e-5 / atol 1e-5; an opset conversion changes no arithmetic, so its outputs are compared exactly (atol 0),
except where Transposes move a Softmax axis (same arithmetic, other order: 1e-6).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from autoglm_compile.config import PassSpec
from autoglm_compile.errors import InputError, UnsupportedError
from autoglm_compile.pass_manager import PassContext, run_passes
from conftest import make_model

SAME = dict(rtol=1e-5, atol=1e-5)
MS = "com.microsoft"


def apply(model, name, **options):
    out, records = run_passes(model, [PassSpec(name=name, options=options)], PassContext(ir_version=model.ir_version))
    return out, records[0]


def run(model, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def ops(model):
    return [(n.domain + "." if n.domain else "") + n.op_type for n in model.graph.node]


def vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def model_with_domains(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "t", inputs, outputs, initializer=list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])
    m.ir_version = 8
    return m


X = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ decompose-ops

def test_layernorm_decomposed_below_opset_17():
    rng = np.random.default_rng(1)
    m = make_model(
        [helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], name="ln", axis=-1, epsilon=1e-5)],
        [vi("x", [2, 5, 8])], [vi("y", [2, 5, 8])],
        [const("s", rng.standard_normal(8).astype(np.float32)), const("b", rng.standard_normal(8).astype(np.float32))],
    )
    out, rec = apply(m, "decompose-ops", opset=11)
    assert rec.changed and rec.stats["decomposed"] == {"LayerNormalization": 1}
    assert ops(out) == ["ReduceMean", "Sub", "Mul", "ReduceMean", "Add", "Sqrt", "Div", "Mul", "Add"]
    assert [o.name for o in out.graph.output] == ["y"]
    np.testing.assert_allclose(run(out, {"x": X})[0], run(m, {"x": X})[0], **SAME)


def test_layernorm_over_two_axes_at_opset_18_takes_axes_as_input():
    m = make_model([helper.make_node("LayerNormalization", ["x", "s"], ["y"], name="ln", axis=1)], [vi("x", [2, 5, 8])], [vi("y", [2, 5, 8])],
                   [const("s", np.full((5, 8), 0.5, np.float32))], opset=18)
    out, _ = apply(m, "decompose-ops", ops=["LayerNormalization"])
    means = [n for n in out.graph.node if n.op_type == "ReduceMean"]
    assert len(means) == 2 and all(len(n.input) == 2 for n in means)  # opset 18: axes is an input
    assert ops(out)[-1] == "Mul"  # no bias
    np.testing.assert_allclose(run(out, {"x": X})[0], run(m, {"x": X})[0], **SAME)


def test_float16_layernorm_computes_in_float32_behind_casts():
    x16 = X.astype(np.float16)
    m = make_model([helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], name="ln")], [vi("x", [2, 5, 8], TensorProto.FLOAT16)],
                   [vi("y", [2, 5, 8], TensorProto.FLOAT16)], [const("s", np.ones(8, np.float16)), const("b", np.zeros(8, np.float16))])
    out, _ = apply(m, "decompose-ops", opset=11)
    assert ops(out)[0] == "Cast" and ops(out)[-1] == "Cast"
    assert out.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    np.testing.assert_allclose(run(out, {"x": x16})[0].astype(np.float32), run(m, {"x": x16})[0].astype(np.float32), rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("approximate, erf_or_tanh", [("none", "Erf"), ("tanh", "Tanh")])
def test_gelu_20_decomposed(approximate, erf_or_tanh):
    m = make_model([helper.make_node("Gelu", ["x"], ["y"], name="g", approximate=approximate)], [vi("x", [2, 5, 8])], [vi("y", [2, 5, 8])], opset=20)
    out, rec = apply(m, "decompose-ops", opset=11)
    assert rec.stats["decomposed"] == {"Gelu": 1} and erf_or_tanh in ops(out) and "Gelu" not in ops(out)
    np.testing.assert_allclose(run(out, {"x": X})[0], run(m, {"x": X})[0], **SAME)


def test_com_microsoft_gelu_and_fastgelu_with_bias():
    bias = const("bias", np.linspace(-1, 1, 8).astype(np.float32))
    m = model_with_domains(
        [helper.make_node("Gelu", ["x"], ["g"], name="g", domain=MS), helper.make_node("FastGelu", ["g", "bias"], ["y"], name="fg", domain=MS)],
        [vi("x", [2, 5, 8])], [vi("y", [2, 5, 8])], [bias],
    )
    out, rec = apply(m, "decompose-ops", ops=[f"{MS}.Gelu", f"{MS}.FastGelu"])
    assert rec.stats["decomposed"] == {f"{MS}.Gelu": 1, f"{MS}.FastGelu": 1}
    assert all(n.domain == "" for n in out.graph.node)
    np.testing.assert_allclose(run(out, {"x": X})[0], run(m, {"x": X})[0], **SAME)


@pytest.mark.parametrize("op, opset, new", [("HardSwish", 14, ["HardSigmoid", "Mul"]), ("Mish", 18, ["Softplus", "Tanh", "Mul"])])
def test_activations_decomposed(op, opset, new):
    m = make_model([helper.make_node(op, ["x"], ["y"], name="a")], [vi("x", [2, 5, 8])], [vi("y", [2, 5, 8])], opset=opset)
    out, _ = apply(m, "decompose-ops", opset=11)
    assert ops(out) == new
    np.testing.assert_allclose(run(out, {"x": X * 4})[0], run(m, {"x": X * 4})[0], **SAME)


def test_decompose_ops_leaves_ops_of_the_opset_alone():
    m = make_model([helper.make_node("Gelu", ["x"], ["y"], name="g")], [vi("x", [2, 5, 8])], [vi("y", [2, 5, 8])], opset=20)
    out, rec = apply(m, "decompose-ops", opset=20)
    assert not rec.changed and ops(out) == ["Gelu"]
    m = make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [vi("x", [2, 5, 8])], [vi("y", [2, 5, 8])])
    assert not apply(m, "decompose-ops", opset=11, ops=["Gelu"])[1].changed


def test_decompose_ops_rejects_an_op_without_a_rewrite():
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])])
    with pytest.raises(InputError, match="no known rewrite for Attention"):
        apply(m, "decompose-ops", ops=["Attention"])


# ------------------------------------------------------------------------------------------------ convert-opset

def test_convert_opset_17_to_11():
    """Type-only changes (Identity 16, Add 14, Relu 14) pass through; Reshape-14 drops allowzero=0; Unsqueeze-13 and
    ReduceMean-13 go through ONNX's adapters (axes input -> attribute); Softmax on a middle axis is moved last."""
    m = make_model(
        [
            helper.make_node("Identity", ["x"], ["i"], name="id"),
            helper.make_node("Add", ["i", "one"], ["a"], name="add"),
            helper.make_node("Relu", ["a"], ["r"], name="relu"),
            helper.make_node("Softmax", ["r"], ["s"], name="softmax", axis=1),
            helper.make_node("Reshape", ["s", "shape"], ["rs"], name="reshape", allowzero=0),
            helper.make_node("ReduceMean", ["rs"], ["rm"], name="mean", axes=[2], keepdims=0),
            helper.make_node("Unsqueeze", ["rm", "axes"], ["y"], name="unsqueeze"),
        ],
        [vi("x", [2, 5, 8])], [vi("y", [1, 10, 8])],
        [const("one", np.float32(1.0)), const("shape", np.array([10, 8, 1], np.int64)), const("axes", np.array([0], np.int64))],
    )
    out, rec = apply(m, "convert-opset", opset=11)
    assert [(o.domain, o.version) for o in out.opset_import] == [("", 11)]
    assert rec.stats["softmax_axis_moved"] == 1 and rec.stats["passed_through"] >= 4
    assert ops(out) == ["Identity", "Add", "Relu", "Transpose", "Softmax", "Transpose", "Reshape", "ReduceMean", "Unsqueeze"]
    node = {n.name: n for n in out.graph.node}
    assert [a.name for a in node["reshape"].attribute] == [] and list(node["unsqueeze"].input) == ["rm"]
    onnx.checker.check_model(out, full_check=True)
    np.testing.assert_allclose(run(out, {"x": X})[0], run(m, {"x": X})[0], rtol=0, atol=1e-6)


def test_convert_opset_same_opset_is_unchanged():
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])])
    out, rec = apply(m, "convert-opset", opset=17)
    assert not rec.changed and ops(out) == ["Relu"]


def test_convert_opset_upgrades_too():
    m = make_model([helper.make_node("Softmax", ["x"], ["y"], axis=2)], [vi("x", [2, 5, 8])], [vi("y", [2, 5, 8])], opset=11)
    out, rec = apply(m, "convert-opset", opset=13)
    assert rec.changed and out.opset_import[0].version == 13
    np.testing.assert_allclose(run(out, {"x": X})[0], run(m, {"x": X})[0], rtol=0, atol=1e-6)


def test_convert_opset_names_ops_missing_at_the_target():
    m = make_model([helper.make_node("LayerNormalization", ["x", "s"], ["y"], name="ln0")], [vi("x", [2, 8])], [vi("y", [2, 8])], [const("s", np.ones(8, np.float32))])
    with pytest.raises(UnsupportedError, match=r"have no version at opset 11: 'ln0' \(LayerNormalization\)") as e:
        apply(m, "convert-opset", opset=11)
    assert "decompose-ops" in e.value.hint


def test_convert_opset_checks_types_of_passed_through_nodes():
    """Add-14 takes int8, Add-13 does not: passing it through unchanged is caught by the type check, which names it."""
    m = make_model([helper.make_node("Add", ["x", "x"], ["y"], name="add8")], [vi("x", [4], TensorProto.INT8)], [vi("y", [4], TensorProto.INT8)])
    with pytest.raises(UnsupportedError, match="not valid at opset 13.*add8"):
        apply(m, "convert-opset", opset=13)
