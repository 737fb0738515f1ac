"""Two GPU schedule changes, checked without a GPU: the tensor-core GEMMs' cp.async pipeline (gpu_schedules.
pipeline_stages, on sm_80 and newer) and split-K's sum fused into the layer norm that reads it
(gpu_schedules.fuse_split_k_sums): the fused module computes what the unfused one does, on the CPU."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from autoglm_compile import gpu_schedules as gs

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


def cuda_target(arch: str):
    import tvm

    return tvm.target.Target({"kind": "cuda", "arch": arch, "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
                              "thread_warp_size": 32, "registers_per_block": 65536}, host={"kind": "llvm"})


def split_gemm(m: int, n: int, k: int, s: int, a_dtype: str = "float16", b_dtype: str = "float16"):
    """split-K's GEMM (A[m, k] by B^T[n, k] in s slices of K) as a PrimFunc."""
    from tvm import te

    a = te.placeholder((m, k), a_dtype, name="a")
    b = te.placeholder((n, k), b_dtype, name="b")
    return te.create_prim_func([a, b, gs._split_k_gemm(a, b, s, transposed=True)])


def cuda_source(sch, target) -> str:
    import tvm

    with tvm.transform.PassContext(opt_level=3, config=gs.async_copy_config(target)):
        lib = tvm.compile(sch.mod, target=target)
    return "\n".join(m.inspect_source() for m in lib.mod.imports)


@pytest.mark.parametrize("arch, stages", [("sm_90", 3), ("sm_87", 3), ("sm_80", 3), ("sm_75", 2), ("sm_72", 2)])
def test_async_pipeline_needs_sm80(arch, stages):
    assert gs.pipeline_stages(gs.DEFAULT_TILE, "float16", cuda_target(arch)) == stages
    assert gs.pipeline_stages(gs.DEFAULT_TILE, "float16", None) == 2


def test_tiles_whose_buffers_exceed_the_shared_limit_keep_two_stages():
    for tile in gs.TILES:
        stages = gs.pipeline_stages(tile, "float16", cuda_target("sm_90"))
        assert (stages == gs.ASYNC_STAGES) == (tile.shared_bytes_for("float16", gs.ASYNC_STAGES) <= gs.SHARED_LIMIT)
        assert tile.shared_bytes_for("float16", stages) <= gs.SHARED_LIMIT or stages == 2
    assert gs.pipeline_stages(gs.TILES[0], "float16", cuda_target("sm_90")) == 2  # DLight's 128 x 128: 110 KiB in 3 stages
    assert gs.DEFAULT_TILE.shared_bytes_for("float16", 3) == 3 * 128 * 40 * 2 + 64 * 68 * 4


@pytest.mark.parametrize("a_dtype, b_dtype, piece", [("float16", "float16", 16), ("float32", "float16", 16), ("int8", "int8", 4)])
def test_sm90_gemm_copies_operands_with_cp_async(a_dtype, b_dtype, piece):
    """On sm_90 the operands go straight to shared memory in 16-byte cp.async copies, three K steps in flight (the
    wait leaves the next two outstanding); a float32 A is cast on its way (a plain store), B still goes by cp.async.
    On sm_75 the pipeline stays register-staged: no cp.async."""
    func = split_gemm(128, 768, 768, 4, a_dtype, b_dtype)
    src = cuda_source(gs.wmma_schedule(func, gs.DEFAULT_TILE, cuda_target("sm_90")), cuda_target("sm_90"))
    assert "wmma::mma_sync" in src and "cp.async" in src
    assert f'"n"({piece})' in src
    assert "cp_async_wait_group_2" in src.replace("async_wait_group_", "cp_async_wait_group_")
    old = cuda_source(gs.wmma_schedule(func, gs.DEFAULT_TILE, cuda_target("sm_75")), cuda_target("sm_75"))
    assert "wmma::mma_sync" in old and "cp.async" not in old


