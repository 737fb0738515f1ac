"""int8 on CUDA targets (sm_72 and newer), checked without a GPU: the rewrite's int8 x int8 -> int32 module (signed
activations, NHWC convs) against ONNX Runtime's int8 kernels on the CPU, split-K of int8 GEMMs computing exactly
what the plain ones do, and the CUDA lowering putting every int8 GEMM on the int8 tensor cores (wmma s8 x s8 -> s32).
The kernels themselves ran on the H200 (docs/int8.md)."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from autoglm_compile import gpu_schedules as gs
from autoglm_compile.int8_kernels import CUDA_INT8, describe, dot_kernels, int8_dot_product, rewrite
from autoglm_compile.measure import run_ort
from conftest import make_model

SHAPE = [1, 32, 16, 16]


def qdq_convs(tmp_path) -> onnx.ModelProto:
    """Conv(32->64, 3x3, pad 1) -> Relu -> Conv(64->64, 3x3, pad 1) -> Flatten -> MatMul(->32), quantized by ONNX
    Runtime (QDQ, uint8 activations with non-zero zero points, int8 per-channel weights). The convs are big enough for
    the tensor cores (256 x 64 outputs, K 288 and 576) and launch too few blocks on 132 SMs: both are split."""
    from test_int8_kernels import _quantized

    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((64, 32, 3, 3)).astype(np.float32) * 0.1, rng.standard_normal(64).astype(np.float32)
    w2, b2 = rng.standard_normal((64, 64, 3, 3)).astype(np.float32) * 0.05, rng.standard_normal(64).astype(np.float32)
    fc = rng.standard_normal((64 * 16 * 16, 32)).astype(np.float32) * 0.01
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c2"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (fc, "fc"))]
    feeds = [{"x": rng.standard_normal(SHAPE).astype(np.float32) + 0.7} for _ in range(8)]
    return _quantized(tmp_path, make_model(nodes, [x], [y], inits, opset=13), feeds)  # writes f.onnx, the float model


def _rewritten(model):
    from tvm.relax.frontend.onnx import from_onnx

    from autoglm_compile.target import resolve_target
    from autoglm_compile.tvm_build import make_target

    mod = from_onnx(model, shape_dict={"x": SHAPE}, keep_params_in_input=False)
    return rewrite(mod, make_target(resolve_target("nvidia-h100")))


@pytest.mark.parametrize("arch, instruction", [("sm_90", CUDA_INT8), ("sm_80", CUDA_INT8), ("sm_75", CUDA_INT8), ("sm_72", CUDA_INT8), ("sm_70", None)])
def test_int8_tensor_cores_from_the_cuda_arch(arch, instruction):
    import tvm

    assert int8_dot_product(tvm.target.Target({"kind": "cuda", "arch": arch})) == instruction


def test_cuda_rewrite_matches_onnxruntime_int8(tmp_path):
    """The module the CUDA targets get, built for the CPU: int8 activations (uint8 shifted by -128, the zero points
    with them) and weights, NHWC convs, within one output step of ONNX Runtime's int8 kernels."""
    import tvm
    from tvm import relax

    model = qdq_convs(tmp_path)
    mod, summary = _rewritten(model)
    assert summary.instruction == CUDA_INT8 and (summary.convs, summary.matmuls, summary.packed) == (2, 1, 0)
    assert not summary.kept_float
    main = mod["main"].script()
    assert "R.nn.conv2d(" in main and 'data_layout="NHWC"' in main and 'out_dtype="int32"' in main
    assert "R.call_tir(conv2d_nhwc_int8_packed" not in main  # packing is for VNNI only
    convs = [line for line in main.splitlines() if "R.nn.conv2d(" in line]
    assert len(convs) == 2 and all('R.Tensor((1, 16, 16, 64), dtype="int32")' in line for line in convs)
    target = tvm.target.Target({"kind": "llvm"})
    ex = relax.build(relax.get_default_pipeline(target)(mod), target, relax_pipeline=None)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out_scale = float(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "y_scale")))
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32) + 0.7
        ours, ort = vm["main"](tvm.runtime.tensor(x)).numpy(), run_ort(model, {"x": x})[0]
        np.testing.assert_allclose(ours, ort, rtol=0, atol=out_scale * 1.001)
        assert np.mean(np.abs(ours - ort) < out_scale * 1e-3) > 0.9


