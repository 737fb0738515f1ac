"""The transformer passes (fuse-layernorm, fuse-gelu, fuse-attention, convert-float16).

Each pass runs on tiny graphs built with onnx.helper: the exact nodes after the pass, equal outputs under ONNX
Runtime, and changed=False when nothing matches (or on a near miss). fuse-attention (and fuse-layernorm at opset 14)
also run on a real export: transformers' BertModel (eager attention, seeded random weights, hidden 64, 2 layers,
4 heads) exported by torch.onnx, through the pass runner and through the whole pipeline into TVM (a --config that
extends O2), where the artifact must match ONNX Runtime on the unfused model, with padding masked out as well.

Tolerances:
- fuse-layernorm and fuse-gelu replace a chain by one kernel that computes the same formula in another order:
  rtol 1e-5, atol 1e-5.
- fuse-attention on BERT: the pipeline's fp32 tolerances (rtol 1e-3, atol 1e-4), against ONNX Runtime with its own
  graph optimizations off on the unfused model (ORT would otherwise fuse the attention itself).
- convert-float16: rtol 1e-3, atol 2.5e-3 against the float32 model, on data scaled so that the outputs are of
  order 1 (float16 keeps 11 significant bits: a relative step of 4.9e-4).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from autoglm_compile.config import PassSpec
from autoglm_compile.pass_manager import PassContext, run_passes
from conftest import make_model

SAME = dict(rtol=1e-5, atol=1e-5)
FP32 = dict(rtol=1e-3, atol=1e-4)
FP16 = dict(rtol=1e-3, atol=2.5e-3)
MS = "com.microsoft"


def apply(model, name, **options):
    out, records = run_passes(model, [PassSpec(name=name, options=options)], PassContext())
    return out, records[0]


def ops(model):
    return [n.op_type for n in model.graph.node]


def run(model, feeds, optimize=True):
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_same(before, after, feeds, tol=SAME):
    expected, got = run(before, feeds, optimize=False), run(after, feeds)
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        assert e.shape == g.shape and e.dtype == g.dtype
        np.testing.assert_allclose(g, e, **tol)


def tensor(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def rand(shape, seed, scale=1.0, shift=0.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale + shift).astype(np.float32)


def attr(node, key):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == key), None)


def init(model, name):
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def opset_of(model, domain=""):
    return next(o.version for o in model.opset_import if o.domain == domain)


# ------------------------------------------------------------------------------------------------ fuse-layernorm

H = 16
LN_SHAPE = [2, 5, H]


def layernorm_chain(square="pow", gamma=True, beta=True, opset=17, extra_reader=None, eps=1e-5):
    """x -> ReduceMean, Sub, Pow(d, 2) | Mul(d, d), ReduceMean, Add eps, Sqrt, Div [, Mul gamma] [, Add beta] -> y.

    `extra_reader` names an intermediate ("mean", "d", "var", "std", "n") that an Identity also reads, as a second
    graph output."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], name="ln/mean", axes=[-1], keepdims=1),
        helper.make_node("Sub", ["x", "mean"], ["d"], name="ln/sub"),
        (helper.make_node("Pow", ["d", "two"], ["sq"], name="ln/pow") if square == "pow"
         else helper.make_node("Mul", ["d", "d"], ["sq"], name="ln/square")),
        helper.make_node("ReduceMean", ["sq"], ["var"], name="ln/var", axes=[-1], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="ln/add_eps"),
        helper.make_node("Sqrt", ["ve"], ["std"], name="ln/sqrt"),
        helper.make_node("Div", ["d", "std"], ["n"], name="ln/div"),
    ]
    consts = [const("eps", np.float32(eps))] + ([const("two", np.float32(2.0))] if square == "pow" else [])
    last = "n"
    if gamma:
        nodes.append(helper.make_node("Mul", [last, "gamma"], ["g"], name="ln/mul_gamma"))
        consts.append(const("gamma", rand(H, 1, 0.5, 1.0)))
        last = "g"
    if beta:
        nodes.append(helper.make_node("Add", ["beta", last], ["b"], name="ln/add_beta"))  # the constant first
        consts.append(const("beta", rand(H, 2)))
        last = "b"
    nodes.append(helper.make_node("Relu", [last], ["y"], name="relu"))
    outputs = [tensor("y", LN_SHAPE)]
    if extra_reader is not None:
        nodes.append(helper.make_node("Identity", [extra_reader], ["extra"], name="extra"))
        reduced = extra_reader in ("mean", "var", "std")
        outputs.append(tensor("extra", LN_SHAPE[:-1] + [1] if reduced else LN_SHAPE))
    return make_model(nodes, [tensor("x", LN_SHAPE)], outputs, consts, opset=opset)


def ln_feeds():
    return {"x": rand(LN_SHAPE, 0, scale=3.0, shift=1.5)}  # a mean and a spread far from 0 and 1


@pytest.mark.parametrize("square", ["pow", "mul"])
@pytest.mark.parametrize("gamma,beta", [(True, True), (True, False), (False, True), (False, False)])
def test_fuse_layernorm(square, gamma, beta):
    model = layernorm_chain(square, gamma, beta)
    out, rec = apply(model, "fuse-layernorm")
    assert rec.changed and rec.stats == {"fused": 1}
    assert ops(out) == ["LayerNormalization", "Relu"]
    ln = out.graph.node[0]
    assert ln.name == "ln/LayerNormalization" and ln.input[0] == "x"
    assert attr(ln, "axis") == -1 and math.isclose(attr(ln, "epsilon"), 1e-5, rel_tol=1e-6)
    np.testing.assert_array_equal(init(out, ln.input[1]), init(model, "gamma") if gamma else np.ones(H, np.float32))
    if beta:
        np.testing.assert_array_equal(init(out, ln.input[2]), init(model, "beta"))
    else:
        assert len(ln.input) == 2
    assert opset_of(out) == 17
    assert_same(model, out, ln_feeds())


