"""Split-K for float16 GEMMs that launch too few thread blocks (gpu_schedules.split_k), checked without a GPU: the
split factor's rule, the rewritten module computing the same values as the plain one (on the CPU), and the CUDA
lowering giving the split GEMM the tensor-core schedule with the sum and the epilogue in one kernel."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from autoglm_compile import gpu_schedules as gs


@pytest.mark.parametrize("m,n,k,expected", [  # two waves of 132 SMs: 264 blocks
    (128, 768, 3072, 16),  # BERT-base FFN down: 2 x 12 blocks of 64 x 64 -> 384 blocks
    (128, 768, 768, 4),    # attention output: 96 blocks; K / 8 would be 96, under SPLIT_K_MIN
    (128, 3072, 768, 4),   # FFN up: 96 blocks; 192 are not two waves yet
    (128, 2304, 768, 4),   # Q, K and V merged (merge-parallel-matmuls)
    (49, 512, 4608, 32),   # ResNet-50's last 3x3 convs: 8 blocks (split_k caps it at max_split, 16)
    (4096, 4096, 4096, 1),  # 4096 blocks already
    (128, 768, 96, 1),     # K too short to split
])
def test_split_factor(m, n, k, expected):
    assert gs.split_k_factor(m, n, k, sms=132, channels=(512, 9) if k == 4608 else None) == expected
    s = expected
    assert k % s == 0 and (s == 1 or k // s >= gs.SPLIT_K_MIN)


def module(m: int, k: int, n: int):
    """x[1, m, k] @ w[k, n] + bias, then GELU's tanh, in float32 (mixed_precision makes float16 of it)."""
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, m, k), "float32"))
    w = relax.Var("w", relax.TensorType((k, n), "float32"))
    bias = relax.Var("bias", relax.TensorType((n,), "float32"))
    with bb.function("main", [x, w, bias]):
        with bb.dataflow():
            y = bb.emit(relax.op.tanh(relax.op.add(relax.op.matmul(x, w), bias)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def build_and_run(mod, inputs):
    import tvm
    from tvm import relax

    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in inputs]).numpy()


def test_split_module_computes_what_the_plain_one_does():
    from autoglm_compile.tvm_build import mixed_precision

    m, k, n = 64, 1024, 48
    plain = mixed_precision(module(m, k, n), ["w"])
    split = gs.split_k(mixed_precision(module(m, k, n), ["w"]), sms=132)
    names = {gv.name_hint for gv in split.functions}
    assert {"matmul_split_k", "split_k_sum"} <= names
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1, m, k)).astype(np.float32) * 0.05, rng.standard_normal((k, n)).astype(np.float16),
              rng.standard_normal(n).astype(np.float32)]
    want, got = build_and_run(plain, inputs), build_and_run(split, inputs)
    ref = np.tanh(inputs[0].astype(np.float16).astype(np.float32) @ inputs[1].astype(np.float32) + inputs[2])
    assert np.abs(got - ref).max() < 2e-2 and np.abs(got - want).max() < 2e-2


def test_enough_blocks_means_no_split():
    from autoglm_compile.tvm_build import mixed_precision

    mod = gs.split_k(mixed_precision(module(128, 1024, 128), ["w"]), sms=1)  # 4 blocks: two waves of one SM
    assert "matmul_split_k" not in {gv.name_hint for gv in mod.functions}


