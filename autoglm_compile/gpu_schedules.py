"""The default GPU schedules: DLight's rules, with float16 tensor cores for GEMMs smaller than DLight's threshold.

DLight's Matmul rule tensorizes (MatmulTensorization: wmma, float16 x float16 -> float16/float32) only GEMMs whose
I, J and K are all above 64; smaller ones get its scalar schedule. On ResNet-50 at batch 1 the 7x7 stage's
convolutions (49 output pixels) then took over 40% of the fp16 time on the H200 (docs/benchmarks.md). TensorCoreMatmul
takes float16 GEMMs down to TENSOR_CORE_MIN; MatmulTensorization pads them to its tile. Needs only TVM (it runs in
the tuning worker on the GPU machine too).
"""
from __future__ import annotations

TENSOR_CORE_MIN = 32  # smallest I, J and K given to the tensor-core schedule (batch-1 FC layers stay GEMV)


def tensor_core_rule():
    """A DLight rule: MatmulTensorization for float16 GEMMs whose I, J, K are all at least TENSOR_CORE_MIN; None
    (the next rule decides) for everything else."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import get_root_block
    from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
    from tvm.s_tir.dlight.gpu.matmul import MatmulTensorization, check_sm_version, get_in_out_dtypes, get_index_map, get_reduction_blocks

    class TensorCoreMatmul(GPUScheduleRule):
        def apply(self, func, target, tunable):
            if not isinstance(func, tirx.PrimFunc) or target.kind.name != "cuda" or check_sm_version(str(target.attrs.get("arch", ""))) < 70:
                return None
            sch = s_tir.Schedule(func)
            blocks = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
            if blocks is None or not get_index_map(sch.get(blocks[0])):
                return None
            main = blocks[0]
            reindexed = [sch.reindex(main, ("read", 0)), sch.reindex(main, ("read", 1)), sch.reindex(main, ("write", 0))]
            gemm, a_map, b_map, c_map = get_index_map(sch.get(main))
            sch.transform_layout(reindexed[0], ("write", 0), a_map)
            sch.transform_layout(reindexed[1], ("write", 0), b_map)
            sch.transform_layout(reindexed[2], ("read", 0), c_map)
            sch.transform_block_layout(main, gemm)
            block = sch.get(main)
            extents = [iv.dom.extent for iv in block.iter_vars[1:]]  # I, J, K (the batch dim first)
            if get_in_out_dtypes(block)[0] != "float16" or not all(isinstance(e, tirx.IntImm) and e.value >= TENSOR_CORE_MIN for e in extents):
                return None
            try:
                return MatmulTensorization().apply(func, target, tunable)
            except Exception:  # a GEMM the tensor-core schedule cannot take: DLight's Matmul decides
                return None

    return TensorCoreMatmul()


def default_schedule_pass():
    """DLight's ApplyDefaultSchedule with TVM's CUDA rules (relax.backend.cuda.pipeline), tensor_core_rule first."""
    from tvm.s_tir import dlight as dl

    return dl.ApplyDefaultSchedule(tensor_core_rule(), dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())
