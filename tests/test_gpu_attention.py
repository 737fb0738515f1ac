"""gpu_attention: self-attention as one CUDA kernel. The kernel's logic is checked on the CPU (its thread loops
serial, gpu=False) against NumPy, the rewrite on transformers' BERT against ONNX Runtime, and the CUDA lowering on
its source (no GPU needed)."""
from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort
import pytest

from autoglm_compile.gpu_attention import AttentionShape, attention_kernel, fuse_attention
from autoglm_compile.inputs import InputSpec
from autoglm_compile.target import resolve_target
from autoglm_compile.tvm_build import ScheduleContext, import_relax, lower, mixed_precision


def reference(q, k, v, bias, scale):
    """NumPy: softmax(Q K^T * scale + bias) V per head, float64; q, k, v [B, S, N, H], bias broadcast to [B, N, Sq, Sk]."""
    qh, kh, vh = (np.transpose(x.astype(np.float64), (0, 2, 1, 3)) for x in (q, k, v))
    s = qh @ np.swapaxes(kh, -1, -2) * scale + bias.astype(np.float64)
    s = np.exp(s - s.max(axis=-1, keepdims=True))
    p = s / s.sum(axis=-1, keepdims=True)
    return np.transpose(p @ vh, (0, 2, 1, 3))


def max_abs_error(shape: AttentionShape, seed: int = 0) -> float:
    """The kernel's CPU form for shape on seeded random inputs: its max abs difference to `reference`. Where the
    shape has one column count for all three and q_len == kv_len, q, k and v are the parts of one packed tensor."""
    import tvm

    rng = np.random.default_rng(seed)
    b, n, h = shape.batch, shape.heads, shape.head_dim
    lengths = (shape.q_len, shape.kv_len, shape.kv_len)
    if shape.columns is not None and len(set(shape.cols)) == 1 and shape.q_len == shape.kv_len:
        tensors = [rng.standard_normal((b, shape.q_len, shape.cols[0])).astype(shape.dtype)] * 3
    else:
        tensors = [rng.standard_normal((b, length, c)).astype(shape.dtype) for length, c in zip(lengths, shape.cols)]
    q, k, v = (t[:, :, o:o + n * h].reshape(b, length, n, h) for t, o, length in zip(tensors, shape.offsets, lengths))
    bias = (rng.standard_normal(shape.bias_shape) * 2).astype(shape.bias_dtype)
    lib = tvm.tirx.build(attention_kernel(shape, gpu=False), target="llvm")
    out = tvm.runtime.tensor(np.zeros((b, shape.q_len, n, h), shape.out_dtype))
    lib(*(tvm.runtime.tensor(a) for a in (*tensors, bias)), out)
    return float(np.abs(out.numpy().astype(np.float64) - reference(q, k, v, bias, shape.scale)).max())


def shape(b=1, sq=128, sk=128, n=12, h=64, dtype="float16", out="float16", bias=(1, 1, 1, 128), bias_dtype="float32", scale=0.125):
    return AttentionShape(b, sq, sk, n, h, dtype, out, bias, bias_dtype, scale)


@pytest.mark.parametrize("s,tol", [
    (shape(n=2), 2e-3),  # BERT's layout and mask, float16 in and out
    (shape(b=2, sq=20, sk=33, n=3, h=32, dtype="float32", out="float32", bias=(2, 3, 20, 33), bias_dtype="float16", scale=0.3), 1e-5),
    (shape(sq=7, sk=150, n=1, h=32, dtype="float16", out="float32", bias=(1, 1, 7, 1), scale=1.0), 1e-5),  # keys beyond the threads
    (shape(sq=17, sk=17, n=2, h=16, dtype="float32", out="float32", bias=(1, 1, 1, 1)), 1e-5),  # a query tile past the sequence
    # q, k and v as the parts of one [B, S, 3 x N x H] tensor (a merged Q/K/V projection), and at other offsets
    (AttentionShape(1, 24, 24, 3, 32, "float32", "float32", (1, 1, 1, 24), "float32", 0.2, (288, 288, 288), (0, 96, 192)), 1e-5),
    (AttentionShape(1, 24, 40, 3, 32, "float16", "float32", (1, 3, 24, 40), "float32", 0.2, (104, 112, 96), (8, 16, 0)), 1e-5),
])
def test_kernel_matches_numpy(s, tol):
    assert s.supported() is None
    assert max_abs_error(s) < tol