def test_cuda_lowering_tensorizes_the_split_gemm_and_fuses_the_sum_with_the_epilogue():
    import tvm

    from autoglm_compile.target import resolve_target
    from autoglm_compile.tvm_build import ScheduleContext, lower, mixed_precision

    desc = resolve_target("nvidia-h100")
    assert desc.cuda.sm_count == 132
    mod = mixed_precision(module(128, 3072, 768), ["w"])
    lowered, _ = lower(mod, desc, "default", ScheduleContext(desc=desc, split_k=True))
    prims = {gv.name_hint: f for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert "wmma" in prims["matmul_split_k"].script()
    epilogue = [name for name in prims if name.startswith("fused_split_k_sum")]
    assert len(epilogue) == 1 and "tanh" in epilogue[0] and "add" in epilogue[0]
    off, _ = lower(mixed_precision(module(128, 3072, 768), ["w"]), desc, "default", ScheduleContext(desc=desc, split_k=False))
    assert not any("split_k" in gv.name_hint for gv in off.functions)


def conv_module(c: int, o: int, hw: int, padding, stride: int):
    """relu(conv2d(x[1, c, hw, hw], w[o, c, 3, 3])) in float32."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, c, hw, hw), "float32"))
    w = relax.Var("w", relax.TensorType((o, c, 3, 3), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, w, strides=stride, padding=padding)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("padding,stride,hw", [((1, 1, 1, 1), 1, 7), ((1, 0, 0, 1), 2, 14)])  # (top, left, bottom, right)
def test_split_conv_computes_what_the_plain_one_does(padding, stride, hw):
    from autoglm_compile.tvm_build import mixed_precision

    c, o = 256, 32
    split = gs.split_k(mixed_precision(conv_module(c, o, hw, padding, stride), ["w"]), sms=132)
    assert "conv2d_split_k" in {gv.name_hint for gv in split.functions}
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1, c, hw, hw)).astype(np.float32), (rng.standard_normal((o, c, 3, 3)) * 0.05).astype(np.float16)]
    want = build_and_run(mixed_precision(conv_module(c, o, hw, padding, stride), ["w"]), inputs)
    got = build_and_run(split, inputs)
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max())


def test_cuda_lowering_tensorizes_the_split_conv():
    import tvm

    from autoglm_compile.target import resolve_target
    from autoglm_compile.tvm_build import ScheduleContext, lower, mixed_precision

    desc = resolve_target("nvidia-h100")
    lowered, _ = lower(mixed_precision(conv_module(512, 512, 7, (1, 1, 1, 1), 1), ["w"]), desc, "default", ScheduleContext(desc=desc, split_k=True))
    prims = {gv.name_hint: f for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert "wmma" in prims["conv2d_split_k"].script()
    assert any(name.startswith("fused_split_k_sum") and "relu" in name for name in prims)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_the_report_says_what_was_split(conv_onnx, tmp_path):
    """An fp16 CUDA build (cross-compiled here) of a tiny conv net: its one conv is too small to split, so the report
    has no split-K line; with ResNet-50's last 3x3 conv it names the split."""
    from autoglm_compile.pipeline import CompileOptions, compile_model

    report = compile_model(CompileOptions(source=str(conv_onnx), output=tmp_path / "a", target="nvidia-h100", precision="fp16"))
    assert report.schedule == ["1 float16 conv(s) as NHWC/OHWI"]
    wide = tmp_path / "wide.onnx"
    onnx_wide_conv(wide)
    report = compile_model(CompileOptions(source=str(wide), output=tmp_path / "b", target="nvidia-h100", precision="fp16"))
    assert report.schedule == ["1 float16 conv(s) as NHWC/OHWI",
                               "split-K on 0 matmul(s) and 1 conv(s) that launch fewer than 2 waves of thread blocks on 132 SMs, in 16 slices"]
    from autoglm_compile.report import summary_rows

    assert ("schedule", "; ".join(report.schedule)) in summary_rows(report)


def onnx_wide_conv(path):
    """x[1, 512, 7, 7] -> Conv 3x3 512 -> 512 (pad 1) -> Relu: ResNet-50's last 3x3 conv."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((512, 512, 3, 3)) * 0.02).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512, 7, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 512, 7, 7])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(path))


def _constant_weight_module(m: int, k: int, n: int, seed: int = 0):
    """x[1, m, k] @ W[k, n] with W a float32 constant, as the CLI's builds have their weights."""
    from tvm import relax

    w = (np.random.default_rng(seed).standard_normal((k, n)) * 0.05).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, m, k), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.matmul(x, relax.const(w))))
        bb.emit_func_output(out)
    return bb.get()


