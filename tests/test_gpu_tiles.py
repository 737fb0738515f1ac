"""The float16 tensor-core GEMM schedule with its tile as a parameter (autoglm_compile.gpu_schedules) and the GPU
tuning worker's tile sweep (tune_worker.sweep_gpu_tiles), checked without a GPU: every tile lowers for sm_90 within
the shared memory a kernel gets without opting in, the sweep keeps the fastest tile's schedule, and timing the
default schedules leaves the tasks unscheduled for the search."""
from __future__ import annotations

import json
import types

import pytest

from autoglm_compile import gpu_schedules as gs
from autoglm_compile import tune_worker

SM90 = {"kind": "cuda", "arch": "sm_90", "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
        "thread_warp_size": 32, "registers_per_block": 65536}


def target():
    import tvm

    return tvm.target.Target(SM90, host={"kind": "llvm"})


def gemm(m: int, n: int, k: int, out: str = "float32", batch: int = 1):
    """C[b, i, j] = sum_k A[b, i, k] * B[k, j] on float16 operands, as an IRModule of one PrimFunc 'main'."""
    import tvm
    from tvm import te

    a = te.placeholder((batch, m, k), "float16", name="A")
    b = te.placeholder((k, n), "float16", name="B")
    r = te.reduce_axis((0, k), name="k")
    c = te.compute((batch, m, n), lambda s, i, j: te.sum(a[s, i, r].astype(out) * b[r, j].astype(out), axis=r), name="C")
    return tvm.IRModule({"main": te.create_prim_func([a, b, c])})


def cuda_source(mod) -> str:
    import tvm

    lib = tvm.compile(mod, target=target())
    return "\n".join(m.inspect_source() for m in lib.mod.imports)


@pytest.mark.parametrize("tile", gs.TILES, ids=lambda t: f"{t.rows}x{t.cols}k{16 * t.k_frags}")
def test_every_tile_lowers_to_wmma_within_the_shared_memory_limit(tile):
    sch = gs.wmma_schedule(gemm(128, 768, 768)["main"], tile)
    src = cuda_source(sch.mod)
    assert "wmma::mma_sync" in src and "wmma::accumulator, 16, 16, 16, float" in src
    # DLight's own tile stages its accumulators in dynamic shared memory; the smaller ones in static shared memory,
    # and the two together must stay under the 48 KiB a kernel gets without opting in
    assert ("__shared__ alignas(64) float C_reindex_shared" in src) == tile.static_out
    if tile.static_out:
        assert tile.shared_bytes <= 48 * 1024


def test_float16_accumulation_gets_float16_fragments():
    src = cuda_source(gs.wmma_schedule(gemm(64, 64, 64, out="float16")["main"], gs.DEFAULT_TILE).mod)
    assert "wmma::accumulator, 16, 16, 16, half" in src


@pytest.mark.parametrize("shape, taken", [((128, 768, 768), True), ((49, 512, 64), True), ((16, 768, 768), False)])
def test_tensor_core_gemm_takes_float16_gemms_down_to_the_threshold(shape, taken):
    found = gs.tensor_core_gemm(gemm(*shape)["main"], target())
    assert (found == (1, *shape)) if taken else found is None
    assert len(gs.tile_candidates(gemm(*shape)["main"], target())) == (len(gs.TILES) if taken else 0)


class _Builder:
    def build(self, inputs):
        return [types.SimpleNamespace(error_msg=None, artifact_path=f"/nonexistent/{i}.so") for i in range(len(inputs))]


class _Runner:
    """Times each candidate by its position in the batch: secs[i]."""

    def __init__(self, secs):
        self.secs = secs

    def run(self, inputs):
        return [types.SimpleNamespace(result=lambda s=s: types.SimpleNamespace(error_msg=None, run_secs=[s])) for s in self.secs[:len(inputs)]]


def test_sweep_keeps_the_fastest_tile_and_writes_the_times(tmp_path):
    import tvm
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    tune_worker.import_tensor_intrinsics()
    mods, names = [gemm(128, 768, 768)], ["dense"]
    secs = [5e-5, 4e-5, 1e-5, 3e-5, 2e-5]  # the third tile (TILES[2]) is the fastest
    db = ms.database.JSONDatabase(work_dir=str(tmp_path), allow_missing=True)
    tune_worker.sweep_gpu_tiles(mods, names, target(), _Builder(), _Runner(secs), db, str(tmp_path))

    times = json.loads((tmp_path / tune_worker.GPU_TILES).read_text())["dense"]
    assert sorted(times.values()) == sorted(s * 1e6 for s in secs)
    best = db.get_top_k(db.commit_workload(mods[0]), 1)
    assert len(best) == 1 and best[0].run_secs[0].value == pytest.approx(1e-5)
    replayed = s_tir.Schedule(mods[0])
    best[0].trace.apply_to_schedule(replayed, remove_postproc=False)
    tvm.ir.assert_structural_equal(replayed.mod, gs.wmma_schedule(mods[0]["main"], gs.TILES[2]).mod)

    # a second sweep over the same folder skips the tasks it has times for
    runner = _Runner([])
    tune_worker.sweep_gpu_tiles(mods, names, target(), _Builder(), runner, db, str(tmp_path))
    assert json.loads((tmp_path / tune_worker.GPU_TILES).read_text())["dense"] == times


def test_timing_the_default_schedules_leaves_the_tasks_unscheduled(tmp_path):
    """DLight's ApplyDefaultSchedule writes its result into the module it is given: the tasks handed to the search
    afterwards must still be the unscheduled ones (MetaSchedule's rules fail on scheduled TIR)."""
    mods, names = [gemm(128, 768, 768)], ["dense"]

    class Failing:
        def build(self, inputs):
            return [types.SimpleNamespace(error_msg="no build here", artifact_path=None) for _ in inputs]

    tune_worker.measure_gpu_defaults(mods, names, target(), Failing(), _Runner([]), str(tmp_path))
    assert "tirx.is_scheduled" not in mods[0]["main"].attrs
    assert gs.tensor_core_gemm(mods[0]["main"], target()) == (1, 128, 768, 768)
