"""The "tune" schedule strategy: MetaSchedule for llvm targets, run in a subprocess within a budget, with a
target-aware tuning cache.

    legalize + fuse (the default pipeline's first half)
    → extract the TIR tasks
    → look each up in the cache (a hit needs no trial)
    → tune the misses in `python -m autoglm_compile.tune_worker` (killed at the hard deadline)
    → merge the best record of each tuned task into the cache
    → apply the cache (MetaScheduleApplyDatabase), default lowering for anything untuned.

The cache. TVM's JSONDatabase answers a query with the best record of a workload whatever target it was tuned for
(apache/tvm #15549), so the cache keeps one JSONDatabase per target: <root>/<key>/, where key hashes the canonical
target JSON (host left out) and the TVM version. Within it MetaSchedule keys records by workload (the task's TIR,
structurally hashed), so one database serves every model built for that target. The root is
$XDG_CACHE_HOME/autoglm-compile/tuning (~/.cache/...) unless tune.database (--tuning-db) names another; only the best
record of each workload is kept, so a database stays small enough to commit or share in CI. Writers take a lock.

A crash or timeout of the subprocess is not an error: the build goes on with what the cache has (records the worker
measured before it stopped are kept), and the report's `tuning.fell_back` and a warning say what happened.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

from .errors import TuningError, UnsupportedError
from .report import TuningReport, TuningTask

KILL_GRACE_S = 30.0  # the hard deadline: time budget + this + 10% of the budget (a round in flight may finish)
FAILED_RUN_S = 1e9  # MetaSchedule records a failed measurement as 1e10 s
LEDGER = "trials.json"  # beside MetaSchedule's two files: trials spent per workload, so that tuning can resume


# ------------------------------------------------------------------------------------------------- the cache

def default_database_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "autoglm-compile" / "tuning"


def canonical_target(target) -> dict:
    """The target as TVM normalizes it (so equal targets spelled differently agree), without its host."""
    spec = json.loads(str(target))
    spec.pop("host", None)
    return spec


def target_key(target) -> str:
    import tvm

    blob = json.dumps({"tvm": tvm.__version__, "target": canonical_target(target)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def workload_key(mod) -> str:
    """The structural hash MetaSchedule's JSONDatabase keys workloads by."""
    import tvm_ffi

    return str(tvm_ffi.structural_hash(mod))