@pytest.mark.parametrize("tile", gs.TILES, ids=lambda t: f"{t.rows}x{t.cols}k{16 * t.k_frags}")
def test_every_tile_lowers_on_sm90(tile):
    func = split_gemm(128, 768, 768, 2)
    src = cuda_source(gs.wmma_schedule(func, tile, cuda_target("sm_90")), cuda_target("sm_90"))
    assert "wmma::mma_sync" in src
    assert ("cp.async" in src) == (gs.pipeline_stages(tile, "float16", cuda_target("sm_90")) > 2)


# ------------------------------------------------------------------------------- split-K sum into the layer norm

def block_module(m: int, k: int, n: int):
    """layer_norm(x @ w + bias + residual), float32 (mixed_precision makes the matmul float16): a BERT block's end."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, m, k), "float32"))
    res = relax.Var("res", relax.TensorType((1, m, n), "float32"))
    w = relax.Var("w", relax.TensorType((k, n), "float32"))
    bias, gamma, beta = (relax.Var(name, relax.TensorType((n,), "float32")) for name in ("bias", "gamma", "beta"))
    with bb.function("main", [x, res, w, bias, gamma, beta]):
        with bb.dataflow():
            y = bb.emit(relax.op.add(relax.op.add(relax.op.matmul(x, w), bias), res))
            out = bb.emit_output(bb.emit(relax.op.nn.layer_norm(y, gamma, beta, axes=[-1], epsilon=1e-12)))
        bb.emit_func_output(out)
    return bb.get()


def legalized(mod, fuse: bool):
    """TVM's CUDA legalize passes up to FuseTIR (as tune_worker.gpu_legalize_passes), with or without the fusion."""
    import tvm
    from tvm import relax

    passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
              relax.transform.FuseOps(), relax.transform.FuseTIR()]
    return tvm.transform.Sequential(passes + ([gs.fuse_split_k_sums_pass()] if fuse else []))(mod)


def run_on_cpu(mod, inputs):
    import tvm
    from tvm import relax

    ex = tvm.compile(mod, target="llvm")
    return relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in inputs]).numpy()


def test_split_k_sum_fused_into_layer_norm_computes_the_same():
    from autoglm_compile.tvm_build import mixed_precision

    m, k, n = 128, 1024, 64
    mod = gs.split_k(mixed_precision(block_module(m, k, n), ["w"]), sms=132)
    plain, fused = legalized(mod, False), legalized(mod, True)
    names = {gv.name_hint for gv in fused.functions}
    assert any(name.startswith("fused_split_k_layer_norm") for name in names)
    assert not any(name.startswith("fused_split_k_sum") or name == "layer_norm" for name in names)  # one kernel, not two
    assert any(gv.name_hint.startswith("fused_split_k_sum") for gv in plain.functions)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1, m, k)).astype(np.float32) * 0.05, rng.standard_normal((1, m, n)).astype(np.float32),
              rng.standard_normal((k, n)).astype(np.float16), *(rng.standard_normal(n).astype(np.float32) for _ in range(3))]
    want, got = run_on_cpu(plain, inputs), run_on_cpu(fused, inputs)
    y = inputs[0][0].astype(np.float16).astype(np.float32) @ inputs[2].astype(np.float32) + inputs[3] + inputs[1][0]
    ref = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-12) * inputs[4] + inputs[5]
    assert np.abs(got[0] - ref).max() < 1e-2
    assert np.abs(got - want).max() < 1e-4


def test_a_sum_read_twice_is_left_alone():
    """The residual add's result read by the layer norm and by the output as well: fusing would compute it twice."""
    import tvm
    from tvm import relax

    from autoglm_compile.tvm_build import mixed_precision

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 128, 1024), "float32"))
    w = relax.Var("w", relax.TensorType((1024, 64), "float32"))
    g = relax.Var("g", relax.TensorType((64,), "float32"))
    with bb.function("main", [x, w, g]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, w))
            z = bb.emit(relax.op.nn.layer_norm(y, g, g, axes=[-1]))
            out = bb.emit_output(relax.Tuple([y, z]))
        bb.emit_func_output(out)
    mod = legalized(gs.split_k(mixed_precision(bb.get(), ["w"]), sms=132), True)
    names = {gv.name_hint for gv in mod.functions if isinstance(mod[gv], tvm.tirx.PrimFunc)}
    assert not any(name.startswith("fused_split_k_layer_norm") for name in names)
    assert "layer_norm" in names


