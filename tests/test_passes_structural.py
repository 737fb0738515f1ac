"""The structural passes (fuse-conv-bn, fuse-matmul-add, cancel-transposes, collapse-reshapes, and the shape no-ops
of eliminate-noops) on tiny graphs: the exact nodes after the pass, equal outputs under ONNX Runtime, and
changed=False when nothing matches. Then all of them on a torch-exported CNN with BatchNorm.

Tolerances: the rewrites that move no arithmetic are compared at rtol 1e-5, atol 1e-6; fuse-conv-bn rescales the
weights (rounding differs) at rtol 1e-4, atol 1e-5; Gemm against MatMul + Add may sum in another order, so at
rtol 1e-5, atol 1e-5."""
from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from autoglm_compile.config import PassSpec
from autoglm_compile.pass_manager import PassContext, run_passes
from conftest import make_model

EXACT = dict(rtol=1e-5, atol=1e-6)
FOLDED = dict(rtol=1e-4, atol=1e-5)
GEMM = dict(rtol=1e-5, atol=1e-5)
INT64_MAX = np.iinfo(np.int64).max


def apply(model, name, **options):
    out, records = run_passes(model, [PassSpec(name=name, options=options)], PassContext())
    onnx.checker.check_model(out, full_check=True)
    return out, records[0]


def ops(model):
    return [n.op_type for n in model.graph.node]


def attr(model, op, key):
    node = next(n for n in model.graph.node if n.op_type == op)
    return helper.get_attribute_value(next(a for a in node.attribute if a.name == key))


def init(model, name):
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def feeds_of(model, seed=0):
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32) for i in model.graph.input}


def assert_same(before, after, tol):
    feeds = feeds_of(before)
    for a, b in zip(run(before, feeds), run(after, feeds)):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, **tol)


def tensor(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def rand(shape, seed, positive=False):
    a = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return np.abs(a) + 0.5 if positive else a


def bn_consts(prefix, c, seed):
    return [const(f"{prefix}_scale", rand(c, seed)), const(f"{prefix}_shift", rand(c, seed + 1)),
            const(f"{prefix}_mean", rand(c, seed + 2)), const(f"{prefix}_var", rand(c, seed + 3, positive=True))]


def bn_node(x, y, prefix, **kw):
    return helper.make_node("BatchNormalization", [x, f"{prefix}_scale", f"{prefix}_shift", f"{prefix}_mean", f"{prefix}_var"], [y], name=f"{prefix}", **kw)


# ---------------------------------------------------------------------------------------------- fuse-conv-bn

def test_fuse_conv_bn_conv_with_bias():
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]), bn_node("c", "y", "bn", epsilon=1e-3)]
    model = make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 4, 8, 8])],
                       [const("w", rand((4, 3, 3, 3), 0)), const("b", rand(4, 1))] + bn_consts("bn", 4, 2))
    out, rec = apply(model, "fuse-conv-bn")
    assert rec.changed and rec.stats["folded"] == {"Conv": 1}
    assert [(n.name, n.op_type) for n in out.graph.node] == [("conv", "Conv")]
    assert out.graph.node[0].output[0] == "y"
    assert_same(model, out, FOLDED)


def test_fuse_conv_bn_grouped_conv_without_bias_keeps_a_shared_weight():
    # conv_a (grouped, no bias) feeds the BN; conv_b reads the same weight and must keep it unscaled.
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], name="conv_a", group=2),
        bn_node("a", "a_bn", "bn"),
        helper.make_node("Relu", ["a_bn"], ["y"], name="relu"),
        helper.make_node("Conv", ["x", "w"], ["z"], name="conv_b", group=2),
    ]
    model = make_model(nodes, [tensor("x", [1, 4, 6, 6])], [tensor("y", [1, 6, 4, 4]), tensor("z", [1, 6, 4, 4])],
                       [const("w", rand((6, 2, 3, 3), 0))] + bn_consts("bn", 6, 1))
    out, rec = apply(model, "fuse-conv-bn")
    assert rec.changed and sorted(ops(out)) == ["Conv", "Conv", "Relu"]
    assert_same(model, out, FOLDED)


