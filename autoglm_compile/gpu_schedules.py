"""The default GPU schedules: DLight's rules, with a float16 (and int8) tensor-core GEMM schedule whose tile is a
parameter.

DLight's MatmulTensorization (wmma, float16 x float16 -> float32/float16) has one tile: 128 x 128 per thread block,
16 warps of 32 x 32. It takes only GEMMs whose I, J and K are all above 64, and at batch 1 it launches few blocks:
BERT-base's 128 x 768 outputs make 6 blocks on the H200's 132 SMs (the 128x3072 by 3072x768 GEMM: 159 us, about 4
TFLOP/s), and ResNet-50's 7x7 stage pads 49 rows to 128. TensorCoreMatmul takes float16 GEMMs down to
TENSOR_CORE_MIN in every dim with DEFAULT_TILE, 64 x 64 (on the H200 faster than DLight's tile on 25 of the 31 GEMM
tasks of ResNet-50 and BERT-base, up to 2.6x; 0.47x on the worst, a 7x7-stage conv; docs/benchmarks.md). The GPU
tuning worker times every tile of TILES per task and keeps the fastest (tune_worker.sweep_gpu_tiles): no single tile
is best everywhere. `split_k` splits the K of GEMMs and convolutions that launch too few thread blocks.
The schedule is DLight's (the same steps: reindex to C[S, I, J] += A[S, I, K] * B[S, J, K], pad, a shared-memory stage
pipelined over K, wmma fragments, the epilogue inlined into the store) with the tile as a parameter. Needs only TVM
(it runs in the tuning worker on the GPU machine too).
"""
from __future__ import annotations

from dataclasses import dataclass

from .relax_util import mutate_functions

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
        """Shared memory per block with float16 operands and the register-staged pipeline (two buffers)."""
        return self.shared_bytes_for("float16", 2)

    def shared_bytes_for(self, in_dtype: str, stages: int) -> int:
        """Shared memory per block: `stages` buffers of the operand tiles (rows padded as WMMA_DTYPES says) and, for
        tiles smaller than DLight's, the float32 accumulator stage in static shared memory (rows padded by 4)."""
        pad, size = WMMA_DTYPES[in_dtype][1], 1 if in_dtype == "int8" else 2
        operands = stages * (self.rows + self.cols) * (FRAG * self.k_frags + pad) * size
        return operands + (self.rows * (self.cols + 4) * 4 if self.static_out else 0)

    @property
    def static_out(self) -> bool:
        return self.rows * self.cols < 128 * 128


# Largest first. Tile(4, 4) is DLight's; the others keep a block's static plus dynamic shared memory under the 48 KiB
# a kernel gets without opting in (CUDA_ERROR_INVALID_VALUE at launch otherwise): 64 x 64 with K steps of 32.
TILES = (Tile(4, 4), Tile(2, 2, k_frags=2), Tile(1, 2), Tile(2, 1), Tile(1, 1))
DEFAULT_TILE = TILES[1]  # int8 GEMMs too (K steps of 64 instead of 32 were slower on the H200: BERT-base 1.46 against 1.20 ms)


# wmma operand dtype -> (accumulator dtypes to try, shared-memory row padding in elements). wmma reads a fragment's
# rows at a stride that is a multiple of 16 bytes: 8 float16 or 16 int8 elements of padding keep it one.
WMMA_DTYPES = {"float16": (("float32", "float16"), 8), "int8": (("int32",), 16)}


# K steps in flight where the target copies global to shared memory asynchronously (cp.async, sm_80 and newer): the
# loads of steps s+1 and s+2 overlap the fragments' compute of step s. The split-K GEMMs at batch 1 run a dozen K
# steps per block, each waiting on a global load: on the H200, BERT-base fp16 0.73 -> 0.67 ms (docs/benchmarks.md).
ASYNC_STAGES = 3
ASYNC_MIN_SM = 80
SHARED_LIMIT = 48 * 1024  # what a kernel gets without opting in: a pipeline that needs more keeps two register-staged buffers