@needs_nvcc
def test_cuda_lowering_of_bert_block_end_has_one_kernel_for_sum_and_norm():
    """The CUDA lowering (DLight's schedules): the fused function is scheduled as a row reduction, and the report
    notes say how many sums were fused."""
    import tvm

    from autoglm_compile.target import resolve_target
    from autoglm_compile.tvm_build import ScheduleContext, lower

    desc = resolve_target("nvidia-h100")
    ctx = ScheduleContext(desc=desc, fp16=True, split_k=True)
    lowered, _ = lower(block_module(128, 1024, 768), desc, "default", ctx)
    prims = {gv.name_hint: f for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    fused = [name for name in prims if name.startswith("fused_split_k_layer_norm")]
    assert len(fused) == 1 and "threadIdx.x" in prims[fused[0]].script()
    assert "layer_norm" not in prims and not any(name.startswith("fused_split_k_sum") for name in prims)
    assert "1 split-K sum(s) fused into the layer norm that reads them" in ctx.notes


def conv_split(c: int, o: int, hw: int, kernel: int, nhwc: bool = False):
    """split-K's conv (2 slices of the input channels) as a PrimFunc: NCHW float16 or NHWC int8."""
    from tvm import te

    dtype = "int8" if nhwc else "float16"
    x = te.placeholder((1, hw, hw, c) if nhwc else (1, c, hw, hw), dtype, name="x")
    w = te.placeholder((o, kernel, kernel, c) if nhwc else (o, c, kernel, kernel), dtype, name="w")
    pad = kernel // 2
    return te.create_prim_func([x, w, gs._split_k_conv(x, w, 2, (1, 1), (pad, pad, pad, pad), (1, 1), (hw, hw), nhwc)])


@pytest.mark.parametrize("func", [
    lambda: conv_split(256, 64, 56, 1),    # ResNet-50's 1x1 conv: channels 3136 elements apart
    lambda: conv_split(64, 64, 56, 3),     # 3x3: K runs over kernel columns of 3
    lambda: conv_split(64, 64, 56, 3, nhwc=True),  # int8 NHWC: contiguous channels, but through the padding's gather
    lambda: split_gemm_b_kn(128, 768, 768, 4),      # B [K, N]: K strided by N
], ids=["conv1x1", "conv3x3", "conv3x3-nhwc-int8", "b-k-by-n"])
def test_operands_not_contiguous_along_k_keep_the_register_pipeline(func):
    """TVM 0.27's InjectPTXAsyncCopy makes one contiguous cp.async of a strided vector load (misaligned addresses on
    the H200 with ResNet-50): such GEMMs keep the register-staged pipeline."""
    src = cuda_source(gs.wmma_schedule(func(), gs.DEFAULT_TILE, cuda_target("sm_90")), cuda_target("sm_90"))
    assert "wmma::mma_sync" in src and "cp.async" not in src


def split_gemm_b_kn(m: int, n: int, k: int, s: int):
    from tvm import te

    a = te.placeholder((m, k), "float16", name="a")
    b = te.placeholder((k, n), "float16", name="b")
    return te.create_prim_func([a, b, gs._split_k_gemm(a, b, s, transposed=False)])


# ------------------------------------------------------------------------------------------- NHWC float16 convs

def conv_net(c: int = 32, hw: int = 14, seed: int = 0):
    """relu(conv3x3(x) + bias) -> conv1x1 -> max_pool, float32 with constant weights (a CLI build's)."""
    from tvm import relax

    rng = np.random.default_rng(seed)
    w1 = relax.const((rng.standard_normal((c, c, 3, 3)) * 0.1).astype(np.float32))
    w2 = relax.const((rng.standard_normal((2 * c, c, 1, 1)) * 0.1).astype(np.float32))
    bias = relax.const(rng.standard_normal((1, c, 1, 1)).astype(np.float32))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, c, hw, hw), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.add(relax.op.nn.conv2d(x, w1, padding=1), bias)))
            z = bb.emit(relax.op.nn.max_pool2d(relax.op.nn.conv2d(y, w2), pool_size=2, strides=2))
            out = bb.emit_output(z)
        bb.emit_func_output(out)
    return bb.get()