@pytest.mark.parametrize("group", [1, 2])
def test_fuse_conv_bn_conv_transpose(group):
    # ConvTranspose weights are [C_in, C_out/group, kH, kW]: the per-channel scale runs along axis 1, per group.
    c_in, c_out = 4, 6
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], name="deconv", group=group, strides=[2, 2]), bn_node("c", "y", "bn")]
    model = make_model(nodes, [tensor("x", [1, c_in, 5, 5])], [tensor("y", [1, c_out, 11, 11])],
                       [const("w", rand((c_in, c_out // group, 3, 3), 0)), const("b", rand(c_out, 1))] + bn_consts("bn", c_out, 2))
    out, rec = apply(model, "fuse-conv-bn")
    assert rec.changed and ops(out) == ["ConvTranspose"]
    assert_same(model, out, FOLDED)


def _conv_bn_no_match(case):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y", "bn")]
    outputs = [tensor("y", [1, 4, 6, 6])]
    inputs = [tensor("x", [1, 3, 8, 8])]
    consts = [const("w", rand((4, 3, 3, 3), 0))] + bn_consts("bn", 4, 1)
    if case == "conv output read twice":
        nodes.append(helper.make_node("Relu", ["c"], ["r"], name="relu"))
        outputs.append(tensor("r", [1, 4, 6, 6]))
    elif case == "conv output is a graph output":
        outputs.append(tensor("c", [1, 4, 6, 6]))
    elif case == "mean is an input":
        consts = [c for c in consts if c.name != "bn_mean"]
        inputs.append(tensor("bn_mean", [4]))
    elif case == "no conv":
        nodes[0] = helper.make_node("Relu", ["x"], ["c"], name="relu")
        outputs = [tensor("y", [1, 3, 8, 8])]
        consts = bn_consts("bn", 3, 1)
    return make_model(nodes, inputs, outputs, consts)


@pytest.mark.parametrize("case", ["conv output read twice", "conv output is a graph output", "mean is an input", "no conv"])
def test_fuse_conv_bn_no_match(case):
    model = _conv_bn_no_match(case)
    out, rec = apply(model, "fuse-conv-bn")
    assert not rec.changed and sorted(ops(out)) == sorted(ops(model))


# ------------------------------------------------------------------------------------------- fuse-matmul-add

def _matmul_add(x_shape, bias_shape, bias_first=False, extra_reader=False, weight_is_input=False):
    k, n = x_shape[-1], 5
    add_inputs = ["b", "m"] if bias_first else ["m", "b"]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"), helper.make_node("Add", add_inputs, ["y"], name="add")]
    outputs = [tensor("y", list(x_shape[:-1]) + [n])]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["m"], ["r"], name="relu"))
        outputs.append(tensor("r", list(x_shape[:-1]) + [n]))
    inputs = [tensor("x", list(x_shape))]
    consts = [const("b", rand(bias_shape, 1))]
    if weight_is_input:
        inputs.append(tensor("w", [k, n]))
    else:
        consts.append(const("w", rand((k, n), 0)))
    return make_model(nodes, inputs, outputs, consts)


@pytest.mark.parametrize("bias_shape,bias_first", [((5,), False), ((1, 5), True), ((1,), False)])
def test_fuse_matmul_add_2d_becomes_gemm(bias_shape, bias_first):
    model = _matmul_add((3, 4), bias_shape, bias_first)
    out, rec = apply(model, "fuse-matmul-add")
    assert rec.changed and rec.stats == {"fused": 1, "kept_nd": 0}
    assert [(n.name, n.op_type) for n in out.graph.node] == [("mm", "Gemm")]
    assert list(out.graph.node[0].input) == ["x", "w", "b"] and out.graph.node[0].output[0] == "y"
    assert_same(model, out, GEMM)


def test_fuse_matmul_add_keeps_nd_activations():
    # Measured: Reshape -> Gemm -> Reshape is slower under TVM than MatMul + Add (see the pass docstring).
    model = _matmul_add((2, 3, 4), (5,))
    out, rec = apply(model, "fuse-matmul-add")
    assert not rec.changed and rec.stats == {"fused": 0, "kept_nd": 1}
    assert ops(out) == ["MatMul", "Add"]


@pytest.mark.parametrize("case", [dict(extra_reader=True), dict(weight_is_input=True), dict(bias_shape=(3, 5))])
def test_fuse_matmul_add_no_match(case):
    model = _matmul_add((3, 4), case.pop("bias_shape", (5,)), **case)
    out, rec = apply(model, "fuse-matmul-add")
    assert not rec.changed and sorted(ops(out)) == sorted(ops(model))


# ----------------------------------------------------------------------------------------- cancel-transposes

def _transposes(perms, shape=(2, 3, 4, 5), relu_first=False, tail_relu=True, side_reader=False):
    """x -> [Relu] -> Transpose(perms[0]) -> Transpose(perms[1]) ... -> [Relu] -> y."""
    nodes, cur, outputs = [], "x", []
    if relu_first:
        nodes.append(helper.make_node("Relu", ["x"], ["x_r"], name="relu_in"))
        cur = "x_r"
    out_shape = list(shape)
    for i, perm in enumerate(perms):
        nodes.append(helper.make_node("Transpose", [cur], [f"t{i}"], name=f"t{i}", perm=perm))
        cur, out_shape = f"t{i}", [out_shape[p] for p in perm]
        if i == 0 and side_reader:
            nodes.append(helper.make_node("Sigmoid", ["t0"], ["side"], name="side"))
            outputs.append(tensor("side", out_shape))
    if tail_relu:
        nodes.append(helper.make_node("Relu", [cur], ["y"], name="relu_out"))
    else:
        nodes[-1].output[0] = "y"
    return make_model(nodes, [tensor("x", list(shape))], [tensor("y", out_shape)] + outputs)


def test_cancel_transposes_pair_cancels():
    model = _transposes([[0, 2, 1, 3], [0, 2, 1, 3]])
    out, rec = apply(model, "cancel-transposes")
    assert rec.changed and rec.stats["cancelled"] == 1
    assert ops(out) == ["Relu"] and list(out.graph.node[0].input) == ["x"]
    assert_same(model, out, EXACT)


def test_cancel_transposes_pair_writing_the_graph_output():
    model = _transposes([[0, 3, 1, 2], [0, 2, 3, 1]], relu_first=True, tail_relu=False)
    out, rec = apply(model, "cancel-transposes")
    assert rec.changed and ops(out) == ["Relu"] and out.graph.node[0].output[0] == "y"
    assert_same(model, out, EXACT)


def test_cancel_transposes_chain_merges_into_one():
    model = _transposes([[1, 0, 2, 3], [0, 2, 1, 3], [0, 1, 3, 2]])
    out, rec = apply(model, "cancel-transposes")
    assert rec.changed and ops(out) == ["Transpose", "Relu"]
    assert list(attr(out, "Transpose", "perm")) == [1, 2, 3, 0]
    assert_same(model, out, EXACT)


def test_cancel_transposes_first_transpose_with_another_reader_stays():
    model = _transposes([[0, 2, 1, 3], [0, 2, 1, 3]], side_reader=True)
    out, rec = apply(model, "cancel-transposes")
    assert rec.changed and sorted(ops(out)) == ["Relu", "Sigmoid", "Transpose"]
    assert_same(model, out, EXACT)


def test_cancel_transposes_constant_matmul_operand_is_folded():
    w = rand((6, 4), 0)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], name="t", perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm")]
    model = make_model(nodes, [tensor("x", [2, 3, 4])], [tensor("y", [2, 3, 6])], [const("w", w)])
    out, rec = apply(model, "cancel-transposes")
    assert rec.changed and rec.stats["into_constant"] == 1 and ops(out) == ["MatMul"]
    np.testing.assert_array_equal(init(out, out.graph.node[0].input[1]), w.T)
    assert_same(model, out, EXACT)


def test_cancel_transposes_gemm_operands_fold_into_trans_flags():
    # A: Transpose of an input -> transA=1. B: constant under a Transpose, already transB=1 -> folded constant.
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], name="ta", perm=[1, 0]),
        helper.make_node("Transpose", ["w"], ["wt"], name="tb", perm=[1, 0]),
        helper.make_node("Gemm", ["xt", "wt", "c"], ["y"], name="gemm", transB=1),
    ]
    model = make_model(nodes, [tensor("x", [4, 3])], [tensor("y", [3, 5])], [const("w", rand((4, 5), 0)), const("c", rand(5, 1))])
    out, rec = apply(model, "cancel-transposes")
    assert rec.changed and rec.stats["into_gemm_flag"] == 1 and rec.stats["into_constant"] == 1
    assert ops(out) == ["Gemm"] and out.graph.node[0].input[0] == "x"
    assert attr(out, "Gemm", "transA") == 1 and attr(out, "Gemm", "transB") == 1
    assert_same(model, out, EXACT)


