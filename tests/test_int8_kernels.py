"""int8 kernels (autoglm_compile/int8_kernels.py): the DQ -> Conv/MatMul rewrite to int8 x int8 -> int32 on targets
with an int8 dot product, checked against ONNX Runtime's int8 kernels on the same QDQ model, and VNNI code from
MetaSchedule's VNNI rule with the re-registered intrinsic (tune_worker.fix_vnni_intrinsic)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from autoglm_compile.int8_kernels import describe, int8_dot_product, rewrite
from autoglm_compile.measure import run_ort
from conftest import make_model

VNNI = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "icelake-server"}  # avx512vnni
NO_DOT = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}  # AVX2, no VNNI


def qdq_net(tmp_path, pool: bool = False) -> onnx.ModelProto:
    """Conv(3->16, stride 2, pad 1, bias) -> Relu -> Conv(16->32, pad 1, bias) -> Flatten -> MatMul(->16), quantized by
    ONNX Runtime (QDQ, uint8 activations, int8 per-channel weights) on data with a non-zero mean (so the activation
    zero points are not 0). The first conv has 3 input channels (padded to 4 with zero weights), the second and the
    MatMul VNNI-sized ones (16 output lanes x 4): all three weights are packed. pool: a 3x3 MaxPool (stride 1, pad 1)
    after the Relu."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.3, rng.standard_normal(16).astype(np.float32)
    w2, b2 = rng.standard_normal((32, 16, 3, 3)).astype(np.float32) * 0.1, rng.standard_normal(32).astype(np.float32)
    fc = rng.standard_normal((32 * 4 * 4, 16)).astype(np.float32) * 0.05
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1" if not pool else "r0"]),
             *([helper.make_node("MaxPool", ["r0"], ["r1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])] if pool else []),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c2"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (fc, "fc"))]
    onnx.save(make_model(nodes, [x], [y], inits, opset=13), str(tmp_path / "f.onnx"))

    class Data(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32) + 0.7} for _ in range(8)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), Data(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return onnx.load(str(tmp_path / "q.onnx"))


def _import(model):
    from tvm.relax.frontend.onnx import from_onnx

    return from_onnx(model, shape_dict={"x": [1, 3, 8, 8]}, keep_params_in_input=False)


def _run(mod, x):
    import tvm
    from tvm import relax

    target = tvm.target.Target({"kind": "llvm"})  # generic x86-64: runs on any CI machine
    ex = relax.build(relax.get_default_pipeline(target)(mod), target, relax_pipeline=None)
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def test_rewrite_matches_onnxruntime_int8(tmp_path):
    import tvm

    model = qdq_net(tmp_path)
    zero_points = {i.name: int(numpy_helper.to_array(i)) for i in model.graph.initializer if i.name.endswith("zero_point") and not i.dims}
    assert any(z != 0 for z in zero_points.values())  # the zero-point correction is exercised
    mod, summary = rewrite(_import(model), tvm.target.Target(VNNI))
    assert summary.instruction.startswith("vpdpbusd") and (summary.convs, summary.matmuls, summary.packed) == (2, 1, 3)
    assert not summary.kept_float
    text = mod.script()
    # really int8 x int8 -> int32: the three packed kernels, and no float conv/matmul left
    assert "R.nn.conv2d(" not in text and "R.matmul(" not in text
    main = mod["main"].script()
    assert main.count("R.call_tir(conv2d_nhwc_int8_packed") == 2 and main.count("R.call_tir(dense_int8_packed") == 1
    # NHWC from the first conv to the second: transposes only at the input and before the Flatten
    assert main.count("R.permute_dims(") == 2
    assert "(1, 10, 10, 4)" in main  # the padded input, 4 channels
    funcs = {str(g.name_hint): f for g, f in mod.functions_items()}
    packed = funcs["dense_int8_packed"].script()
    assert '"uint8"' in packed and '"int8"' in packed and 'T.Cast("int32"' in packed
    x = np.random.default_rng(3).standard_normal((4, 1, 3, 8, 8)).astype(np.float32) + 0.7
    out_scale = float(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "y_scale")))
    for sample in x:
        ours, ort = _run(mod, sample), run_ort(model, {"x": sample})[0]
        # ONNX Runtime's int8 kernels requantize with float multipliers too: at most one output step apart
        np.testing.assert_allclose(ours, ort, rtol=0, atol=out_scale * 1.001)
        assert np.mean(np.abs(ours - ort) < out_scale * 1e-3) > 0.9  # and almost everywhere equal