@pytest.mark.parametrize("s,why", [
    (shape(h=80), "head_dim 80"),
    (shape(h=4, n=16), "head_dim 4"),
    (shape(sk=256, bias=(1, 1, 1, 256)), "shared memory"),
    (shape(bias=(1, 1, 1, 64)), "bias shape"),
    (shape(dtype="int8"), "dtype"),
    (AttentionShape(1, 128, 128, 12, 64, "float16", "float16", (1, 1, 1, 128), "float32", 0.125, (2308, 2308, 2308), (2, 770, 1538)), "offsets"),
])
def test_shapes_the_kernel_does_not_take(s, why):
    assert why in (s.supported() or "")


def bert_module(tmp_path, mask):
    """zoo.bert_tiny (2 layers, 2 heads of 64, seq 16) after the O2 passes of a CUDA build, imported into Relax, with
    feeds whose attention mask is `mask` and ONNX Runtime's outputs on them."""
    import onnx

    from autoglm_compile.config import adapt_to_target, load_config
    from autoglm_compile.pass_manager import PassContext, run_passes
    from autoglm_compile.zoo import bert_tiny

    path = bert_tiny(tmp_path / "bert.onnx")
    specs = [InputSpec(n, (1, 16), "int64") for n in ("input_ids", "attention_mask", "token_type_ids")]
    ctx = PassContext(input_shapes={s.name: list(s.shape) for s in specs}, input_dtypes={s.name: s.dtype for s in specs},
                      ir_version=8, log=lambda _: None)
    cfg = load_config("O2")
    adapt_to_target(cfg, "cuda")  # as CUDA builds: merge-parallel-matmuls makes one Q/K/V projection
    model, _ = run_passes(onnx.load(str(path)), cfg.passes, ctx)
    feeds = {"input_ids": np.arange(16, dtype=np.int64).reshape(1, 16) * 7 % 1000, "attention_mask": mask,
             "token_type_ids": np.zeros((1, 16), np.int64)}
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    return import_relax(model, specs), feeds, expected


def run_llvm(mod, feeds):
    import tvm
    from tvm import relax

    ex = relax.build(mod, tvm.target.Target("llvm"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*(tvm.runtime.tensor(v) for v in feeds.values()))
    return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]