def pipeline_stages(tile: Tile, in_dtype: str, target) -> int:
    """ASYNC_STAGES where the target has cp.async and the tile's buffers fit in SHARED_LIMIT; else 2 (the operands
    staged through registers, DLight's double buffer)."""
    from tvm.s_tir.dlight.gpu.matmul import check_sm_version

    arch = str(target.attrs.get("arch", "")) if target is not None and target.kind.name == "cuda" else ""
    if arch and check_sm_version(arch) >= ASYNC_MIN_SM and tile.shared_bytes_for(in_dtype, ASYNC_STAGES) <= SHARED_LIMIT:
        return ASYNC_STAGES
    return 2


def async_copy_config(target) -> dict:
    """The PassContext settings a CUDA build needs for the cp.async pipelines (TIR's InjectPTXAsyncCopy)."""
    return {"tirx.use_async_copy": 1} if target is not None and target.kind.name == "cuda" else {}


def wmma_schedule(func, tile: Tile, target=None):
    """func (a GEMM-like PrimFunc with float16 or int8 operands) scheduled on wmma tensor cores with the given tile,
    or None when the intrinsics do not match it. With a target, the operands' pipeline has `pipeline_stages`
    buffers (cp.async copies in 16-byte pieces where there are more than 2; build with async_copy_config)."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import get_root_block
    from tvm.s_tir.dlight.gpu.matmul import auto_inline_consumer_chain, auto_inline_producers, get_in_out_dtypes, get_reduction_blocks
    from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group

    sch = s_tir.Schedule(func)
    main = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))[0]
    in_dtype = str(get_in_out_dtypes(sch.get(main))[0])
    if in_dtype not in WMMA_DTYPES:
        return None
    stages = pipeline_stages(tile, in_dtype, target)
    if stages > 2 and not _contiguous_along_k(sch, main, 4 if in_dtype == "int8" else 8, padding=in_dtype == "float16"):
        stages = 2
    warp, vector = 32, 4
    # operand elements per thread and load in the async pipeline: 16 bytes of float16 (one cp.async); 4 bytes of int8,
    # since TVM 0.27's CUDA codegen writes an int8x8 or int8x16 constant (a padded conv's zero) as a make_int4 of 16
    # chars, which nvcc refuses
    load_vector = (4 if in_dtype == "int8" else 8) if stages > 2 else vector
    out_dtypes, row_pad = WMMA_DTYPES[in_dtype]
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
    if stages > 2:  # the two shared-memory copies (async), then the fragment pipeline's prologue, body and epilogue
        sch.annotate(k_stage, "software_pipeline_order", [0, 1, 2, 3, 4])
        sch.annotate(k_stage, "software_pipeline_stage", [0, 0] + [stages - 1] * 3)
        sch.annotate(k_stage, "software_pipeline_async_stages", [0])
    else:  # the shared-memory loads of stage s+1 overlap the fragments' compute of stage s (DLight's pipeline)
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
        _, ty, tx, vec = sch.split(sch.fuse(*sch.get_loops(stage)[-2:]), [None, num_warps, warp, load_vector])
        sch.bind(tx, "threadIdx.x")
        sch.bind(ty, "threadIdx.y")
        sch.vectorize(vec)
        sch.storage_align(stage, 0, axis=-2, factor=16, offset=row_pad)  # against shared-memory bank conflicts
        if stages == 2:  # global -> registers -> shared, double-buffered; the async pipeline copies straight to shared
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

    for out_dtype in out_dtypes:  # float32 accumulation where the GEMM has it
        intrins = get_wmma_intrin_group(load_scope="shared.dyn", store_scope=out_scope, in_dtype=in_dtype, out_dtype=out_dtype, trans_b=True)
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
        return scalar_bool_loads(attempt)  # here, not only in the rule: the GPU tile sweep schedules with this too
    return None


def _contiguous_along_k(sch, main, vector: int, padding: bool = False) -> bool:
    """Whether both operands of the GEMM block `main` are read `vector` elements at a time from contiguous, aligned
    memory along K: the last index of each read is the innermost reduction variable plus a multiple of `vector`, and
    the buffer's rows are a multiple of `vector` long. An operand computed in the function must be an elementwise
    image of its input (a cast) or, with `padding`, a copy whose last index is its input's (an NHWC conv's padding of
    the spatial dims: the copy is predicated per `vector` channels, cp.async with zero fill). TVM 0.27's
    InjectPTXAsyncCopy turns a strided vector load into one contiguous cp.async (NCHW ResNet-50's 1x1 convs read
    channels 3136 apart: misaligned addresses on the H200), so the async pipeline is for such GEMMs only."""
    from tvm import sym

    block = sch.get(main)
    k = [iv for iv in block.iter_vars if int(iv.iter_type) == 2]  # 2: CommReduce
    if not k or int(k[-1].dom.extent) % vector:
        return False
    k = k[-1].var
    producers = {sch.get(p).writes[0].source.name: sch.get(p) for p in sch.get_producers(main)}
    analyzer = sym.Analyzer()
    for read in block.reads:
        coef, base = (list(sym.detect_linear_equation(read.region[-1].min, [k])) + [None, None])[:2]
        if coef is None or int(coef) != 1:
            return False
        mod = analyzer.modular_set(base)
        if int(mod.coeff) % vector or int(mod.base) % vector or int(read.source.shape[-1]) % vector:
            return False
        src = producers.get(read.source.name)
        if src is not None:  # computed in the function: a cast, or (padding) a padding along other dims than the last
            dims = [-1] if padding else range(len(src.writes[0].region))
            if len(src.reads) != 1 or len(src.writes) != 1 or len(src.reads[0].region) != len(src.writes[0].region) or not all(
                    analyzer.can_prove_equal(src.reads[0].region[d].min, src.writes[0].region[d].min) for d in dims):
                return False
            if int(src.reads[0].source.shape[-1]) % vector or src.reads[0].source.name in producers:
                return False
    return True


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
    """(S, I, J, K) of func when it is a GEMM the tensor-core schedule takes on this target (float16 or int8 operands,
    static extents, I, J and K all at least TENSOR_CORE_MIN); None otherwise."""
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
    if get_in_out_dtypes(block)[0] not in WMMA_DTYPES or not all(isinstance(e, tirx.IntImm) for e in extents):
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
            sch = wmma_schedule(func, tile, target)
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
                return wmma_schedule(func, DEFAULT_TILE, target)
            except Exception:  # a GEMM the tensor-core schedule cannot take: DLight's Matmul decides
                return None

    return TensorCoreMatmul()


# A reduction over at most this many elements per output (a pooling window) runs in one thread per output.
SMALL_REDUCTION = 32
SMALL_REDUCTION_OUTPUTS = 4096  # ... where the function has at least this many outputs to spread over threads


def small_reductions(func) -> bool:
    """Whether every reduction block of func reduces at most SMALL_REDUCTION elements into each of at least
    SMALL_REDUCTION_OUTPUTS outputs (constant extents), and it has one: ResNet-50's 3x3 max pool, 9 into 802816."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    if not isinstance(func, tirx.PrimFunc):
        return False
    try:
        infos = normalize_prim_func(s_tir.Schedule(func))
    except Exception:  # a function DLight's analysis does not take
        return False
    reductions = [b for b in infos or [] if b.is_reduction()]
    if not reductions:
        return False
    for block in reductions:
        extents = {"S": 1, "R": 1}
        for it in block.iters:
            if not isinstance(it.dom, int) and not isinstance(it.dom, tirx.IntImm):
                return False
            if it.kind in extents:
                extents[it.kind] *= int(it.dom)
        if extents["R"] > SMALL_REDUCTION or extents["S"] < SMALL_REDUCTION_OUTPUTS:
            return False
    return True