def test_max_pool_runs_on_the_quantized_values(tmp_path):
    """DQ -> MaxPool becomes MaxPool on the uint8 values -> DQ: exact (a positive scale keeps the order), and the pool
    reads and writes bytes."""
    import tvm

    model = qdq_net(tmp_path, pool=True)
    mod, summary = rewrite(_import(model), tvm.target.Target(VNNI))
    assert summary.pools == 1 and (summary.convs, summary.matmuls) == (2, 1)
    assert "1 MaxPool on the quantized values" in describe(summary)
    pools = [line for line in mod["main"].script().splitlines() if "R.nn.max_pool2d(" in line]
    assert len(pools) == 1 and '"uint8"' in pools[0], pools
    out_scale = float(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "y_scale")))
    for sample in np.random.default_rng(4).standard_normal((3, 1, 3, 8, 8)).astype(np.float32) + 0.7:
        ours, ort = _run(mod, sample), run_ort(model, {"x": sample})[0]
        np.testing.assert_allclose(ours, ort, rtol=0, atol=out_scale * 1.001)
        assert np.mean(np.abs(ours - ort) < out_scale * 1e-3) > 0.9


def test_target_without_int8_dot_product_stays_float(tmp_path):
    import tvm
    import tvm_ffi

    mod = _import(qdq_net(tmp_path))
    out, summary = rewrite(mod, tvm.target.Target(NO_DOT))
    assert summary.instruction is None and summary.rewritten == 0
    assert summary.kept_float == {"Conv: the target has no int8 dot product": 2, "MatMul: the target has no int8 dot product": 1}
    assert tvm_ffi.structural_equal(out, mod)
    assert describe(summary).startswith("no: the target has no int8 dot product")


@pytest.mark.parametrize("target, instruction", [
    (VNNI, "vpdpbusd (AVX512-VNNI)"),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "alderlake"}, "vpdpbusd (AVX-VNNI)"),
    (NO_DOT, None),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"}, "sdot (dotprod)"),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a53"}, None),
])
def test_int8_dot_product_from_target_features(target, instruction):
    import tvm

    assert int8_dot_product(tvm.target.Target(target)) == instruction


@pytest.mark.parametrize("kernel, shape_a, shape_w", [("_dense_packed", (4, 64), (2, 16, 16, 4)),
                                                      ("_batch_matmul_packed", (1, 2, 8, 64), (1, 2, 2, 16, 16, 4))])
def test_vnni_rule_emits_vpdpbusd(kernel, shape_a, shape_w):
    """MetaSchedule's VNNI rule (picked from the target's avx512vnni) tensorizes the packed int8 dense and the
    batched matmul of two activations, and the re-registered dot_16x4_vnni builds with this LLVM (TVM's own fails
    to: <16 x i32> operands)."""
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    from autoglm_compile import int8_kernels
    from autoglm_compile.tune_worker import build_candidate, import_tensor_intrinsics

    import_tensor_intrinsics()
    target = tvm.target.Target({**VNNI, "num-cores": 2})
    a, wp = te.placeholder(shape_a, "uint8", "a"), te.placeholder(shape_w, "int8", "wp")
    func = te.create_prim_func([a, wp, getattr(int8_kernels, kernel)(a, wp)])
    built = []
    for seed in range(8):  # a sampled vectorization can fail to build on a shape this small (as in tuning): try others
        ctx = ms.TuneContext(mod=tvm.IRModule({"main": func}), target=target, space_generator="post-order-apply",
                             search_strategy=ms.search_strategy.ReplayTrace(), rand_state=seed).clone()
        for space in ctx.generate_design_space():
            sch = space.copy()
            if "dot_16x4_vnni" not in str(sch.trace) or not all(p.apply(sch) for p in ctx.space_generator.postprocs):
                continue
            try:
                built.append(build_candidate(sch.mod, target, None).inspect_source("asm"))
            except tvm.error.InternalError:
                continue
        if built:
            break
    assert built and all("vpdpbusd" in asm for asm in built)