def test_bert_attention_becomes_one_call_that_computes_the_same(tmp_path):
    mask = np.ones((1, 16), np.int64)
    mask[0, 12:] = 0  # padding: the mask's -inf-like bias must reach the softmax
    mod, feeds, expected = bert_module(tmp_path, mask)
    found = []
    fused = fuse_attention(mod, found, gpu=False)
    # q, k and v are read from the merged Q/K/V projection's output, at three offsets: the split goes
    assert [(s.heads, s.q_len, s.kv_len, s.head_dim, s.bias_shape, s.cols, s.offsets, why) for s, why in found] == [
        (2, 16, 16, 64, (1, 1, 16, 16), (384, 384, 384), (0, 128, 256), None)] * 2
    assert abs(found[0][0].scale - 0.125) < 1e-7
    text = fused["main"].script()
    assert text.count("fused_attention") == 2 and "softmax" not in text and "R.split" not in text
    for got, ref in zip(run_llvm(fused, feeds), expected):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_the_cuda_build_runs_attention_as_one_kernel_per_layer(tmp_path):
    import tvm

    mod, _, _ = bert_module(tmp_path, np.ones((1, 16), np.int64))
    desc = resolve_target("nvidia-h100")
    ctx = ScheduleContext(desc=desc, fp16=True, split_k=True, attention_kernel=True)
    lowered, target = lower(mod, desc, "default", ctx)
    assert any("2 self-attention(s) as one kernel each (2 heads x 16 x 16, head_dim 64, float16)" in n for n in ctx.notes), ctx.notes
    names = [gv.name_hint for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert "fused_attention" in names and not any("softmax" in n for n in names), names
    plain, _ = lower(mod, desc, "default", ScheduleContext(desc=desc, fp16=True, split_k=True))
    assert any("softmax" in gv.name_hint for gv in plain.functions)


needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


@needs_nvcc
def test_cuda_source_keeps_registers_and_few_barriers():
    """The scores' K row and sums stay in registers (no local-memory arrays indexed at run time), the softmax
    exchanges its partials through shared memory, and the phases need six barriers, none inside a loop."""
    import tvm

    from autoglm_compile.tvm_build import make_target

    lib = tvm.tirx.build(attention_kernel(shape()), target=make_target(resolve_target("nvidia-h100")))
    src = (lib.imports[0] if lib.imports else lib).inspect_source()
    assert src.count("__syncthreads()") == 6
    body = src[src.rindex("fused_attention_kernel("):]
    loops = body.split("for (")[1:]
    assert all("__syncthreads" not in loop.split("}")[0] for loop in loops)
    assert "kr_ptr[d" not in src and "acc_ptr[r" not in src  # unrolled: constant indices only
    assert "__shared__ alignas(64) float part_ptr[256]" in src


def test_mixed_precision_graph_is_matched():
    """After ToMixedPrecision the pattern has casts between its ops (q, k and v cast to float16 after the head
    transposes, the scores to float16 and back, the probabilities to float16): the rewrite looks through them, and
    the kernel reads q, k and v in the dtype the matmuls took (float16)."""
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    @tvm.script.ir_module
    class Attn:
        @R.function
        def main(q: R.Tensor((1, 32, 4, 32), "float32"), k: R.Tensor((1, 32, 4, 32), "float32"), v: R.Tensor((1, 32, 4, 32), "float32"),
                 mask: R.Tensor((1, 1, 1, 32), "float32")):
            with R.dataflow():
                qt = R.permute_dims(q, [0, 2, 1, 3])
                kt = R.permute_dims(k, [0, 2, 3, 1])
                s = R.divide(R.matmul(qt, kt), R.const(4.0, "float32"))
                p = R.nn.softmax(R.add(s, mask), axis=-1)
                o = R.permute_dims(R.matmul(p, R.permute_dims(v, [0, 2, 1, 3])), [0, 2, 1, 3])
                R.output(o)
            return o

    mod = relax.transform.Normalize()(Attn)
    found = []
    fused = fuse_attention(mixed_precision(mod), found, gpu=False)
    assert len(found) == 1 and found[0][1] is None and found[0][0].dtype == "float16" and found[0][0].scale == 0.25
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in (("q", (1, 32, 4, 32)), ("k", (1, 32, 4, 32)), ("v", (1, 32, 4, 32)), ("mask", (1, 1, 1, 32)))}
    (ref,), (got,) = run_llvm(mod, feeds), run_llvm(fused, feeds)
    np.testing.assert_allclose(got, ref, rtol=0, atol=5e-3)