def test_split_gemm_reads_constant_weights_transposed(monkeypatch):
    """A constant weight W[K, N] reaches the split GEMM as W^T [N, K] (FoldConstant folds the transpose at build
    time), so the shared-memory loads read K contiguously: one half4 load instead of four gathered halves. Without
    TRANSPOSE_WEIGHTS the GEMM gathers. Both compute the same (on the CPU)."""
    import tvm

    from autoglm_compile.target import resolve_target
    from autoglm_compile.tvm_build import ScheduleContext, lower, mixed_precision

    m, k, n = 128, 768, 768
    x = np.random.default_rng(1).standard_normal((1, m, k)).astype(np.float32)
    outs, sources = {}, {}
    desc = resolve_target("nvidia-h100")
    for on in (False, True):
        monkeypatch.setattr(gs, "TRANSPOSE_WEIGHTS", on)
        split = gs.split_k(mixed_precision(_constant_weight_module(m, k, n)), sms=132)
        outs[on] = build_and_run(split, [x])
        lowered, target = lower(mixed_precision(_constant_weight_module(m, k, n)), desc, "default", ScheduleContext(desc=desc, split_k=True))
        names = [gv.name_hint for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
        assert not any("transpose" in name or "permute" in name for name in names)  # folded at build time
        lib = tvm.compile(lowered, target=target, relax_pipeline=None)
        sources[on] = "\n".join(mod.inspect_source() for mod in _modules(lib.mod) if mod.kind == "cuda")
    np.testing.assert_allclose(outs[True], outs[False], rtol=1e-5, atol=1e-5)
    def gathers(src):  # a half4 made of four separate loads from a kernel argument
        return [line for line in src.splitlines() if "= make_half4(" in line and "_ptr[" in line]

    assert gathers(sources[False]) and not gathers(sources[True])


def _modules(mod):
    yield mod
    for sub in mod.imports:
        yield from _modules(sub)


def test_gemm_epilogue_reading_bools_is_not_vectorized():
    """TVM's CUDA codegen loads 4 bools as a ushort4 (8 bytes from 4): BERT's attention mask in the score matmul's
    epilogue made cudaErrorMisalignedAddress on the H200. Such an epilogue reads one element per thread."""
    import tvm
    from tvm import te, tirx

    from autoglm_compile.tune_worker import import_tensor_intrinsics

    import_tensor_intrinsics()  # seconds, instead of TVM's half a minute
    a = te.placeholder((1, 128, 64), "float16", name="A")
    b = te.placeholder((64, 128), "float16", name="B")
    rows, cols = te.placeholder((128,), "bool", name="row_mask"), te.placeholder((128,), "bool", name="mask")
    r = te.reduce_axis((0, 64), name="k")
    c = te.compute((1, 128, 128), lambda s, i, j: te.sum(a[s, i, r].astype("float32") * b[r, j].astype("float32"), axis=r), name="C")
    both = te.compute((128, 128), lambda i, j: tirx.all(rows[i], cols[j]), name="both")  # BERT's logical_and -> where
    d = te.compute((1, 128, 128), lambda s, i, j: tirx.Select(both[i, j].astype("int32") > 0, c[s, i, j], tirx.const(-1e4, "float32")), name="D")
    func = te.create_prim_func([a, b, rows, cols, d])
    sch = gs.wmma_schedule(func, gs.DEFAULT_TILE)
    assert sch is not None
    lib = tvm.compile(sch.mod, target=tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"}))
    src = "\n".join(m.inspect_source() for m in _modules(lib.mod) if m.kind == "cuda")
    assert "wmma::mma_sync" in src and "mask_ptr[" in src
    assert "ushort4 v" not in src and "*(ushort" not in src


def test_dlight_rules_load_bools_one_at_a_time():
    """DLight's Matmul vectorizes the epilogue of fp32 BERT's score matmul, which reads the attention mask: TVM's codegen
    then loads 2 bools as a ushort2. gpu_schedules.scalar_bools unrolls those loops instead."""
    import tvm
    from tvm import te, tirx
    from tvm.s_tir import dlight as dl

    a = te.placeholder((1, 128, 64), "float32", name="A")
    b = te.placeholder((64, 128), "float32", name="B")
    rows, cols = te.placeholder((128,), "bool", name="row_mask"), te.placeholder((128,), "bool", name="mask")
    r = te.reduce_axis((0, 64), name="k")
    c = te.compute((1, 128, 128), lambda s, i, j: te.sum(a[s, i, r] * b[r, j], axis=r), name="C")
    both = te.compute((128, 128), lambda i, j: tirx.all(rows[i], cols[j]), name="both")
    d = te.compute((1, 128, 128), lambda s, i, j: tirx.Select(both[i, j].astype("int32") > 0, c[s, i, j], tirx.const(-1e4, "float32")), name="D")
    func = te.create_prim_func([a, b, rows, cols, d])
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})

    def source(rule):
        with target:
            sch = rule.apply(func, target, False)
        lib = tvm.compile(sch.mod, target=target)
        return "\n".join(m.inspect_source() for m in _modules(lib.mod) if m.kind == "cuda")

    def bool_vectors(src):
        return [line for line in src.splitlines() if "ushort" in line and "mask_ptr" in line]

    assert bool_vectors(source(dl.gpu.Matmul()))  # TVM's codegen as it is
    fixed = source(gs.scalar_bools(dl.gpu.Matmul()))
    assert not bool_vectors(fixed) and "mask_ptr[" in fixed