def layernorm_axes_chain(axes, opset=17, affine_shape=(H,), dtype=np.float32):
    """The Pow variant with gamma and beta, over the given axes; at opset 18 ReduceMean takes its axes as an input."""
    axes_attr, axes_in = (dict(axes=list(axes)), []) if opset < 18 else ({}, ["axes"])
    nodes = [
        helper.make_node("ReduceMean", ["x", *axes_in], ["mean"], name="ln/mean", keepdims=1, **axes_attr),
        helper.make_node("Sub", ["x", "mean"], ["d"], name="ln/sub"),
        helper.make_node("Pow", ["d", "two"], ["sq"], name="ln/pow"),
        helper.make_node("ReduceMean", ["sq", *axes_in], ["var"], name="ln/var", keepdims=1, **axes_attr),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="ln/add_eps"),
        helper.make_node("Sqrt", ["ve"], ["std"], name="ln/sqrt"),
        helper.make_node("Div", ["d", "std"], ["n"], name="ln/div"),
        helper.make_node("Mul", ["n", "gamma"], ["g"], name="ln/mul_gamma"),
        helper.make_node("Add", ["g", "beta"], ["y"], name="ln/add_beta"),
    ]
    consts = [const("eps", dtype(1e-5)), const("two", dtype(2.0)),
              const("gamma", rand(affine_shape, 1, 0.5, 1.0).astype(dtype)), const("beta", rand(affine_shape, 2).astype(dtype))]
    consts += [const("axes", np.array(axes, np.int64))] if opset >= 18 else []
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    return make_model(nodes, [tensor("x", LN_SHAPE, elem)], [tensor("y", LN_SHAPE, elem)], consts, opset=opset)


@pytest.mark.parametrize("kw,axis", [
    (dict(axes=[2]), -1),
    (dict(axes=[-2, -1]), -2),
    (dict(axes=[1, 2], affine_shape=(5, H)), -2),
    (dict(axes=[-1], affine_shape=(1, 1, H)), -1),
    (dict(axes=[-1], opset=18), -1),
    (dict(axes=[-1], dtype=np.float16), -1),
])
def test_fuse_layernorm_axes_opsets_and_dtypes(kw, axis):
    model = layernorm_axes_chain(**kw)
    out, rec = apply(model, "fuse-layernorm")
    assert rec.changed and rec.stats == {"fused": 1} and ops(out) == ["LayerNormalization"]
    ln = out.graph.node[0]
    assert attr(ln, "axis") == axis and list(ln.output) == ["y"]
    dtype = kw.get("dtype", np.float32)
    assert init(out, ln.input[1]).dtype == dtype and init(out, ln.input[1]).shape == tuple(LN_SHAPE[axis:])
    x = ln_feeds()["x"].astype(dtype)
    expected, got = run(model, {"x": x}, optimize=False)[0], run(out, {"x": x})[0]
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), **(SAME if dtype == np.float32 else FP16))


@pytest.mark.parametrize("kw", [
    pytest.param(dict(axes=[1]), id="not the trailing axes"),
    pytest.param(dict(axes=[-1], affine_shape=(5, H)), id="gamma wider than the normalized shape"),
])
def test_fuse_layernorm_axes_no_match(kw):
    model = layernorm_axes_chain(**kw)
    out, rec = apply(model, "fuse-layernorm")
    assert not rec.changed and sorted(ops(out)) == sorted(ops(model))


def test_fuse_layernorm_upgrades_opset_14_to_17():
    model = layernorm_chain(opset=14)
    out, rec = apply(model, "fuse-layernorm")
    assert rec.changed and rec.stats == {"fused": 1, "upgraded_opset": "14 -> 17"}
    assert opset_of(out) == 17 and ops(out) == ["LayerNormalization", "Relu"]
    onnx.checker.check_model(out, full_check=True)
    assert_same(model, out, ln_feeds())


def test_fuse_layernorm_without_upgrade_leaves_opset_14_and_says_why():
    model = layernorm_chain(opset=14)
    out, rec = apply(model, "fuse-layernorm", upgrade_opset=False)
    assert not rec.changed and rec.stats["fused"] == 0
    assert "opset 14 < 17" in rec.stats["skipped"] and "upgrade_opset is false" in rec.stats["skipped"]
    assert opset_of(out) == 14 and sorted(ops(out)) == sorted(ops(model))


@pytest.mark.parametrize("reader", ["mean", "d", "var", "std"])
def test_fuse_layernorm_leaves_a_chain_whose_intermediate_has_another_reader(reader):
    model = layernorm_chain(extra_reader=reader)
    out, rec = apply(model, "fuse-layernorm")
    assert not rec.changed and rec.stats == {"fused": 0}
    assert sorted(ops(out)) == sorted(ops(model))


