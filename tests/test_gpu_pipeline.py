"""split-K's sum fused into the layer norm that reads it (gpu_schedules.fuse_split_k_sums), checked without a GPU:
the fused module computes what the unfused one does, on the CPU, and the CUDA lowering has one kernel for both."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from autoglm_compile import gpu_schedules as gs

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


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