SMALL_REDUCTION_THREADS = 256


def small_reduction_schedule(func, bind: bool = True):
    """One thread per output, the window reduced in a register and the epilogue (the int8 builds' requantize) in the
    same kernel: a function of small_reductions with one reduction block and at most one block after it. None where
    that does not apply. bind=False leaves the loops serial (the same schedule, to run on a CPU)."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import try_inline

    sch = s_tir.Schedule(func)
    infos = try_inline(sch, normalize_prim_func(sch))
    kinds = [b.is_reduction() for b in infos]
    if kinds not in ([True], [True, False]):
        return None
    block = infos[0].block_rv
    loops = sch.get_loops(block)
    dom = infos[0].dom_kind()
    spatial = [loop for loop, kind in zip(loops, dom) if kind == "S"]
    window = [loop for loop, kind in zip(loops, dom) if kind == "R"]
    if len(spatial) + len(window) != len(loops) or not window:
        return None
    sch.reorder(*spatial, *window)
    bx, tx = sch.split(sch.fuse(*spatial), factors=[None, SMALL_REDUCTION_THREADS])
    if bind:
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    if len(infos) == 2:
        sch.reverse_compute_at(infos[1].block_rv, tx)
        sch.set_scope(block, 0, "local")
    sch.decompose_reduction(block, window[0])
    return sch


def small_reduction_rule():
    """A DLight rule: functions of small_reductions get small_reduction_schedule; None (the next rule decides) for the
    others, and for those the schedule does not take (several reductions, as a softmax over short rows). DLight's
    GeneralReduction would give each output a thread block of 256 threads that reduce its 9 values together (for
    uint8, the int8 builds' max pool, through shared memory without warp shuffles, which compute-sanitizer's
    racecheck flags as warp-synchronous hazards)."""
    from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

    class SmallReductions(GPUScheduleRule):
        def apply(self, func, target, tunable):
            if not small_reductions(func):
                return None
            try:
                return small_reduction_schedule(func)
            except Exception:  # a shape the schedule does not take: the next rule
                return None

    return SmallReductions()


def default_schedule_pass():
    """DLight's ApplyDefaultSchedule with TVM's CUDA rules (relax.backend.cuda.pipeline), tensor_core_rule first and
    small_reduction_rule before the reduction rules, no rule with vectorized bool loads (scalar_bool_loads:
    wmma_schedule calls it, DLight's rules get scalar_bools)."""
    from tvm.s_tir import dlight as dl

    rules = (dl.gpu.Matmul(), dl.gpu.GEMV(), small_reduction_rule(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())
    return dl.ApplyDefaultSchedule(tensor_core_rule(), *(scalar_bools(rule) for rule in rules))


def scalar_bools(rule):
    """The DLight rule, its schedules passed through scalar_bool_loads."""
    from tvm.s_tir.dlight.base import ScheduleRule

    class ScalarBools(ScheduleRule):
        def apply(self, func, target, tunable):
            sch = rule.apply(func, target, tunable)
            for one in sch if isinstance(sch, list) else [sch] if sch is not None else []:
                scalar_bool_loads(one)
            return sch

        def is_target_available(self, target):
            return rule.is_target_available(target)

    return ScalarBools()


def scalar_bool_loads(sch):
    """sch with the vectorized loops of the blocks that read a bool tensor unrolled instead. TVM 0.27's CUDA codegen
    loads N bools (N bytes) as a ushortN (2N bytes): misaligned, and the wrong bytes. BERT's score matmul reads the
    attention mask in its epilogue: cudaErrorMisalignedAddress on the H200 with the tensor-core schedule, and the
    wrong mask bytes with DLight's Matmul (fp32 and int8 builds). Staging loops (which read no bool) stay as they are:
    unrolling them breaks ManifestSharedMemoryLocalStage."""
    from tvm.tirx import ForKind

    if '"bool"' not in sch.mod["main"].script():
        return sch
    for block in _all_blocks(sch):
        if any(str(getattr(region.source, "dtype", "")) == "bool" for region in sch.get(block).reads):
            for loop in sch.get_loops(block):
                if sch.get(loop).kind == ForKind.VECTORIZED:
                    sch.unroll(loop)
    return sch


def _all_blocks(sch):
    """Every block of the schedule's main function, nested ones included."""
    from tvm.s_tir.dlight.analysis import get_root_block

    out, todo = [], [get_root_block(sch)]
    while todo:
        children = sch.get_child_blocks(todo.pop())
        out += children
        todo += children
    return out


# ----------------------------------------------------------------------------------------------------- split-K

def split_k_factor(m: int, n: int, k: int, sms: int, tile=None, channels: tuple[int, int] | None = None) -> int:
    """How many slices of K a float16 GEMM of M x N outputs over K gets: the smallest power of two that gives the
    tile's thread blocks at least SPLIT_K_WAVES waves of `sms` SMs, each slice at least SPLIT_K_MIN deep and a whole number of
    K steps. A convolution (channels = (input channels, kernel window)) is split along its input channels: the
    slices must divide them. 1: no split (enough blocks already, or K too short)."""
    tile = tile or DEFAULT_TILE
    blocks = -(-m // tile.rows) * -(-n // tile.cols)
    step = FRAG * tile.k_frags
    s = 1
    while blocks * s < SPLIT_K_WAVES * sms and k // (2 * s) >= SPLIT_K_MIN:
        if channels is None and k % (2 * s * step):
            break
        if channels is not None and (channels[0] % (2 * s) or (channels[0] // (2 * s)) % FRAG):
            break
        s *= 2
    return s


TRANSPOSE_WEIGHTS = True  # split GEMMs read constant weights as B^T [N, K] (their loads along K are contiguous)
SPLIT_K_MIN = 128  # the shortest K slice (on the H200, ResNet-50 fp16 untuned: 0.627 ms with 128, 0.700 with 256)
# waves of thread blocks split-K aims at: with the cp.async pipeline, shorter slices in two waves (several blocks per SM
# at once) took BERT-base fp16 from 0.64-0.71 to 0.55-0.64 ms on the H200 in three calls, int8 0.87 -> 0.82 ms, and left
# ResNet-50 as it was (docs/benchmarks.md)
SPLIT_K_WAVES = 2
# (A, B, output) dtypes of the GEMMs split: ToMixedPrecision's float16 ones and int8_kernels' int8 ones
SPLIT_DTYPES = {("float16", "float16", "float32"), ("int8", "int8", "int32")}
CONV_LAYOUTS = {("NCHW", "OIHW", "NCHW"), ("NHWC", "OHWI", "NHWC")}  # float16 convs are NHWC (nhwc_convs) or NCHW (conv_layout), int8 ones NHWC


def nhwc_convs(mod):
    """The float16 convolutions as NHWC with OHWI weights (Relax's ConvertLayout, which carries the layout through
    the elementwise ops and pools after each conv), then consecutive transposes folded (`fold_permutes`; constant
    weights' transposes fold at build time). In NHWC a conv's im2col reads whole runs of channels, contiguous along
    K, so its operands can be copied with cp.async (wmma_schedule); in NCHW they are 3136 elements apart in
    ResNet-50's first stage."""
    from tvm import relax

    return fold_permutes(relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]})(mod))


def float16_convs(mod) -> int:
    """How many conv2d calls of mod's Relax functions take float16 data."""
    import tvm
    from tvm import relax

    conv2d = tvm.ir.Op.get("relax.nn.conv2d")
    found = []
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, lambda e: found.append(e) if isinstance(e, relax.Call) and e.op == conv2d
                                            and str(e.args[0].ty.dtype) == "float16" else None)
    return len(found)


def fold_permutes(mod):
    """permute_dims(permute_dims(x, p), q) as one permute_dims of x, or as x where the two undo each other; also
    through a cast between them (ToMixedPrecision's cast of a weight that a Transpose node read):
    permute_dims(astype(permute_dims(x, p)), q) as astype of the folded permute."""
    import tvm
    from tvm import relax

    permute, astype = tvm.ir.Op.get("relax.permute_dims"), tvm.ir.Op.get("relax.astype")

    @relax.expr_functor.mutator
    class Fold(relax.PyExprMutator):
        def bound(self, e, op):
            b = self.lookup_binding(e) if isinstance(e, relax.Var) else None
            return b if isinstance(b, relax.Call) and b.op == op else None

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != permute or call.attrs.axes is None:
                return call
            cast = self.bound(call.args[0], astype)
            inner = self.bound(cast.args[0] if cast is not None else call.args[0], permute)
            if inner is None or inner.attrs.axes is None:
                return call
            p, q = [int(a) for a in inner.attrs.axes], [int(a) for a in call.attrs.axes]
            axes = [p[i] for i in q]
            x = inner.args[0] if axes == list(range(len(axes))) else relax.op.permute_dims(inner.args[0], axes)
            return relax.op.astype(x, cast.attrs.dtype) if cast is not None else x

    rewritten = mutate_functions(Fold(mod), mod)
    return relax.transform.DeadCodeElimination()(rewritten)


def split_k(mod, sms: int, max_split: int = 16, splits: list | None = None):
    """Split-K for the float16 GEMMs and convolutions that launch fewer than SPLIT_K_WAVES waves of thread blocks (batch 1:
    BERT-base's 128 x 768 outputs are 24 blocks of 64 x 64 on 132 SMs, ResNet-50's last 3x3 convs 8), and for
    int8_kernels' int8 ones (int8 operands, int32 partial sums, NHWC convs) alike. On the H200, untuned:
    ResNet-50 fp16 2.29 -> 0.63 ms, BERT-base 3.15 -> 1.16 ms with merge-parallel-matmuls (docs/benchmarks.md).
    A matmul of A[..., M, K] by a 2-D B[K, N] with float32 output
    (ToMixedPrecision's) becomes one GEMM kernel over the S slices of K (`_split_k_gemm`: float32 partial products
    [S, M, N], the slice a batch dimension of the tensor-core schedule) and a sum of the S partial products in
    float32, written out term by term (`_split_k_sum`) so that it is an injective op, to which FuseOps fuses the GEMM's
    epilogue (bias, GELU, cast): one kernel more than the plain GEMM. Where A is ToMixedPrecision's cast of a float32
    tensor, the GEMM takes the float32 tensor and casts it in its own kernel (`_split_k_gemm`), and the stand-alone
    cast kernel goes. A conv2d (NCHW, OIHW, one group) is split along its input channels the same way
    (`_split_k_conv`). Runs before legalization, after mixed_precision. `splits`, when given, gets ("matmul" or
    "conv2d", S) for each op split."""
    import tvm
    from tvm import relax

    from tvm.ir.expr import Constant

    matmul, astype, conv2d, permute = (tvm.ir.Op.get(f"relax.{name}") for name in ("matmul", "astype", "nn.conv2d", "permute_dims"))

    @relax.expr_functor.mutator
    class SplitK(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op == conv2d:
                return self.conv(call)
            if call.op != matmul or len(call.args) != 2:
                return call
            a, b = call.args
            try:
                a_shape = [int(d) for d in a.ty.shape]
                b_shape = [int(d) for d in b.ty.shape]
            except (AttributeError, TypeError):  # dynamic shapes
                return call
            if len(b_shape) != 2 or len(a_shape) < 2 or (str(a.ty.dtype), str(b.ty.dtype), str(call.ty.dtype)) not in SPLIT_DTYPES:
                return call
            k, n = b_shape
            m = 1
            for d in a_shape[:-1]:
                m *= d
            if a_shape[-1] != k or min(m, n, k) < TENSOR_CORE_MIN:
                return call
            s = min(split_k_factor(m, n, k, sms), max_split)
            if s == 1:
                return call
            source = self.lookup_binding(a) if isinstance(a, relax.Var) else None
            if isinstance(source, relax.Call) and source.op == astype and str(source.args[0].ty.dtype) == "float32":
                a = source.args[0]  # the float32 activation: the GEMM casts it while staging it (no cast kernel)
            if splits is not None:
                splits.append(("matmul", s))
            a2 = self.builder_.emit(relax.op.reshape(a, [m, k]))
            bt = self.transposed(b)
            if bt is not None:  # B[N, K]: the shared-memory loads read each column's K contiguously
                parts = self.builder_.emit_te(_split_k_gemm, a2, bt, s, True, primfunc_name_hint="matmul_split_k")
            else:
                parts = self.builder_.emit_te(_split_k_gemm, a2, b, s, primfunc_name_hint="matmul_split_k")
            total = self.builder_.emit_te(_split_k_sum, parts, primfunc_name_hint="split_k_sum")
            return relax.op.reshape(total, a_shape[:-1] + [n])

        def transposed(self, b):
            """B^T [N, K] for a weight B [K, N] that is a constant (cast or not: FoldConstant folds the transpose at
            build time) or a permute_dims of one; None for an activation, which would cost a transpose kernel."""
            if not TRANSPOSE_WEIGHTS:
                return None
            source = self.lookup_binding(b) if isinstance(b, relax.Var) else None
            if isinstance(source, relax.Call) and source.op == permute and [int(x) for x in source.attrs.axes] == [1, 0]:
                return source.args[0]
            if isinstance(b, Constant) or (isinstance(source, relax.Call) and source.op == astype and isinstance(source.args[0], Constant)):
                return self.builder_.emit(relax.op.permute_dims(b, [1, 0]))
            return None

        def conv(self, call):
            """conv2d NCHW/OIHW (float16 operands, float32 output) or NHWC/OHWI (int8 operands, int32 output), one
            group: split along the input channels."""
            x, w = call.args
            at = call.attrs
            layout = (str(at.data_layout), str(at.kernel_layout), str(at.out_layout))
            if (layout not in CONV_LAYOUTS or int(at.groups) != 1
                    or (str(x.ty.dtype), str(w.ty.dtype), str(call.ty.dtype)) not in SPLIT_DTYPES):
                return call
            nhwc = layout[0] == "NHWC"
            try:
                x_shape, w_shape, out_shape = ([int(d) for d in t] for t in (x.ty.shape, w.ty.shape, call.ty.shape))
            except (AttributeError, TypeError):
                return call
            if nhwc:  # NHWC / OHWI / NHWC
                (batch, _h, _w, c), (o, kh, kw, _c), (_b, oh, ow, _o) = x_shape, w_shape, out_shape
            else:
                (batch, c, _h, _w), (o, _c, kh, kw), (_b, _o, oh, ow) = x_shape, w_shape, out_shape
            m, k = batch * oh * ow, c * kh * kw
            if min(m, o, k) < TENSOR_CORE_MIN:
                return call
            s = min(split_k_factor(m, o, k, sms, channels=(c, kh * kw)), max_split)
            if s == 1:
                return call
            if splits is not None:
                splits.append(("conv2d", s))
            parts = self.builder_.emit_te(_split_k_conv, x, w, s, [int(v) for v in at.strides], [int(v) for v in at.padding],
                                          [int(v) for v in at.dilation], (oh, ow), nhwc, primfunc_name_hint="conv2d_split_k")
            return self.builder_.call_te(_split_k_sum, parts, primfunc_name_hint="split_k_sum")  # a call, not a var: FuseOps fuses no alias binding

    return mutate_functions(SplitK(mod), mod)


def _split_k_gemm(a, b, s: int, transposed: bool = False):
    """parts[s, m, n] = sum over k of A[m, s*K/S + k] * B[s*K/S + k, n], float16 operands and float32 sums (int8 and
    int32): a batched GEMM whose batch is the slice of K (DLight's reindexing makes A[S, M, K/S] of it in the
    shared-memory loads). A float32 A is cast to float16 in a block of the same function, which the schedule inlines
    into its shared-memory load."""
    from tvm import te

    (m, k), n = a.shape, b.shape[0 if transposed else 1]
    if a.dtype == "float32":
        a = te.compute(a.shape, lambda i, j: a[i, j].astype("float16"), name="cast_a")
    acc = "int32" if b.dtype == "int8" else "float32"
    depth = int(k) // s
    r = te.reduce_axis((0, depth), name="k")

    def weight(kk, j):
        return b[j, kk] if transposed else b[kk, j]

    return te.compute((s, m, n), lambda p, i, j: te.sum(a[i, p * depth + r].astype(acc) * weight(p * depth + r, j).astype(acc), axis=r),
                      name="matmul_split_k")


def _split_k_conv(x, w, s: int, strides, padding, dilation, out_hw, nhwc: bool = False):
    """parts[s, n, o, y, x] = the conv2d (NCHW, OIHW) over the s-th slice of the input channels, float16 operands,
    float32 sums; parts[s, n, y, x, o] for an NHWC/OHWI conv with int8 operands and int32 sums: a convolution whose
    batch of GEMMs is the channel slice (DLight's reindexing makes it an implicit GEMM, as for topi's conv2d)."""
    from tvm import te, tirx

    if nhwc:
        n, h, wd, c = (int(d) for d in x.shape)
        o, kh, kw, _ = (int(d) for d in w.shape)
    else:
        n, c, h, wd = (int(d) for d in x.shape)
        o, _, kh, kw = (int(d) for d in w.shape)
    top, left, bottom, right = padding
    acc = "int32" if w.dtype == "int8" else "float32"

    def inside(yy, xx):
        return tirx.all(yy >= top, yy < h + top, xx >= left, xx < wd + left)

    if nhwc:
        padded = te.compute((n, h + top + bottom, wd + left + right, c), lambda b, yy, xx, ch: tirx.if_then_else(
            inside(yy, xx), x[b, yy - top, xx - left, ch], tirx.const(0, x.dtype)), name="pad_temp")
    else:
        padded = te.compute((n, c, h + top + bottom, wd + left + right), lambda b, ch, yy, xx: tirx.if_then_else(
            inside(yy, xx), x[b, ch, yy - top, xx - left], tirx.const(0, x.dtype)), name="pad_temp")
    depth = c // s
    rc, ry, rx = te.reduce_axis((0, depth), name="rc"), te.reduce_axis((0, kh), name="ry"), te.reduce_axis((0, kw), name="rx")
    (sy, sx), (dy, dx) = strides, dilation
    if nhwc:
        return te.compute((s, n) + tuple(out_hw) + (o,), lambda p, b, yy, xx, oc: te.sum(
            padded[b, yy * sy + ry * dy, xx * sx + rx * dx, p * depth + rc].astype(acc) * w[oc, ry, rx, p * depth + rc].astype(acc),
            axis=[ry, rx, rc]), name="conv2d_split_k")
    return te.compute((s, n, o) + tuple(out_hw), lambda p, b, oc, yy, xx: te.sum(
        padded[b, p * depth + rc, yy * sy + ry * dy, xx * sx + rx * dx].astype(acc) * w[oc, p * depth + rc, ry, rx].astype(acc),
        axis=[rc, ry, rx]), name="conv2d_split_k")


def _split_k_sum(parts):
    """total[...] = parts[0, ...] + ... + parts[S-1, ...], unrolled (no reduction axis)."""
    from tvm import te

    s = int(parts.shape[0])

    def total(*idx):
        acc = parts[(0, *idx)]
        for p in range(1, s):
            acc = acc + parts[(p, *idx)]
        return acc

    return te.compute(parts.shape[1:], total, name="split_k_sum")


# ------------------------------------------------------------------------------------ split-K sum into layer norm

def fuse_split_k_sums(mod):
    """Each split-K sum (with the epilogue FuseOps gave it: bias, residual add, casts) fused into the layer norm that
    is its only reader: one kernel instead of two. FuseOps does not do it, since it fuses an injective op into
    injective consumers only. Runs after FuseOps/FuseTIR, before the schedules: the pair becomes one primitive
    function, which FuseTIR makes one PrimFunc (the sum inlined into the layer norm's loads); DLight's
    GeneralReduction schedules it as it does the layer norm (a thread block per row). Matches the PrimFuncs by their
    blocks: the sum's `split_k_sum` (_split_k_sum) and topi's `T_layer_norm` (relax.nn.layer_norm legalized)."""
    import tvm
    from tvm import relax

    from .cpu_kernels import _block_names

    call_tir = tvm.ir.Op.get("relax.call_tir")
    blocks = {gv: _block_names(f) for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}

    def is_sum(gv) -> bool:
        return any(b.startswith("split_k_sum") for b in blocks.get(gv, ()))

    uses: dict = {}
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, lambda e: uses.__setitem__(e, uses.get(e, 0) + 1) if isinstance(e, relax.Var) else None)

    @relax.expr_functor.mutator
    class Fuse(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != call_tir or "T_layer_norm" not in blocks.get(call.args[0], ()):
                return call
            x = call.args[1].fields[0]
            src = self.lookup_binding(x) if isinstance(x, relax.Var) else None
            if not (isinstance(src, relax.Call) and src.op == call_tir and is_sum(src.args[0]) and uses.get(x) == 1):
                return call
            sum_args, norm_args = list(src.args[1].fields), list(call.args[1].fields[1:])
            params = [relax.Var(f"p{i}", a.ty) for i, a in enumerate(sum_args + norm_args)]
            bb = relax.BlockBuilder()
            with bb.function("fused_split_k_layer_norm", params, attrs={"Primitive": True}, private=True):
                with bb.dataflow():
                    total = bb.emit(relax.call_tir(src.args[0], params[:len(sum_args)], x.ty))
                    out = bb.emit_output(relax.call_tir(call.args[0], [total] + params[len(sum_args):], call.ty))
                bb.emit_func_output(out)
            fused = self.builder_.add_func(bb.get()["fused_split_k_layer_norm"], "fused_split_k_layer_norm")
            return relax.Call(fused, sum_args + norm_args)

    rewritten = mutate_functions(Fuse(mod), mod, skip_primitive=True)
    out = relax.transform.DeadCodeElimination()(rewritten)  # the sums' own calls, now unused
    return relax.transform.FuseTIR()(out)


def fuse_split_k_sums_pass():
    import tvm

    return tvm.transform.module_pass(lambda mod, _ctx: fuse_split_k_sums(mod), opt_level=0, name="FuseSplitKSums")
