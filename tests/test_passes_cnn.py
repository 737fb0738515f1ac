"""The CNN clean-up passes (fuse-conv-affine, fuse-hardswish) on tiny graphs: the exact nodes after the pass, equal
outputs under ONNX Runtime, and changed=False when nothing matches (near misses included). Plus the Constant
nodes that fuse-layernorm's opset upgrade used to leave behind.

Tolerances: fuse-conv-affine rescales weights in float64 and rounds once (rtol 1e-4, atol 1e-5, as fuse-conv-bn);
fuse-hardswish computes x/6 + 1/2 where the graph computed (x + 3) / 6 (rtol 1e-5, atol 1e-6)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from autoglm_compile.config import PassSpec
from autoglm_compile.pass_manager import PassContext, run_passes
from conftest import make_model

FOLDED = dict(rtol=1e-4, atol=1e-5)
CLOSE = dict(rtol=1e-5, atol=1e-6)


def apply(model, name, **options):
    out, records = run_passes(model, [PassSpec(name=name, options=options)], PassContext())
    onnx.checker.check_model(out, full_check=True)
    return out, records[0]


def ops(model):
    return [n.op_type for n in model.graph.node]


def run(model, feeds):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # compare the graphs as written
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def assert_same(before, after, tol):
    rng = np.random.default_rng(0)
    feeds = {i.name: (3 * rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim])).astype(np.float32)
             for i in before.graph.input}
    for a, b in zip(run(before, feeds), run(after, feeds)):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, **tol)


def tensor(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def const(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def rand(shape, seed, positive=False):
    a = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return np.abs(a) + 0.5 if positive else a


# ------------------------------------------------------------------------------------------------ fuse-conv-affine

def test_conv_then_add_mul_sub_chain_folds_into_the_conv():
    # Conv without bias, then + b[1,C,1,1], * s (scalar), - t[C,1,1], / d[1,C,1,1], and a Relu that stays.
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "b"], ["a"], name="add"),
        helper.make_node("Mul", ["s", "a"], ["m"], name="mul"),
        helper.make_node("Sub", ["m", "t"], ["u"], name="sub"),
        helper.make_node("Div", ["u", "d"], ["v"], name="div"),
        helper.make_node("Relu", ["v"], ["y"], name="relu"),
    ]
    inits = [const("w", rand((4, 3, 3, 3), 0)), const("b", rand((1, 4, 1, 1), 1)), const("s", 0.5),
             const("t", rand((4, 1, 1), 2)), const("d", rand((1, 4, 1, 1), 3, positive=True))]
    model = make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 4, 8, 8])], inits)
    out, rec = apply(model, "fuse-conv-affine")
    assert ops(out) == ["Conv", "Relu"]
    assert rec.changed and rec.stats["folded_after_conv"] == {"Add": 1, "Mul": 1, "Sub": 1, "Div": 1}
    assert len(out.graph.node[0].input) == 3  # a bias was added
    assert_same(model, out, FOLDED)


def test_grouped_conv_transpose_add_then_batchnorm_fold():
    c_in, c_out, group = 4, 6, 2  # weight [C_in, C_out/group, k, k]
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w", "b0"], ["c"], name="deconv", group=group, strides=[2, 2]),
        helper.make_node("Add", ["c", "b"], ["a"], name="add"),
        helper.make_node("BatchNormalization", ["a", "g", "beta", "mean", "var"], ["n"], name="bn", epsilon=1e-3),
        helper.make_node("Sigmoid", ["n"], ["y"], name="sigmoid"),
    ]
    inits = [const("w", rand((c_in, c_out // group, 2, 2), 0)), const("b0", rand((c_out,), 1)), const("b", rand((1, c_out, 1, 1), 2)),
             const("g", rand((c_out,), 3)), const("beta", rand((c_out,), 4)), const("mean", rand((c_out,), 5)),
             const("var", rand((c_out,), 6, positive=True))]
    model = make_model(nodes, [tensor("x", [1, c_in, 5, 5])], [tensor("y", [1, c_out, 10, 10])], inits)
    out, rec = apply(model, "fuse-conv-affine")
    assert ops(out) == ["ConvTranspose", "Sigmoid"]
    assert rec.stats["folded_after_conv"] == {"Add": 1, "BatchNormalization": 1}
    assert_same(model, out, FOLDED)


def test_affine_before_unpadded_grouped_convs_folds_into_each_reader():
    # y = (x * s + t) read by two unpadded convs, one grouped; the other operand order of Sub (t - m) too.
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["m"], name="mul"),
        helper.make_node("Sub", ["t", "m"], ["a"], name="sub"),
        helper.make_node("Conv", ["a", "w1", "b1"], ["y1"], name="conv1", group=2),
        helper.make_node("Conv", ["a", "w2"], ["y2"], name="conv2", strides=[2, 2], auto_pad="VALID"),
    ]
    inits = [const("s", rand((1, 4, 1, 1), 0)), const("t", 0.25), const("w1", rand((6, 2, 1, 1), 1)), const("b1", rand((6,), 2)),
             const("w2", rand((5, 4, 3, 3), 3))]
    model = make_model(nodes, [tensor("x", [1, 4, 9, 9])], [tensor("y1", [1, 6, 9, 9]), tensor("y2", [1, 5, 4, 4])], inits)
    out, rec = apply(model, "fuse-conv-affine")
    assert ops(out) == ["Conv", "Conv"]
    assert [n.input[0] for n in out.graph.node] == ["x", "x"]
    assert rec.stats["folded_before_conv"] == {"Sub": 1, "Mul": 1}
    assert_same(model, out, FOLDED)


@pytest.mark.parametrize("case", ["padded", "spatial-constant", "conv-read-twice", "const-divided", "broadcast-channels", "nonconstant"])
def test_conv_affine_near_misses_are_left(case):
    w = const("w", rand((4, 4, 3, 3), 0))
    x_shape, y_shape = [1, 4, 6, 6], [1, 4, 6, 6]
    extra_out = []
    if case == "padded":  # an affine map before a padded conv: the padded zeros would be shifted too
        nodes = [helper.make_node("Add", ["x", "t"], ["a"]), helper.make_node("Conv", ["a", "w"], ["y"], pads=[1, 1, 1, 1])]
        inits = [w, const("t", 1.0)]
    elif case == "spatial-constant":  # the constant varies over H, W: not per channel
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Add", ["c", "t"], ["y"])]
        inits = [w, const("t", rand((1, 4, 6, 6), 1))]
    elif case == "conv-read-twice":  # the conv result is read by another node as well
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Add", ["c", "t"], ["y"]),
                 helper.make_node("Relu", ["c"], ["r"])]
        inits = [w, const("t", 1.0)]
        extra_out = [tensor("r", y_shape)]
    elif case == "const-divided":  # t / conv(x) is no affine map of the conv
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Div", ["t", "c"], ["y"])]
        inits = [w, const("t", 2.0)]
    elif case == "broadcast-channels":  # a 1-channel input broadcast up to 4 channels by the constant
        x_shape, y_shape = [1, 1, 6, 6], [1, 4, 4, 4]
        nodes = [helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Conv", ["m", "w"], ["y"])]
        inits = [w, const("s", rand((1, 4, 1, 1), 2))]
    else:  # both operands computed
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Mul", ["c", "x"], ["y"])]
        inits = [w]
    model = make_model(nodes, [tensor("x", x_shape)], [tensor("y", y_shape)] + extra_out, inits)
    out, rec = apply(model, "fuse-conv-affine")
    assert not rec.changed
    assert ops(out) == ops(model)


def test_conv_affine_before_conv_can_be_switched_off():
    nodes = [helper.make_node("Add", ["x", "t"], ["a"]), helper.make_node("Conv", ["a", "w"], ["y"])]
    model = make_model(nodes, [tensor("x", [1, 2, 4, 4])], [tensor("y", [1, 3, 4, 4])], [const("t", 1.0), const("w", rand((3, 2, 1, 1), 0))])
    out, rec = apply(model, "fuse-conv-affine", before_conv=False)
    assert not rec.changed and ops(out) == ["Add", "Conv"]


# -------------------------------------------------------------------------------------------------- fuse-hardswish

def hardswish_nodes(x="x", sixth=False, order="mul-then-div"):
    """x * Clip(x + 3, 0, 6) / 6 (or the Div as * 1/6), from the nodes Paddle2ONNX and torch write."""
    scale = helper.make_node("Mul", ["p", "sixth"], ["y"]) if sixth else helper.make_node("Div", ["p", "six"], ["y"])
    head = [helper.make_node("Add", [x, "three"], ["a"]), helper.make_node("Clip", ["a", "zero", "six"], ["r"])]
    if order == "mul-then-div":
        return head + [helper.make_node("Mul", [x, "r"], ["p"]), scale]
    # x * (Clip(x + 3, 0, 6) / 6)
    scale = helper.make_node("Mul", ["r", "sixth"], ["h"]) if sixth else helper.make_node("Div", ["r", "six"], ["h"])
    return head + [scale, helper.make_node("Mul", ["h", x], ["y"])]


SCALARS = [const("three", 3.0), const("zero", 0.0), const("six", 6.0), const("sixth", 1.0 / 6.0)]


@pytest.mark.parametrize("sixth", [False, True])
@pytest.mark.parametrize("order", ["mul-then-div", "div-then-mul"])
def test_hardswish_becomes_one_node_at_opset_14(sixth, order):
    model = make_model(hardswish_nodes(sixth=sixth, order=order), [tensor("x", [2, 8])], [tensor("y", [2, 8])], SCALARS, opset=17)
    out, rec = apply(model, "fuse-hardswish")
    assert ops(out) == ["HardSwish"]
    assert rec.stats["fused"] == {"HardSwish": 1}
    assert_same(model, out, CLOSE)


def test_hardswish_below_opset_14_becomes_x_times_hardsigmoid():
    model = make_model(hardswish_nodes(), [tensor("x", [2, 8])], [tensor("y", [2, 8])], SCALARS, opset=12)
    out, rec = apply(model, "fuse-hardswish")
    assert ops(out) == ["HardSigmoid", "Mul"]
    hs = out.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in hs.attribute}
    assert attrs["alpha"] == pytest.approx(1 / 6) and attrs["beta"] == pytest.approx(0.5)
    assert sorted(out.graph.node[1].input) == sorted(["x", hs.output[0]])
    assert_same(model, out, CLOSE)


def test_hardsigmoid_alone_and_clip_attributes_below_opset_11():
    # Clip(x + 3, 0, 6) / 6 at opset 10: Clip's bounds are attributes; the result is not multiplied by x.
    nodes = [helper.make_node("Add", ["three", "x"], ["a"]), helper.make_node("Clip", ["a"], ["r"], min=0.0, max=6.0),
             helper.make_node("Div", ["r", "six"], ["y"])]
    model = make_model(nodes, [tensor("x", [3, 5])], [tensor("y", [3, 5])], SCALARS[:1] + SCALARS[2:3], opset=10)
    out, rec = apply(model, "fuse-hardswish")
    assert ops(out) == ["HardSigmoid"]
    assert rec.stats["fused"] == {"HardSigmoid": 1}
    assert_same(model, out, CLOSE)


@pytest.mark.parametrize("case", ["clip-5", "add-4", "other-operand", "clip-read-twice", "hardsigmoid-default-alpha"])
def test_hardswish_near_misses_are_left(case):
    inits = list(SCALARS)
    outputs = [tensor("y", [2, 8])]
    inputs = [tensor("x", [2, 8])]
    nodes = hardswish_nodes()
    if case == "clip-5":
        inits[2] = const("six", 6.0)
        nodes[1] = helper.make_node("Clip", ["a", "zero", "five"], ["r"])
        inits.append(const("five", 5.0))
    elif case == "add-4":
        inits[0] = const("three", 4.0)
    elif case == "other-operand":  # z * Clip(x + 3, 0, 6) / 6
        nodes[2] = helper.make_node("Mul", ["z", "r"], ["p"])
        inputs.append(tensor("z", [2, 8]))
    elif case == "clip-read-twice":
        outputs.append(tensor("r", [2, 8]))
    else:  # x * HardSigmoid(x) with ONNX's default alpha 0.2 is not hard-swish
        nodes = [helper.make_node("HardSigmoid", ["x"], ["h"]), helper.make_node("Mul", ["x", "h"], ["y"])]
        inits = []
    model = make_model(nodes, inputs, outputs, inits, opset=17)
    out, rec = apply(model, "fuse-hardswish")
    assert not rec.changed
    assert ops(out) == ops(model)


# ----------------------------------------------------------------------------- the opset upgrade leaves no Constant nodes

def test_layernorm_upgrade_leaves_no_constant_nodes():
    """fuse-layernorm upgrades an opset-12 model to 17; the converter writes Squeeze's axes as Constant nodes, which
    become initializers."""
    d = 8
    nodes = [
        helper.make_node("Squeeze", ["x"], ["s"], axes=[0]),
        helper.make_node("ReduceMean", ["s"], ["mu"], axes=[-1]),
        helper.make_node("Sub", ["s", "mu"], ["dx"]),
        helper.make_node("Pow", ["dx", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["dx", "sd"], ["n"]),
        helper.make_node("Mul", ["n", "gamma"], ["g"]),
        helper.make_node("Add", ["g", "beta"], ["y"]),
    ]
    inits = [const("two", 2.0), const("eps", 1e-5), const("gamma", rand((d,), 0)), const("beta", rand((d,), 1))]
    model = make_model(nodes, [tensor("x", [1, 4, d])], [tensor("y", [4, d])], inits, opset=12)
    out, rec = apply(model, "fuse-layernorm")
    assert rec.stats["upgraded_opset"] == "12 -> 17"
    assert ops(out) == ["Squeeze", "LayerNormalization"]
    assert_same(model, out, dict(rtol=1e-4, atol=1e-5))
