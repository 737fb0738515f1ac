"""inline-if: an If with a constant condition becomes the nodes of its taken branch. Hand-built If graphs (each
branch, outer-scope references, name collisions, constant outputs, nesting) and a TorchScript `if` on a shape
keep ONNX Runtime's outputs, and leave nothing that TVM's importer lacks."""
from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from autoglm_compile.config import PassSpec
from autoglm_compile.pass_manager import PassContext, run_passes
from autoglm_compile.tvm_build import unsupported_nodes
from conftest import conv_net, make_model

RTOL, ATOL = 1e-5, 1e-6


def apply(model, names=("inline-if",), ctx=None):
    out, records = run_passes(model, [PassSpec(name=n, options={}) for n in names], ctx or PassContext())
    return out, {r.name: r for r in records}


def run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_same(a, b, feeds):
    for x, y in zip(run(a, feeds), run(b, feeds)):
        np.testing.assert_allclose(y, x, rtol=RTOL, atol=ATOL)


def nodes(model):
    return [(n.op_type, n.name, list(n.input), list(n.output)) for n in model.graph.node]


def value(name, shape=None):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def vector(name, v):
    return numpy_helper.from_array(np.full(3, v, np.float32), name)


def cond(v):
    return numpy_helper.from_array(np.array(v), "cond")


X = {"x": np.array([-1.0, 0.5, 2.0], np.float32)}


def simple_if(taken: bool):
    """y = If(cond) then (x + c) * w (c local to the branch, w from the outer graph) else x - w; z = y + Neg(x)."""
    then_g = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["t"], name="add"), helper.make_node("Mul", ["t", "w"], ["out_then"], name="mul")],
        "then", [], [value("out_then")], initializer=[vector("c", 1.0)],
    )
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "w"], ["out_else"], name="sub")], "else", [], [value("out_else")])
    graph_nodes = [
        helper.make_node("Neg", ["x"], ["n"], name="neg"),
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g),
        helper.make_node("Add", ["y", "n"], ["z"], name="final"),
    ]
    return make_model(graph_nodes, [value("x", [3])], [value("z", [3]), value("y", [3])], [cond(taken), vector("w", 2.0)])


def test_then_branch_exact_nodes():
    model = simple_if(True)
    out, rec = apply(model)
    assert rec["inline-if"].changed and rec["inline-if"].stats["branches"] == {"then": 1, "else": 0}
    assert nodes(out) == [
        ("Neg", "neg", ["x"], ["n"]),
        ("Add", "if/then/add", ["x", "c"], ["if/then/t"]),  # a tensor made in the branch gets the If's prefix
        ("Mul", "if/then/mul", ["if/then/t", "w"], ["y"]),  # the If's output name is kept; w is the outer tensor
        ("Add", "final", ["y", "n"], ["z"]),
    ]
    assert unsupported_nodes(out) == []
    assert_same(model, out, X)


def test_else_branch_exact_nodes():
    model = simple_if(False)
    out, rec = apply(model)
    assert rec["inline-if"].stats["branches"] == {"then": 0, "else": 1}
    assert nodes(out) == [("Neg", "neg", ["x"], ["n"]), ("Sub", "if/else/sub", ["x", "w"], ["y"]), ("Add", "final", ["y", "n"], ["z"])]
    assert_same(model, out, X)


def test_colliding_local_names_of_two_ifs_are_renamed():
    # Both taken branches make "t" and hold a constant "k" with different values: after inlining they share a scope.
    def branch(v):
        return helper.make_graph(
            [helper.make_node("Add", ["x", "k"], ["t"], name="n"), helper.make_node("Mul", ["t", "t"], ["o"], name="n2")],
            f"b{v}", [], [value("o")], initializer=[vector("k", v)],
        )

    model = make_model(
        [
            helper.make_node("If", ["cond"], ["y1"], name="if_a", then_branch=branch(1), else_branch=branch(2)),
            helper.make_node("If", ["cond"], ["y2"], name="if_b", then_branch=branch(3), else_branch=branch(4)),
            helper.make_node("Sub", ["y1", "y2"], ["y"], name="sub"),
        ],
        [value("x", [3])], [value("y", [3])], [cond(True)],
    )
    source = model.SerializeToString()
    out, rec = apply(model)
    assert rec["inline-if"].stats["inlined"] == 2
    names = sorted(i.name for i in out.graph.initializer)
    assert len(names) == 2 and names[0] != names[1]
    onnx.checker.check_model(out, full_check=True)
    assert model.SerializeToString() == source  # the source model (ORT's reference) is left as it was
    assert_same(model, out, X)


