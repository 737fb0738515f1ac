"""The roofline estimate: FLOP and byte counts against hand-computed values, compute- vs memory-bound
classification, the formula, and the report of a cross build (status "estimate") and of a host build
("measured", with the estimate beside it)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from autoglm_compile.estimate import LAUNCH_OVERHEAD_US, Roofline, count_ops, estimate, roofline_for
from autoglm_compile.pipeline import CompileOptions, compile_model
from autoglm_compile.target import TargetDescriptor, resolve_target
from conftest import conv_net, make_model

F = TensorProto.FLOAT


def weight(name, *shape):
    return numpy_helper.from_array(np.zeros(shape, np.float32), name)


def one_op(op, inputs, out_shape, initializers=(), **attrs):
    """A graph of one node: `inputs` are (name, shape) graph inputs, `initializers` its weights."""
    node = helper.make_node(op, [n for n, _ in inputs] + [t.name for t in initializers], ["y"], name="n", **attrs)
    ins = [helper.make_tensor_value_info(n, F, s) for n, s in inputs]
    return make_model([node], ins, [helper.make_tensor_value_info("y", F, out_shape)], initializers)


def only(model):
    ops, skipped = count_ops(model)
    assert skipped == [] and len(ops) == 1
    return ops[0]


def test_conv_flops_and_bytes_of_the_conv_net():
    ops, skipped = count_ops(conv_net(batch=1))
    assert skipped == []
    by_name = {o.name: o for o in ops}
    assert "ident" not in by_name and "flatten" not in by_name  # views launch no kernel
    conv = by_name["conv"]  # x 1x3x16x16, w 8x3x3x3, pads 1 -> y 1x8x16x16
    assert conv.flops == 2 * (8 * 16 * 16) * (3 * 3 * 3) + 8 * 16 * 16  # multiply-adds x 2, plus the bias
    assert conv.bytes == 4 * (3 * 16 * 16 + 8 * 3 * 3 * 3 + 8 + 8 * 16 * 16)
    gemm = by_name["gemm"]  # f 1x8 times fc^T (8x4)
    assert gemm.flops == 2 * 1 * 4 * 8 and gemm.bytes == 4 * (8 + 32 + 4)
    assert by_name["relu"].flops == 8 * 16 * 16 and by_name["pool"].flops == 8 * 16 * 16


@pytest.mark.parametrize("op, inputs, out, inits, attrs, flops", [
    ("MatMul", [("a", [2, 3, 4, 5]), ("b", [5, 6])], [2, 3, 4, 6], [], {}, 2 * 2 * 3 * 4 * 6 * 5),
    ("Gemm", [("a", [5, 3]), ("b", [5, 7]), ("c", [7])], [3, 7], [], {"transA": 1}, 2 * 3 * 7 * 5 + 3 * 7),
    ("Conv", [("x", [1, 4, 8, 8])], [1, 4, 8, 8], [weight("w", 4, 2, 3, 3)], {"group": 2, "pads": [1, 1, 1, 1]}, 2 * (4 * 8 * 8) * (2 * 3 * 3)),
    ("ConvTranspose", [("x", [1, 4, 5, 5])], [1, 2, 7, 7], [weight("w", 4, 2, 3, 3)], {}, 2 * (4 * 5 * 5) * (2 * 3 * 3)),
    ("Softmax", [("x", [2, 10])], [2, 10], [], {}, 5 * 20),
    ("LayerNormalization", [("x", [2, 16])], [2, 16], [weight("g", 16), weight("b", 16)], {}, 8 * 32),
    ("ReduceMean", [("x", [4, 6])], [4, 1], [], {"axes": [1]}, 24),
    ("MaxPool", [("x", [1, 2, 8, 8])], [1, 2, 4, 4], [], {"kernel_shape": [2, 2], "strides": [2, 2]}, 2 * 16 * 4),
    ("Transpose", [("x", [3, 5])], [5, 3], [], {}, 0),
])
def test_flop_counts(op, inputs, out, inits, attrs, flops):
    assert only(one_op(op, inputs, out, inits, **attrs)).flops == flops


def test_gather_reads_only_the_rows_it_outputs():
    """An embedding lookup: 2 rows of a 1000x64 table, not the whole table."""
    table = weight("table", 1000, 64)
    node = helper.make_node("Gather", ["table", "ids"], ["y"], name="g")
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [2])
    model = make_model([node], [ids], [helper.make_tensor_value_info("y", F, [2, 64])], [table])
    op = only(model)
    assert op.flops == 0 and op.bytes == 2 * 8 + 2 * (2 * 64 * 4)


def test_attention_flops():
    """com.microsoft Attention: QKV projection, Q.K^T, softmax and scores.V."""
    b, s, hid, heads = 1, 8, 16, 2
    node = helper.make_node("Attention", ["x", "w", "bias"], ["y"], name="att", domain="com.microsoft", num_heads=heads)
    x = helper.make_tensor_value_info("x", F, [b, s, hid])
    y = helper.make_tensor_value_info("y", F, [b, s, hid])
    graph = helper.make_graph([node], "att", [x], [y], [weight("w", hid, 3 * hid), weight("bias", 3 * hid)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    [op], skipped = count_ops(model)
    assert skipped == []
    assert op.flops == 2 * b * s * hid * 3 * hid + b * s * 3 * hid + 2 * 2 * b * s * s * hid + 5 * b * heads * s * s


ROOF = Roofline({"fp32": 1e12}, 100.0, 5.0, "test figures")  # ridge point 10 FLOP/byte


def test_compute_and_memory_bound():
    big = one_op("MatMul", [("a", [512, 512]), ("b", [512, 512])], [512, 512])       # 2*512^3 / (3*512^2*4) = 85 FLOP/B
    skinny = one_op("MatMul", [("a", [1, 512]), ("b", [512, 512])], [1, 512])        # about 0.5 FLOP/B
    relu = one_op("Relu", [("x", [1024, 1024])], [1024, 1024])
    e_big, e_skinny, e_relu = (estimate(m, ROOF) for m in (big, skinny, relu))
    assert e_big.top_ops[0].bound == "compute" and e_big.top_ops[0].intensity > ROOF.peak_flops["fp32"] / 100e9
    assert e_big.top_ops[0].ms == pytest.approx(2 * 512**3 / 1e12 * 1e3)
    assert e_skinny.top_ops[0].bound == "memory" and e_relu.top_ops[0].bound == "memory"
    assert e_relu.top_ops[0].ms == pytest.approx(2 * 1024 * 1024 * 4 / 100e9 * 1e3)
    assert e_big.compute_bound_ms > 0 and e_big.memory_bound_ms == 0 and e_relu.compute_bound_ms == 0


def test_total_is_sum_of_ops_plus_launch_overhead():
    e = estimate(conv_net(batch=1), ROOF)
    assert e.kernels == 4  # conv, relu, pool, gemm; Identity and Flatten are views
    assert e.overhead_ms == pytest.approx(4 * 5.0 / 1e3)
    assert e.total_ms == pytest.approx(sum(o.ms for o in e.top_ops) + e.overhead_ms)
    assert e.total_ms == pytest.approx(e.compute_bound_ms + e.memory_bound_ms + e.overhead_ms)
    assert e.ridge_point == pytest.approx(10.0)


def test_figures_from_the_descriptor_and_derived_for_the_host():
    h100 = roofline_for(resolve_target("nvidia-h100"))
    assert h100.peak_flops["fp32"] == 67e12 and h100.bandwidth_gbps == 3350
    assert h100.launch_overhead_us == LAUNCH_OVERHEAD_US["cuda"]
    host = roofline_for(resolve_target("host"))
    assert host.peak_flops["fp32"] > 0 and host.bandwidth_gbps > 0 and "derived for this machine" in host.figures_from
    assert roofline_for(resolve_target("nvidia-h100"), launch_overhead_us=0.0).launch_overhead_us == 0.0


def test_a_descriptor_without_figures_has_no_estimate():
    desc = TargetDescriptor(name="bare", description="no figures", kind="cpu", backend="tvm", cpu={"triple": "x86_64-linux-gnu"})
    with pytest.raises(ValueError, match="no peak_flops"):
        roofline_for(desc)


def test_missing_dtype_peak_falls_back_and_says_so():
    half = one_op("Relu", [("x", [4])], [4])
    half.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    half.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    e = estimate(half, ROOF)
    assert e.top_ops[0].dtype == "fp16" and any("no fp16 peak" in a for a in e.assumptions)


needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc for a CUDA build")


@needs_nvcc
def test_cross_build_for_h100_reports_an_estimate(tmp_path, conv_onnx):
    out = tmp_path / "h100"
    report = compile_model(CompileOptions(source=str(conv_onnx), target="nvidia-h100", output=out))
    lat, e = report.latency, report.estimate
    assert lat.status == "estimate" and lat.stats is None and "CUDA GPU" in lat.reason
    assert e is not None and e.total_ms > 0 and lat.estimate_ms == e.total_ms
    assert [o.op_type for o in e.top_ops] and {o.bound for o in e.top_ops} <= {"compute", "memory"}
    assert e.peak_flops == {"fp32": 67e12} and e.memory_bandwidth_gbps == 3350
    saved = json.loads((out / "report.json").read_text())
    assert saved["latency"]["status"] == "estimate" and saved["estimate"]["total_ms"] == pytest.approx(e.total_ms)
    md = (out / "report.md").read_text()
    assert "latency | estimate" in md and "## Roofline estimate" in md and "| conv | Conv |" in md


def test_host_build_is_measured_and_carries_an_estimate(built_artifact):
    out, report, _ = built_artifact
    assert report.latency.status == "measured" and report.latency.stats.p50_ms > 0
    assert report.estimate is not None and report.estimate.total_ms > 0
    assert "derived for this machine" in report.estimate.figures_from
    assert "roofline estimate" in (out / "report.md").read_text()
