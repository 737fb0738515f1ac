"""--sample-inputs and --input-value: user inputs replace the random ones; bad ones exit 2 naming the input."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from autoglm_compile.cli import app
from autoglm_compile.errors import InputError
from autoglm_compile.inputs import InputSpec
from autoglm_compile.samples import check_samples, freeze_inputs, load_samples, sample_shapes

from conftest import conv_net, make_model

runner = CliRunner()


def _conv_sample(path, batch=1, dtype=np.float32, name="x", seed=1):
    x = np.random.default_rng(seed).standard_normal((batch, 3, 16, 16)).astype(dtype)
    np.savez(path, **{name: x})
    return x


def gated_model() -> onnx.ModelProto:
    """y = If(mode > 0, x * 2, x + 1): the branch depends on a scalar input `mode`."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    zero = numpy_helper.from_array(np.array(0, np.int64), "zero")
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["t"])], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 3])])
    else_g = helper.make_graph([helper.make_node("Add", ["x", "one"], ["e"])], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])])
    nodes = [
        helper.make_node("Greater", ["mode", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    mode = helper.make_tensor_value_info("mode", TensorProto.INT64, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    return make_model(nodes, [x, mode], [y], [two, one, zero])


# ------------------------------------------------------------------------------------------------ unit level

def test_load_samples_file_and_folder(tmp_path):
    _conv_sample(tmp_path / "b.npz", seed=2)
    _conv_sample(tmp_path / "a.npz", seed=1)
    assert [f for f, _ in load_samples(tmp_path)] == ["a.npz", "b.npz"]
    assert [f for f, _ in load_samples(tmp_path / "b.npz")] == ["b.npz"]


@pytest.mark.parametrize("what", ["no-such", "empty-dir", "not-npz"])
def test_load_samples_bad_path(tmp_path, what):
    path = tmp_path / what
    if what == "empty-dir":
        path.mkdir()
    elif what == "not-npz":
        path.write_text("hello")
    with pytest.raises(InputError, match="--sample-inputs"):
        load_samples(path)


SPECS = [InputSpec("x", (1, 3), "float32"), InputSpec("ids", (1, 4), "int64")]


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((1, 3), np.float32)}, "missing input 'ids'"),
        ({"x": np.zeros((1, 3), np.float64), "ids": np.zeros((1, 4), np.int64)}, "input 'x' is float64, the model takes float32"),
        ({"x": np.zeros((1, 3), np.float32), "ids": np.zeros((1, 5), np.int64)}, r"input 'ids' has shape \[1, 5\], the model takes \[1, 4\]"),
        ({"x": np.zeros((1, 3), np.float32), "ids": np.zeros((1, 4), np.int64), "y": np.zeros(1)}, "'y' is not a model input"),
    ],
)
def test_check_samples_names_the_input(arrays, message):
    with pytest.raises(InputError, match=message):
        check_samples([("s.npz", arrays)], SPECS)


def test_sample_shapes_fill_dynamic_dims_only():
    model = conv_net()  # x: [batch, 3, 16, 16]
    assert sample_shapes(model, {"x": np.zeros((2, 3, 16, 16), np.float32)}, set()) == ["x=2x3x16x16"]
    assert sample_shapes(model, {"x": np.zeros((2, 3, 16, 16), np.float32)}, {"x"}) == []
    assert sample_shapes(model, {"x": np.zeros((2, 3, 8, 8), np.float32)}, set()) == []  # misfit: check_samples says so
    assert sample_shapes(conv_net(batch=1), {"x": np.zeros((1, 3, 16, 16), np.float32)}, set()) == []


def test_freeze_inputs_makes_an_initializer():
    frozen = freeze_inputs(gated_model(), ["mode=3"])
    assert [i.name for i in frozen.graph.input] == ["x"]
    init = {i.name: numpy_helper.to_array(i) for i in frozen.graph.initializer}
    assert init["mode"].dtype == np.int64 and init["mode"].shape == () and int(init["mode"]) == 3
    onnx.checker.check_model(frozen)


@pytest.mark.parametrize("value, message", [("nope=1", "not a model input"), ("mode=abc", "not a int64 value"), ("mode", "bad --input-value")])
def test_freeze_inputs_errors(value, message):
    with pytest.raises(InputError, match=message):
        freeze_inputs(gated_model(), [value])


def test_freeze_rejects_a_tensor_input():
    with pytest.raises(InputError, match="not a scalar"):
        freeze_inputs(gated_model(), ["x=1"])


# ------------------------------------------------------------------------------------------------ CLI

def test_compile_with_sample_inputs(tmp_path, dynamic_conv_onnx):
    """A folder of samples: the dynamic batch dim comes from the first sample; the first sample is stored."""
    samples = tmp_path / "samples"
    samples.mkdir()
    first = _conv_sample(samples / "0.npz", batch=2, seed=5)
    _conv_sample(samples / "1.npz", batch=2, seed=6)
    out = tmp_path / "art"
    res = runner.invoke(app, ["compile", str(dynamic_conv_onnx), "-o", str(out), "--sample-inputs", str(samples), "--runs", "2", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["inputs"] == [{"name": "x", "shape": [2, 3, 16, 16], "dtype": "float32"}]
    assert "sample inputs from" in report["accuracy"]["inputs"] and "2 files" in report["accuracy"]["inputs"]
    assert report["accuracy"]["ok"]
    with np.load(out / "verify" / "inputs.npz") as z:
        np.testing.assert_array_equal(z["x"], first)
    res = runner.invoke(app, ["run", str(out), "--check"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: _conv_sample(p, name="pixels"), "missing input 'x'"),
        (lambda p: _conv_sample(p, dtype=np.float64), "input 'x' is float64"),
        (lambda p: np.savez(p, x=np.zeros((1, 3, 8, 8), np.float32)), "input 'x' has shape"),
    ],
    ids=["missing", "dtype", "shape"],
)
def test_bad_sample_inputs_exit_2(tmp_path, conv_onnx, make, message):
    path = tmp_path / "s.npz"
    make(path)
    res = runner.invoke(app, ["compile", str(conv_onnx), "-o", str(tmp_path / "out"), "--sample-inputs", str(path)])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert not (tmp_path / "out").exists()


def test_input_value_folds_the_if(tmp_path):
    """mode frozen to 1: the If folds to its then-branch before TVM import (TVM's importer has no If)."""
    path = tmp_path / "gated.onnx"
    onnx.save(gated_model(), str(path))
    out = tmp_path / "gated"
    res = runner.invoke(app, ["compile", str(path), "-o", str(out), "--input-value", "mode=1", "--no-fallback", "--runs", "2", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert [i["name"] for i in report["inputs"]] == ["x"]
    import autoglm_compile

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(autoglm_compile.load(out)(x=x)[0], x * 2, rtol=1e-6)


def test_bad_input_value_exits_2(tmp_path, conv_onnx):
    res = runner.invoke(app, ["compile", str(conv_onnx), "-o", str(tmp_path / "out"), "--input-value", "nope=3"])
    assert res.exit_code == 2, res.output
    assert "'nope'" in res.output
