"""The default GPU schedules: DLight's rules, with a float16 tensor-core GEMM schedule whose tile is a parameter.

DLight's MatmulTensorization (wmma, float16 x float16 -> float32/float16) has one tile: 128 x 128 per thread block,
16 warps of 32 x 32. It takes only GEMMs whose I, J and K are all above 64, and at batch 1 it launches few blocks:
BERT-base's 128 x 768 outputs make 6 blocks on the H200's 132 SMs (the 128x3072 by 3072x768 GEMM: 159 us, about 4
TFLOP/s), and ResNet-50's 7x7 stage pads 49 rows to 128. TensorCoreMatmul takes float16 GEMMs down to
TENSOR_CORE_MIN in every dim with DEFAULT_TILE, 64 x 64 (on the H200 faster than DLight's tile on 25 of the 31 GEMM
tasks of ResNet-50 and BERT-base, up to 2.6x; 0.47x on the worst, a 7x7-stage conv; docs/benchmarks.md). The GPU
tuning worker times every tile of TILES per task and keeps the fastest (tune_worker.sweep_gpu_tiles): no single tile
is best everywhere.
The schedule is DLight's (the same steps: reindex to C[S, I, J] += A[S, I, K] * B[S, J, K], pad, a shared-memory stage
pipelined over K, wmma fragments, the epilogue inlined into the store) with the tile as a parameter. Needs only TVM
(it runs in the tuning worker on the GPU machine too).
"""
from __future__ import annotations

from dataclasses import dataclass

TENSOR_CORE_MIN = 32  # smallest I, J and K given to the tensor-core schedule (batch-1 FC layers stay GEMV)
FRAG = 16  # the wmma fragment: 16 x 16 x 16


@dataclass(frozen=True)
class Tile:
    """A thread block of warps_i x warps_j warps, each computing frags_i x frags_j 16x16 fragments, over K in
    steps of k_frags fragments (one shared-memory stage)."""

    warps_i: int
    warps_j: int
    frags_i: int = 2
    frags_j: int = 2
    k_frags: int = 4

    @property
    def rows(self) -> int:
        return FRAG * self.warps_i * self.frags_i

    @property
    def cols(self) -> int:
        return FRAG * self.warps_j * self.frags_j

    @property
    def shared_bytes(self) -> int:
        """Shared memory per block: the float16 operand stages (two buffers for the pipeline, rows padded by 8) and,
        for tiles smaller than DLight's, the float32 accumulator stage in static shared memory (rows padded by 4)."""
        operands = 2 * (self.rows + self.cols) * (FRAG * self.k_frags + 8) * 2
        return operands + (self.rows * (self.cols + 4) * 4 if self.static_out else 0)

    @property
    def static_out(self) -> bool:
        return self.rows * self.cols < 128 * 128


# Largest first. Tile(4, 4) is DLight's; the others keep a block's static plus dynamic shared memory under the 48 KiB
# a kernel gets without opting in (CUDA_ERROR_INVALID_VALUE at launch otherwise): 64 x 64 with K steps of 32.
TILES = (Tile(4, 4), Tile(2, 2, k_frags=2), Tile(1, 2), Tile(2, 1), Tile(1, 1))
DEFAULT_TILE = TILES[1]