def test_sink_transposes_through_layout_agnostic_ops():
    """NHWC -> NCHW, then bias add, relu, quantize/dequantize, max pool and a residual add, then back to NHWC:
    the transposes cancel and the result is unchanged."""
    import tvm
    from tvm import relax

    from autoglm_compile.int8_kernels import sink_transposes

    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 8, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            nchw = bb.emit(relax.op.permute_dims(x, [0, 3, 1, 2]))
            y = bb.emit(relax.op.nn.relu(relax.op.add(nchw, relax.const(rng.standard_normal((1, 16, 1, 1)).astype("float32")))))
            q = bb.emit(relax.op.quantize(y, relax.const(0.05, "float32"), relax.const(3, "uint8"), 1, "uint8"))
            d = bb.emit(relax.op.dequantize(q, relax.const(0.05, "float32"), relax.const(3, "uint8"), 1))
            p = bb.emit(relax.op.nn.max_pool2d(d, 3, 1, 1))
            r = bb.emit(relax.op.add(p, nchw))
            out = bb.emit_output(relax.op.permute_dims(r, [0, 2, 3, 1]))
        bb.emit_func_output(out)
    mod = bb.get()
    sunk = sink_transposes(mod)
    assert "permute_dims" in mod.script() and "permute_dims" not in sunk.script()
    assert 'layout="NHWC"' in sunk.script()
    data = rng.standard_normal((1, 8, 8, 16)).astype(np.float32)
    outs = []
    for m in (mod, sunk):
        target = tvm.target.Target({"kind": "llvm"})
        ex = relax.build(relax.get_default_pipeline(target)(m), target, relax_pipeline=None)
        outs.append(relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(data)).numpy())
    np.testing.assert_array_equal(outs[0], outs[1])


def test_sink_transposes_leaves_other_permutations():
    """An attention-style permutation (0, 2, 1, 3) is not an NCHW<->NHWC one: the module comes back unchanged."""
    import tvm_ffi
    from tvm import relax

    from autoglm_compile.int8_kernels import sink_transposes

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 8, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            t = bb.emit(relax.op.permute_dims(x, [0, 2, 1, 3]))
            out = bb.emit_output(relax.op.multiply(t, relax.const(0.5, "float32")))
        bb.emit_func_output(out)
    mod = bb.get()
    assert tvm_ffi.structural_equal(sink_transposes(mod), mod)


def test_dot_kernels_counts_compute_kernels_only():
    """SplitLayoutRewritePreproc's weight-packing functions share the kernel's name: they are not counted."""
    import tvm
    from tvm import te

    from autoglm_compile.int8_kernels import dot_kernels

    a = te.placeholder((4, 4), "int8", "a")
    func = te.create_prim_func([a, te.compute((4, 4), lambda i, j: a[j, i], name="b")])
    mod = tvm.IRModule({"fused_conv2d_nhwc_int8_packed3_cast": func, "fused_conv2d_nhwc_int8_packed3_cast_weight_prepack": func,
                        "fused_add_quantize": func})
    assert dot_kernels(mod) == (0, 1)


