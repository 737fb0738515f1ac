"""benchmarks/roofline_calibration.py's lift_constants, which the int8 GPU timings rest on (gpu-build-int8): every
large constant becomes its own parameter, and fed its value back, the module computes what it did."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np


def _calibration_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "roofline_calibration.py"
    spec = importlib.util.spec_from_file_location("roofline_calibration", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lift_constants():
    return _calibration_module().lift_constants


def test_each_large_constant_becomes_its_own_parameter():
    import tvm
    from tvm import relax

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 64)).astype(np.float32)
    w2 = rng.integers(-127, 128, (64, 64)).astype(np.int8)  # like-shaped: distinct objects must not share a parameter
    bias = np.arange(64, dtype=np.float32)  # under min_elements: stays a constant
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 64), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(w1)))
            y = bb.emit(relax.op.matmul(y, relax.op.astype(relax.const(w2), "float32")))
            out = bb.emit_output(bb.emit(relax.op.add(y, relax.const(bias))))
        bb.emit_func_output(out)
    mod = bb.get()
    feed = rng.standard_normal((4, 64)).astype(np.float32)

    def run(m, *args):
        ex = tvm.compile(m, target="llvm")
        return relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()

    want = run(mod, feed)
    lifted, specs = _lift_constants()(mod, 1024)
    assert [p.name for p in lifted["main"].params] == ["x", "w0", "w1"]
    assert [(s["name"], s["shape"], s["dtype"]) for s in specs] == [("w0", [64, 64], "float32"), ("w1", [64, 64], "int8")]
    assert specs[1]["low"] == int(w2.min()) and specs[1]["high"] == int(w2.max()) and abs(specs[0]["mean"] - float(w1.mean())) < 1e-6
    np.testing.assert_allclose(run(lifted, feed, w1, w2), want, rtol=1e-5, atol=1e-5)


def test_int8_matmul_weights_lift_transposed():
    """transpose_2d: a 2-D int8 constant becomes permute_dims of a W^T parameter (the layout split-K reads), floats stay
    as they are; fed W^T, the module computes what it did."""
    import tvm
    from tvm import relax

    rng = np.random.default_rng(1)
    w8 = rng.integers(-127, 128, (64, 32)).astype(np.int8)
    emb = rng.standard_normal((64, 64)).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 64), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.astype(relax.op.matmul(x, relax.const(w8), out_dtype="int32"), "float32"))
            out = bb.emit_output(bb.emit(relax.op.matmul(relax.op.astype(x, "float32"), relax.const(emb))))
            out2 = bb.emit_output(y)
        bb.emit_func_output(relax.Tuple([out, out2]))
    mod = bb.get()
    feed = rng.integers(-128, 128, (4, 64)).astype(np.int8)

    def run(m, *args):
        ex = tvm.compile(m, target="llvm")
        res = relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in args])
        return [r.numpy() for r in res]

    want = run(mod, feed)
    lifted, specs = _lift_constants()(mod, 1024, transpose_2d=True)
    assert [(s["name"], s["shape"], s["dtype"]) for s in specs] == [("w0", [32, 64], "int8"), ("w1", [64, 64], "float32")]
    assert "R.permute_dims(w0" in lifted["main"].script()
    got = run(lifted, feed, np.ascontiguousarray(w8.T), emb)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)


def test_weights_stored_transposed_compute_the_same():
    """gpu-build stores MatMul weights as W^T and conv weights as OHWI, each read back through a Transpose: the
    graph computes what it did (ONNX Runtime), and the initializers hold the transposed arrays."""
    import onnx
    import onnxruntime
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    wc = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    wm = rng.standard_normal((6, 5)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "wc"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("Slice", ["r", "zero", "six", "axis1"], ["s"]), helper.make_node("MatMul", ["s", "wm"], ["y"])]
    inits = [numpy_helper.from_array(wc, "wc"), numpy_helper.from_array(wm, "wm"), numpy_helper.from_array(np.array([8, 16], np.int64), "shape"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"), numpy_helper.from_array(np.array([6], np.int64), "six"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    x = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)

    def run(m):
        return onnxruntime.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    want = run(model)
    module = _calibration_module()
    assert module.transpose_matmul_weights(model) == 1 and module.transpose_conv_weights(model) == 1
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(stored["wm"], wm.T)
    np.testing.assert_array_equal(stored["wc"], wc.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(run(model), want, rtol=1e-6, atol=1e-6)