def _int8_conv_module(c: int, o: int, hw: int, padding):
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, hw, hw, c), "int8"))
    w = relax.Var("w", relax.TensorType((o, 3, 3, c), "int8"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, padding=padding, data_layout="NHWC", kernel_layout="OHWI", out_dtype="int32"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _int8_matmul_module(m: int, k: int, n: int):
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, m, k), "int8"))
    w = relax.Var("w", relax.TensorType((k, n), "int8"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.matmul(x, w, out_dtype="int32")))
        bb.emit_func_output(out)
    return bb.get()


def _run_cpu(mod, inputs):
    import tvm
    from tvm import relax

    ex = tvm.compile(mod, target="llvm")
    return relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in inputs]).numpy()


@pytest.mark.parametrize("padding", [(1, 1, 1, 1), (1, 0, 0, 1)])
def test_split_int8_conv_is_exact(padding):
    """int32 partial sums add up to exactly the plain conv's, with the padding on the right sides."""
    rng = np.random.default_rng(0)
    c, o, hw = 256, 32, 7
    split = gs.split_k(_int8_conv_module(c, o, hw, padding), sms=132)
    assert "conv2d_split_k" in {gv.name_hint for gv in split.functions}
    inputs = [rng.integers(-128, 128, (1, hw, hw, c), dtype=np.int8), rng.integers(-127, 128, (o, 3, 3, c), dtype=np.int8)]
    want = _run_cpu(_int8_conv_module(c, o, hw, padding), inputs)
    np.testing.assert_array_equal(_run_cpu(split, inputs), want)


def test_split_int8_matmul_is_exact():
    rng = np.random.default_rng(1)
    m, k, n = 128, 768, 64
    split = gs.split_k(_int8_matmul_module(m, k, n), sms=132)
    assert "matmul_split_k" in {gv.name_hint for gv in split.functions}
    inputs = [rng.integers(-128, 128, (1, m, k), dtype=np.int8), rng.integers(-127, 128, (k, n), dtype=np.int8)]
    np.testing.assert_array_equal(_run_cpu(split, inputs), _run_cpu(_int8_matmul_module(m, k, n), inputs))


def test_cuda_lowering_puts_the_int8_gemms_on_tensor_cores(tmp_path):
    """Both convs are split (S = 2 and 4) and tensorized with int8 wmma fragments; the GEMV-shaped MatMul (one row)
    stays an int8 kernel without tensor cores, and the report's text counts it."""
    import tvm

    from autoglm_compile.target import resolve_target
    from autoglm_compile.tvm_build import ScheduleContext, lower

    mod, summary = _rewritten(qdq_convs(tmp_path))
    desc = resolve_target("nvidia-h100")
    ctx = ScheduleContext(desc=desc, split_k=True)
    lowered, _ = lower(mod, desc, "default", ctx)
    prims = {gv.name_hint: f.script() for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    split = [t for name, t in prims.items() if name.startswith("conv2d_split_k")]
    assert len(split) == 2 and all("tvm_mma_sync" in t and 'scope="wmma.matrix_a"' in t and '"int8"' in t for t in split)
    assert ctx.notes == ["split-K on 0 matmul(s) and 2 conv(s) that launch fewer than 2 waves of thread blocks on 132 SMs, in 2/4 slices"]
    assert dot_kernels(lowered, cuda=True) == (2, 3)
    text = describe(summary, dot_kernels(lowered, cuda=True))
    assert "2 Conv and 1 MatMul/Gemm as int8 x int8 -> int32 (int8 activations (uint8 ones shifted by -128)" in text
    assert text.endswith("2 of 3 int8 kernels use int8 tensor cores (wmma s8 x s8 -> s32) (the others do not fit its tiles)")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cli_int8_build_for_cuda_reports_tensor_cores(tmp_path):
    """The whole pipeline, cross-compiled here: the report's int8 kernels row names the tensor cores."""
    from autoglm_compile.pipeline import CompileOptions, compile_model

    qdq_convs(tmp_path)  # writes the float model f.onnx too
    report = compile_model(CompileOptions(source=str(tmp_path / "f.onnx"), output=tmp_path / "a", target="nvidia-h100", precision="int8", calib_synthetic=True))
    kernels = report.quantization.int8_kernels
    assert kernels.startswith("2 Conv and 1 MatMul/Gemm as int8 x int8 -> int32") and "2 of 3 int8 kernels use int8 tensor cores" in kernels
    assert (tmp_path / "a" / "model.so").exists()


def _attention(tmp_path):
    """MatMul(Relu(q), Transpose(k)), both inputs dequantized activations with non-zero zero points."""
    from test_int8_kernels import _quantized

    nodes = [helper.make_node("Relu", ["q"], ["qr"]), helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["qr", "kt"], ["y"])]
    shape_q, shape_k = [1, 2, 64, 32], [1, 2, 64, 32]
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, shape_q), helper.make_tensor_value_info("k", TensorProto.FLOAT, shape_k)]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 64, 64])
    rng = np.random.default_rng(0)
    draw = lambda: {"q": rng.standard_normal(shape_q).astype(np.float32) + 0.3, "k": rng.standard_normal(shape_k).astype(np.float32) + 0.5}
    return _quantized(tmp_path, make_model(nodes, inputs, [out], opset=13), [draw() for _ in range(8)]), draw, {"q": shape_q, "k": shape_k}