def test_singleton_qparams_share_tuning_tasks():
    """Two requantizes of like tensors with different scales and zero points: with scalar constants (inlined by TVM's
    legalization) they are two tuning tasks; with one-element vectors, one task, and the same results."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from autoglm_compile.int8_kernels import singleton_qparams

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 64), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            outs = []
            for scale, zp in ((0.05, 3), (0.02, 140)):
                q = bb.emit(relax.op.quantize(x, relax.const(scale, "float32"), relax.const(zp, "uint8"), 1, "uint8"))
                outs.append(bb.emit(relax.op.dequantize(q, relax.const(scale, "float32"), relax.const(zp, "uint8"), 1)))
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    mod = bb.get()
    vectors = singleton_qparams(mod)
    assert "R.const(0.05" in mod.script() and "R.const(0.05" not in vectors.script()
    target = tvm.target.Target({"kind": "llvm"})
    fuse = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FuseOps(), relax.transform.FuseTIR()])
    tasks = [ms.relax_integration.extract_tasks(fuse(m), target) for m in (mod, vectors)]
    quantizers = [[t for t in ts if "quantize" in t.task_name] for ts in tasks]
    assert [len(q) for q in quantizers] == [2, 1] and int(quantizers[1][0].weight) == 2
    data = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    results = []
    for m in (mod, vectors):
        ex = relax.build(relax.get_default_pipeline(target)(m), target, relax_pipeline=None)
        results.append([t.numpy() for t in relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(data))])
    np.testing.assert_array_equal(results[0], results[1])
    assert not np.array_equal(results[1][0], results[1][1])  # each kept its own scale


def _quantized(tmp_path, model, feeds) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    onnx.save(model, str(tmp_path / "f.onnx"))

    class Data(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), Data(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return onnx.load(str(tmp_path / "q.onnx"))


@pytest.mark.parametrize("n", [16, 12])  # 16: B packed for vpdpbusd at run time; 12: a plain int8 matmul
def test_attention_matmul_of_two_activations_matches_onnxruntime(tmp_path, n):
    """Attention's MatMul(Q, Transpose(K)) with both inputs dequantized activations (non-zero zero points) becomes
    int8 x int8 -> int32, and agrees with ONNX Runtime's QLinearMatMul on the same QDQ model within one output step."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    nodes = [helper.make_node("Relu", ["q"], ["qr"]), helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["qr", "kt"], ["y"])]
    shape_q, shape_k = [1, 2, 8, 32], [1, 2, n, 32]
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, shape_q), helper.make_tensor_value_info("k", TensorProto.FLOAT, shape_k)]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, n])
    rng = np.random.default_rng(0)
    draw = lambda: {"q": rng.standard_normal(shape_q).astype(np.float32) + 0.3, "k": rng.standard_normal(shape_k).astype(np.float32) + 0.5}
    model = _quantized(tmp_path, make_model([*nodes], inputs, [out], opset=13), [draw() for _ in range(8)])
    mod, summary = rewrite(from_onnx(model, shape_dict={"q": shape_q, "k": shape_k}, keep_params_in_input=False), tvm.target.Target(VNNI))
    assert (summary.matmuls, summary.activation_matmuls, summary.packed) == (1, 1, int(n % 16 == 0)) and not summary.kept_float
    main = mod["main"].script()
    assert "R.matmul(" not in main or 'out_dtype="int32"' in main
    assert ("batch_matmul_int8_packed" in main) == (n % 16 == 0)
    target = tvm.target.Target({"kind": "llvm"})
    from tvm import relax

    ex = relax.build(relax.get_default_pipeline(target)(mod), target, relax_pipeline=None)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    step = float(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "y_scale")))
    for _ in range(3):
        feeds = draw()
        ours, ort = vm["main"](tvm.runtime.tensor(feeds["q"]), tvm.runtime.tensor(feeds["k"])).numpy(), run_ort(model, feeds)[0]
        np.testing.assert_allclose(ours, ort, rtol=0, atol=step * 1.001)
        assert np.mean(np.abs(ours - ort) < step * 1e-3) > 0.9