def wmma_schedule(func, tile: Tile):
    """func (a GEMM-like PrimFunc with float16 operands) scheduled on wmma tensor cores with the given tile, or None
    when the intrinsics do not match it."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import get_root_block
    from tvm.s_tir.dlight.gpu.matmul import auto_inline_consumer_chain, auto_inline_producers, get_reduction_blocks
    from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group

    warp, vector = 32, 4
    sch = s_tir.Schedule(func)
    main = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))[0]
    _normalize(sch, main)
    sch.pad_einsum(main, [1, tile.rows, tile.cols, FRAG * tile.k_frags])  # whole block tiles

    batch, i, j, k = sch.get_loops(main)
    i, i_frag = sch.split(i, [None, FRAG])
    j, j_frag = sch.split(j, [None, FRAG])
    k, k_frag = sch.split(k, [None, FRAG])
    sch.reorder(i, j, k, i_frag, j_frag, k_frag)
    inner = main
    outer = sch.blockize(i_frag)
    # grid: (I blocks, J blocks, S); block: warps_i x warps_j warps; a warp: frags_i x frags_j fragments.
    i_block, i_one, i_warp, i_frags = sch.split(i, [None, 1, tile.warps_i, tile.frags_i])
    j_one, j_block, j_warp, j_frags = sch.split(j, [1, None, tile.warps_j, tile.frags_j])
    k_stage, k_step = sch.split(k, [None, tile.k_frags])
    sch.reorder(i_block, j_one, i_one, j_block, j_warp, i_warp, k_stage, k_step, i_frags, j_frags)
    # the shared-memory loads of stage s+1 overlap the fragments' compute of stage s (DLight's pipeline)
    sch.annotate(k_stage, "software_pipeline_order", [0, 3, 1, 4, 5, 2, 6])
    sch.annotate(k_stage, "software_pipeline_stage", [0, 0, 0, 0, 0, 1, 1])
    sch.annotate(k_step, "software_pipeline_order", [0, 1, 2])
    sch.annotate(k_step, "software_pipeline_stage", [0, 0, 1])
    sch.bind(batch, "blockIdx.z")
    sch.bind(sch.fuse(i_block, j_one), "blockIdx.x")
    sch.bind(sch.fuse(i_one, j_block), "blockIdx.y")
    warps = sch.fuse(j_warp, i_warp)
    sch.bind(warps, "threadIdx.y")
    num_warps = tile.warps_i * tile.warps_j

    def stage_in_shared(operand: int):
        stage = sch.cache_read(outer, operand, "shared.dyn")
        sch.compute_at(stage, k_stage)
        _, ty, tx, vec = sch.split(sch.fuse(*sch.get_loops(stage)[-2:]), [None, num_warps, warp, vector])
        sch.bind(tx, "threadIdx.x")
        sch.bind(ty, "threadIdx.y")
        sch.vectorize(vec)
        sch.storage_align(stage, 0, axis=-2, factor=16, offset=8)  # against shared-memory bank conflicts
        sch.annotate(stage, "tirx.manifest_shared_memory_local_stage", 1)
        sch.annotate(stage, "double_buffer_scope", 0)
        auto_inline_producers(sch, stage)

    stage_in_shared(0)
    stage_in_shared(1)
    frag_a = sch.cache_read(outer, 0, "wmma.matrix_a")
    frag_b = sch.cache_read(outer, 1, "wmma.matrix_b")
    sch.compute_at(frag_a, k_step)
    sch.compute_at(frag_b, k_step)
    # The accumulators go through shared memory to the epilogue. DLight stages them in dynamic shared memory, beside
    # the operand stages; with most smaller tiles TVM 0.27's lowering then fails (LowerIntrin: "tvm_access_ptr
    # element type must match the source buffer", float16 vs float32), so those stage in static shared memory.
    out_scope = "shared" if tile.static_out else "shared.dyn"
    out_shared = sch.cache_write(outer, 0, out_scope)
    sch.storage_align(out_shared, 0, -2, 16, 4)
    acc = sch.cache_write(outer, 0, "wmma.accumulator")
    sch.reverse_compute_at(acc, warps)
    sch.reverse_compute_at(out_shared, warps)
    init = sch.get_child_blocks(sch.decompose_reduction(outer, k_stage))[0]

    for out_dtype in ("float32", "float16"):  # float32 accumulation where the GEMM has it
        intrins = get_wmma_intrin_group(load_scope="shared.dyn", store_scope=out_scope, in_dtype="float16", out_dtype=out_dtype, trans_b=True)
        attempt = sch.copy()
        try:
            for block, name in ((frag_a, "load_a"), (frag_b, "load_b")):
                r0, c0, r1 = _by_fragment(attempt, block)
                attempt.unroll(r0)
                attempt.unroll(c0)
                attempt.tensorize(r1, intrins[name])
            attempt.tensorize(attempt.get_loops(init)[-2], intrins["init"])
            attempt.tensorize(_by_fragment(attempt, acc)[2], intrins["store"])
            attempt.tensorize(attempt.get_loops(inner)[-3], intrins["compute"])
        except Exception:  # the intrinsics' dtypes do not match this GEMM's
            continue
        auto_inline_consumer_chain(attempt, out_shared)
        _, tx, vec = attempt.split(attempt.fuse(*attempt.get_loops(out_shared)[-2:]), [None, warp, vector])
        attempt.bind(tx, "threadIdx.x")
        attempt.vectorize(vec)
        return attempt
    return None


def _normalize(sch, main) -> None:
    """The GEMM block `main` rewritten to C[S, I, J] += A[S, I, K] * B[S, J, K] (DLight's reindexing)."""
    from tvm.s_tir.dlight.gpu.matmul import get_index_map

    reindexed = [sch.reindex(main, ("read", 0)), sch.reindex(main, ("read", 1)), sch.reindex(main, ("write", 0))]
    gemm, a_map, b_map, c_map = get_index_map(sch.get(main))
    sch.transform_layout(reindexed[0], ("write", 0), a_map)
    sch.transform_layout(reindexed[1], ("write", 0), b_map)
    sch.transform_layout(reindexed[2], ("read", 0), c_map)
    sch.transform_block_layout(main, gemm)


def _by_fragment(sch, block):
    """The block's last two loops split into 16 x 16 fragments: (outer row, outer column, fragment row) loops."""
    r, c = sch.get_loops(block)[-2:]
    r0, r1 = sch.split(r, [None, FRAG])
    c0, c1 = sch.split(c, [None, FRAG])
    sch.reorder(r0, c0, r1, c1)
    return r0, c0, r1


def tensor_core_gemm(func, target) -> tuple[int, int, int, int] | None:
    """(S, I, J, K) of func when it is a GEMM the tensor-core schedule takes on this target (float16 operands, static
    extents, I, J and K all at least TENSOR_CORE_MIN); None otherwise."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import get_root_block
    from tvm.s_tir.dlight.gpu.matmul import check_sm_version, get_in_out_dtypes, get_index_map, get_reduction_blocks

    arch = str(target.attrs.get("arch", "")) if target.kind.name == "cuda" else ""
    if not isinstance(func, tirx.PrimFunc) or not arch or check_sm_version(arch) < 70 or "dlight.do_not_tensorize" in func.attrs.keys():
        return None
    sch = s_tir.Schedule(func)
    blocks = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
    if blocks is None or not get_index_map(sch.get(blocks[0])):
        return None
    main = blocks[0]
    _normalize(sch, main)
    block = sch.get(main)
    extents = [iv.dom.extent for iv in block.iter_vars]
    if get_in_out_dtypes(block)[0] != "float16" or not all(isinstance(e, tirx.IntImm) for e in extents):
        return None
    s, i, j, k = (int(e) for e in extents)
    return (s, i, j, k) if min(i, j, k) >= TENSOR_CORE_MIN else None


def tile_candidates(func, target) -> list[tuple[Tile, object]]:
    """(tile, schedule) for every tile of TILES that schedules func: what the GPU tuning worker measures
    (tune_worker.sweep_gpu_tiles). Empty when func is no tensor-core GEMM."""
    if tensor_core_gemm(func, target) is None:
        return []
    out = []
    for tile in TILES:
        try:
            sch = wmma_schedule(func, tile)
        except Exception:  # this tile does not divide into this GEMM's loops
            continue
        if sch is not None:
            out.append((tile, sch))
    return out


def tensor_core_rule():
    """A DLight rule: wmma_schedule with DEFAULT_TILE for the GEMMs tensor_core_gemm accepts; None (the next
    rule decides) for everything else."""
    from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

    class TensorCoreMatmul(GPUScheduleRule):
        def apply(self, func, target, tunable):
            gemm = tensor_core_gemm(func, target)
            if gemm is None:
                return None
            try:
                return wmma_schedule(func, DEFAULT_TILE)
            except Exception:  # a GEMM the tensor-core schedule cannot take: DLight's Matmul decides
                return None

    return TensorCoreMatmul()


def default_schedule_pass():
    """DLight's ApplyDefaultSchedule with TVM's CUDA rules (relax.backend.cuda.pipeline), tensor_core_rule first."""
    from tvm.s_tir import dlight as dl

    return dl.ApplyDefaultSchedule(tensor_core_rule(), dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())