def test_cancel_transposes_gemm_trans_flag_flips_back():
    nodes = [helper.make_node("Transpose", ["b"], ["bt"], name="t", perm=[1, 0]), helper.make_node("Gemm", ["a", "bt"], ["y"], name="gemm", transB=1)]
    model = make_model(nodes, [tensor("a", [3, 4]), tensor("b", [4, 5])], [tensor("y", [3, 5])])
    out, rec = apply(model, "cancel-transposes")
    assert rec.changed and ops(out) == ["Gemm"] and attr(out, "Gemm", "transB") == 0
    assert_same(model, out, EXACT)


def test_cancel_transposes_no_match():
    model = _transposes([[0, 2, 1, 3]])
    out, rec = apply(model, "cancel-transposes")
    assert not rec.changed and sorted(ops(out)) == sorted(ops(model))


# ----------------------------------------------------------------------------------------- collapse-reshapes

def _reshape_chain(steps, shape=(2, 3, 4), extra_reader=None, dims=None):
    """x -> steps... -> Relu -> y, each step (op, attrs or shape/axes input, output shape)."""
    nodes, consts, cur = [], [], "x"
    for i, (op, arg, _) in enumerate(steps):
        if op == "Flatten":
            nodes.append(helper.make_node(op, [cur], [f"r{i}"], name=f"r{i}", axis=arg))
        else:
            consts.append(const(f"arg{i}", np.array(arg, np.int64)))
            nodes.append(helper.make_node(op, [cur, f"arg{i}"], [f"r{i}"], name=f"r{i}"))
        cur = f"r{i}"
    nodes.append(helper.make_node("Relu", [cur], ["y"], name="relu"))
    outputs = [tensor("y", steps[-1][2])]
    if extra_reader is not None:
        nodes.append(helper.make_node("Sigmoid", [f"r{extra_reader}"], ["side"], name="side"))
        outputs.append(tensor("side", steps[extra_reader][2]))
    return make_model(nodes, [tensor("x", dims or list(shape))], outputs, consts)