def test_fuse_layernorm_stops_before_gamma_when_the_normalized_value_has_another_reader():
    # Div's output is read twice: the chain up to Div is a LayerNorm without scale and bias; Mul and Add stay.
    model = layernorm_chain(extra_reader="n")
    out, rec = apply(model, "fuse-layernorm")
    assert rec.changed and rec.stats == {"fused": 1}
    assert sorted(ops(out)) == ["Add", "Identity", "LayerNormalization", "Mul", "Relu"]
    assert_same(model, out, ln_feeds())


# ------------------------------------------------------------------------------------------------------ fuse-gelu

G_SHAPE = [2, 8, 32]
SQRT2 = math.sqrt(2.0)
K_TANH = math.sqrt(2.0 / math.pi)


def _product(nodes, consts, a, order, half):
    """0.5 * x * a in one of the three associations that exporters emit; writes y."""
    consts.append(const("half", np.float32(half)))
    if order == "x*a*0.5":  # torch.nn.functional.gelu
        nodes += [helper.make_node("Mul", ["x", a], ["xa"], name="g/mul_x"), helper.make_node("Mul", ["xa", "half"], ["y"], name="g/mul_half")]
    elif order == "(0.5*x)*a":  # transformers' NewGELUActivation: 0.5 * input * (1.0 + tanh(...))
        nodes += [helper.make_node("Mul", ["half", "x"], ["hx"], name="g/mul_half"), helper.make_node("Mul", ["hx", a], ["y"], name="g/mul_x")]
    elif order == "x*(a*0.5)":
        nodes += [helper.make_node("Mul", [a, "half"], ["ah"], name="g/mul_half"), helper.make_node("Mul", ["x", "ah"], ["y"], name="g/mul_x")]
    else:
        raise AssertionError(order)


def gelu_erf(order="x*a*0.5", scale="div", opset=17, half=0.5, divisor=SQRT2, erf_reader=False):
    nodes = []
    if scale == "div":
        nodes.append(helper.make_node("Div", ["x", "c"], ["s"], name="g/div"))
        consts = [const("c", np.float32(divisor))]
    else:  # x * (1/sqrt 2), the constant first
        nodes.append(helper.make_node("Mul", ["c", "x"], ["s"], name="g/scale"))
        consts = [const("c", np.float32(1.0 / divisor))]
    nodes += [helper.make_node("Erf", ["s"], ["e"], name="g/erf"), helper.make_node("Add", ["one", "e"], ["a"], name="g/add_one")]
    consts.append(const("one", np.float32(1.0)))
    _product(nodes, consts, "a", order, half)
    outputs = [tensor("y", G_SHAPE)] + ([tensor("e", G_SHAPE)] if erf_reader else [])
    return make_model(nodes, [tensor("x", G_SHAPE)], outputs, consts, opset=opset)


def gelu_tanh(order="(0.5*x)*a", cube="pow", opset=17, half=0.5, coeff=0.044715):
    if cube == "pow":
        nodes = [helper.make_node("Pow", ["x", "three"], ["x3"], name="g/pow")]
        consts = [const("three", np.float32(3.0))]
    elif cube == "x*(x*x)":
        nodes = [helper.make_node("Mul", ["x", "x"], ["xx"], name="g/sq"), helper.make_node("Mul", ["x", "xx"], ["x3"], name="g/cube")]
        consts = []
    else:  # (x*x)*x
        nodes = [helper.make_node("Mul", ["x", "x"], ["xx"], name="g/sq"), helper.make_node("Mul", ["xx", "x"], ["x3"], name="g/cube")]
        consts = []
    nodes += [
        helper.make_node("Mul", ["k", "x3"], ["kx3"], name="g/mul_k"),
        helper.make_node("Add", ["x", "kx3"], ["inner"], name="g/add_inner"),
        helper.make_node("Mul", ["inner", "sqrt_2_pi"], ["t_in"], name="g/mul_sqrt"),
        helper.make_node("Tanh", ["t_in"], ["t"], name="g/tanh"),
        helper.make_node("Add", ["t", "one"], ["a"], name="g/add_one"),
    ]
    consts += [const("k", np.float32(coeff)), const("sqrt_2_pi", np.float32(K_TANH)), const("one", np.float32(1.0))]
    _product(nodes, consts, "a", order, half)
    return make_model(nodes, [tensor("x", G_SHAPE)], [tensor("y", G_SHAPE)], consts, opset=opset)


def gelu_feeds():
    return {"x": rand(G_SHAPE, 0, scale=2.0)}


ORDERS = ["x*a*0.5", "(0.5*x)*a", "x*(a*0.5)"]


def _check_gelu(model, out, rec, op, domain, approximate=None):
    assert rec.changed and rec.stats == {"fused": {f"{domain}.{op}" if domain else op: 1}}
    assert ops(out) == [op]
    node = out.graph.node[0]
    assert node.domain == domain and list(node.input) == ["x"] and list(node.output) == ["y"]
    assert node.name == f"g/{op}"
    assert attr(node, "approximate") == (approximate.encode() if approximate else None)
    onnx.checker.check_model(out)
    assert_same(model, out, gelu_feeds())


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("scale", ["div", "mul"])
def test_fuse_gelu_erf_opset17_is_microsoft_gelu(order, scale):
    model = gelu_erf(order, scale)
    out, rec = apply(model, "fuse-gelu")
    _check_gelu(model, out, rec, "Gelu", MS)
    assert opset_of(out) == 17  # the opset is left as it is