@pytest.mark.parametrize("int8_attention", [False, True])
def test_attention_matmul_of_two_activations_on_cuda(tmp_path, monkeypatch, int8_attention):
    """By default attention's matmul stays float on CUDA (its zero-point sums cost more kernels than int8 saves), and
    the report says why; with CUDA_ACTIVATION_MATMULS it is int8 x int8 -> int32 with both operands shifted to int8,
    within one output step of ONNX Runtime's int8 kernels."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from autoglm_compile import int8_kernels
    from autoglm_compile.target import resolve_target
    from autoglm_compile.tvm_build import make_target

    monkeypatch.setattr(int8_kernels, "CUDA_ACTIVATION_MATMULS", int8_attention)
    model, draw, shapes = _attention(tmp_path)
    mod, summary = rewrite(from_onnx(model, shape_dict=shapes, keep_params_in_input=False), make_target(resolve_target("nvidia-h100")))
    if not int8_attention:
        assert summary.rewritten == 0
        assert summary.kept_float == {"MatMul: of two activations (attention): on CUDA its zero-point row and column sums would be 4 kernels more": 1}
        return
    assert (summary.matmuls, summary.activation_matmuls, summary.packed) == (1, 1, 0) and not summary.kept_float
    assert 'R.matmul(' in mod["main"].script() and 'out_dtype="int32"' in mod["main"].script()
    target = tvm.target.Target({"kind": "llvm"})
    vm = relax.VirtualMachine(relax.build(relax.get_default_pipeline(target)(mod), target, relax_pipeline=None), tvm.cpu())
    step = float(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "y_scale")))
    for _ in range(3):
        feeds = draw()
        ours, ort = vm["main"](tvm.runtime.tensor(feeds["q"]), tvm.runtime.tensor(feeds["k"])).numpy(), run_ort(model, feeds)[0]
        np.testing.assert_allclose(ours, ort, rtol=0, atol=step * 1.001)
        assert np.mean(np.abs(ours - ort) < step * 1e-3) > 0.9


def test_mixed_precision_leaves_integer_ops_alone():
    """mixed on CUDA: ToMixedPrecision makes the float matmul float16 (float32 accumulation), and the int8 one keeps
    its int8 operands and int32 result (its policy would have given it out_dtype float32 and a float16 result)."""
    import tvm
    from tvm import relax

    from autoglm_compile.tvm_build import mixed_precision

    bb = relax.BlockBuilder()
    a, b = relax.Var("a", relax.TensorType((16, 64), "int8")), relax.Var("b", relax.TensorType((64, 32), "int8"))
    x, w = relax.Var("x", relax.TensorType((16, 32), "float32")), relax.Var("w", relax.TensorType((32, 8), "float32"))
    with bb.function("main", [a, b, x, w]):
        with bb.dataflow():
            acc = bb.emit(relax.op.matmul(a, b, out_dtype="int32"))
            y = bb.emit(relax.op.add(relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(1e-3, "float32")), x))  # a requantize scale
            out = bb.emit_output(relax.op.matmul(y, w))
        bb.emit_func_output(out)
    mod = mixed_precision(bb.get())
    main = mod["main"].script()
    assert 'R.matmul(a, b, out_dtype="int32")' in main and "call_pure_packed" not in main
    assert main.count("R.matmul(") == 2 and 'dtype="float16"' in main
    rng = np.random.default_rng(0)
    args = [rng.integers(-128, 128, (16, 64)).astype(np.int8), rng.integers(-128, 128, (64, 32)).astype(np.int8),
            rng.standard_normal((16, 32)).astype(np.float32), rng.standard_normal((32, 8)).astype(np.float32)]
    target = tvm.target.Target({"kind": "llvm"})
    vm = relax.VirtualMachine(relax.build(relax.get_default_pipeline(target)(mod), target, relax_pipeline=None), tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(v) for v in args]).numpy()
    want = ((args[0].astype(np.int64) @ args[1]).astype(np.float32) * 1e-3 + args[2]) @ args[3]
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