def test_collapse_reshapes_chain_becomes_one_reshape():
    model = _reshape_chain([("Flatten", 1, [2, 12]), ("Unsqueeze", [1], [2, 1, 12]), ("Reshape", [0, 12, -1], [2, 12, 1]), ("Squeeze", [2], [2, 12])] + [("Reshape", [4, 6], [4, 6])])
    out, rec = apply(model, "collapse-reshapes")
    assert rec.changed and rec.stats == {"collapsed": 4, "removed": 0}
    assert ops(out) == ["Reshape", "Relu"] and out.graph.node[0].input[0] == "x"
    assert init(out, out.graph.node[0].input[1]).tolist() == [4, 6]
    assert_same(model, out, EXACT)


def test_collapse_reshapes_chain_back_to_the_input_shape_is_removed():
    model = _reshape_chain([("Unsqueeze", [0], [1, 2, 3, 4]), ("Reshape", [6, 4], [6, 4]), ("Reshape", [2, 3, 4], [2, 3, 4])])
    out, rec = apply(model, "collapse-reshapes")
    assert rec.changed and rec.stats == {"collapsed": 0, "removed": 3}
    assert ops(out) == ["Relu"] and list(out.graph.node[0].input) == ["x"]
    assert_same(model, out, EXACT)


def test_collapse_reshapes_single_reshape_to_own_shape_is_removed():
    model = _reshape_chain([("Reshape", [2, -1, 4], [2, 3, 4])])
    out, rec = apply(model, "collapse-reshapes")
    assert rec.changed and ops(out) == ["Relu"]
    assert_same(model, out, EXACT)


def test_collapse_reshapes_stops_at_an_intermediate_with_another_reader():
    model = _reshape_chain([("Reshape", [6, 4], [6, 4]), ("Reshape", [24], [24]), ("Reshape", [4, 6], [4, 6])], extra_reader=0)
    out, rec = apply(model, "collapse-reshapes")
    assert rec.changed and rec.stats == {"collapsed": 1, "removed": 0}
    assert sorted(ops(out)) == ["Relu", "Reshape", "Reshape", "Sigmoid"]
    assert_same(model, out, EXACT)


@pytest.mark.parametrize("case", ["other reader", "dynamic dim"])
def test_collapse_reshapes_no_match(case):
    steps = [("Reshape", [6, 4], [6, 4]), ("Reshape", [24], [24])]
    if case == "other reader":
        model = _reshape_chain(steps, extra_reader=0)
    else:
        model = _reshape_chain([("Reshape", [-1, 4], ["n", 4]), ("Flatten", 0, [1, "n"])], dims=["n", 3, 4])
    out, rec = apply(model, "collapse-reshapes")
    assert not rec.changed and sorted(ops(out)) == sorted(ops(model))


# ------------------------------------------------------------------------------------ eliminate-noops (shapes)

