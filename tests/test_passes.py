"""Each built-in pass on a tiny graph: the exact nodes after it, equal outputs under ONNX Runtime (rtol 1e-5,
atol 1e-6: these passes must not change numerics), and changed=False when nothing matches."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from autoglm_compile.config import PassSpec
from autoglm_compile.pass_manager import PassContext, run_passes
from conftest import conv_net, make_model

RTOL, ATOL = 1e-5, 1e-6


def apply(model, name, ctx=None, **options):
    out, records = run_passes(model, [PassSpec(name=name, options=options)], ctx or PassContext())
    return out, records[0]


def ops(model):
    return [n.op_type for n in model.graph.node]


def same_ops(a, b):
    """The same nodes, in any order (the runner sorts the graph topologically after each pass)."""
    return sorted(ops(a)) == sorted(ops(b))


def run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_same(a, b, feeds):
    for x, y in zip(run(a, feeds), run(b, feeds)):
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)


def feeds_for(shape, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


# ------------------------------------------------------------------------------------------------- pin-shapes

def test_pin_shapes_makes_dims_static():
    model = conv_net()  # dynamic batch
    out, rec = apply(model, "pin-shapes", PassContext(input_shapes={"x": [2, 3, 16, 16]}))
    dims = [d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim]
    assert rec.changed and dims == [2, 3, 16, 16]
    assert same_ops(out, model)
    assert_same(model, out, feeds_for((2, 3, 16, 16)))


def test_pin_shapes_no_change_when_already_static():
    model = conv_net(batch=1)
    out, rec = apply(model, "pin-shapes", PassContext(input_shapes={"x": [1, 3, 16, 16]}))
    assert not rec.changed and same_ops(out, model)


# --------------------------------------------------------------------------------------------- fold-constants

def shape_subgraph_model():
    """x -> Reshape(x, Concat(Shape(x)[0], -1)) -> Add(c1 + c2): the shape subgraph and the constant Add fold."""
    c1 = numpy_helper.from_array(np.full((1, 48), 0.5, np.float32), "c1")
    c2 = numpy_helper.from_array(np.full((1, 48), 0.25, np.float32), "c2")
    zero = numpy_helper.from_array(np.array([0], np.int64), "zero")
    minus1 = numpy_helper.from_array(np.array([-1], np.int64), "minus1")
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["b"], name="gather", axis=0),
        helper.make_node("Concat", ["b", "minus1"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"], name="reshape"),
        helper.make_node("Add", ["c1", "c2"], ["c3"], name="const_add"),
        helper.make_node("Add", ["flat", "c3"], ["y"], name="add"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 48])
    return make_model(nodes, [x], [y], [c1, c2, zero, minus1])


def test_fold_constants_folds_shape_subgraphs():
    model = shape_subgraph_model()
    out, rec = apply(model, "fold-constants")
    assert rec.changed and ops(out) == ["Reshape", "Add"]
    target = next(i for i in out.graph.initializer if i.name == out.graph.node[0].input[1])
    assert numpy_helper.to_array(target).tolist() == [1, -1]
    assert_same(model, out, feeds_for((1, 3, 4, 4)))


def test_fold_constants_reaches_a_fixed_point():
    model = shape_subgraph_model()
    _, rec = apply(model, "fold-constants", max_iterations=10)
    assert 1 <= rec.stats["iterations"] < 10


def test_fold_constants_no_match():
    model = conv_net(batch=1)
    out, rec = apply(model, "fold-constants")
    assert not rec.changed and same_ops(out, model)


def test_fold_constants_honours_shape_start_end():
    # onnx-graphsurgeon alone folds Shape(x, start=1, end=3) to the whole shape; the pass must not.
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape", start=1, end=3),
        helper.make_node("Cast", ["s"], ["sf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["x"], ["r"], name="sum", keepdims=0),
        helper.make_node("Add", ["r", "sf"], ["y"], name="add"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    model = make_model(nodes, [x], [y])
    out, rec = apply(model, "fold-constants")
    assert rec.changed and ops(out) == ["ReduceSum", "Add"]
    folded = next(i for i in out.graph.initializer if i.name in out.graph.node[1].input)
    assert numpy_helper.to_array(folded).tolist() == [3.0, 5.0]
    assert_same(model, out, feeds_for((2, 3, 5)))


# -------------------------------------------------------------------------------------------- eliminate-noops

def noop_model():
    nodes = [
        helper.make_node("Identity", ["x"], ["a"], name="id_in"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Dropout", ["b"], ["c"], name="drop"),
        helper.make_node("Cast", ["c"], ["d"], name="cast_same", to=TensorProto.FLOAT),
        helper.make_node("Cast", ["d"], ["e"], name="cast_half", to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["e"], ["f"], name="cast_back", to=TensorProto.FLOAT),
        helper.make_node("Identity", ["f"], ["y"], name="id_out"),  # writes the graph output
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    model = make_model(nodes, [x], [y])
    return onnx.shape_inference.infer_shapes(model)  # Cast needs its input dtype to be known


def test_eliminate_noops_exact_nodes():
    model = noop_model()
    out, rec = apply(model, "eliminate-noops")
    assert rec.changed
    assert [(n.name, n.op_type) for n in out.graph.node] == [("relu", "Relu"), ("cast_half", "Cast"), ("cast_back", "Cast")]
    assert out.graph.output[0].name == "y" and out.graph.node[-1].output[0] == "y"
    assert rec.stats["removed"] == {"Identity": 2, "Dropout": 1, "Cast": 1}
    assert_same(model, out, feeds_for((2, 3)))


def test_eliminate_noops_keeps_identity_from_input_to_output():
    nodes = [helper.make_node("Identity", ["x"], ["y"], name="id")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    out, rec = apply(model, "eliminate-noops")
    assert not rec.changed and ops(out) == ["Identity"]


def test_eliminate_noops_keeps_dropout_whose_mask_is_a_graph_output():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"), helper.make_node("Dropout", ["a"], ["y", "mask"], name="drop")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]), helper.make_tensor_value_info("mask", TensorProto.BOOL, [2, 3])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])], outputs)
    out, rec = apply(model, "eliminate-noops")
    assert not rec.changed and ops(out) == ["Relu", "Dropout"]
    assert [o.name for o in out.graph.output] == ["y", "mask"] and list(out.graph.node[1].output) == ["y", "mask"]
    assert_same(model, out, feeds_for((2, 3)))


def test_eliminate_noops_removes_dropout_with_unused_mask():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"), helper.make_node("Dropout", ["a"], ["b", "mask"], name="drop"),
             helper.make_node("Neg", ["b"], ["y"], name="neg")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    out, rec = apply(model, "eliminate-noops")
    assert rec.changed and ops(out) == ["Relu", "Neg"]
    assert_same(model, out, feeds_for((2, 3)))


def test_eliminate_noops_no_match():
    model = shape_subgraph_model()
    out, rec = apply(model, "eliminate-noops")
    assert not rec.changed and same_ops(out, model)


# ---------------------------------------------------------------------------------------- eliminate-dead-code

def test_eliminate_dead_code_removes_unused_branch():
    unused = numpy_helper.from_array(np.ones((2, 3), np.float32), "unused_w")
    nodes = [
        helper.make_node("Relu", ["x"], ["y"], name="relu"),
        helper.make_node("Mul", ["x", "unused_w"], ["dead"], name="dead_mul"),
        helper.make_node("Exp", ["dead"], ["dead2"], name="dead_exp"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    model = make_model(nodes, [x], [y], [unused])
    out, rec = apply(model, "eliminate-dead-code")
    assert rec.changed and [n.name for n in out.graph.node] == ["relu"]
    assert not out.graph.initializer
    assert_same(model, out, feeds_for((2, 3)))


def test_eliminate_dead_code_no_match():
    model = conv_net(batch=1)
    out, rec = apply(model, "eliminate-dead-code")
    assert not rec.changed and same_ops(out, model)


# ----------------------------------------------------------------------------------------------- infer-shapes

def test_infer_shapes_annotates_intermediates():
    model = conv_net(batch=1)
    assert not model.graph.value_info
    out, rec = apply(model, "infer-shapes")
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in out.graph.value_info}
    assert rec.changed and shapes["c"] == [1, 8, 16, 16] and shapes["f"] == [1, 8]
    assert same_ops(out, model)
    assert_same(model, out, feeds_for((1, 3, 16, 16)))


def test_infer_shapes_no_change_when_already_inferred():
    once, _ = apply(conv_net(batch=1), "infer-shapes")
    _, rec = apply(once, "infer-shapes")
    assert not rec.changed


def test_eliminate_dead_code_keeps_loop_outputs():
    # gs's cleanup(remove_unused_node_outputs=True) would drop the Loop's unused scan output, breaking the Loop.
    body_in = [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
               helper.make_tensor_value_info("acc", TensorProto.FLOAT, [2])]
    body_out = [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [2]),
                helper.make_tensor_value_info("scan", TensorProto.FLOAT, [2])]
    body = helper.make_graph([
        helper.make_node("Identity", ["cond"], ["cond_out"]),
        helper.make_node("Add", ["acc", "x"], ["acc_out"]),
        helper.make_node("Identity", ["acc_out"], ["scan"]),
    ], "body", body_in, body_out)
    trips = numpy_helper.from_array(np.array(3, np.int64), "trips")
    true = numpy_helper.from_array(np.array(True), "true")
    nodes = [helper.make_node("Loop", ["trips", "true", "x"], ["y", "scan_all"], name="loop", body=body)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    model = make_model(nodes, [x], [y], [trips, true])
    out, rec = apply(model, "eliminate-dead-code")
    assert not rec.changed and len(out.graph.node[0].output) == 2
    assert_same(model, out, feeds_for((2,)))