class TuningDatabase:
    """One target's folder in the cache: a MetaSchedule JSONDatabase, target.json saying what it is for, and
    trials.json counting the trials spent on each workload (a task tuned fewer times than asked is tuned further)."""

    def __init__(self, root: Path, target):
        import tvm

        from .tune_worker import import_tensor_intrinsics

        import_tensor_intrinsics()  # records of tensorized kernels (int8 dot products) name intrinsics, read on load
        self.target = target
        self.key = target_key(target)
        self.path = Path(root).expanduser() / self.key
        self.path.mkdir(parents=True, exist_ok=True)
        self.dropped = 0  # unreadable records load() removed
        info = self.path / "target.json"
        if not info.exists():
            info.write_text(json.dumps({"tvm": tvm.__version__, "target": canonical_target(target)}, indent=2, sort_keys=True) + "\n")

    @contextlib.contextmanager
    def locked(self, exclusive: bool) -> Iterator[None]:
        with open(self.path / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def ledger(self) -> dict[str, dict]:
        """Trials measured so far per workload (its structural hash): {"name", "trials", "exhausted"}."""
        path = self.path / LEDGER
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def add_trials(self, counts: dict[str, tuple[str, int, bool]]) -> None:
        """Add this run's trials per workload key: (task name, trials, search space exhausted)."""
        with self.locked(exclusive=True):
            ledger = self.ledger()
            for key, (name, trials, exhausted) in counts.items():
                entry = ledger.setdefault(key, {"name": name, "trials": 0, "exhausted": False})
                entry["trials"] += trials
                entry["exhausted"] = entry["exhausted"] or exhausted
            tmp = self.path / f"{LEDGER}.tmp-{os.getpid()}"
            tmp.write_text(json.dumps(ledger, indent=1, sort_keys=True) + "\n")
            tmp.replace(self.path / LEDGER)

    def load(self):
        """The MetaSchedule database. TVM replays every record's trace on its workload when it reads the files, and
        one that does not replay fails the whole read: such records are moved to DROPPED in the folder (self.dropped
        counts them) and the rest is read."""
        from tvm.s_tir import meta_schedule as ms

        with self.locked(exclusive=False):
            try:
                return ms.database.JSONDatabase(work_dir=str(self.path), allow_missing=True)
            except Exception:  # noqa: BLE001 - TVM raises RuntimeError/ValueError/TVMError here
                pass
        with self.locked(exclusive=True):
            self.dropped += _drop_unreadable_records(self.path)
            return ms.database.JSONDatabase(work_dir=str(self.path), allow_missing=True)

    def merge(self, worker_dir: Path, tasks: list, defaults_us: dict[str, float] | None = None) -> dict[str, object]:
        """Commit the best valid record of each task found in the worker's databases (its tuning records and its
        default-schedule timings); returns {task name: the record committed}. A task whose best record is not faster
        than `defaults_us` (the default GPU schedule's time, measured by the worker) is left out: it keeps DLight."""
        from tvm.s_tir import meta_schedule as ms

        sources = [db for db in (_salvaged_database(worker_dir), _salvaged_database(worker_dir / "defaults")) if db is not None]
        best = {}
        for task in tasks:
            found = [r for r in (_valid_record(db, task.mod, self.target, task.task_name) for db in sources) if r is not None and _replays(r.trace, task.mod)]
            if found:
                rec = min(found, key=lambda r: _mean(r.run_secs))
                if defaults_us and task.task_name in defaults_us and _mean(rec.run_secs) * 1e6 >= defaults_us[task.task_name]:
                    continue
                best[task.task_name] = (task, rec)
        if not best:
            return {}
        committed = {}
        with self.locked(exclusive=True):
            cache = ms.database.JSONDatabase(work_dir=str(self.path), allow_missing=True)
            for name, (task, rec) in best.items():
                current = _valid_record(cache, task.mod, self.target, name)
                if current is not None and _mean(current.run_secs) <= _mean(rec.run_secs):
                    committed[name] = current
                    continue
                workload = cache.commit_workload(task.mod)
                cache.commit_tuning_record(ms.database.TuningRecord(rec.trace, workload, rec.run_secs, rec.target, rec.args_info))
                committed[name] = rec
        return committed


def _replays(trace, mod) -> bool:
    """Whether a record's trace applies to this task's module. Structurally equal modules can differ in their buffer
    names, and MetaSchedule's tensor-core traces look blocks up by names made from them ("w3_reindex_shared.dyn_wmma.
    matrix_b_o"): such a record, committed for the other module, would make the database unreadable."""
    from tvm import s_tir

    try:
        s_tir.Trace.apply_json_to_schedule(trace.as_json(), s_tir.Schedule(mod))
    except Exception:  # noqa: BLE001 - any failure to replay
        return False
    return True


DROPPED = "dropped_records.json"  # records load() took out of a database folder, kept as they were


def _drop_unreadable_records(folder: Path) -> int:
    """Move the tuning records TVM cannot read (their trace does not replay on their workload) out of folder's
    database into folder/DROPPED; returns how many. One record at a time: TVM reads a database whole or not at all."""
    from tvm.s_tir import meta_schedule as ms

    rec_file = folder / "database_tuning_record.json"
    workloads = (folder / "database_workload.json").read_text().splitlines()
    kept, dropped = [], []
    with tempfile.TemporaryDirectory(prefix="autoglm-records-") as tmp:
        (Path(tmp) / "database_workload.json").write_text("".join(line + "\n" for line in workloads))
        for line in rec_file.read_text().splitlines():
            (Path(tmp) / "database_tuning_record.json").write_text(line + "\n")
            try:
                ms.database.JSONDatabase(work_dir=tmp, allow_missing=False)
                kept.append(line)
            except Exception:  # noqa: BLE001
                dropped.append(line)
    with open(folder / DROPPED, "a") as f:
        f.write("".join(line + "\n" for line in dropped))
    tmp_file = folder / f"database_tuning_record.json.tmp-{os.getpid()}"
    tmp_file.write_text("".join(line + "\n" for line in kept))
    tmp_file.replace(rec_file)
    return len(dropped)


def _mean(run_secs) -> float:
    values = [float(s) for s in run_secs or []]
    return sum(values) / len(values) if values else float("inf")


def is_default_schedule(record) -> bool:
    """A record of the default (unscheduled) TIR: the worker times it so that it wins where tuning did worse."""
    return all(inst.kind.name == "GetSBlock" for inst in record.trace.insts)


def _valid_record(db, mod, target, name):
    rec = db.query_tuning_record(mod, target, name)
    if rec is None or _mean(rec.run_secs) >= FAILED_RUN_S:
        return None
    return rec


def _salvaged_database(work_dir: Path):
    """The worker's database, minus a line cut off when it was killed (and records that point past the workloads)."""
    from tvm.s_tir import meta_schedule as ms

    wl_file, rec_file = work_dir / "database_workload.json", work_dir / "database_tuning_record.json"
    if not wl_file.exists() or not rec_file.exists():
        return None

    def good_lines(path: Path) -> list[str]:
        out = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                out.append((json.loads(line), line))
            except ValueError:
                continue
        return out

    workloads = good_lines(wl_file)
    records = [line for obj, line in good_lines(rec_file) if isinstance(obj, list) and obj and isinstance(obj[0], int) and obj[0] < len(workloads)]
    clean = work_dir / "salvaged"
    clean.mkdir(exist_ok=True)
    (clean / "database_workload.json").write_text("".join(line + "\n" for _, line in workloads))
    (clean / "database_tuning_record.json").write_text("".join(line + "\n" for line in records))
    return ms.database.JSONDatabase(work_dir=str(clean), allow_missing=False)


# ------------------------------------------------------------------------------------- shipped databases

# Pre-tuned databases in the package: autoglm_compile/tuned/<target key>.tar.xz, each one target's database folder
# (its two JSON files and target.json) as `pack_database` writes it. A build takes from it the records of the tasks
# its tuning database lacks, so a user on a shipped target gets tuned kernels without tuning.
SHIPPED = Path(__file__).parent / "tuned"
SHIPPED_FILES = ("database_workload.json", "database_tuning_record.json", "target.json")


def merge_shipped(db: TuningDatabase, tasks: list) -> dict[str, object]:
    """Commit the shipped records of `tasks` for db's target into db; returns {task name: record}."""
    import tarfile

    archive = SHIPPED / f"{db.key}.tar.xz"
    if not tasks or not archive.is_file():
        return {}
    with tempfile.TemporaryDirectory(prefix="autoglm-shipped-") as tmp:
        with tarfile.open(archive) as tar:
            for name in SHIPPED_FILES:
                member = tar.getmember(name)
                if not member.isfile():
                    raise ValueError(f"{archive}: {name} is not a file")
                with tar.extractfile(member) as src:
                    (Path(tmp) / name).write_bytes(src.read())
        return db.merge(Path(tmp), tasks)


def pack_database(folder: Path, out_dir: Path = SHIPPED) -> Path:
    """Write a target's database folder (from the tuning cache) as out_dir/<key>.tar.xz, ready to ship."""
    import tarfile

    folder = Path(folder)
    for name in SHIPPED_FILES:
        if not (folder / name).is_file():
            raise UnsupportedError(f"{folder}: no {name}", "give a target's folder of the tuning cache, ~/.cache/autoglm-compile/tuning/<key>")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    out = Path(out_dir) / f"{folder.name}.tar.xz"
    with tarfile.open(out, "w:xz", preset=9) as tar:
        for name in SHIPPED_FILES:
            info = tar.gettarinfo(str(folder / name), arcname=name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with open(folder / name, "rb") as f:
                tar.addfile(info, f)
    return out


# ------------------------------------------------------------------------------------------------ the worker

def worker_command(spec_path: Path) -> list[str]:
    """The tuning subprocess's command line (tests replace it to simulate a crash or a hang)."""
    return [sys.executable, "-m", "autoglm_compile.tune_worker", str(spec_path)]


def hard_deadline(budget_s: float | None) -> float | None:
    return None if budget_s is None else budget_s + KILL_GRACE_S + 0.1 * budget_s


class _WorkerRun:
    def __init__(self):
        self.trials = 0
        self.task_trials: dict[str, int] = {}
        self.exhausted: set[str] = set()
        self.failed: dict[str, str] = {}  # task -> MetaSchedule's error
        self.best_us: dict[str, float] = {}
        self.tasks_done = 0
        self.stopped_by_time = False
        self.finished = False  # the worker said "done"
        self.fell_back = False
        self.reason: str | None = None


def _format_us(us: float) -> str:
    return f"{us / 1e3:.3g} ms" if us >= 1000 else f"{us:.3g} µs"


def run_worker(spec: dict, work_dir: Path, progress, total_tasks: int) -> _WorkerRun:
    """Run the tuning subprocess, showing its progress; kill it at the hard deadline."""
    spec_path = work_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = work_dir / "worker.log"
    run = _WorkerRun()
    limit = hard_deadline(spec.get("time_budget_s"))
    events: queue.Queue = queue.Queue()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(worker_command(spec_path), stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)

        def read() -> None:
            for line in proc.stdout:
                if line.startswith('{"event"'):
                    with contextlib.suppress(ValueError):
                        events.put(json.loads(line))
            events.put(None)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        start = time.monotonic()
        eof = False
        while True:
            try:
                event = events.get(timeout=0.5)
            except queue.Empty:
                event = False
            if event is None:
                eof = True
            elif event:
                _on_event(run, event, progress, total_tasks, spec.get("trials"))
            if eof and proc.poll() is not None:
                break
            if limit is not None and time.monotonic() - start > limit:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the worker and its build/run processes
                proc.wait()
                run.fell_back = True
                run.reason = f"the tuning subprocess was still running at the hard deadline ({limit:.0f} s: time budget {spec['time_budget_s']:g} s + grace) and was killed"
                break
        reader.join(timeout=5)
        # its build/run workers are in its session: make sure none outlives it
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    if not run.fell_back and (proc.returncode != 0 or not run.finished):
        run.fell_back = True
        rc = proc.returncode
        how = f"was killed by signal {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
        tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-1:]
        run.reason = f"the tuning subprocess {how}" + (f": {tail[0].strip()[:300]}" if tail else "") + f" (log: {keep_log(log_path)})"
    return run


def keep_log(log_path: Path) -> Path:
    """Copy a failed worker's log out of its temporary folder, into the user cache's logs/ folder."""
    folder = default_database_root().parent / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    kept = folder / f"tune-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    shutil.copyfile(log_path, kept)
    return kept


def _on_event(run: _WorkerRun, event: dict, progress, total_tasks: int, trials_budget: int | None) -> None:
    kind = event.get("event")
    if kind in ("measured", "done"):
        run.trials = int(event.get("trials", run.trials))
        run.task_trials.update(event.get("task_trials", {}))
        run.exhausted.update(event.get("exhausted", []))
        run.failed.update(event.get("failed", {}))
        run.best_us.update(event.get("best_us", {}))
        run.stopped_by_time = run.stopped_by_time or bool(event.get("stopped_by_time"))
        run.tasks_done = int(event.get("tasks_done", run.tasks_done))
    if kind == "done":
        run.finished = True
        run.tasks_done = total_tasks
    name = event.get("name")
    if kind in ("default", "default_failed"):
        progress.update(f"tuning: timing the default schedule of {name}")
        return
    best = run.best_us.get(name) if name else None
    text = f"tuning: {run.tasks_done}/{total_tasks} tasks, {run.trials}" + (f"/{trials_budget}" if trials_budget else "") + " trials"
    if best is not None:
        text += f", {name} best {_format_us(best)}"
    progress.update(text)


# --------------------------------------------------------------------------------------------- the strategy

class _Silent:
    def update(self, text: str) -> None:
        pass


TUNABLE_KINDS = ("llvm", "cuda")


def check_tunable(desc, tune) -> None:
    """Fail before any work when the target cannot be tuned by this build."""
    if desc.kind not in ("cpu", "cuda"):
        raise UnsupportedError(
            f"--tune: target '{desc.name}' is a {desc.kind} target; tuning covers CPU (llvm) and CUDA targets",
            "build it without --tune (its vendor runtime schedules the model)",
        )


def _phases(target, weight_prepack: bool = False):
    """(passes before task extraction, passes after the database is applied) of the target's default Relax pipeline,
    with the default schedules (DLight on GPUs) moved after the database so that they only cover untuned tasks.

    weight_prepack (llvm): the kernels' constant weights are layout-free buffers, so MetaSchedule may choose their
    layout (its RewriteLayout postprocessor); after the database is applied, the layout transforms are split out of
    the kernels (SplitLayoutRewritePreproc) and folded into the constants, i.e. done once at build time, as TVM's
    static_shape_tuning pipeline does with cpu_weight_prepack (there with LiftTransformParams, since its weights are
    parameters; ours are bound constants)."""
    if target.kind.name == "llvm":
        import tvm
        from tvm import relax
        from tvm.relax.backend.cpu_generic import pipeline as p

        from .cpu_kernels import schedule_pass

        before = p.library_dispatch_passes(target) + p.legalize_passes(target) + [schedule_pass(target)]  # hand-scheduled kernels: not tasks
        after = p.dataflow_lower_passes(target) + p.finalize_passes(target)
        if weight_prepack:
            before += [relax.transform.AttachAttrLayoutFreeBuffers(),
                       tvm.transform.module_pass(_fixed_layout_of_transformed_weights, opt_level=0, name="FixedLayoutOfTransformedWeights")]
            after = [relax.transform.SplitLayoutRewritePreproc(), relax.transform.FoldConstant()] + after
        return before, after
    from tvm.relax.backend.cuda import pipeline as p

    from .tune_worker import gpu_legalize_passes

    legalize, default_schedules = gpu_legalize_passes(target)
    return p.library_dispatch_passes(target) + legalize, default_schedules + p.dataflow_lower_passes(target) + p.finalize_passes(target)


def _fixed_layout_of_transformed_weights(mod, _ctx):
    """No layout-free weights in kernels that transform a weight in a block of their own (topi's conv2d_transpose:
    "kernel_transform"): the layout MetaSchedule picks for them, once folded into the constant by
    SplitLayoutRewritePreproc, gave wrong results (the PP-OCRv4 detector's transposed convs: an output of all ones)."""
    import tvm
    from tvm.s_tir.stmt import SBlock

    from .memory_fit import walk_stmts

    funcs = dict(mod.functions_items())
    for gvar, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or "layout_free_buffers" not in (func.attrs or {}):
            continue
        names = []
        walk_stmts(func.body, lambda s: names.append(str(s.name_hint)) if isinstance(s, SBlock) else None)
        if "kernel_transform" in names:
            funcs[gvar] = func.without_attr("layout_free_buffers")
    return tvm.IRModule(funcs, attrs=mod.attrs, global_infos=mod.global_infos)


def export_tasks(folder: Path, tasks, target, tune, trials: int, spent: dict[str, int]) -> Path:
    """Write the tasks to tune, and the worker's spec, into `folder`, for tuning on the target machine:

        python -m autoglm_compile.tune_worker FOLDER/spec.json      (there: needs TVM only; writes FOLDER/db)
        autoglm-compile tune-merge FOLDER --target T                (here: merges FOLDER/db into the tuning cache)

    Paths in the spec are relative to it, so the folder can be carried anywhere."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = _worker_spec(sorted(tasks, key=_task_cost, reverse=True), target, tune, trials, folder, spent)
    for entry in spec["tasks"]:
        entry["mod"] = Path(entry["mod"]).name
    spec["work_dir"] = "db"
    spec["measure_defaults"] = target.kind.name == "llvm"  # a GPU task's unscheduled TIR binds no threads: it cannot run
    path = folder / "spec.json"
    path.write_text(json.dumps(spec, indent=1) + "\n")
    return path


class _Task:
    def __init__(self, name: str, mod):
        self.task_name, self.mod = name, mod


def merge_export(folder: Path, target, database: Path | None = None) -> tuple[Path, dict[str, float], dict[str, float]]:
    """Merge what the worker left in FOLDER/db (after export_tasks) into the target's tuning database; returns the
    database folder, {task: best µs} of the records committed, and {task: µs} of the default GPU schedules that
    tuning did not beat (those tasks keep the default)."""
    import tvm

    folder = Path(folder)
    spec_path = folder / "spec.json"
    if not spec_path.is_file():
        raise UnsupportedError(f"{folder}: no spec.json", "give the folder written by --tune-export")
    spec = json.loads(spec_path.read_text())
    if canonical_target(tvm.target.Target(spec["target"])) != canonical_target(target):
        raise UnsupportedError(f"{folder}: tasks were exported for target {json.dumps(canonical_target(tvm.target.Target(spec['target'])))}, not {json.dumps(canonical_target(target))}",
                               "merge with the --target the tasks were exported for")
    if not (folder / spec["work_dir"] / "database_tuning_record.json").is_file():
        raise UnsupportedError(f"{folder / spec['work_dir']}: no tuning records", "run python -m autoglm_compile.tune_worker FOLDER/spec.json on the target machine first, and bring FOLDER back")
    tasks = [_Task(t["name"], tvm.ir.load_json((folder / t["mod"]).read_text())) for t in spec["tasks"]]
    from .tune_worker import GPU_DEFAULTS

    defaults_path = folder / spec["work_dir"] / GPU_DEFAULTS
    defaults = json.loads(defaults_path.read_text()) if defaults_path.is_file() else {}
    db = TuningDatabase(Path(database) if database else default_database_root(), target)
    committed = db.merge(folder / spec["work_dir"], tasks, defaults)
    return db.path, {name: _mean(rec.run_secs) * 1e6 for name, rec in committed.items()}, {n: us for n, us in defaults.items() if n not in committed}


def _scheduled(task) -> bool:
    """A task whose kernel has its schedule already (cpu_kernels.py): nothing to tune."""
    return any(bool(f.attrs.get("tirx.is_scheduled", False)) for f in task.dispatched[0].functions.values() if f.attrs is not None)


def tune_and_lower(mod, target, ctx):
    """Lower `mod` for an llvm target with MetaSchedule schedules from the tuning cache, tuning what it lacks."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from .config import TuneConfig

    tune = ctx.tune if ctx.tune is not None else TuneConfig()
    progress = ctx.progress if ctx.progress is not None else _Silent()
    check_tunable(ctx.desc, tune)
    if target.kind.name not in TUNABLE_KINDS:
        raise UnsupportedError(f"--tune: TVM target kind '{target.kind.name}' cannot be tuned", "tuning covers llvm and cuda targets")
    start = time.monotonic()
    # int8 kernels (int8_kernels.py) need it: the dot-product intrinsics read weight blocks packed contiguously
    before, after = _phases(target, tune.weight_prepack or ctx.prepack_weights)
    with target:
        mod = tvm.transform.Sequential(before)(mod)
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, target) if not _scheduled(t)]
    db = TuningDatabase(Path(tune.database) if tune.database else default_database_root(), target)
    cache = db.load()
    cached = {t.task_name: _valid_record(cache, t.mod, target, t.task_name) for t in tasks}
    from_package = merge_shipped(db, [t for t in tasks if cached[t.task_name] is None])
    if from_package:
        cache = db.load()
        cached = {t.task_name: _valid_record(cache, t.mod, target, t.task_name) for t in tasks}
    keys = {t.task_name: workload_key(t.mod) for t in tasks}
    ledger = db.ledger()
    spent = {t.task_name: int(ledger.get(keys[t.task_name], {}).get("trials", 0)) for t in tasks}

    def complete(t) -> bool:
        # A record tuned elsewhere (no ledger entry: a shared or shipped database) counts as complete; so does a
        # task whose search space ran out. Strict mode takes any record.
        entry = ledger.get(keys[t.task_name])
        return tune.strict or entry is None or bool(entry.get("exhausted")) or spent[t.task_name] >= tune.trials_per_task

    hits = [t for t in tasks if cached[t.task_name] is not None and complete(t)]
    hit_names = {t.task_name for t in hits}
    misses = [t for t in tasks if t.task_name not in hit_names]
    resumed = [t for t in misses if cached[t.task_name] is not None]
    trials_budget = tune.trials if tune.trials is not None else sum(max(1, tune.trials_per_task - spent[t.task_name]) for t in misses)
    report = TuningReport(
        database=str(db.path), target_key=db.key, strict=tune.strict, tasks=len(tasks), hits=len(hits), shipped=len(from_package), misses=len(misses),
        resumed=len(resumed), trials_budget=trials_budget, time_budget_s=tune.time_budget,
    )
    ctx.tuning = report
    best = {t.task_name: cached[t.task_name] for t in tasks if cached[t.task_name] is not None}  # the records applied
    if misses and tune.strict:
        names = ", ".join(t.task_name for t in misses[:8]) + (f" and {len(misses) - 8} more" if len(misses) > 8 else "")
        raise TuningError(
            f"--tune-strict: {len(misses)} of {len(tasks)} tasks are not in the tuning database {db.path}: {names}",
            "tune them once without --tune-strict (same target and --tuning-db), or point --tuning-db at a database tuned for this target",
        )
    if misses and tune.export:
        spec_path = export_tasks(Path(tune.export), misses, target, tune, trials_budget, spent)
        report.exported = str(spec_path.parent)
        ctx.warnings.append(
            f"{len(misses)} of {len(tasks)} tuning tasks were written to {spec_path.parent} for tuning on the target and use their default "
            f"schedules in this build: run 'python -m autoglm_compile.tune_worker {spec_path}' there, bring the folder back, "
            f"'autoglm-compile tune-merge {spec_path.parent} --target {ctx.desc.name}', and build again")
        misses = []
    if misses:
        if not ctx.desc.is_host:
            elsewhere = getattr(ctx.desc, "not_runnable_here", lambda: None)() or f"target '{ctx.desc.name}' is not this machine"
            raise TuningError(
                f"--tune: {len(misses)} of {len(tasks)} tasks are not in the tuning database, and tuning measures candidates on this machine: {elsewhere}",
                "export the tasks with --tune-export DIR, tune them on the target machine (python -m autoglm_compile.tune_worker DIR/spec.json), "
                "merge with autoglm-compile tune-merge DIR, and build again with --tune-strict",
            )
        with tempfile.TemporaryDirectory(prefix="autoglm-tune-") as tmp:
            work = Path(tmp)
            # MetaSchedule's first round visits the tasks in order: heaviest first, so that a time budget that ends
            # during that round leaves the cheap tasks, not the expensive ones, with default schedules.
            spec = _worker_spec(sorted(misses, key=_task_cost, reverse=True), target, tune, trials_budget, work, spent)
            progress.update(f"tuning: 0/{len(misses)} tasks, 0/{trials_budget} trials")
            run = run_worker(spec, work, progress, len(misses))
            report.trials = run.trials
            report.stopped_by = "time budget" if run.stopped_by_time else None
            tuned = db.merge(work / "db", misses)
            db.add_trials({keys[name]: (name, n, name in run.exhausted) for name, n in run.task_trials.items() if n or name in run.exhausted})
            if run.failed:
                ctx.warnings.append(f"MetaSchedule failed on {len(run.failed)} task(s), which keep the default schedule: " + "; ".join(f"{k}: {v}" for k, v in list(run.failed.items())[:4]))
            if run.fell_back:
                report.fell_back = True
                report.reason = run.reason
                if tuned:
                    report.reason += f"; kept the records of the {len(tuned)} task(s) it had measured"
                    ctx.warnings.append(f"tuning was cut short, the rest of the tasks keep what the database had or their default schedules: {report.reason}")
                else:
                    report.reason += "; every task it was to tune uses what the database had or its default (untuned) schedule"
                    ctx.warnings.append(f"tuning fell back to untuned schedules: {report.reason}")
        best.update(tuned)
        tuned_now, run_trials = set(tuned), run.task_trials
        cache = db.load()
    else:
        tuned_now, run_trials = set(), {}
    report.per_task = [
        TuningTask(
            name=t.task_name, weight=int(t.weight),
            status="cached" if t.task_name in hit_names else "tuned" if t.task_name in tuned_now else "untuned" if t.task_name not in best else "cached",
            trials=spent[t.task_name] + run_trials.get(t.task_name, 0),
            best_us=_mean(best[t.task_name].run_secs) * 1e6 if t.task_name in best else None,
            default_schedule=t.task_name in best and is_default_schedule(best[t.task_name]),
        )
        for t in tasks
    ]
    report.untuned = [t.name for t in report.per_task if t.status == "untuned"]
    if db.dropped:
        ctx.warnings.append(f"the tuning database {db.path} held {db.dropped} record(s) whose schedule does not apply to its kernel (TVM could not read it): "
                            f"moved to {db.path / DROPPED}")
    if report.untuned and not report.fell_back and not report.exported:
        ctx.warnings.append(f"{len(report.untuned)} of {len(tasks)} tuning tasks have no valid schedule in the database and use the default one: {', '.join(report.untuned[:8])}")
    with target, cache:
        mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        mod = tvm.transform.Sequential(after)(mod)
    report.seconds = time.monotonic() - start
    return mod


def _task_cost(task) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(task.mod)) * int(task.weight)
    except Exception:  # the estimator does not cover every TIR construct; such a task goes last
        return 0.0


def _worker_spec(tasks, target, tune, trials: int, work: Path, spent: dict[str, int]) -> dict:
    import tvm

    entries = []
    for i, t in enumerate(tasks):
        path = work / f"task{i}.json"
        path.write_text(tvm.ir.save_json(t.mod))
        entries.append({"name": t.task_name, "weight": int(t.weight), "mod": str(path), "trials_done": spent.get(t.task_name, 0)})
    return {
        "target": json.loads(str(target)), "tasks": entries, "work_dir": str(work / "db"),
        "trials": trials, "trials_per_task": tune.trials_per_task, "time_budget_s": tune.time_budget,
        # MetaSchedule's first round measures a batch of every task before it checks the global trial limit: keep that
        # round inside the budget, so that no task is left without a trial.
        "trials_per_iter": max(1, min(32, tune.trials_per_task, trials // max(1, len(tasks)))), "cost_model": tune.cost_model, "seed": 0,
    }