@needs_nvcc
def test_the_report_names_the_fused_attentions_and_the_config_turns_them_off(tmp_path):
    """The CLI's pipeline for a CUDA target (cross-compiled here): the report's schedule line counts the fused
    attentions; `schedule.attention_kernel: false` keeps the default kernels."""
    from autoglm_compile.pipeline import CompileOptions, compile_model
    from autoglm_compile.zoo import bert_tiny

    model = bert_tiny(tmp_path / "bert.onnx")
    dims = ["batch=1", "sequence=16"]
    report = compile_model(CompileOptions(source=str(model), output=tmp_path / "a", target="nvidia-h100", precision="fp16", dims=dims))
    assert "2 self-attention(s) as one kernel each (2 heads x 16 x 16, head_dim 64, float16)" in report.schedule
    cfg = tmp_path / "off.yaml"
    cfg.write_text("extends: O2\nschedule: {attention_kernel: false}\n")
    report = compile_model(CompileOptions(source=str(model), output=tmp_path / "b", target="nvidia-h100", precision="fp16", dims=dims, config_path=cfg))
    assert not any("self-attention" in line for line in report.schedule)


@needs_nvcc
def test_int8_cuda_build_keeps_attention_float_for_the_kernel(tmp_path):
    """int8 for CUDA: the QDQ model leaves each self-attention float (quantize.attention_nodes: no quantize or
    dequantize along the kernel's pattern, and no FastMathTransform softmax), the report lists those nodes with the
    reason, and the lowering runs both attentions as the kernel; a CPU int8 build quantizes them."""
    import onnx

    from autoglm_compile.pipeline import CompileOptions, compile_model
    from autoglm_compile.quantize import attention_nodes
    from autoglm_compile.zoo import bert_tiny

    model = bert_tiny(tmp_path / "bert.onnx")
    dims = ["batch=1", "sequence=16"]
    report = compile_model(CompileOptions(source=str(model), output=tmp_path / "a", target="nvidia-h100", precision="int8", calib_synthetic=True, dims=dims))
    assert "2 self-attention(s) as one kernel each (2 heads x 16 x 16, head_dim 64, float32)" in report.schedule
    kept = [p for p in report.quantization.protected if p.reason.startswith("self-attention on a CUDA target")]
    assert sorted({p.op for p in kept}) == ["Add", "MatMul", "Mul", "Reshape", "Softmax", "Transpose"]
    assert sum(p.op == "Softmax" for p in kept) == 2 and sum(p.op == "MatMul" for p in kept) == 4
    qdq = onnx.load(str(tmp_path / "a" / "model.opt.onnx"))
    assert not set(attention_nodes(qdq)) - {p.name for p in kept}  # the same nodes, found again in the QDQ model
    producers = {o: n.op_type for n in qdq.graph.node for o in n.output}
    for node in qdq.graph.node:
        if node.op_type in ("Softmax", "MatMul") and node.name in {p.name for p in kept}:
            assert not any(producers.get(i) == "DequantizeLinear" for i in node.input)
    cpu = compile_model(CompileOptions(source=str(model), output=tmp_path / "c", target="host", precision="int8", calib_synthetic=True, dims=dims, runs=1))
    assert not any(p.reason.startswith("self-attention") for p in cpu.quantization.protected)


@needs_nvcc
def test_mixed_cuda_build_runs_the_float_part_in_float16(tmp_path):
    """mixed for CUDA: the int8 GEMMs as in an int8 build, and what stays float (here the self-attentions) in float16
    by ToMixedPrecision: the attention kernel takes float16, and the report says so, without the float32 warning."""
    from autoglm_compile.pipeline import CompileOptions, compile_model
    from autoglm_compile.zoo import bert_tiny

    model = bert_tiny(tmp_path / "bert.onnx")
    report = compile_model(CompileOptions(source=str(model), output=tmp_path / "m", target="nvidia-h100", precision="mixed", calib_synthetic=True,
                                          dims=["batch=1", "sequence=16"]))
    assert report.precision == "mixed" and "2 self-attention(s) as one kernel each (2 heads x 16 x 16, head_dim 64, float16)" in report.schedule
    assert report.quantization.format.endswith("float16 elsewhere (TVM's ToMixedPrecision: float16 operands, float32 accumulation)")
    assert report.quantization.int8_kernels.startswith("0 Conv and 9 MatMul/Gemm as int8 x int8 -> int32")
    assert not any("float32" in w and w.startswith("mixed") for w in report.warnings)
