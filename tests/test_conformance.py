"""The conformance run's fast sample: tests recorded as passing still pass, through the same worker subprocesses
as the full run (`make conformance`), and the recorded table is complete and above TVM's own allow-list."""
from __future__ import annotations

import json
from pathlib import Path

from autoglm_compile.conformance import RESULTS, Outcome, freeze_parameter_inputs, run_all, summarize

RECORD = Path(__file__).parent.parent / "docs" / "conformance.json"
SAMPLE = [
    "test_abs", "test_add_bcast", "test_averagepool_2d_pads", "test_batchnorm_example", "test_concat_3d_axis_1",
    "test_conv_with_strides_padding", "test_gemm_default_matrix_bias", "test_gather_0", "test_layer_normalization_2d_axis0",
    "test_matmul_3d", "test_maxpool_2d_default", "test_reduce_sum_keepdims_example", "test_relu", "test_reshape_extended_dims",
    "test_slice", "test_softmax_axis_1", "test_transpose_default", "test_where_example",
]


def test_recorded_table_is_complete():
    record = json.loads(RECORD.read_text())
    summary = record["summary"]
    assert summary["unclassified"] == 0
    assert summary["total"] == len(record["results"]) > 1500
    assert set(record["results"].values()) <= set(RESULTS)
    assert summary["results"]["pass"] > 388  # TVM's own ONNX test allow-lists 388 node tests


def test_sample_still_passes():
    recorded = json.loads(RECORD.read_text())["results"]
    sample = [n for n in SAMPLE if recorded.get(n) == "pass"]
    assert len(sample) >= 15
    outcomes = run_all(sample, jobs=2, timeout=120)
    failed = {o.name: f"{o.result}: {o.detail}" for o in outcomes if o.result != "pass"}
    assert not failed
    assert all(o.passes_keep_ort == "yes" for o in outcomes)


def test_unsupported_is_classified_not_fatal():
    outcomes = {o.name: o for o in run_all(["test_lstm_defaults", "test_string_concat"], jobs=1, timeout=120)}
    assert outcomes["test_lstm_defaults"].result == "unsupported-import" and "LSTM" in outcomes["test_lstm_defaults"].detail
    assert outcomes["test_string_concat"].result == "unsupported-type"


def test_summary_counts_unclassified():
    s = summarize([Outcome("a", "pass", "yes"), Outcome("b", "weird", "no")])
    assert s["results"]["pass"] == 1 and s["unclassified"] == 1 and s["passes_keep_ort_outputs"]["no"] == 1


def test_freeze_parameter_inputs():
    import numpy as np
    from onnx import TensorProto, helper

    from conftest import make_model

    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]), helper.make_tensor_value_info("shape", TensorProto.INT64, [1])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6])])
    frozen_model, frozen = freeze_parameter_inputs(model, {"x": np.zeros((2, 3), np.float32), "shape": np.array([6])})
    assert frozen == ["shape"]
    assert [i.name for i in frozen_model.graph.input] == ["x"] and [t.name for t in frozen_model.graph.initializer] == ["shape"]