def test_nhwc_convs_compute_the_same_with_transposes_only_at_the_ends():
    from tvm import relax

    from autoglm_compile.tvm_build import mixed_precision

    plain = mixed_precision(conv_net())
    nhwc = gs.nhwc_convs(mixed_precision(conv_net()))
    assert gs.float16_convs(nhwc) == 2
    text = nhwc["main"].script()
    assert text.count('data_layout="NHWC"') == 2 and text.count('kernel_layout="OHWI"') == 2
    folded = relax.transform.FoldConstant()(nhwc)
    # the input's transpose to NHWC and the output's back: the weights' and the bias's transposes are folded
    assert folded["main"].script().count("R.permute_dims") == 2
    x = np.random.default_rng(1).standard_normal((1, 32, 14, 14)).astype(np.float32)
    want, got = run_on_cpu(plain, [x]), run_on_cpu(nhwc, [x])
    assert got.shape == want.shape == (1, 64, 7, 7)
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)


def test_fold_permutes_through_a_cast():
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3, 4, 5), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))           # NCHW -> NHWC
            b = bb.emit(relax.op.permute_dims(bb.emit(relax.op.astype(a, "float16")), [0, 3, 1, 2]))  # and back, cast
            c = bb.emit(relax.op.permute_dims(bb.emit(relax.op.permute_dims(x, [1, 0, 2, 3])), [0, 1, 3, 2]))
            out = bb.emit_output(relax.Tuple([b, c]))
        bb.emit_func_output(out)
    folded = gs.fold_permutes(bb.get())
    text = folded["main"].script()
    assert text.count("R.permute_dims") == 1 and "axes=[1, 0, 3, 2]" in text  # b is astype(x); c one permute
    xs = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    import tvm

    ex = tvm.compile(folded, target="llvm")
    got_b, got_c = (t.numpy() for t in relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(xs)))
    np.testing.assert_array_equal(got_b, xs.astype(np.float16))
    np.testing.assert_array_equal(got_c, xs.transpose(1, 0, 3, 2))


@needs_nvcc
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_nhwc_convs_copy_with_predicated_cp_async(layout):
    """NHWC: the 3x3 conv's padded im2col rows go to shared memory by cp.async with zero fill (predicated), the 1x1
    conv's by plain cp.async; NCHW (the ONNX layout, `schedule.conv_layout: NCHW`): no cp.async, no layout note."""
    from autoglm_compile.target import resolve_target
    from autoglm_compile.tvm_build import ScheduleContext, build, lower

    desc = resolve_target("nvidia-h100")
    ctx = ScheduleContext(desc=desc, fp16=True, split_k=True, conv_layout=layout)
    lowered, target = lower(conv_net(64, 28), desc, "default", ctx)
    lib = build(lowered, target).executable.mod
    src = "\n".join(m.inspect_source() for m in _modules(lib) if m.kind == "cuda")
    assert "wmma::mma_sync" in src
    if layout == "NHWC":
        assert "ptx_cp_async_legacy_pred_cg_16" in src and "ptx_cp_async_legacy_cg_16" in src
        assert "2 float16 conv(s) as NHWC/OHWI" in ctx.notes
    else:
        assert "cp.async" not in src and not any("NHWC" in n for n in ctx.notes)


def _modules(mod):
    yield mod
    for sub in mod.imports:
        yield from _modules(sub)


