"""int8 / mixed precision (autoglm_compile/quantize.py, precision.py): calibrated QDQ with ONNX Runtime's tools, the
accuracy budget, accuracy-driven protection, and the exit codes 2 (no calibration data), 3 (default budget unmet)
and 4 (a user's budget unmet). Tiny models built here; each build takes a few seconds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from autoglm_compile import cli
from autoglm_compile.config import load_config
from autoglm_compile.errors import InputError
from autoglm_compile.measure import run_ort
from autoglm_compile.pipeline import CompileOptions, compile_model
from autoglm_compile.precision import budget_value, metric_value, parse_budget
from autoglm_compile.quantize import load_calibration, onnx_opset, prepare
from autoglm_compile.inputs import InputSpec
from conftest import conv_net, make_model

runner = CliRunner(env={"COLUMNS": "200"})
X = InputSpec(name="x", shape=(1, 3, 16, 16), dtype="float32")


def invoke(*args):
    args = [str(a) for a in args]
    return runner.invoke(cli.app, args if args[0] in cli.COMMANDS else ["compile", *args])


def assert_user_error(result, code: int, message: str, hint: str | None = None) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1 and message in lines[errors[0]], result.stderr
    if hint is not None:
        assert hint in lines[errors[0] + 1] and lines[errors[0] + 1].startswith("Hint: "), result.stderr


def sensitive_net() -> onnx.ModelProto:
    """conv -> relu -> (+ offset) -> (- offset) -> conv. The offset holds one value of 1e4: the tensor between the two
    Adds spans [0, 1e4], so uint8 steps of ~40 wipe out its small values, which the second Add recovers in float.
    The Adds are the deliberately sensitive ops; the convs quantize well."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((4, 8, 3, 3)).astype(np.float32) * 0.3
    offset = np.zeros((1, 8, 1, 1), np.float32)
    offset[0, 0, 0, 0] = 1e4
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(offset, "offset"), numpy_helper.from_array(-offset, "neg_offset")]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Add", ["r1", "offset"], ["shifted"], name="sensitive_add"),
        helper.make_node("Add", ["shifted", "neg_offset"], ["back"], name="sensitive_sub"),
        helper.make_node("Conv", ["back", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])
    return make_model(nodes, [x], [y], inits)


def calib_file(path: Path, n: int = 8, seed: int = 1) -> Path:
    """n calibration samples for input x in one .npz (a leading sample dim)."""
    np.savez(path, x=np.random.default_rng(seed).standard_normal((n, 1, 3, 16, 16)).astype(np.float32))
    return path


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# ---------------------------------------------------------------------------------------------- budgets, metrics

@pytest.mark.parametrize("text, metric, op, threshold", [
    ("cosine>=0.995", "cosine", ">=", 0.995),
    (" max-rel <= 0.02 ", "max-rel", "<=", 0.02),
    ("top1-agree>=0.99", "top1-agree", ">=", 0.99),
    ("max-abs<=1e-3", "max-abs", "<=", 1e-3),
])
def test_parse_budget(text, metric, op, threshold):
    b = parse_budget(text)
    assert (b.metric, b.op, b.threshold, b.source) == (metric, op, threshold, "user")