def test_erf_and_softmax_become_fast_math(tmp_path):
    """Dense -> GELU's Erf -> Softmax, quantized: erf and softmax become topi's fast_erf / fast_softmax (LLVM lowers
    erf and exp to a libm call per element), and the output still agrees with ONNX Runtime's int8 within one step."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32) * 0.3, "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Erf", ["h"], ["e"]),
             helper.make_node("Split", ["e"], ["e1", "e2"], axis=-1, num_outputs=2),  # a call of tuple type in between
             helper.make_node("Concat", ["e2", "e1"], ["c"], axis=-1), helper.make_node("Softmax", ["c"], ["y"], axis=-1)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 32])
    draw = lambda: {"x": rng.standard_normal((1, 8, 32)).astype(np.float32)}
    model = _quantized(tmp_path, make_model(nodes, [x], [y], [w], opset=18), [draw() for _ in range(8)])
    mod, summary = rewrite(from_onnx(model, shape_dict={"x": [1, 8, 32]}, keep_params_in_input=False), tvm.target.Target(VNNI))
    main = mod["main"].script()
    assert summary.matmuls == 1 and "fast_erf" in main and "fast_softmax" in main
    assert "R.erf(" not in main and "R.nn.softmax(" not in main
    _agrees_with_ort_within_a_step(mod, model, draw)


def _agrees_with_ort_within_a_step(mod, model, draw):
    """mod, built for the host CPU, gives ONNX Runtime's output of the QDQ model within one quantization step of y, on
    three draws of x."""
    import tvm
    from tvm import relax

    target = tvm.target.Target({"kind": "llvm"})
    vm = relax.VirtualMachine(relax.build(relax.get_default_pipeline(target)(mod), target, relax_pipeline=None), tvm.cpu())
    step = float(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "y_scale")))
    for _ in range(3):
        feeds = draw()
        np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(feeds["x"])).numpy(), run_ort(model, feeds)[0], rtol=0, atol=step * 1.001)


def test_prepack_leaves_transposed_conv_weights_alone():
    """With weight prepacking (on for the int8 kernels), conv2d_transpose's weight is not layout-free (a layout tuned
    for it and folded into the constant gave wrong outputs on the PP-OCRv4 detector); a conv2d's weight still is."""
    import tvm
    from tvm import relax

    from autoglm_compile.tuning import _phases

    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 8, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            c = bb.emit(relax.op.nn.conv2d(x, relax.const(rng.standard_normal((8, 8, 3, 3)).astype("float32")), padding=1))
            out = bb.emit_output(relax.op.nn.conv2d_transpose(c, relax.const(rng.standard_normal((8, 4, 2, 2)).astype("float32")), strides=2))
        bb.emit_func_output(out)
    target = tvm.target.Target({"kind": "llvm"})
    before, _ = _phases(target, True)
    with target:
        mod = tvm.transform.Sequential(before)(bb.get())
    free = {str(g.name_hint).rstrip("0123456789"): "layout_free_buffers" in (f.attrs or {}) for g, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert free == {"conv2d": True, "conv2d_transpose": False}


def test_conv_output_channels_padded_to_vnni_lanes(tmp_path):
    """A conv with 24 output channels (not a multiple of vpdpbusd's 16 lanes) is packed with 8 zero output channels,
    sliced off after, and agrees with ONNX Runtime's int8 within one output step."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((24, 8, 3, 3)).astype(np.float32) * 0.2, "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 24, 6, 6])
    draw = lambda: {"x": rng.standard_normal((1, 8, 6, 6)).astype(np.float32) + 0.5}
    model = _quantized(tmp_path, make_model(nodes, [x], [y], [w], opset=13), [draw() for _ in range(8)])
    mod, summary = rewrite(from_onnx(model, shape_dict={"x": [1, 8, 6, 6]}, keep_params_in_input=False), tvm.target.Target(VNNI))
    assert (summary.convs, summary.packed) == (1, 1)
    main = mod["main"].script()
    assert "R.call_tir(conv2d_nhwc_int8_packed" in main and "R.Tensor((1, 6, 6, 32), dtype=\"int32\")" in main and "R.strided_slice(" in main
    _agrees_with_ort_within_a_step(mod, model, draw)


def dq_weight_matmul() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """x (float) @ DequantizeLinear(int8 weight, per-column scales): a QDQ model's MatMul whose activation is kept in
    float (what the protection search leaves); an input, and the model's own arithmetic on it in float64."""
    rng = np.random.default_rng(3)
    wq = rng.integers(-127, 128, (64, 96)).astype(np.int8)
    scale = rng.uniform(0.005, 0.02, 96).astype(np.float32)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=1), helper.make_node("MatMul", ["x", "w"], ["y"])]
    inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(scale, "ws"), numpy_helper.from_array(np.zeros(96, np.int8), "wz")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 64])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 96])], inits, opset=13)
    x = rng.standard_normal((1, 16, 64)).astype(np.float32)
    return model, x, x.astype(np.float64) @ (wq.astype(np.float64) * scale)


def test_reference_of_a_qdq_model_is_its_own_arithmetic():
    """ONNX Runtime's optimizer turns DequantizeLinear(int8 weight) + MatMul into MatMulNBits, which quantizes the float
    activation too; the reference runs such a model without the optimizations."""
    model, x, expected = dq_weight_matmul()
    np.testing.assert_allclose(run_ort(model, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)


def test_dequantized_weights_fold_into_float_constants():
    """A matmul whose weight is dequantize(constant) reads a float32 constant after fold_dequantized_constants (per
    output channel: the scales along axis 1), so the float kernels take it; the values are the model's."""
    import tvm
    from tvm import relax
    from tvm.ir.expr import Constant
    from tvm.relax.frontend.onnx import from_onnx

    from autoglm_compile.int8_kernels import fold_dequantized_constants

    model, x, expected = dq_weight_matmul()
    mod = fold_dequantized_constants(from_onnx(model, shape_dict={"x": [1, 16, 64]}, keep_params_in_input=False))
    assert "dequantize" not in mod.script()
    (matmul,) = [c for c in _calls(mod) if c.op.name == "relax.matmul"]
    weight = relax.analysis.get_var2val(mod["main"]).get(matmul.args[1], matmul.args[1])
    assert isinstance(weight, Constant) and weight.value.numpy().dtype == np.float32
    target = tvm.target.Target({"kind": "llvm"})
    ex = relax.build(relax.get_default_pipeline(target)(mod), target, relax_pipeline=None)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _calls(mod) -> list:
    from tvm import relax

    found = []
    for _gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, lambda e: found.append(e) if isinstance(e, relax.Call) else None)
    return found
