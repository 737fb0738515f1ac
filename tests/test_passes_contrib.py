"""Contrib and integer ops (issue 7): decompose-contrib on tiny graphs (the exact nodes after it, equal outputs under
ONNX Runtime, changed=False when nothing has a rewrite), then quantized and ORT-optimized models through the
pipeline: what TVM cannot take runs on ONNX Runtime, the report shows the split, and `run --check` matches.

The models come from onnxruntime.quantization (quantize_dynamic: DynamicQuantizeLinear, MatMulInteger, ConvInteger;
quantize_static in QOperator format: QLinearConv, QLinearMatMul) and from ONNX Runtime's own graph optimizer
(ORT_ENABLE_EXTENDED writes com.microsoft FusedConv, DynamicQuantizeMatMul).
Tolerances: the rewrites compute the same arithmetic, in another kernel: rtol 1e-5, atol 1e-5. Integer results
are exact."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from autoglm_compile.cli import app
from autoglm_compile.config import PassSpec
from autoglm_compile.pass_manager import PassContext, run_passes
from autoglm_compile.pipeline import CompileOptions, compile_model

from conftest import IR_VERSION

TOL = dict(rtol=1e-5, atol=1e-5)
MS = "com.microsoft"
runner = CliRunner()


def w(name, shape, seed, dtype=np.float32):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(dtype), name)


def model_of(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "contrib", inputs, outputs, initializer=list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])
    m.ir_version = IR_VERSION
    return m


def vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def apply(model, **options):
    out, records = run_passes(model, [PassSpec(name="decompose-contrib", options=options)], PassContext())
    return out, records[0]


def ops(model):
    return [(f"{n.domain}." if n.domain else "") + n.op_type for n in model.graph.node]


def run(model, feeds):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def feeds_of(model, seed=0):
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32) for i in model.graph.input}


def assert_same(before, after, tol=TOL):
    feeds = feeds_of(before)
    for a, b in zip(run(before, feeds), run(after, feeds)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(b, a, **tol)


# ---------------------------------------------------------------------------------------------- decompose-contrib

@pytest.mark.parametrize("activation, params, tail", [
    ("Relu", [], ["Relu"]), ("Sigmoid", [], ["Sigmoid"]), ("LeakyRelu", [0.1], ["LeakyRelu"]),
    ("Clip", [-0.5, 0.5], ["Clip"]), ("HardSigmoid", [0.2, 0.5], ["HardSigmoid"]), ("", [], [])])
def test_fused_conv_becomes_conv_add_activation(activation, params, tail):
    attrs = {"pads": [1, 1, 1, 1], "activation": activation} if activation else {"pads": [1, 1, 1, 1]}
    if params:
        attrs["activation_params"] = params
    nodes = [helper.make_node("FusedConv", ["x", "w", "b", "z"], ["y"], name="fc", domain=MS, **attrs)]
    model = model_of(nodes, [vi("x", [1, 3, 6, 6]), vi("z", [1, 4, 6, 6])], [vi("y", [1, 4, 6, 6])], [w("w", (4, 3, 3, 3), 0), w("b", (4,), 1)])
    out, rec = apply(model)
    assert ops(out) == ["Conv", "Add"] + tail
    assert rec.changed and rec.stats == {"decomposed": {"FusedConv": 1}, "left": {}}
    assert out.graph.node[-1].output == ["y"]
    assert_same(model, out)


def test_fused_gemm_and_fused_matmul_and_quick_gelu():
    nodes = [
        helper.make_node("FusedGemm", ["x", "w", "c"], ["g"], name="fg", domain=MS, activation="Tanh", transB=1, alpha=0.5),
        helper.make_node("FusedMatMul", ["g", "m"], ["h"], name="fm", domain=MS, transB=1, alpha=2.0),
        helper.make_node("QuickGelu", ["h"], ["y"], name="qg", domain=MS, alpha=1.5),
    ]
    inits = [w("w", (8, 6), 0), w("c", (8,), 1), w("m", (5, 8), 2)]
    model = model_of(nodes, [vi("x", [3, 6])], [vi("y", [3, 5])], inits)
    out, rec = apply(model)
    # The Transpose of the constant weight may sort anywhere before its MatMul.
    assert sorted(ops(out)) == sorted(["Gemm", "Tanh", "Transpose", "MatMul", "Mul", "Mul", "Sigmoid", "Mul"])
    assert [n.op_type for n in out.graph.node if n.op_type != "Transpose"] == ["Gemm", "Tanh", "MatMul", "Mul", "Mul", "Sigmoid", "Mul"]
    assert rec.stats["decomposed"] == {"FusedGemm": 1, "FusedMatMul": 1, "QuickGelu": 1}
    assert_same(model, out)


def dqmm_model(per_column: bool, bias: bool):
    rng = np.random.default_rng(3)
    n = 6
    inits = [numpy_helper.from_array(rng.integers(-128, 127, (8, n)).astype(np.int8), "wq"),
             numpy_helper.from_array((rng.random(n if per_column else ()) * 0.02 + 0.01).astype(np.float32), "ws"),
             numpy_helper.from_array(rng.integers(-3, 3, n if per_column else ()).astype(np.int8), "wz")]
    ins = ["x", "wq", "ws", "wz"]
    if bias:
        inits.append(w("bias", (n,), 4))
        ins.append("bias")
    nodes = [helper.make_node("DynamicQuantizeMatMul", ins, ["y"], name="dqmm", domain=MS)]
    return model_of(nodes, [vi("x", [2, 3, 8])], [vi("y", [2, 3, n])], inits)


@pytest.mark.parametrize("per_column, bias", [(False, False), (True, True)])
def test_dynamic_quantize_matmul_becomes_standard_integer_ops(per_column, bias):
    model = dqmm_model(per_column, bias)
    out, rec = apply(model)
    assert ops(out) == ["DynamicQuantizeLinear", "MatMulInteger", "Mul", "Cast", "Mul"] + (["Add"] if bias else [])
    assert_same(model, out)


def test_matmul_integer_to_float_without_a_zero_point():
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.integers(0, 255, (8, 4)).astype(np.uint8), "b"),
             numpy_helper.from_array(np.float32(0.05), "as"), numpy_helper.from_array(np.full(4, 0.01, np.float32), "bs"),
             numpy_helper.from_array(np.full(4, 7, np.uint8), "bz")]
    nodes = [helper.make_node("MatMulIntegerToFloat", ["a", "b", "as", "bs", "", "bz"], ["y"], name="mitf", domain=MS)]
    model = model_of(nodes, [vi("a", [3, 8], TensorProto.UINT8)], [vi("y", [3, 4])], inits)
    out, rec = apply(model)
    assert ops(out) == ["MatMulInteger", "Mul", "Cast", "Mul"]
    assert list(out.graph.node[0].input) == ["a", "b", "", "bz"]
    feeds = {"a": np.random.default_rng(6).integers(0, 255, (3, 8)).astype(np.uint8)}
    np.testing.assert_allclose(run(out, feeds)[0], run(model, feeds)[0], **TOL)


@pytest.mark.parametrize("case", ["unknown-activation", "trans-batch", "gemm-activation-with-params", "other-contrib", "not-selected"])
def test_contrib_ops_without_a_rewrite_are_left(case):
    options = {}
    if case == "unknown-activation":
        node = helper.make_node("FusedConv", ["x", "w"], ["y"], domain=MS, activation="Elu", activation_params=[1.0])
    elif case == "trans-batch":
        node = helper.make_node("FusedMatMul", ["x", "w"], ["y"], domain=MS, transBatchA=1)
    elif case == "gemm-activation-with-params":
        node = helper.make_node("FusedGemm", ["x", "w"], ["y"], domain=MS, activation="LeakyRelu", activation_alpha=0.1)
    elif case == "other-contrib":
        node = helper.make_node("BiasGelu", ["x", "w"], ["y"], domain=MS)
    else:
        node = helper.make_node("QuickGelu", ["x"], ["y"], domain=MS)
        options = {"ops": ["FusedConv"]}
    model = model_of([node], [vi("x", [1, 3, 4, 4])], [vi("y", None)], [w("w", (4, 3, 1, 1), 0)])
    out, rec = apply(model, **options)
    assert not rec.changed and ops(out) == ops(model)


def test_unknown_op_option_is_an_input_error():
    from autoglm_compile.errors import InputError

    with pytest.raises(InputError, match="decompose-contrib"):
        apply(model_of([], [vi("x", [1])], [vi("x", [1])]), ops=["Attention"])


# ------------------------------------------------------------------------------------------ through the pipeline

def float_model(kind: str) -> onnx.ModelProto:
    if kind == "matmul":
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"), helper.make_node("Relu", ["a"], ["r"], name="relu"),
                 helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
        ins, outs, inits = [vi("x", [4, 16])], [vi("y", [4, 8])], [w("w1", (16, 32), 0), w("w2", (32, 8), 1)]
    else:
        nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", ["a"], ["r"], name="relu"), helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
        ins, outs, inits = [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, 8, 8])], [w("w1", (8, 3, 3, 3), 0), w("b1", (8,), 2), w("w2", (4, 8, 1, 1), 1)]
    graph = helper.make_graph(nodes, kind, ins, outs, initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = IR_VERSION
    return m


def quantized(tmp_path, kind: str, how: str):
    """A tiny model quantized by onnxruntime.quantization: 'dynamic' or 'static' (QOperator format)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    src, dst = tmp_path / f"{kind}.onnx", tmp_path / f"{kind}.{how}.onnx"
    model = float_model(kind)
    onnx.save(model, str(src))
    if how == "dynamic":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QUInt8)
    else:
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter([{"x": np.random.default_rng(i).standard_normal(shape).astype(np.float32)} for i in range(4)])

            def get_next(self):
                return next(self.it, None)

        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QOperator)
    return dst


