"""The tuning subprocess: MetaSchedule on a list of TIR tasks, writing a JSON database into a work folder.

    python -m autoglm_compile.tune_worker SPEC.json

It needs only TVM, numpy and the standard library (no pydantic), so that it also runs where only TVM's bundle is
installed (the GPU machine). The parent (autoglm_compile.tuning) starts it, reads its progress from stdout (one
JSON object a line), kills it at the hard deadline, and merges the database it leaves into the tuning cache.

SPEC.json:
    target           the TVM target as a JSON dict
    tasks            [{"name", "weight", "mod", "trials_done"}]: "mod" is a file holding tvm.ir.save_json of the task's
                     IRModule; trials_done, the trials it had in earlier runs (counted against trials_per_task)
    work_dir         where MetaSchedule writes its database and logs (and defaults/: the default schedules' times)
    measure_defaults also time the default schedule of tasks whose tuned kernel is short (true unless false)
    trials           max trials over all tasks
    trials_per_task  max trials for one task
    time_budget_s    no new round starts after this many seconds (null: no limit)
    trials_per_iter  candidates measured per task and round
    tasks_per_round  tasks in one round (one MetaSchedule run; records are saved and the time checked after each)
    cost_model       "xgb" (MetaSchedule's default) or "random"
    sweep_tiles      CUDA: first time every tile of gpu_schedules.TILES on the float16 GEMM tasks (true unless false)
    seed             search seed
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
import time


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


@contextlib.contextmanager
def _cheap_inspect_stack():
    """Make inspect.stack() walk frames without reading source or resolving modules.

    TVMScript's @T.prim_func calls inspect.stack() for every function it parses, and inspect resolves the module
    of each frame by scanning sys.modules. Importing tvm.s_tir.tensor_intrin parses ~500 functions under deep
    import stacks: 38 s here, and MetaSchedule's builder imports it in a fresh process for every batch (its 30 s
    timeout then fails every candidate). The parser only reads each FrameInfo's frame, so this is safe: 2 s.
    """
    original = inspect.stack

    def stack(context: int = 1):
        frame, out = sys._getframe(1), []
        while frame is not None:
            out.append(inspect.FrameInfo(frame, frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name, None, None))
            frame = frame.f_back
        return out

    inspect.stack = stack
    try:
        yield
    finally:
        inspect.stack = original


_VNNI_FIXED = False


def import_tensor_intrinsics() -> None:
    """Register TVM's tensor intrinsics (the schedule rules name them), dot_16x4_vnni as fix_vnni_intrinsic makes it,
    also where something else imported tvm.s_tir.tensor_intrin first (gpu_schedules' wmma intrinsics do: the VNNI
    rule's candidates then all failed to build)."""
    global _VNNI_FIXED
    if "tvm.s_tir.tensor_intrin" not in sys.modules:
        with _cheap_inspect_stack():
            import tvm.s_tir.tensor_intrin  # noqa: F401
    if not _VNNI_FIXED:
        fix_vnni_intrinsic()
        _VNNI_FIXED = True


def fix_vnni_intrinsic() -> None:
    """Re-register "dot_16x4_vnni" (MetaSchedule's VNNI rule names it) for LLVM >= 21, where
    llvm.x86.avx512.vpdpbusd.512 takes <64 x i8> operands: TVM 0.27's passes <16 x i32> ones, which LLVM 22 rejects
    ("Call parameter type does not match function signature"), so every VNNI candidate failed to build."""
    from tvm.s_tir import TensorIntrin
    from tvm.s_tir.tensor_intrin.x86 import VNNI_DOT_16x4_INTRIN, dot_product_16x4_u8i8i32_desc
    from tvm.script import tirx as T
    from tvm.target import codegen

    if codegen.llvm_version_major() < 21:
        return

    @T.prim_func(s_tir=True)
    def vnni_impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64"),
                B.vload([0, 0], dtype="int8x64"),
                dtype="int32x16",
            )

    TensorIntrin.register(VNNI_DOT_16x4_INTRIN, dot_product_16x4_u8i8i32_desc, vnni_impl, override=True)


def build_candidate(mod, target, _params):
    """MetaSchedule's default_build without its import of tvm.s_tir.tensor_intrin (runs in the builder's worker).

    Intrinsics are looked up by name while a schedule is made (tensorize), in the tuning process; a candidate that
    reaches the builder already holds their bodies, so the builder does not need them registered."""
    import tvm
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from .gpu_schedules import async_copy_config

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    cur = tvm.transform.PassContext.current()
    with tvm.transform.PassContext(opt_level=cur.opt_level, config={**cur.config, **async_copy_config(target)}):  # the GEMMs' cp.async
        return tvm_build(mod, target=target)