@pytest.mark.parametrize("text, message", [
    ("cosine", "not an accuracy budget"),
    ("psnr>=30", "unknown accuracy metric 'psnr'"),
    ("cosine<=0.9", "cosine is checked with >="),
    ("max-rel>=0.1", "max-rel is checked with <="),
    ("cosine>=1.5", "cosine lies in [-1, 1]"),
    ("max-abs<=-1", "cannot be below 0"),
])
def test_bad_budget(text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_budget(text)


def test_metrics():
    e = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    assert metric_value("cosine", e, 2 * e) == pytest.approx(1.0)
    assert metric_value("cosine", -e, e) == pytest.approx(-1.0)
    assert metric_value("cosine", np.zeros(3), np.zeros(3)) == 1.0 and metric_value("cosine", np.zeros(3), np.ones(3)) == 0.0
    assert metric_value("max-abs", e + 0.5, e) == pytest.approx(0.5)
    assert metric_value("max-rel", e + 0.3, e) == pytest.approx(0.1)  # 0.3 / max|e| = 0.3 / 3
    a = e.copy()
    a[1] = [1.0, 2.0, 3.0]  # row 1's argmax moves from 0 to 2
    assert metric_value("top1-agree", a, e) == 0.5
    b = parse_budget("cosine>=0.99")
    assert budget_value(b, [e, e], [e, -e]) == pytest.approx(-1.0)  # the worst output
    assert b.holds(0.99) and not b.holds(0.98) and not b.holds(float("nan"))
    t = b.tightened(0.1)  # what the protection search holds: 10 % of the way to a perfect value to spare
    assert t.threshold == pytest.approx(0.991) and not t.holds(0.9905) and b.threshold == 0.99
    assert parse_budget("max-rel<=0.02").tightened(0.1).threshold == pytest.approx(0.018)


# ------------------------------------------------------------------------------------------------- config, data

def test_config_precision_section(tmp_path):
    f = tmp_path / "int8.yaml"
    f.write_text("extends: O2\nprecision:\n  mode: int8\n  calibration: {method: entropy, samples: 4}\n  keep_float: [conv1]\n  budget: top1-agree>=0.9\n")
    cfg = load_config(path=f)
    assert cfg.precision == "int8" and cfg.precision_config.calibration.method == "entropy"
    assert cfg.accuracy_budget.text == "top1-agree>=0.9" and cfg.accuracy_budget.source == "user"
    assert cfg.model_dump()["precision"]["keep_float"] == ["conv1"]  # dumped under the YAML key
    assert load_config("O2", precision="int8").accuracy_budget.text == "cosine>=0.99"
    assert load_config("O2", precision="fp16").accuracy_budget.text == "cosine>=0.999"
    assert load_config("O2").accuracy_budget is None  # fp32: rtol/atol
    f.write_text("extends: O2\nprecision: {mode: fp16}\n")
    assert [p.name for p in load_config(path=f).passes][-1] == "convert-float16" and load_config(path=f).precision == "fp16"


@pytest.mark.parametrize("yaml_text, message", [
    ("precision: {mode: int4}\n", "invalid config key 'precision.mode'"),
    ("precision: {budget: cosine<=0.5}\n", "cosine is checked with >="),
    ("precision: {mode: int8, calibraton: {}}\n", "valid keys: mode, calibration, keep_float"),
    ("precision: {mode: fp32}\npasses: [convert-float16]\n", "precision.mode is fp32, but the passes compute in fp16"),
    ("precision: {mode: int8}\npasses: [convert-float16]\n", "precision.mode int8 on a float16 graph"),
    ("precision: {budget: cosine>=0.9}\n", "an accuracy budget applies to fp16, int8 and mixed builds"),
])
def test_bad_precision_config(tmp_path, yaml_text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml_text)
    with pytest.raises(InputError, match=message):
        load_config(path=f)


def test_calibration_data_forms(tmp_path):
    stacked = load_calibration(calib_file(tmp_path / "c.npz", n=5), [X], limit=3)
    assert len(stacked) == 3 and stacked[0]["x"].shape == (1, 3, 16, 16)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(2):
        np.savez(folder / f"{i}.npz", x=np.full((1, 3, 16, 16), i, np.float32))
    assert [float(s["x"].max()) for s in load_calibration(folder, [X], limit=10)] == [0.0, 1.0]


@pytest.mark.parametrize("arrays, message", [
    ({"y": np.zeros((1, 3, 16, 16), np.float32)}, "missing input 'x'"),
    ({"x": np.zeros((1, 3, 16, 16), np.float64)}, "input 'x' is float64, the model takes float32"),
    ({"x": np.zeros((1, 3, 8, 8), np.float32)}, "input 'x' has shape [1, 3, 8, 8]"),
    ({"x": np.zeros((1, 3, 16, 16), np.float32), "z": np.zeros(1)}, "'z' is not a model input"),
])
def test_bad_calibration_data(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_calibration(tmp_path / "bad.npz", [X], limit=8)


def test_prepare_upgrades_the_opset_for_per_channel(tmp_path):
    model = conv_net(batch=1)
    model.opset_import[0].version = 12
    prepared, _ = prepare(model, per_channel=True, ir_version=8, folder=tmp_path)
    assert onnx_opset(prepared) == 13 and {o.domain for o in prepared.opset_import} == {""}  # unused domains dropped
    assert all(n.name for n in prepared.graph.node)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(prepared, feeds)[0], run_ort(model, feeds)[0], rtol=1e-5, atol=1e-5)
    kept, _ = prepare(model, per_channel=False, ir_version=8, folder=tmp_path)
    assert onnx_opset(kept) == 12


def test_local_sqnr_and_contributions(tmp_path):
    """The two measures behind the protection, on the sensitive net: each tensor's own quantization SQNR (checked
    against numpy here) and its contribution (output cosine with only it quantized), which singles out 'shifted'
    where the SQNR does not (the 1e4 channel dominates its norm)."""
    from autoglm_compile.quantize import FEW_LEVELS, FLUSHED, activation_qparams, activation_stats, contributions, quantize

    prepared, path = prepare(sensitive_net(), per_channel=True, ir_version=8, folder=tmp_path)
    samples = load_calibration(calib_file(tmp_path / "c.npz"), [X], limit=8)
    qdq = quantize(path, tmp_path / "q.onnx", samples, tmp_path / "cache.json", "minmax", True, [], 8)
    qparams = activation_qparams(qdq, prepared)
    assert set(qparams) == {"x", "r1", "shifted", "back", "y"}  # quantize_static drops the Relu (its QuantizeLinear clamps); y: the output
    feed = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    sqnr, flushed, levels = activation_stats(prepared, qparams, feed)
    scale, zp = qparams["x"]
    x = feed["x"].astype(np.float64)
    fq = (np.clip(np.round(x / float(scale)) + float(zp), 0, 255) - float(zp)) * float(scale)
    assert sqnr["x"] == pytest.approx(20 * np.log10(np.linalg.norm(x) / np.linalg.norm(x - fq)))
    alone = contributions(prepared, list(qparams), qparams, feed)
    assert min(alone, key=alone.get) == "shifted" and alone["shifted"] < 0.5 and min(v for k, v in alone.items() if k != "shifted") > 0.999
    assert max(sqnr, key=sqnr.get) == "shifted"
    # ... and the flushed share does: the 1e4 channel stretches the range so that the other channels quantize to 0
    assert [t for t in qparams if flushed[t] >= FLUSHED] == ["shifted"] and flushed["x"] < 0.05
    assert levels["shifted"] <= FEW_LEVELS < min(levels[t] for t in ("x", "r1"))


def test_float_tensors_removes_only_their_pairs(tmp_path):
    """float_tensors leaves the named activations in float and every other quantization as it was: with every
    activation in float, the model computes the float net on the int8-rounded weights (the Relu is still there, so
    nothing relied on a removed QuantizeLinear to clamp)."""
    from autoglm_compile.quantize import activation_qparams, float_tensors, quantize

    prepared, path = prepare(sensitive_net(), per_channel=True, ir_version=8, folder=tmp_path)
    samples = load_calibration(calib_file(tmp_path / "c.npz"), [X], limit=8)
    assert "Relu" not in ops(quantize(path, tmp_path / "d.onnx", samples, tmp_path / "cache.json", "minmax", True, [], 8))  # dropped by default
    qdq = quantize(path, tmp_path / "q.onnx", samples, tmp_path / "cache.json", "minmax", True, [], 8, keep_activations=True)
    acts = list(activation_qparams(qdq, prepared))
    one = float_tensors(qdq, ["shifted"])
    quantized = lambda m: sorted(n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear")  # noqa: E731
    assert quantized(one) == sorted(t for t in quantized(qdq) if t != "shifted")
    onnx.checker.check_model(one)
    none = float_tensors(qdq, acts)
    assert quantized(none) == [] and "Relu" in ops(none)
    feed = {"x": np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    w_dq = {n.output[0]: (inits[n.input[0]].astype(np.float32) * inits[n.input[1]].reshape(-1, 1, 1, 1)) for n in qdq.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4}
    rounded = onnx.ModelProto()
    rounded.CopyFrom(prepared)
    for init in rounded.graph.initializer:
        if init.name in ("w1", "w2"):
            init.CopyFrom(numpy_helper.from_array(w_dq[f"{init.name}_DequantizeLinear_Output"], init.name))
    np.testing.assert_allclose(run_ort(none, feed)[0], run_ort(rounded, feed)[0], rtol=1e-4, atol=1e-3)


def test_float_tensors_with_the_weights_is_the_float_model(tmp_path):
    """The weights are candidates too (quantized_weights: each with its quantization SQNR): with every activation and
    every weight in float, the QDQ model computes the prepared float model; with one weight in float, only that
    weight's DequantizeLinear is gone and its reader reads the float initializer."""
    from autoglm_compile.quantize import activation_qparams, float_tensors, quantize, quantized_weights

    prepared, path = prepare(sensitive_net(), per_channel=True, ir_version=8, folder=tmp_path)
    samples = load_calibration(calib_file(tmp_path / "c.npz"), [X], limit=8)
    qdq = quantize(path, tmp_path / "q.onnx", samples, tmp_path / "cache.json", "minmax", True, [], 8, keep_activations=True)
    weights = quantized_weights(qdq, prepared)
    assert {"w1", "w2"} <= set(weights)
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    w1 = numpy_helper.to_array(next(i for i in prepared.graph.initializer if i.name == "w1")).astype(np.float64)
    rounded = inits["w1_quantized"].astype(np.float64) * inits["w1_scale"].reshape(-1, 1, 1, 1)
    assert weights["w1"] == pytest.approx(20 * np.log10(np.linalg.norm(w1) / np.linalg.norm(w1 - rounded)))
    one = float_tensors(qdq, ["w1"], prepared)
    onnx.checker.check_model(one)
    dequantized = lambda m: sorted(n.input[0] for n in m.graph.node if n.op_type == "DequantizeLinear")  # noqa: E731
    assert dequantized(one) == sorted(t for t in dequantized(qdq) if t != "w1_quantized")
    assert "w1" in {i.name for i in one.graph.initializer} and any("w1" in n.input for n in one.graph.node if n.op_type == "Conv")
    everything = float_tensors(qdq, list(activation_qparams(qdq, prepared)) + list(weights), prepared)
    assert [n for n in everything.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")] == []
    feed = {"x": np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(everything, feed)[0], run_ort(prepared, feed)[0], rtol=1e-5, atol=1e-5)


def test_search_keeps_what_breaks_the_budget_even_when_errors_do_not_add_up():
    """search() on a made-up metric: 'bad' breaks the budget alone; 'p' and 'q' only together (each alone is fine),
    so one of them stays in float; the 5 others are harmless. Every accepted step holds, and the trial cap leaves
    the rest in float."""
    from autoglm_compile.quantize import search

    budget = parse_budget("cosine>=0.99")
    harmless = [f"h{i}" for i in range(5)]
    order = harmless + ["p", "q", "bad"]

    def measure(floats):
        quantized = set(order) - set(floats)
        return 0.9 if "bad" in quantized else 0.95 if {"p", "q"} <= quantized else 0.999 - 0.0001 * len(quantized)

    floats, value, trials, failed = search(order, measure, budget, max_trials=100, note=lambda _m: None)
    assert sorted(floats) == ["bad", "q"] and value == measure(floats) and budget.holds(value)
    assert set(failed) == {"bad", "q"} and failed["bad"][1] == 0.9 and failed["q"][1] == 0.95
    assert trials[0] == (order, 0.999)
    for t, (k, v) in failed.items():  # the trial that kept t in float quantized it, and missed the budget
        fl, tv = trials[k - 1]
        assert t not in fl and tv == v == measure(fl) and not budget.holds(v)
    assert len(trials) < 2 * len(order)
    floats, value, trials, _ = search(order, measure, budget, max_trials=2, note=lambda _m: None)
    assert len(trials) == 2 and budget.holds(value) and len(floats) < len(order)


# ------------------------------------------------------------------------------------------------------ builds

def test_qdq_round_trip_tiny_conv(tmp_path):
    """Calibrated on data, quantized per channel, built with TVM, run from the folder, checked with the budget."""
    src = tmp_path / "conv.onnx"
    onnx.save(conv_net(batch=1), str(src))
    out = tmp_path / "out"
    report = compile_model(CompileOptions(source=str(src), output=out, runs=1, precision="int8", calib_data=calib_file(tmp_path / "c.npz")))
    q = report.quantization
    assert report.precision == "int8" and q.ok and q.calibration.representative and q.calibration.samples == 8
    assert q.per_channel and q.quantized_nodes >= 2
    from autoglm_compile.int8_kernels import int8_dot_product
    from autoglm_compile.tvm_build import make_target
    from autoglm_compile.target import resolve_target

    if int8_dot_product(make_target(resolve_target("host"))):  # int8_kernels.py: the Conv and the Gemm in int8
        assert q.int8_kernels.startswith("1 Conv and 1 MatMul/Gemm as int8 x int8 -> int32"), q.int8_kernels
    else:
        assert q.int8_kernels.startswith("no: the target has no int8 dot product"), q.int8_kernels
    assert report.accuracy.ok and report.accuracy.budget.text == "cosine>=0.99" and report.accuracy.outputs[0].metric >= 0.99
    assert report.baseline.runtime.endswith("the QDQ model, model.opt.onnx)")
    qdq = onnx.load(str(out / "model.opt.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= set(ops(qdq))
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    weight_dq = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None and inits[n.input[0]].ndim == 4]
    assert weight_dq and inits[weight_dq[0].input[0]].dtype == np.int8 and inits[weight_dq[0].input[1]].shape == (8,)  # per channel
    # The artifact (TVM, QDQ simulated in float) agrees with ONNX Runtime's int8 kernels on the same QDQ model.
    from autoglm_compile.runtime import load

    feeds = dict(np.load(out / "verify" / "inputs.npz"))
    ours, ort = load(out)(feeds)[0], run_ort(qdq, feeds)[0]
    assert metric_value("cosine", ours, ort) > 0.999
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verify"]["budget"]["metric"] == "cosine"
    result = invoke("run", out, "--check")
    assert result.exit_code == 0 and "budget cosine>=0.99 (default for int8)" in result.stderr and "PASS" in result.stderr


@pytest.mark.parametrize("scan", [128, 1])
def test_sensitive_op_ends_up_in_float(tmp_path, scan):
    """The Adds around the 1e4 offset are kept in float by the protection; the convs stay int8. With scan 1 the one
    tensor measured is the flushed one (its SQNR is the best of the four)."""
    src = tmp_path / "sensitive.onnx"
    onnx.save(sensitive_net(), str(src))
    cfg = tmp_path / "int8.yaml"
    cfg.write_text(f"extends: O2\nprecision: {{mode: int8, scan: {scan}}}\n")
    out = tmp_path / "out"
    report = compile_model(CompileOptions(source=str(src), output=out, runs=1, config_path=cfg, calib_data=calib_file(tmp_path / "c.npz")))
    q = report.quantization
    assert q.value_before < 0.99 <= q.value and q.ok and len(q.rounds) >= 3 and not q.rounds[0].holds and q.rounds[1].holds
    assert q.rounds[1].tensors == 6 and min(r.tensors for r in q.rounds if r.holds) == 1  # all in float, then only 'shifted'
    assert q.candidates == 6 and q.scanned == min(scan, 6)  # x, c1, r1, shifted, back, y
    protected = {p.name: p for p in q.protected}
    assert "sensitive_add" in protected and protected["sensitive_add"].tensor == "shifted"
    assert protected["sensitive_add"].alone_cosine < 0.99 and protected["sensitive_add"].local_sqnr_db is not None
    assert "conv1" not in protected and "conv2" not in protected
    qdq = onnx.load(str(out / "model.opt.onnx"))
    quantized = {o for n in qdq.graph.node if n.op_type == "QuantizeLinear" for o in n.input[:1]}
    assert "shifted" not in quantized and "x" in quantized  # the sensitive tensor is float, the input int8
    assert report.accuracy.ok and "Nodes kept in float" in (out / "report.md").read_text()


def test_a_weight_that_int8_breaks_stays_float(tmp_path):
    """A 1x1 conv whose output channels each have one weight of 100 on an input channel that a mask zeroes: per
    channel, int8 rounds its other weights (about 0.5) to multiples of 100/127, so the int8 weights alone miss the
    budget with every activation in float. The search then takes the weights as candidates too and keeps this one
    in float; the conv's activations stay int8."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((8, 4, 1, 1)) * 0.5).astype(np.float32)
    w[:, 0] = 100.0
    mask = np.array([0, 1, 1, 1], np.float32).reshape(1, 4, 1, 1)
    nodes = [helper.make_node("Mul", ["x", "mask"], ["masked"], name="mask_mul"), helper.make_node("Conv", ["masked", "w"], ["y"], name="conv")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
                       [numpy_helper.from_array(mask, "mask"), numpy_helper.from_array(w, "w")], opset=13)
    src = tmp_path / "weight.onnx"
    onnx.save(model, str(src))
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((8, 1, 4, 8, 8)).astype(np.float32))
    out = tmp_path / "out"
    report = compile_model(CompileOptions(source=str(src), output=out, runs=1, precision="int8", calib_data=tmp_path / "c.npz"))
    q = report.quantization
    assert q.value_before < 0.99 <= q.value and q.ok and "the weights were candidates too" in q.search_budget
    assert [(p.name, p.tensor) for p in q.protected if p.tensor == "w"] == [("conv", "w")]
    qdq = onnx.load(str(out / "model.opt.onnx"))
    conv = next(n for n in qdq.graph.node if n.op_type == "Conv")
    assert conv.input[1] == "w" and conv.input[0].endswith("_DequantizeLinear_Output")  # float weight, int8 activation
    assert report.accuracy.ok


def test_keep_float_by_op_type(tmp_path):
    src = tmp_path / "conv.onnx"
    onnx.save(conv_net(batch=1), str(src))
    cfg = tmp_path / "int8.yaml"
    cfg.write_text("extends: O2\nprecision: {keep_float: [Gemm], max_rounds: 0}\n")
    report = compile_model(CompileOptions(source=str(src), output=tmp_path / "out", runs=1, config_path=cfg, precision="int8",
                                          calib_data=calib_file(tmp_path / "c.npz")))
    assert [(p.name, p.op, p.reason) for p in report.quantization.protected] == [("gemm", "Gemm", "keep_float in the config")]
    qdq = onnx.load(str(tmp_path / "out" / "model.opt.onnx"))
    gemm = next(n for n in qdq.graph.node if n.op_type == "Gemm")
    assert gemm.input[1] == "fc"  # its weight stays float


# --------------------------------------------------------------------------------------------------- exit codes

@pytest.fixture
def sensitive_onnx(tmp_path) -> Path:
    path = tmp_path / "sensitive.onnx"
    onnx.save(sensitive_net(), str(path))
    return path


def test_exit_2_without_calibration_data(sensitive_onnx, tmp_path):
    assert_user_error(invoke(sensitive_onnx, "-o", tmp_path / "o", "--precision", "int8"), 2, "--precision int8 needs calibration data", "--calib-data")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message, hint", [
    (["--precision", "int8", "--calib-synthetic", "--calib-method", "kl"], "unknown --calib-method 'kl'", "minmax, entropy, percentile"),
    (["--calib-synthetic"], "--calib-synthetic applies to int8 and mixed builds", "--precision int8"),
    (["--accuracy-budget", "cosine>=0.9"], "--accuracy-budget applies to fp16, int8 and mixed builds", "--max-error"),
    (["--precision", "int8", "--calib-synthetic", "--accuracy-budget", "snr>=3"], "unknown accuracy metric 'snr'", "cosine>=0.995"),
    (["--precision", "int8", "--calib-data", "missing.npz"], "--calib-data missing.npz: no such file or folder", "--calib-synthetic"),
    (["--precision", "int4"], "unknown precision 'int4'", "fp32, fp16, int8, mixed"),
])
def test_exit_2_bad_precision_options(sensitive_onnx, tmp_path, args, message, hint):
    assert_user_error(invoke(sensitive_onnx, "-o", tmp_path / "o", *args), 2, message, hint)


def test_exit_3_default_budget_unmet(sensitive_onnx, tmp_path):
    cfg = tmp_path / "noprotect.yaml"
    cfg.write_text("extends: O2\nprecision: {max_rounds: 0}\n")
    result = invoke(sensitive_onnx, "-o", tmp_path / "o", "--config", cfg, "--precision", "int8", "--calib-data", calib_file(tmp_path / "c.npz"))
    assert_user_error(result, 3, "the accuracy budget cosine>=0.99 (default for int8) is not met", "--calib-data")
    assert not (tmp_path / "o").exists()


def test_exit_4_user_budget_unmet(sensitive_onnx, tmp_path):
    cfg = tmp_path / "noprotect.yaml"
    cfg.write_text("extends: O2\nprecision: {max_rounds: 0}\n")
    out = tmp_path / "o"
    result = invoke(sensitive_onnx, "-o", out, "--config", cfg, "--precision", "int8", "--calib-data", calib_file(tmp_path / "c.npz"),
                    "--accuracy-budget", "cosine>=0.995", "--runs", "1")
    assert_user_error(result, 4, "misses the accuracy budget", "the artifact was written")
    report = json.loads((out / "report.json").read_text())
    assert report["result"] == "budget-failed" and report["quantization"]["ok"] is False
    assert report["quantization"]["budget"] == "cosine>=0.995 (given by the user)"


def test_int8_for_an_npu_target_is_the_qdq_onnx(tmp_path):
    """Vendor-onnx: the QDQ ONNX at the vendor's opset (11: per-tensor weights, with a warning), verified on ONNX
    Runtime CPU with the budget, which runner.py --check uses too."""
    src = tmp_path / "conv.onnx"
    onnx.save(conv_net(batch=1), str(src))
    out = tmp_path / "npu"
    report = compile_model(CompileOptions(source=str(src), target="ascend-910b", output=out, precision="int8", calib_data=calib_file(tmp_path / "c.npz")))
    q = report.quantization
    assert q.ok and not q.per_channel and q.int8_kernels.startswith("the vendor runtime's")
    assert any("per-channel weights need opset 13" in w for w in report.warnings)
    model = onnx.load(str(out / "model.onnx"))
    assert onnx_opset(model) == 11 and "QuantizeLinear" in ops(model)
    assert report.accuracy.ok and report.accuracy.budget.text == "cosine>=0.99"
    assert json.loads((out / "runner.json").read_text())["verify"]["budget"]["threshold"] == 0.99


def test_calibration_methods_differ(tmp_path):
    """minmax takes the whole range; entropy (2048 bins into 128) and percentile (99.999th) clip it, so their
    scales for the Relu output are no larger, and entropy's is smaller on normal data."""
    from autoglm_compile.quantize import activation_qparams, quantize

    prepared, path = prepare(conv_net(batch=1), per_channel=True, ir_version=8, folder=tmp_path)
    samples = load_calibration(calib_file(tmp_path / "c.npz"), [X], limit=8)
    scale = {}
    for method in ("minmax", "entropy", "percentile"):
        qdq = quantize(path, tmp_path / f"{method}.onnx", samples, tmp_path / f"{method}.json", method, True, [], 8)
        scale[method] = float(activation_qparams(qdq, prepared)["r"][0])
    assert scale["entropy"] < scale["minmax"] and scale["percentile"] <= scale["minmax"]


def test_mixed_with_synthetic_calibration_json(tmp_path):
    """mixed on the host (no fp16): int8 where the budget allows, float32 elsewhere; synthetic calibration is marked
    not representative; --json stdout stays one JSON document (ONNX Runtime's calibrator prints are kept off it)."""
    src = tmp_path / "conv.onnx"
    onnx.save(conv_net(batch=1), str(src))
    result = invoke(src, "-o", tmp_path / "o", "--precision", "mixed", "--calib-synthetic", "--runs", "1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    q = report["quantization"]
    assert report["precision"] == "mixed" and q["mode"] == "mixed" and q["format"].endswith("float32 elsewhere")
    assert q["calibration"]["representative"] is False and q["calibration"]["samples"] == 32
    assert any("synthetic random data" in w for w in report["warnings"])


def test_config_int8_wins_over_the_npu_fp16_preference(tmp_path):
    from autoglm_compile.pipeline import resolve_config
    from autoglm_compile.target import resolve_target

    cfg = tmp_path / "int8.yaml"
    cfg.write_text("extends: O2\nprecision: {mode: int8, calibration: {synthetic: true}}\n")
    target = resolve_target("ascend-910b")  # prefer_fp16: fp16 unless told otherwise
    assert resolve_config(CompileOptions(source="m.onnx", config_path=cfg), target).precision == "int8"
    assert resolve_config(CompileOptions(source="m.onnx"), target).precision == "fp16"


def masked_net() -> onnx.ModelProto:
    """x + an additive attention mask holding -3.4e38 (as in every transformers export), then Softmax."""
    mask = np.zeros((1, 3, 16, 16), np.float32)
    mask[..., :4] = np.finfo(np.float32).min
    nodes = [helper.make_node("Add", ["x", "mask"], ["masked"], name="mask_add"), helper.make_node("Softmax", ["masked"], ["y"], name="softmax", axis=-1)]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 16, 16])], [numpy_helper.from_array(mask, "mask")])


def test_entropy_calibration_takes_minmax_for_a_mask(tmp_path):
    """ONNX Runtime's entropy histogram cannot hold a tensor reaching -3.4e38 (it failed: "Too many bins for data
    range"): that tensor gets MinMax's range, the others entropy's clipped one."""
    from autoglm_compile.quantize import activation_qparams, calibrate, quantize

    prepared, path = prepare(masked_net(), per_channel=True, ir_version=8, folder=tmp_path)
    samples = load_calibration(calib_file(tmp_path / "c.npz"), [X], limit=8)
    assert calibrate(path, samples, "entropy", tmp_path / "entropy.json") == ["masked"]
    scale = {m: activation_qparams(quantize(path, tmp_path / f"{m}.onnx", samples, tmp_path / f"{m}.json", m, True, [], 8), prepared)
             for m in ("entropy", "minmax")}
    assert scale["entropy"]["masked"][0] == scale["minmax"]["masked"][0] > 1e35
    assert scale["entropy"]["x"][0] < scale["minmax"]["x"][0]


def test_entropy_calibration_of_a_masked_model_builds(tmp_path):
    src = tmp_path / "masked.onnx"
    onnx.save(masked_net(), str(src))
    result = invoke(src, "--precision", "int8", "--calib-data", calib_file(tmp_path / "c.npz"), "--calib-method", "entropy", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert any(w.startswith("--calib-method entropy: 1 tensor(s) reach 1e+38") and "(masked)" in w for w in report["warnings"])
    assert report["quantization"]["calibration"]["method"] == "entropy"
