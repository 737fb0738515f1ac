"""Shared fixtures: tiny models built with onnx.helper (fast), and one small compiled artifact per session."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
OPSET = 17


def make_model(nodes, inputs, outputs, initializers=(), opset=OPSET, name="test") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_net(batch: int | str = "batch") -> onnx.ModelProto:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm, with a dynamic (or fixed) batch dim."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    fc = numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "fc")
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["r2"], name="ident"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["y"], name="gemm", transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])
    return make_model(nodes, [x], [y], [w, b, fc])


@pytest.fixture
def conv_onnx(tmp_path) -> Path:
    path = tmp_path / "conv.onnx"
    onnx.save(conv_net(batch=1), str(path))
    return path


@pytest.fixture
def dynamic_conv_onnx(tmp_path) -> Path:
    path = tmp_path / "conv_dyn.onnx"
    onnx.save(conv_net(), str(path))
    return path


@pytest.fixture(scope="session")
def built_artifact(tmp_path_factory):
    """A compiled artifact of the conv net (built once): (artifact folder, report, model path)."""
    from autoglm_compile.pipeline import CompileOptions, compile_model

    root = tmp_path_factory.mktemp("artifact")
    model = root / "conv.onnx"
    onnx.save(conv_net(batch=1), str(model))
    out = root / "conv"
    report = compile_model(CompileOptions(source=str(model), output=out, runs=3))
    return out, report, model