@pytest.mark.parametrize("order", ORDERS)
def test_fuse_gelu_erf_opset20_is_standard_gelu(order):
    model = gelu_erf(order, opset=20)
    out, rec = apply(model, "fuse-gelu")
    _check_gelu(model, out, rec, "Gelu", "")


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("cube", ["pow", "x*(x*x)", "(x*x)*x"])
def test_fuse_gelu_tanh_opset17_is_fastgelu(order, cube):
    model = gelu_tanh(order, cube)
    out, rec = apply(model, "fuse-gelu")
    _check_gelu(model, out, rec, "FastGelu", MS)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("cube", ["pow", "x*(x*x)"])
def test_fuse_gelu_tanh_opset20_is_gelu_tanh(order, cube):
    model = gelu_tanh(order, cube, opset=20)
    out, rec = apply(model, "fuse-gelu")
    _check_gelu(model, out, rec, "Gelu", "", approximate="tanh")


def test_fuse_gelu_forms_option():
    model = gelu_tanh()
    out, rec = apply(model, "fuse-gelu", forms=["erf"])
    assert not rec.changed and sorted(ops(out)) == sorted(ops(model))


@pytest.mark.parametrize("model", [
    pytest.param(lambda: gelu_erf(half=0.6), id="erf 0.6 * x * (...)"),
    pytest.param(lambda: gelu_erf(order="(0.5*x)*a", half=0.6), id="erf (0.6 * x) * (...)"),
    pytest.param(lambda: gelu_erf(divisor=1.5), id="erf x / 1.5"),
    pytest.param(lambda: gelu_erf(scale="mul", divisor=1.5), id="erf x * (1 / 1.5)"),
    pytest.param(lambda: gelu_erf(erf_reader=True), id="erf output also a graph output"),
    pytest.param(lambda: gelu_tanh(half=0.6), id="tanh 0.6"),
    pytest.param(lambda: gelu_tanh(coeff=0.05), id="tanh 0.05 * x^3"),
    pytest.param(lambda: gelu_tanh(opset=20, cube="x*(x*x)", order="x*(a*0.5)", half=0.6), id="tanh opset 20 0.6"),
])
def test_fuse_gelu_near_miss_is_not_fused(model):
    model = model()
    out, rec = apply(model, "fuse-gelu")
    assert not rec.changed and rec.stats == {"fused": {}}
    assert sorted(ops(out)) == sorted(ops(model))


# ------------------------------------------------------------------------------------------------- fuse-attention

A_B, A_S, A_N, A_H = 2, 6, 2, 4
A_D = A_N * A_H


def attention_block(scale=("Mul", 1 / math.sqrt(A_H)), key="one", mask_shape=(1, 1, A_S, A_S), reshape=(0, 0, A_N, A_H), bias=True, cross=False,
                    softmax_axis=-1, weight_input=False, scores_reader=False):
    """BERT's eager self-attention on x [B, S, D]: q, k, v = Reshape(x @ W + b) -> Transpose; Softmax(q k^T * scale
    + mask) @ v -> Transpose -> Reshape -> y. `key` "two": k^T as two Transposes; `cross`: k and v read another
    input; `weight_input`: Wv is a graph input; `scores_reader`: q k^T is also a graph output."""
    nodes, consts = [], []
    inputs = [tensor("x", [A_B, A_S, A_D])] + ([tensor("x2", [A_B, A_S, A_D])] if cross else [])
    for i, p in enumerate("qkv"):
        src = "x2" if cross and p != "q" else "x"
        if weight_input and p == "v":
            inputs.append(tensor("wv", [A_D, A_D]))
        else:
            consts.append(const(f"w{p}", rand((A_D, A_D), i, 1 / math.sqrt(A_D))))
        t = f"{p}_mm"
        nodes.append(helper.make_node("MatMul", [src, f"w{p}"], [t], name=f"/attn/{p}/MatMul"))
        if bias:
            consts.append(const(f"b{p}", rand(A_D, 10 + i, 0.1)))
            nodes.append(helper.make_node("Add", [f"b{p}", t], [f"{p}_b"], name=f"/attn/{p}/Add"))
            t = f"{p}_b"
        consts.append(const(f"{p}_shape", np.array(reshape, np.int64)))
        nodes.append(helper.make_node("Reshape", [t, f"{p}_shape"], [f"{p}_r"], name=f"/attn/{p}/Reshape"))
        if p == "k" and key == "one":
            nodes.append(helper.make_node("Transpose", ["k_r"], ["k_t"], name="/attn/k/Transpose", perm=[0, 2, 3, 1]))
        elif p == "k":
            nodes.append(helper.make_node("Transpose", ["k_r"], ["k_t0"], name="/attn/k/Transpose", perm=[0, 2, 1, 3]))
            nodes.append(helper.make_node("Transpose", ["k_t0"], ["k_t"], name="/attn/k/Transpose_1", perm=[0, 1, 3, 2]))
        else:
            nodes.append(helper.make_node("Transpose", [f"{p}_r"], [f"{p}_t"], name=f"/attn/{p}/Transpose", perm=[0, 2, 1, 3]))
    nodes.append(helper.make_node("MatMul", ["q_t", "k_t"], ["qk"], name="/attn/MatMul"))
    s = "qk"
    if scale is not None:
        op, value = scale
        consts.append(const("scale", np.float32(value)))
        nodes.append(helper.make_node(op, ["qk", "scale"] if op == "Div" else ["scale", "qk"], ["qs"], name=f"/attn/{op}"))
        s = "qs"
    if mask_shape is not None:
        inputs.append(tensor("mask", list(mask_shape)))
        nodes.append(helper.make_node("Add", [s, "mask"], ["qm"], name="/attn/Add"))
        s = "qm"
    nodes += [
        helper.make_node("Softmax", [s], ["p"], name="/attn/Softmax", axis=softmax_axis),
        helper.make_node("MatMul", ["p", "v_t"], ["pv"], name="/attn/MatMul_1"),
        helper.make_node("Transpose", ["pv"], ["pv_t"], name="/attn/Transpose", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["pv_t", "out_shape"], ["y"], name="/attn/Reshape"),
    ]
    consts.append(const("out_shape", np.array([0, 0, A_D], np.int64)))
    outputs = [tensor("y", [A_B, A_S, A_D])] + ([tensor("qk", [A_B, A_N, A_S, A_S])] if scores_reader else [])
    return make_model(nodes, inputs, outputs, consts)