def test_constant_branch_output_becomes_an_identity():
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["r"])], "then", [], [value("k"), value("r")], initializer=[vector("k", 5.0)])
    else_g = helper.make_graph([helper.make_node("Relu", ["x"], ["r2"]), helper.make_node("Neg", ["x"], ["r3"])], "else", [], [value("r2"), value("r3")])
    model = make_model([helper.make_node("If", ["cond"], ["a", "b"], name="if", then_branch=then_g, else_branch=else_g)],
                       [value("x", [3])], [value("a", [3]), value("b", [3])], [cond(True)])
    out, _ = apply(model)
    assert nodes(out) == [("Relu", "if/then/Relu", ["x"], ["b"]), ("Identity", "if/then/output", ["k"], ["a"])]
    assert_same(model, out, X)


def test_nested_ifs_are_inlined_to_the_top():
    inner = helper.make_node(
        "If", ["c2"], ["o"], name="inner",
        then_branch=helper.make_graph([helper.make_node("Exp", ["t"], ["e"], name="exp")], "it", [], [value("e")]),
        else_branch=helper.make_graph([helper.make_node("Neg", ["t"], ["e2"], name="neg")], "ie", [], [value("e2")]),
    )
    then_g = helper.make_graph([helper.make_node("Abs", ["x"], ["t"], name="abs"), inner], "then", [], [value("o")],
                               initializer=[numpy_helper.from_array(np.array(False), "c2")])
    else_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t"], name="relu")], "else", [], [value("t")])
    model = make_model([helper.make_node("If", ["cond"], ["y"], name="outer", then_branch=then_g, else_branch=else_g)],
                       [value("x", [3])], [value("y", [3])], [cond(True)])
    out, rec = apply(model)
    assert rec["inline-if"].stats["branches"] == {"then": 1, "else": 1}
    assert nodes(out) == [("Abs", "outer/then/abs", ["x"], ["outer/then/t"]), ("Neg", "outer/then/inner/else/neg", ["outer/then/t"], ["y"])]
    assert_same(model, out, X)


def test_if_inside_a_loop_body_is_inlined_there():
    body_if = helper.make_node(
        "If", ["c"], ["v"], name="body_if",
        then_branch=helper.make_graph([helper.make_node("Add", ["acc", "one"], ["a1"], name="inc")], "t", [], [value("a1")]),
        else_branch=helper.make_graph([helper.make_node("Sub", ["acc", "one"], ["a2"], name="dec")], "e", [], [value("a2")]),
    )
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep"), body_if],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), value("acc", [3])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), value("v", [3])],
        initializer=[numpy_helper.from_array(np.array(True), "c")],
    )
    model = make_model(
        [helper.make_node("Loop", ["trip", "cond", "x"], ["y"], name="loop", body=body)],
        [value("x", [3])], [value("y", [3])],
        [numpy_helper.from_array(np.array(3, np.int64), "trip"), cond(True), vector("one", 1.0)],
    )
    out, rec = apply(model)
    assert rec["inline-if"].stats["inlined"] == 1
    body_ops = [n.op_type for n in out.graph.node[0].attribute[0].g.node]
    assert body_ops == ["Identity", "Add"]
    assert_same(model, out, X)


def test_non_constant_condition_no_change():
    model = simple_if(True)
    model.graph.node.insert(0, helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"))
    model.graph.node.insert(1, helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"))
    model.graph.node[3].input[0] = "c"
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    out, rec = apply(model)
    assert not rec["inline-if"].changed and [n.op_type for n in out.graph.node].count("If") == 1
    assert rec["inline-if"].stats["left"] == {"if": "the condition is not a constant (pin the input shapes and run fold-constants first)"}


def test_no_if_no_change():
    model = conv_net(batch=1)
    out, rec = apply(model)
    assert not rec["inline-if"].changed and [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]


class ShapeIf(torch.nn.Module):
    def forward(self, x):
        if x.shape[1] > 4:
            y = x * 2 + 1
        else:
            y = torch.relu(x) - 1
        return y.sum(1)


@pytest.mark.parametrize("shape, taken, ops", [([2, 6], "then", ["Mul", "Add", "ReduceSum"]), ([3, 3], "else", ["Relu", "Sub", "ReduceSum"])])
def test_torchscript_if_on_a_shape_folds_and_inlines(shape, taken, ops):
    buf = io.BytesIO()
    torch.onnx.export(torch.jit.script(ShapeIf()), (torch.randn(2, 6),), buf, dynamo=False, input_names=["x"],
                      opset_version=17, dynamic_axes={"x": {0: "batch", 1: "n"}})
    model = onnx.load_from_string(buf.getvalue())
    model.ir_version = 8
    assert "If" in [n.op_type for n in model.graph.node]
    passes = ("pin-shapes", "fold-constants", "inline-if", "fold-constants", "eliminate-noops")
    out, rec = apply(model, passes, PassContext(input_shapes={"x": shape}))
    assert rec["inline-if"].stats["branches"][taken] == 1
    assert sorted(n.op_type for n in out.graph.node) == sorted(ops)
    assert unsupported_nodes(out) == []
    feeds = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    assert_same(model, out, feeds)