def test_eliminate_noops_removes_shape_noops():
    x = [2, 3, 4]
    nodes = [
        helper.make_node("Reshape", ["x", "same_shape"], ["a"], name="reshape_same"),
        helper.make_node("Transpose", ["a"], ["b"], name="transpose_id", perm=[0, 1, 2]),
        helper.make_node("Expand", ["b", "small_shape"], ["c"], name="expand_same"),
        helper.make_node("Slice", ["c", "zeros", "int64_max"], ["d"], name="slice_all"),
        helper.make_node("Slice", ["d", "zeros", "dims", "axes", "ones"], ["e"], name="slice_all_static"),
        helper.make_node("Pad", ["e", "zero_pads"], ["f"], name="pad_zero"),
        helper.make_node("Relu", ["f"], ["g"], name="relu"),
        helper.make_node("Reshape", ["g", "same_shape"], ["y"], name="reshape_out"),  # writes the graph output
    ]
    consts = [
        const("same_shape", np.array(x, np.int64)), const("small_shape", np.array([3, 1], np.int64)),
        const("zeros", np.zeros(3, np.int64)), const("int64_max", np.full(3, INT64_MAX, np.int64)),
        const("dims", np.array([2, 3, 4], np.int64)), const("axes", np.array([0, 1, 2], np.int64)), const("ones", np.ones(3, np.int64)),
        const("zero_pads", np.zeros(6, np.int64)),
    ]
    model = make_model(nodes, [tensor("x", x)], [tensor("y", x)], consts)
    out, rec = apply(model, "eliminate-noops")
    assert rec.changed and rec.stats["removed"] == {"Reshape": 2, "Transpose": 1, "Expand": 1, "Slice": 2, "Pad": 1}
    assert [(n.name, n.op_type) for n in out.graph.node] == [("relu", "Relu")]
    assert list(out.graph.node[0].input) == ["x"] and out.graph.node[0].output[0] == "y"
    assert_same(model, out, EXACT)


def test_eliminate_noops_keeps_shape_ops_that_change_something():
    x = [2, 3, 4]
    nodes = [
        helper.make_node("Reshape", ["x", "flat"], ["a"], name="reshape"),
        helper.make_node("Reshape", ["a", "back"], ["a2"], name="reshape_back"),
        helper.make_node("Transpose", ["a2"], ["b"], name="transpose", perm=[0, 2, 1]),
        helper.make_node("Expand", ["b", "bigger"], ["c"], name="expand"),
        helper.make_node("Slice", ["c", "minus_ones", "int64_min", "axes", "minus_ones"], ["d"], name="reverse"),  # steps -1
        helper.make_node("Slice", ["d", "zeros", "two"], ["e"], name="slice_part"),
        helper.make_node("Pad", ["e", "pads"], ["y"], name="pad"),
    ]
    consts = [
        const("flat", np.array([6, 4], np.int64)), const("back", np.array(x, np.int64)), const("bigger", np.array([2, 2, 4, 3], np.int64)),
        const("zeros", np.zeros(1, np.int64)), const("int64_min", np.full(1, -INT64_MAX - 1, np.int64)), const("axes", np.array([3], np.int64)),
        const("minus_ones", np.full(1, -1, np.int64)), const("two", np.array([1], np.int64)), const("pads", np.array([0, 0, 0, 1, 0, 0, 0, 0], np.int64)),
    ]
    model = make_model(nodes, [tensor("x", x)], [tensor("y", [1, 2, 4, 4])], consts)
    out, rec = apply(model, "eliminate-noops")
    assert not rec.changed and sorted(ops(out)) == sorted(ops(model))


# -------------------------------------------------------------------------------------- end to end: torch CNN

STRUCTURAL = ["fold-constants", "eliminate-noops", "fuse-conv-bn", "fuse-matmul-add", "cancel-transposes", "collapse-reshapes", "eliminate-dead-code"]


def test_structural_passes_keep_a_torch_cnn_with_batchnorm_equal():
    torch = pytest.importorskip("torch")
    from autoglm_compile.zoo import small_cnn

    buf = io.BytesIO()
    with torch.no_grad():
        # do_constant_folding=False: the exporter would otherwise fold the BatchNorms itself, leaving nothing to test.
        torch.onnx.export(small_cnn(), (torch.randn(2, 3, 16, 16),), buf, input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=False, do_constant_folding=False)
    model = onnx.load_from_string(buf.getvalue())
    model.ir_version = 8
    assert ops(model).count("BatchNormalization") == 2
    out, records = run_passes(model, [PassSpec(name=n) for n in STRUCTURAL], PassContext())
    by_name = {r.name: r for r in records}
    assert by_name["fuse-conv-bn"].stats["folded"] == {"Conv": 2}
    assert "BatchNormalization" not in ops(out) and "Identity" not in ops(out)
    assert_same(model, out, FOLDED)