def attention_feeds(model):
    feeds = {}
    for i in model.graph.input:
        shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
        feeds[i.name] = rand(shape, len(feeds), 1 / math.sqrt(A_D) if i.name == "wv" else 1.0)
        if i.name == "mask":  # the last two keys masked out, plus a small bias
            feeds[i.name] = rand(shape, 7, 0.1)
            feeds[i.name][..., -2:] = np.finfo(np.float32).min
    return feeds


SCALE = ("Mul", 1 / math.sqrt(A_H))
ATTENTION_CASES = {
    "mul scale": dict(),
    "div scale": dict(scale=("Div", math.sqrt(A_H))),
    "no scale": dict(scale=None),
    "other scale": dict(scale=("Mul", 0.3)),
    "k^T as two transposes": dict(key="two"),
    "no mask": dict(mask_shape=None),
    "mask [B,1,1,S]": dict(mask_shape=(A_B, 1, 1, A_S)),
    "mask [1,1,1,S]": dict(mask_shape=(1, 1, 1, A_S)),
    "mask [B,N,S,S]": dict(mask_shape=(A_B, A_N, A_S, A_S)),
    "reshape [B,S,-1,H]": dict(reshape=(A_B, A_S, -1, A_H)),
    "reshape [0,0,N,-1]": dict(reshape=(0, 0, A_N, -1)),
    "no bias": dict(bias=False),
    "4 heads of 2": dict(reshape=(0, 0, 4, 2)),  # the heads come from the Reshape, the scale is what it is
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_fuse_attention_block(case):
    kw = ATTENTION_CASES[case]
    model = attention_block(**kw)
    out, rec = apply(model, "fuse-attention")
    assert rec.changed and rec.stats == {"fused": 1}
    mask = kw.get("mask_shape", (1, 1, A_S, A_S))
    expand = mask is not None and mask[2:] != (A_S, A_S)
    assert ops(out) == (["Expand", "Attention"] if expand else ["Attention"])
    node = out.graph.node[-1]
    heads = kw.get("reshape", (0, 0, A_N, A_H))
    assert node.domain == MS and node.name == "/attn/Attention"
    assert attr(node, "num_heads") == (heads[2] if heads[2] != -1 else A_D // heads[3])
    assert node.input[0] == "x" and list(node.output) == ["y"]
    assert init(out, node.input[1]).shape == (A_D, 3 * A_D) and init(out, node.input[2]).shape == (3 * A_D,)
    if mask is None:
        assert len(node.input) == 3
    else:
        assert list(node.input[3:5]) == ["", ""] and node.input[5] == ("mask/expanded" if expand else "mask")
    onnx.checker.check_model(out)
    assert_same(model, out, attention_feeds(model))


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_fuse_attention_fold_scale_block(case):
    kw = ATTENTION_CASES[case]
    model = attention_block(**kw)
    out, rec = apply(model, "fuse-attention", mode="fold-scale")
    has_scale = kw.get("scale", SCALE) is not None
    assert rec.changed == has_scale and rec.stats == {"matched": 1, "scales_folded": int(has_scale)}
    expected = sorted(ops(model))
    if has_scale:
        expected.remove(kw.get("scale", SCALE)[0])
    assert sorted(ops(out)) == expected
    assert scale_nodes(out) == []
    assert_same(model, out, attention_feeds(model))


@pytest.mark.parametrize("kw", [
    pytest.param(dict(cross=True), id="k and v from another input"),
    pytest.param(dict(softmax_axis=2), id="softmax over another axis"),
    pytest.param(dict(weight_input=True), id="Wv a graph input"),
    pytest.param(dict(scores_reader=True), id="scores also a graph output"),
    pytest.param(dict(mask_shape=(A_S, A_S)), id="2-D mask"),
])
def test_fuse_attention_block_no_match(kw):
    model = attention_block(**kw)
    for mode in ("attention", "fold-scale"):
        out, rec = apply(model, "fuse-attention", mode=mode)
        assert not rec.changed and sorted(ops(out)) == sorted(ops(model))


BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100)
SEQ = 16
PRE = ["pin-shapes", "fold-constants", "eliminate-noops", "eliminate-dead-code"]


def export_bert(path, seq=SEQ, opset=17, **config):
    """transformers BertModel (eager attention, torch.manual_seed(0)) exported by torch.onnx (opset 17 unless told)
    with static shapes, batch 1. autoglm_compile.zoo.bert exports dynamic dims and draws token ids below 1000, which a
    vocabulary of 100 cannot take; this is the same export with static shapes."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(attn_implementation="eager", **config)).eval()

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state, out.pooler_output

    args = (torch.randint(0, bert.config.vocab_size, (1, seq)), torch.ones(1, seq, dtype=torch.long), torch.zeros(1, seq, dtype=torch.long))
    with torch.no_grad():
        torch.onnx.export(Wrap(), args, str(path), input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["last_hidden_state", "pooler_output"], opset_version=opset, dynamo=False)
    model = onnx.load(str(path))
    model.ir_version = 8
    onnx.save(model, str(path))
    return model


def _export_quietly(tmp_path_factory, opset):
    pytest.importorskip("transformers")
    import warnings

    path = tmp_path_factory.mktemp("bert") / f"bert{opset}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about the mask code
        model = export_bert(path, opset=opset, **BERT)
    return path, model


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return _export_quietly(tmp_path_factory, 17)


@pytest.fixture(scope="module")
def tiny_bert_opset14(tmp_path_factory):
    return _export_quietly(tmp_path_factory, 14)


def bert_feeds():
    rng = np.random.default_rng(0)
    mask = np.ones((1, SEQ), np.int64)
    mask[0, 11:] = 0  # padding: the mask reaches the attention as a bias
    return {"input_ids": rng.integers(0, BERT["vocab_size"], (1, SEQ)), "attention_mask": mask,
            "token_type_ids": np.zeros((1, SEQ), np.int64)}


def bert_passes(model, *last):
    specs = [PassSpec(name=n) for n in PRE] + [PassSpec(name=n, options=o) for n, o in last]
    out, records = run_passes(model, specs, PassContext())
    return out, records


def scale_nodes(model):
    """The Mul/Div nodes that scale MatMul(q, k^T) on its way to a Softmax."""
    producers = {o: n for n in model.graph.node for o in n.output}
    found = []
    for sm in (n for n in model.graph.node if n.op_type == "Softmax"):
        t = sm.input[0]
        while t in producers and producers[t].op_type in ("Add", "Mul", "Div"):
            node = producers[t]
            if node.op_type in ("Mul", "Div"):
                found.append(node)
            t = next((i for i in node.input if i in producers and producers[i].op_type in ("MatMul", "Mul", "Div", "Add")), None)
    return found


def test_bert_export_has_layernorm_and_decomposed_gelu(tiny_bert):
    # At opset 17 torch.onnx writes nn.LayerNorm as LayerNormalization: fuse-layernorm finds nothing in it.
    _, model = tiny_bert
    counts = {op: ops(model).count(op) for op in ("LayerNormalization", "Erf", "Softmax")}
    assert counts == {"LayerNormalization": 2 * BERT["num_hidden_layers"] + 1, "Erf": 2, "Softmax": 2}


def test_fuse_layernorm_on_bert_opset14(tiny_bert_opset14):
    # At opset 14 each nn.LayerNorm is the decomposed chain; the pass upgrades the model to 17 and fuses them all.
    _, model = tiny_bert_opset14
    n_ln = 2 * BERT["num_hidden_layers"] + 1
    assert opset_of(model) == 14 and "LayerNormalization" not in ops(model) and ops(model).count("Pow") == n_ln
    out, records = bert_passes(model, ("fuse-layernorm", {}), ("fuse-gelu", {}), ("fuse-attention", {}))
    stats = {r.name: r.stats for r in records}
    assert stats["fuse-layernorm"] == {"fused": n_ln, "upgraded_opset": "14 -> 17"}
    assert stats["fuse-gelu"] == {"fused": {f"{MS}.Gelu": BERT["num_hidden_layers"]}}
    assert stats["fuse-attention"] == {"fused": BERT["num_hidden_layers"]}
    assert opset_of(out) == 17 and ops(out).count("LayerNormalization") == n_ln
    assert not {"ReduceMean", "Pow", "Sqrt", "Erf", "Softmax"} & set(ops(out))
    assert_same(model, out, bert_feeds(), FP32)


def test_fuse_attention_on_bert(tiny_bert):
    _, model = tiny_bert
    prepared, _ = bert_passes(model)
    out, records = bert_passes(model, ("fuse-attention", {}))
    rec = records[-1]
    assert rec.changed and rec.stats == {"fused": BERT["num_hidden_layers"]}
    attention = [n for n in out.graph.node if n.op_type == "Attention"]
    assert len(attention) == BERT["num_hidden_layers"] and all(n.domain == MS for n in attention)
    assert all(attr(n, "num_heads") == BERT["num_attention_heads"] for n in attention)
    assert all(len(n.input) == 6 and n.input[3] == n.input[4] == "" for n in attention)  # the mask as attention_bias
    assert "Softmax" not in ops(out) and "Transpose" not in ops(out)
    # Each block: 3 projections (MatMul + Add), 4 Reshapes, 4 Transposes, QK MatMul, scale, mask Add, Softmax, PV MatMul.
    assert rec.nodes_before - rec.nodes_after == BERT["num_hidden_layers"] * (6 + 4 + 4 + 5 - 1)
    assert sorted(ops(out)).count("MatMul") == ops(prepared).count("MatMul") - 5 * BERT["num_hidden_layers"]
    assert_same(model, out, bert_feeds(), FP32)


def test_fuse_attention_fold_scale_on_bert(tiny_bert):
    _, model = tiny_bert
    prepared, _ = bert_passes(model)
    assert len(scale_nodes(prepared)) == BERT["num_hidden_layers"]
    out, records = bert_passes(model, ("fuse-attention", {"mode": "fold-scale"}))
    rec = records[-1]
    assert rec.changed and rec.stats == {"matched": BERT["num_hidden_layers"], "scales_folded": BERT["num_hidden_layers"]}
    assert scale_nodes(out) == []
    assert rec.nodes_before - rec.nodes_after == BERT["num_hidden_layers"]
    removed = sorted(ops(prepared))
    for n in scale_nodes(prepared):
        removed.remove(n.op_type)
    assert sorted(ops(out)) == removed
    assert_same(model, out, bert_feeds(), FP32)
    # A second run finds the pattern and no scale left to fold.
    again, rec2 = apply(out, "fuse-attention", mode="fold-scale")
    assert not rec2.changed and rec2.stats == {"matched": BERT["num_hidden_layers"], "scales_folded": 0}


def test_fuse_attention_no_match():
    model = layernorm_chain()
    for mode in ("attention", "fold-scale"):
        out, rec = apply(model, "fuse-attention", mode=mode)
        assert not rec.changed and sorted(ops(out)) == sorted(ops(model))


@pytest.mark.parametrize("mode", ["attention", "fold-scale"])
def test_bert_with_fusions_builds_in_tvm_and_matches(tiny_bert, tmp_path, mode):
    """The whole pipeline with a --config that extends O2: the fused graph imports into TVM, builds and matches ONNX
    Runtime on the source model (the pipeline's own accuracy check, fp32 tolerances)."""
    from autoglm_compile.pipeline import CompileOptions, compile_model

    path, _ = tiny_bert
    cfg = tmp_path / "fused.yaml"
    cfg.write_text(
        "extends: O2\n"
        "passes:\n"
        "  - pin-shapes\n"
        "  - fold-constants: {max_iterations: 10}\n"
        "  - eliminate-noops\n"
        "  - eliminate-dead-code\n"
        "  - fuse-layernorm\n"
        "  - fuse-gelu\n"
        f"  - fuse-attention: {{mode: {mode}}}\n"
        "  - infer-shapes\n"
        "measure: {enabled: false}\n"
    )
    out = tmp_path / "bert"
    report = compile_model(CompileOptions(source=str(path), output=out, config_path=cfg))
    assert report.graph_verify.ok and report.accuracy.ok
    assert report.accuracy.rtol == 1e-3 and report.accuracy.atol == 1e-4
    stats = {p.name: p.stats for p in report.passes}
    assert stats["fuse-layernorm"] == {"fused": 0}  # the opset-17 export has LayerNormalization already
    assert stats["fuse-gelu"] == {"fused": {f"{MS}.Gelu": BERT["num_hidden_layers"]}}
    # The pipeline feeds an all-ones attention_mask; the artifact must also match with padding masked out.
    import autoglm_compile

    feeds = bert_feeds()
    for got, expected in zip(autoglm_compile.load(out)(feeds), run(onnx.load(str(path)), feeds, optimize=False)):
        np.testing.assert_allclose(got, expected, **FP32)
    optimized = onnx.load(str(out / "model.opt.onnx"))
    if mode == "attention":
        assert stats["fuse-attention"] == {"fused": BERT["num_hidden_layers"]}
        assert ops(optimized).count("Attention") == BERT["num_hidden_layers"]
    else:
        assert stats["fuse-attention"]["scales_folded"] == BERT["num_hidden_layers"]
        assert scale_nodes(optimized) == []


def test_attention_with_expanded_mask_builds_in_tvm_and_matches(tmp_path):
    """A [B, 1, 1, S] mask (transformers 4.x BERT's extended mask) reaches Attention through an Expand: TVM imports and
    builds it, and the artifact matches ONNX Runtime on the unfused block with a mask that hides keys."""
    import autoglm_compile
    from autoglm_compile.pipeline import CompileOptions, compile_model

    model = attention_block(mask_shape=(A_B, 1, 1, A_S))
    onnx.save(model, str(tmp_path / "attention.onnx"))
    cfg = tmp_path / "fuse.yaml"
    cfg.write_text("extends: O2\npasses: [fuse-attention]\nmeasure: {enabled: false}\n")
    report = compile_model(CompileOptions(source=str(tmp_path / "attention.onnx"), output=tmp_path / "out", config_path=cfg))
    assert report.accuracy.ok and report.passes[0].ops_after == {"Attention": 1, "Expand": 1}
    feeds = attention_feeds(model)
    np.testing.assert_allclose(autoglm_compile.load(tmp_path / "out")(feeds)[0], run(model, feeds, optimize=False)[0], **FP32)


# ------------------------------------------------------------------------------------------------ convert-float16

F_IN, F_HID = 32, 64


def fp16_graph(big=None):
    """x -> MatMul -> Add -> Softmax -> MatMul -> Add -> LayerNormalization -> MatMul -> Add -> y.

    The weights are scaled by 1/sqrt(fan-in), so every activation and the output are of order 1."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
        helper.make_node("Softmax", ["a1"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "w2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "b2"], ["a2"], name="add2"),
        helper.make_node("LayerNormalization", ["a2", "gamma", "beta"], ["n"], name="ln", axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["n", "w3"], ["m3"], name="mm3"),
        helper.make_node("Add", ["m3", "b3"], ["y"], name="add3"),
    ]
    b2 = rand(F_HID, 4)
    if big is not None:
        b2[: len(big)] = big
    consts = [
        const("w1", rand((F_IN, F_HID), 1, 2.0 / math.sqrt(F_IN))), const("b1", rand(F_HID, 2)),
        const("w2", rand((F_HID, F_HID), 3, 8.0)), const("b2", b2),
        const("gamma", rand(F_HID, 5, 0.2, 1.0)), const("beta", rand(F_HID, 6, 0.1)),
        const("w3", rand((F_HID, F_IN), 7, 1.0 / math.sqrt(F_HID))), const("b3", rand(F_IN, 8, 0.1)),
    ]
    return make_model(nodes, [tensor("x", [4, F_IN])], [tensor("y", [4, F_IN])], consts)


def fp16_feeds(dtype=np.float32):
    return {"x": rand((4, F_IN), 0).astype(dtype)}


def elem_types(model):
    """Every tensor's element type, after shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    vis = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    types = {v.name: v.type.tensor_type.elem_type for v in vis}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    return types


def node(model, name):
    return next(n for n in model.graph.node if n.name == name)


F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT


def producer_op(model, t):
    return next((n.op_type for n in model.graph.node if t in n.output), None)


def test_convert_float16_keep_io_types():
    model = fp16_graph()
    out, rec = apply(model, "convert-float16")
    onnx.checker.check_model(out, full_check=True)
    assert rec.changed
    assert rec.stats["converted_nodes"] == 6 and rec.stats["kept_fp32"] == {"Softmax": 1, "LayerNormalization": 1}
    assert rec.stats["clamped_values"] == 0
    types = elem_types(out)
    # Names: the original nodes and graph inputs/outputs keep theirs.
    assert {n.name for n in model.graph.node} <= {n.name for n in out.graph.node}
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]
    assert types["x"] == F32 and types["y"] == F32
    for name in ("mm1", "add1", "mm2", "add2", "mm3", "add3"):
        n = node(out, name)
        assert all(types[t] == F16 for t in n.input) and all(types[t] == F16 for t in n.output if t != "y"), name
    for name in ("softmax", "ln"):
        n = node(out, name)
        assert all(types[t] == F32 for t in n.input) and types[n.output[0]] == F32, name
    # Kept nodes read their activations through Casts; the constants they read stay float32 initializers.
    assert producer_op(out, node(out, "softmax").input[0]) == "Cast"
    assert producer_op(out, node(out, "ln").input[0]) == "Cast"
    assert init(out, node(out, "ln").input[1]).dtype == np.float32
    assert producer_op(out, node(out, "mm1").input[0]) == "Cast"  # x is float32
    assert producer_op(out, "y") == "Cast"
    assert ops(out).count("Cast") == rec.stats["casts"] == 6
    # Weights of converted nodes are stored in float16.
    assert init(out, node(out, "mm1").input[1]).dtype == np.float16
    expected, got = run(model, fp16_feeds()), run(out, fp16_feeds())
    assert got[0].dtype == np.float32
    assert np.abs(got[0] - expected[0]).max() > 1e-5  # float16 did run
    np.testing.assert_allclose(got[0], expected[0], **FP16)


def test_convert_float16_keep_fp32_by_node_name():
    model = fp16_graph()
    out, rec = apply(model, "convert-float16", keep_fp32=["mm2"])
    onnx.checker.check_model(out, full_check=True)
    assert rec.stats["converted_nodes"] == 5 and rec.stats["kept_fp32"] == {"Softmax": 1, "MatMul": 1, "LayerNormalization": 1}
    types = elem_types(out)
    mm2 = node(out, "mm2")
    assert all(types[t] == F32 for t in mm2.input) and types[mm2.output[0]] == F32
    assert types[node(out, "mm3").output[0]] == F16
    # The float32 Softmax output feeds the float32 MatMul directly; the float16 Add reads the MatMul through a Cast.
    assert mm2.input[0] == "p" and init(out, mm2.input[1]).dtype == np.float32
    assert producer_op(out, node(out, "add2").input[0]) == "Cast"
    np.testing.assert_allclose(run(out, fp16_feeds())[0], run(model, fp16_feeds())[0], **FP16)


def test_convert_float16_clamps_values_beyond_fp16_range():
    big = np.array([1e5, -7e4, 65504.0, np.inf], np.float32)
    model = fp16_graph(big=big)
    out, rec = apply(model, "convert-float16")
    assert rec.stats["clamped_values"] == 2
    b2 = init(out, node(out, "add2").input[1])
    assert b2.dtype == np.float16 and b2[:4].tolist() == [65504.0, -65504.0, 65504.0, np.inf]
    np.testing.assert_allclose(b2[4:].astype(np.float32), init(model, "b2")[4:], rtol=1e-3, atol=1e-4)


def test_convert_float16_without_keep_io_types():
    model = fp16_graph()
    out, rec = apply(model, "convert-float16", keep_io_types=False)
    onnx.checker.check_model(out, full_check=True)
    types = elem_types(out)
    assert types["x"] == F16 and types["y"] == F16
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]
    assert producer_op(out, node(out, "mm1").input[0]) is None  # reads the float16 input directly
    assert ops(out).count("Cast") == rec.stats["casts"] == 4
    x16 = fp16_feeds(np.float16)["x"]
    got = run(out, {"x": x16})[0]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), run(model, {"x": x16.astype(np.float32)})[0], **FP16)


def test_convert_float16_no_float32():
    nodes = [helper.make_node("Add", ["x", "x"], ["y"], name="add")]
    model = make_model(nodes, [tensor("x", [3], TensorProto.INT64)], [tensor("y", [3], TensorProto.INT64)])
    out, rec = apply(model, "convert-float16")
    assert not rec.changed and ops(out) == ["Add"]