def pool_module(dtype: str = "float16", hw: int = 112, c: int = 64):
    """A 3x3 stride-2 max pool (NHWC) with an elementwise epilogue, legalized and fused into one PrimFunc, as
    ResNet-50's stem pool reaches the schedule."""
    from tvm import relax
    from tvm.script import relax as R

    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, hw, hw, c), dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.max_pool2d(x, pool_size=(3, 3), strides=(2, 2), padding=(1, 1), layout="NHWC"))
            z = bb.emit_output(relax.op.multiply(y, relax.const(2, dtype)))
        bb.emit_func_output(z)
    return legalized(bb.get(), fuse=False)


def _prim_funcs(mod):
    from tvm import tirx

    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}


def test_small_reductions_take_pooling_windows_only():
    from tvm import te

    (pool,) = _prim_funcs(pool_module()).values()
    assert gs.small_reductions(pool)
    x = te.placeholder((1, 7, 7, 2048), "float32", name="x")  # the global average pool: 49 into 2048
    r1, r2 = te.reduce_axis((0, 7)), te.reduce_axis((0, 7))
    mean = te.compute((1, 2048), lambda n, c: te.sum(x[n, r1, r2, c], axis=[r1, r2]), name="mean")
    assert not gs.small_reductions(te.create_prim_func([x, mean]))
    assert not gs.small_reductions(split_gemm(128, 768, 768, 4))  # K slices of 192


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_small_reduction_schedule_computes_the_pool(dtype):
    """The schedule with its loops serial (bind=False) runs on the CPU: the max over each window, then the epilogue."""
    import tvm

    (pool,) = _prim_funcs(pool_module(dtype, hw=16, c=8)).values()
    sch = gs.small_reduction_schedule(pool, bind=False)
    assert sch is not None
    f = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}), target="llvm")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, 16, 16, 8)) * 8).astype(dtype) if dtype == "float16" else rng.integers(0, 100, (1, 16, 16, 8)).astype(dtype)
    out = tvm.runtime.tensor(np.zeros((1, 8, 8, 8), dtype))
    f(tvm.runtime.tensor(x), out)
    padded = np.pad(x.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    want = np.max([padded[:, i:i + 16:2, j:j + 16:2, :] for i in range(3) for j in range(3)], axis=0) * 2
    np.testing.assert_array_equal(out.numpy().astype(np.float32), want.astype(dtype).astype(np.float32))


@needs_nvcc
@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_cuda_pool_is_one_kernel_without_shared_memory(dtype):
    """The default CUDA schedule gives the pool and its epilogue one kernel, a thread per output, no shared-memory
    reduction across threads (DLight's GeneralReduction: a block of 256 threads per output)."""
    import tvm

    target = cuda_target("sm_90")
    mod = pool_module(dtype)
    with target:
        scheduled = gs.default_schedule_pass()(mod)
    (func,) = _prim_funcs(scheduled).values()
    src = cuda_source(tvm.s_tir.Schedule(func.with_attr("global_symbol", "main")), target)
    assert len(re.findall(r"__global__[^;{]*\{", src)) == 1  # one kernel defined (the source declares it first)
    assert "__shared__" not in src and "pool_max_intermediate_local" in src


def test_small_reduction_rule_leaves_several_reductions_to_dlight():
    """A softmax over short rows (a max and a sum, 16 elements each, into 4096 rows) passes small_reductions, and the
    rule still returns None for it: the next DLight rule schedules it, as before."""
    from tvm import relax
    from tvm.script import relax as R

    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((4096, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.softmax(x))
        bb.emit_func_output(y)
    (softmax,) = _prim_funcs(legalized(bb.get(), fuse=False)).values()
    (pool,) = _prim_funcs(pool_module()).values()
    rule, target = gs.small_reduction_rule(), cuda_target("sm_90")
    assert gs.small_reductions(softmax) and rule.apply(softmax, target, False) is None
    assert rule.apply(pool, target, False) is not None