def pooled_builder(max_workers: int, timeout_sec: float):
    """A builder like MetaSchedule's LocalBuilder, but whose worker processes live across rounds.

    LocalBuilder starts a fresh process pool for every round (against a memory leak in long-lived workers), so every
    round pays TVM's import in each worker: seconds per round on a small machine, most of a small tuning run. Here
    a worker is recycled after `MAX_USES` builds instead, which bounds the leak the same way.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import _serialize_params, _worker_func
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    max_uses = 200

    @derived_object
    class PooledBuilder(PyBuilder):
        def __init__(self):
            super().__init__()
            self.pool = PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec, maximum_process_uses=max_uses)

        def build(self, build_inputs):
            results = []
            args = [(build_candidate, None, b.mod, b.target, _serialize_params(b.params)) for b in build_inputs]
            for r in self.pool.map_with_error_catching(lambda x: _worker_func(*x), args):
                if r.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(r.value, None))
                elif r.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"build timed out after {timeout_sec} s"))
                else:
                    results.append(BuilderResult(None, f"build failed: {r.value}"))
            return results

    return PooledBuilder()


class _State:
    """What the worker knows across rounds, per task (by index in the spec)."""

    def __init__(self, names: list[str], weights: list[int], trials_per_task: int, done_before: list[int]):
        self.names, self.weights = names, weights
        self.best: list[float | None] = [None] * len(names)  # seconds of the fastest valid candidate
        self.trials = [0] * len(names)  # in this run
        self.left = [max(0, trials_per_task - d) for d in done_before]
        self.exhausted = [False] * len(names)  # the search space gave no new candidate
        self.failed: list[str | None] = [None] * len(names)  # MetaSchedule raised on the task's round
        self.total = 0
        self.valid = 0

    def done(self) -> int:
        return sum(1 for i in range(len(self.names)) if self.left[i] <= 0 or self.exhausted[i] or self.failed[i])

    def task_trials(self) -> dict[str, int]:
        return dict(zip(self.names, self.trials))

    def exhausted_names(self) -> list[str]:
        return [n for n, e in zip(self.names, self.exhausted) if e]

    def best_us(self) -> dict[str, float]:
        return {self.names[i]: b * 1e6 for i, b in enumerate(self.best) if b is not None}


def _progress_callback(state: _State, group: list[int]):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            i = group[task_id]
            state.total += len(runner_results)
            state.trials[i] += len(runner_results)
            state.left[i] -= len(runner_results)
            for res in runner_results:
                if res.error_msg is None and res.run_secs:
                    secs = sum(float(s) for s in res.run_secs) / len(res.run_secs)
                    if secs < 1e9:  # MetaSchedule records a failed run as 1e10 s
                        state.valid += 1
                        state.best[i] = secs if state.best[i] is None else min(state.best[i], secs)
            emit("measured", task=i, name=state.names[i], tasks_done=state.done(), tasks=len(state.names),
                 trials=state.total, valid=state.valid, best_us=state.best_us(), task_trials=state.task_trials())

    return Progress()


def _next_group(state: _State, first_round: list[int], size: int) -> list[int]:
    """The tasks of the next round: each task once, heaviest first (the spec's order); then the tasks that take the
    most time in the model (weight x best time; untimed ones first), among those with trials left."""
    open_tasks = [i for i in range(len(state.names)) if state.left[i] > 0 and not state.exhausted[i] and not state.failed[i]]
    fresh = [i for i in first_round if i in open_tasks and state.trials[i] == 0]  # not yet measured in this run
    if fresh:
        return fresh[:size]
    return sorted(open_tasks, key=lambda i: -(state.weights[i] * state.best[i]) if state.best[i] is not None else float("-inf"))[:size]


FIRST_BATCH = 8  # candidates of a task in its first round
DEFAULT_CHECK_BELOW_S = 1e-4  # tasks whose best tuned kernel is shorter than this also get their default timed


def measure_defaults(mods, indices, target, builder, runner, database, state: _State) -> None:
    """Measure tasks' default (unscheduled) TIR like a candidate and record it (its trace only looks up a block).

    On tiny kernels a tuned schedule can lose to the default one (a parallel loop costs a thread-pool wake-up of
    several microseconds); with the default in the database, applying the best record keeps whichever is faster.
    Only tasks whose best tuned kernel is short are checked (a long kernel's default never wins, and timing it is
    slow), and only tasks that were tuned (a default record would make a later build skip tuning the task). These
    records go to a database of their own, so that the search does not take them as seeds.
    """
    from tvm.s_tir import Schedule
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.database import TuningRecord
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    schedules = []
    for mod in mods:
        sch = Schedule(mod)
        # A record needs one instruction to count as valid; looking up the root block changes nothing.
        sch.get_sblock("root", func_name="main")
        schedules.append(sch)
    args = [ArgInfo.from_entry_func(mod, remove_preproc=True) for mod in mods]
    built = builder.build([BuilderInput(sch.mod, target) for sch in schedules])
    for i, b in enumerate(built):
        if b.error_msg is not None:
            emit("default_failed", task=indices[i], name=state.names[indices[i]], error=b.error_msg.splitlines()[0][:300])
    todo = [(i, b) for i, b in enumerate(built) if b.error_msg is None]
    device = "cpu" if target.kind.name == "llvm" else target.kind.name
    futures = runner.run([RunnerInput(b.artifact_path, device, args[i]) for i, b in todo])
    for (i, _), future in zip(todo, futures):
        res = future.result()
        if res.error_msg is not None or not res.run_secs:
            emit("default_failed", task=indices[i], name=state.names[indices[i]], error=(res.error_msg or "no time").splitlines()[0][:300])
            continue
        workload = database.commit_workload(mods[i])
        database.commit_tuning_record(TuningRecord(schedules[i].trace, workload, list(res.run_secs), target, args[i]))
        secs = sum(float(x) for x in res.run_secs) / len(res.run_secs)
        emit("default", task=indices[i], name=state.names[indices[i]], us=secs * 1e6)


def _read_times(path: str) -> dict:
    """The JSON of a times file in the work folder, or {} when there is none yet."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_times(path: str, times: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(times, f, indent=1)


GPU_DEFAULTS = "defaults_gpu.json"  # in work_dir: {task: µs of the default GPU schedule (DLight)}


def gpu_legalize_passes(target) -> tuple[list, list]:
    """TVM's CUDA legalize_passes split into (the passes before DLight, with gpu_schedules.fuse_split_k_sums after
    FuseTIR; DLight's ApplyDefaultSchedule with gpu_schedules' tensor-core rule first): tuning extracts its tasks
    before the default schedules, which then cover only what the database lacks."""
    from tvm.relax.backend.cuda import pipeline

    from .gpu_schedules import default_schedule_pass, fuse_split_k_sums_pass

    passes = [p for p in pipeline.legalize_passes(target) if p.info.name != "ApplyDefaultSchedule"]
    return passes + [fuse_split_k_sums_pass()], [default_schedule_pass()]


def measure_gpu_defaults(mods, names, target, builder, runner, work_dir: str) -> None:
    """Time each task with DLight's schedule, which an untuned GPU build uses, into work_dir/defaults_gpu.json.

    A GPU kernel's unscheduled TIR binds no threads and cannot run, so the CPU way (a default record in the database)
    does not apply; DLight's schedule has no MetaSchedule trace to record either. The merge (tuning.merge_export)
    keeps a tuned record only where it beats this time, so that tuning never makes a GPU build slower."""
    import tvm
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    path = os.path.join(work_dir, GPU_DEFAULTS)
    times = _read_times(path)
    todo = [(m, n) for m, n in zip(mods, names) if n not in times]
    if not todo:
        return
    schedule = tvm.transform.Sequential(gpu_legalize_passes(target)[1])
    scheduled, ok = [], []
    for mod, name in todo:
        try:
            with target:  # on a copy: DLight's ApplyDefaultSchedule writes the scheduled functions into its input
                scheduled.append(schedule(tvm.ir.load_json(tvm.ir.save_json(mod))))
            ok.append((mod, name))
        except Exception as e:  # DLight cannot schedule it: the build would fail the same way, tuning decides
            emit("default_failed", name=name, error=str(e).strip().splitlines()[-1][:300])
    built = builder.build([BuilderInput(m, target) for m in scheduled])
    runs = []
    for (mod, name), b in zip(ok, built):
        if b.error_msg is not None:
            emit("default_failed", name=name, error=b.error_msg.strip().splitlines()[-1][:300])
            continue
        runs.append((name, b, ArgInfo.from_entry_func(mod, remove_preproc=True)))
    futures = runner.run([RunnerInput(b.artifact_path, target.kind.name, args) for _, b, args in runs])
    for (name, _, _), future in zip(runs, futures):
        res = future.result()
        if res.error_msg is not None or not res.run_secs:
            emit("default_failed", name=name, error=(res.error_msg or "no time").strip().splitlines()[-1][:300])
            continue
        times[name] = sum(float(x) for x in res.run_secs) / len(res.run_secs) * 1e6
        emit("default", name=name, us=times[name])
    _write_times(path, times)


GPU_TILES = "tiles_gpu.json"  # in work_dir: {task: {tile: µs}} of sweep_gpu_tiles


def sweep_gpu_tiles(mods, names, target, builder, runner, database, work_dir: str) -> None:
    """Time every tile of gpu_schedules.TILES on each float16 tensor-core GEMM task and put the fastest in the
    database (its schedule's trace), before the search: five candidates per task, where an untuned build takes
    gpu_schedules.DEFAULT_TILE everywhere and MetaSchedule's search reaches a few trials per task in minutes. No tile
    is best on every GEMM (docs/benchmarks.md). Times go to work_dir/tiles_gpu.json; tasks already there are
    skipped."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.database import TuningRecord
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    from .gpu_schedules import tile_candidates

    path = os.path.join(work_dir, GPU_TILES)
    times = _read_times(path)
    cands = [(i, f"{t.rows}x{t.cols}k{16 * t.k_frags}", sch) for i, (mod, name) in enumerate(zip(mods, names)) if name not in times
             for t, sch in tile_candidates(mod["main"], target)]
    if not cands:
        return
    built = builder.build([BuilderInput(sch.mod, target) for _, _, sch in cands])
    args = {i: ArgInfo.from_entry_func(mods[i], remove_preproc=True) for i in {c[0] for c in cands}}
    ok = [(c, b) for c, b in zip(cands, built) if b.error_msg is None]
    futures = runner.run([RunnerInput(b.artifact_path, target.kind.name, args[c[0]]) for c, b in ok])
    best = {}
    for ((i, tile, sch), _), future in zip(ok, futures):
        res = future.result()
        if res.error_msg is not None or not res.run_secs:
            continue
        secs = [float(x) for x in res.run_secs]
        times.setdefault(names[i], {})[tile] = sum(secs) / len(secs) * 1e6
        if i not in best or sum(secs) < sum(best[i][1]):
            best[i] = (sch, secs)
    for i, (sch, secs) in best.items():
        database.commit_tuning_record(TuningRecord(sch.trace, database.commit_workload(mods[i]), secs, target, args[i]))
        emit("tiles", name=names[i], us=times[names[i]])
    _write_times(path, times)


def run(spec: dict) -> None:
    """Tune in rounds: each round is one MetaSchedule run over a small group of tasks, measuring one batch of each.

    MetaSchedule's own scheduler sends a batch of every task before it measures any, and writes records only when
    it measures them; with many tasks (ResNet-50 has 26) its first round can outlast a time budget and a kill loses
    it all. Small rounds keep records flowing into the database, and the time budget is checked between rounds. The
    builder, the runner, the cost model and the database live across rounds; each round's search starts from the
    best records so far (MetaSchedule's evolutionary search seeds from the database).
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir
    from tvm.s_tir.meta_schedule.utils import fork_seed

    start = time.monotonic()
    target = tvm.target.Target(spec["target"])
    base = spec.get("base_dir", ".")  # relative paths in the spec are relative to the spec's folder (see main)
    mods = []
    for t in spec["tasks"]:
        with open(os.path.join(base, t["mod"])) as f:
            mods.append(tvm.ir.load_json(f.read()))
    names = [t["name"] for t in spec["tasks"]]
    weights = [int(t["weight"]) for t in spec["tasks"]]
    trials, trials_per_task = int(spec["trials"]), int(spec["trials_per_task"])
    per_iter = max(1, min(int(spec.get("trials_per_iter", 32)), trials_per_task))
    group_size = int(spec.get("tasks_per_round", 4))
    budget = spec.get("time_budget_s")
    deadline = start + budget if budget else None
    work_dir = os.path.join(base, spec["work_dir"])
    import_tensor_intrinsics()  # the CPU schedule rules look intrinsics up by name

    loggers = get_loggers_from_work_dir(work_dir, names)
    builder = pooled_builder(max_workers=os.cpu_count() or 1, timeout_sec=60)
    runner = ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40))
    kind = spec.get("cost_model", "xgb")
    if kind == "xgb":
        try:
            import xgboost  # noqa: F401
        except ImportError:  # e.g. the GPU machine's TVM bundle: tune with random scores rather than not at all
            emit("note", text="xgboost is not installed: the random cost model is used")
            kind = "random"
    cost_model = ms.CostModel.create(kind, **({"num_tuning_cores": os.cpu_count() or 1} if kind == "xgb" else {}))
    database = ms.database.JSONDatabase(work_dir=work_dir, allow_missing=True)
    state = _State(names, weights, trials_per_task, [int(t.get("trials_done", 0)) for t in spec["tasks"]])
    first_round = list(range(len(names)))
    emit("start", tasks=len(names), names=names)
    if target.kind.name != "llvm" and spec.get("measure_defaults_gpu", True):
        measure_gpu_defaults(mods, names, target, builder, runner, work_dir)
    if target.kind.name == "cuda" and spec.get("sweep_tiles", True):
        sweep_gpu_tiles(mods, names, target, builder, runner, database, work_dir)
    stopped_by_time = False
    rounds = 0
    rounds_start = time.monotonic()
    while state.total < trials:
        if deadline is not None and time.monotonic() >= deadline:
            stopped_by_time = True
            break
        left = trials - state.total
        group = _next_group(state, first_round, min(group_size, left))
        if not group:
            break
        before = [state.trials[i] for i in group]
        seeds = fork_seed(int(spec.get("seed", 0)) + rounds, n=len(group))
        n = max(1, min(per_iter, left // len(group)))  # the trial budget holds, give or take a task's search
        if any(state.trials[i] == 0 for i in group):
            n = min(n, FIRST_BATCH)  # reach every task early: a time budget may end before a second round
        if deadline is not None and rounds:
            # Fit the round into the time left, at the pace of the rounds so far (the parent kills the worker not long
            # after the budget, and a kill loses the round in flight).
            pace = (time.monotonic() - rounds_start) / max(1, state.total)
            fits = int((deadline - time.monotonic()) / pace)
            if fits < len(group):
                group = group[:max(1, fits)]
                before = before[:len(group)]
                seeds = seeds[:len(group)]
            n = max(1, min(n, fits // len(group)))
        # MetaSchedule's evolutionary search evolves a population of 512 to pick a batch; a small batch does not need
        # that many (and on a small machine evolving them dominates a short round).
        population = max(64, min(512, 16 * n))
        contexts = [
            ms.TuneContext(
                mod=mods[i], target=target, space_generator="post-order-apply",
                search_strategy=ms.search_strategy.EvolutionarySearch(population_size=population, init_min_unmeasured=min(50, population // 2)),
                task_name=names[i], logger=loggers[i], rand_state=seed, num_threads="physical",
            ).clone()
            for i, seed in zip(group, seeds)
        ]
        try:
            ms.tune_tasks(
                tasks=contexts, task_weights=[float(weights[i]) for i in group], work_dir=work_dir,
                max_trials_global=n * len(group), max_trials_per_task=n, num_trials_per_iter=n,
                builder=builder, runner=runner, database=database, cost_model=cost_model,
                measure_callbacks=ms.MeasureCallback.create("default") + [_progress_callback(state, group)],
            )
        except Exception as e:  # a task MetaSchedule cannot handle: leave its group out of this run, go on
            error = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
            for i in group:
                state.failed[i] = error
            emit("round_failed", tasks=[names[i] for i in group], error=error)
            rounds += 1
            continue
        for i, b in zip(group, before):
            if state.trials[i] == b:
                state.exhausted[i] = True
        rounds += 1
    short = [i for i, b in enumerate(state.best) if b is not None and b < DEFAULT_CHECK_BELOW_S]
    if spec.get("measure_defaults", True) and short:
        os.makedirs(os.path.join(work_dir, "defaults"), exist_ok=True)
        defaults_db = ms.database.JSONDatabase(work_dir=os.path.join(work_dir, "defaults"), allow_missing=True)
        measure_defaults([mods[i] for i in short], short, target, builder, runner, defaults_db, state)
    emit("done", trials=state.total, valid=state.valid, seconds=time.monotonic() - start, best_us=state.best_us(),
         stopped_by_time=stopped_by_time, rounds=rounds, task_trials=state.task_trials(), exhausted=state.exhausted_names(),
         failed={n: f for n, f in zip(names, state.failed) if f})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m autoglm_compile.tune_worker SPEC.json", file=sys.stderr)
        return 2
    with open(args[0]) as f:
        spec = json.load(f)
    spec.setdefault("base_dir", os.path.dirname(os.path.abspath(args[0])))
    run(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