def ort_optimized(src, dst):
    """The model as ONNX Runtime's extended graph optimizations save it (com.microsoft fused ops)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return dst


def build_and_check(path, out, preset="O2"):
    report = compile_model(CompileOptions(source=str(path), output=out, preset=preset, runs=2))
    assert report.accuracy is not None and report.accuracy.ok
    res = runner.invoke(app, ["run", str(out), "--check"])
    assert res.exit_code == 0, res.output
    return report


@pytest.mark.parametrize("kind, how, fallback", [
    ("conv", "dynamic", {"ConvInteger": 2}),  # DynamicQuantizeLinear and its Muls on TVM, ConvInteger on ONNX Runtime
    ("matmul", "static", {"QLinearMatMul": 2}),  # QuantizeLinear/DequantizeLinear on TVM
    ("conv", "static", {"QLinearConv": 2}),
])
def test_integer_ops_without_a_converter_run_on_onnxruntime(tmp_path, kind, how, fallback):
    path = quantized(tmp_path, kind, how)
    report = build_and_check(path, tmp_path / "out")
    fb = report.fallback
    assert fb is not None
    got: dict[str, int] = {}
    for n in fb.fallback_nodes:
        got[n.op] = got.get(n.op, 0) + 1
    assert got == fallback
    assert fb.nodes["onnxruntime"] == sum(fallback.values()) and fb.nodes["tvm"] > 0
    assert [s.backend for s in fb.segments][:2] == ["tvm", "onnxruntime"]
    assert "## Backends (--fallback onnxruntime)" in (tmp_path / "out" / "report.md").read_text()


def test_dynamic_quantized_matmul_runs_on_tvm(tmp_path):
    """DynamicQuantizeLinear and MatMulInteger have TVM converters: nothing falls back."""
    path = quantized(tmp_path, "matmul", "dynamic")
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {n.op_type for n in onnx.load(str(path)).graph.node}
    report = build_and_check(path, tmp_path / "out")
    assert report.fallback is None


def test_ort_optimized_contrib_ops_are_decomposed_onto_tvm(tmp_path):
    """ONNX Runtime's optimizer fuses the dynamic quantization into com.microsoft.DynamicQuantizeMatMul: O2's
    decompose-contrib writes it back as standard ops, so all of it runs on TVM. Without the pass (O1) the two
    nodes run on ONNX Runtime."""
    path = ort_optimized(quantized(tmp_path, "matmul", "dynamic"), tmp_path / "opt.onnx")
    assert ops(onnx.load(str(path))).count(f"{MS}.DynamicQuantizeMatMul") == 2
    report = build_and_check(path, tmp_path / "o2")
    assert report.fallback is None
    assert next(p for p in report.passes if p.name == "decompose-contrib").stats["decomposed"] == {"DynamicQuantizeMatMul": 2}
    report = build_and_check(path, tmp_path / "o1", preset="O1")
    assert [(n.op, n.domain) for n in report.fallback.fallback_nodes] == [("DynamicQuantizeMatMul", MS)] * 2
