"""Tuning (schedule strategy 'tune'): the tune: config section and CLI flags, a tuned build of the conv net that
matches ONNX Runtime, the target-aware cache (a second build tunes nothing), strict mode, and the fall back when the
tuning subprocess crashes or is killed at its deadline.

The tuned builds use MetaSchedule's random cost model and a handful of trials: they check the plumbing, not speed
(benchmarks/ and docs/ hold the figures).
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import onnx
import pytest
import yaml
from typer.testing import CliRunner

from autoglm_compile import cli, tuning
from autoglm_compile.config import TuneConfig, load_config, parse_duration
from autoglm_compile.errors import ExitCode, InputError, TuningError
from autoglm_compile.pipeline import CompileOptions, Progress, compile_model, resolve_config
from conftest import conv_net

runner = CliRunner(env={"COLUMNS": "200"})

# The hand-scheduled fp32 kernels (cpu_kernels.py) are off: they would take the conv net's conv and Gemm out of the
# tasks these tests count and tune.
QUICK = {"extends": "O2", "tune": {"cost_model": "random", "trials_per_task": 2}, "measure": {"runs": 3, "baseline": False},
         "schedule": {"cpu_kernels": False}}


def quick_config(tmp_path: Path, **tune) -> Path:
    data = json.loads(json.dumps(QUICK))
    data["tune"].update(tune)
    path = tmp_path / "quick.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class Recorder(Progress):
    def __init__(self):
        self.lines: list[str] = []

    def update(self, text: str) -> None:
        self.lines.append(text)


def build(model: Path, out: Path, db: Path, config: Path, progress=None, **opts):
    return compile_model(CompileOptions(source=str(model), output=out, config_path=config, tune=True, tuning_db=db, **opts), progress)


def no_worker(monkeypatch):
    """Make starting a tuning subprocess fail loudly: a build that should tune nothing must not start one."""
    monkeypatch.setattr(tuning, "worker_command", lambda spec: [sys.executable, "-c", "raise SystemExit('a tuning subprocess was started')"])


# ---------------------------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("10m", 600), ("1h30m", 5400), ("1.5h", 5400), ("2m30s", 150), (" 10 m ", 600), (45, 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["10x", "m", "", "1m1m", "-5", "0", "10s5", "ten minutes"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_tune_section_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("extends: O2\nschedule: {strategy: tune}\ntune: {trials: 100, trials_per_task: 8, time_budget: 10m, database: /x/db, strict: true}\n")
    cfg = load_config(path=path)
    assert cfg.schedule.strategy == "tune"
    assert cfg.tune == TuneConfig(trials=100, trials_per_task=8, time_budget=600, database="/x/db", strict=True)


def test_tune_defaults_are_off():
    cfg = load_config("O2")
    assert cfg.schedule.strategy == "default"
    assert cfg.tune.trials is None and cfg.tune.trials_per_task == 64 and cfg.tune.time_budget == 600 and not cfg.tune.strict


@pytest.mark.parametrize("body, message", [
    ("tune: {trails: 5}", "invalid config key 'tune.trails'"),
    ("tune: {time_budget: soon}", "tune.time_budget: not a duration: 'soon'"),
    ("tune: {trials: 0}", "invalid config key 'tune.trials'"),
    ("tune: {cost_model: mlp}", "invalid config key 'tune.cost_model'"),
])
def test_bad_tune_section(tmp_path, body, message):
    path = tmp_path / "c.yaml"
    path.write_text(f"extends: O2\n{body}\n")
    with pytest.raises(InputError) as e:
        load_config(path=path)
    assert message in str(e.value)


def test_valid_keys_listed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tune: {trails: 5}\n")
    with pytest.raises(InputError) as e:
        load_config(path=path)
    assert "valid keys: trials, trials_per_task, time_budget, database, strict, cost_model" in str(e.value)


@pytest.mark.parametrize("opts, expect", [
    ({"tune": True}, {"trials": None, "time_budget": 600.0}),
    ({"tune_trials": 200}, {"trials": 200}),
    ({"tune_time": "10m"}, {"time_budget": 600.0}),
    ({"tune_time": "90s"}, {"time_budget": 90.0}),
    ({"tuning_db": Path("/ci/db")}, {"database": "/ci/db"}),
    ({"tune_strict": True}, {"strict": True}),
])
def test_flags_imply_tune(opts, expect):
    cfg = resolve_config(CompileOptions(source="m.onnx", **opts))
    assert cfg.schedule.strategy == "tune"
    for k, v in expect.items():
        assert getattr(cfg.tune, k) == v


def test_cli_dump_config(conv_onnx):
    result = runner.invoke(cli.app, ["compile", str(conv_onnx), "--tune-time", "10m", "--tune-trials", "50", "--dump-config"])
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.stdout)
    assert cfg["schedule"]["strategy"] == "tune" and cfg["tune"]["time_budget"] == 600 and cfg["tune"]["trials"] == 50


@pytest.mark.parametrize("args, message, hint", [
    (["--tune-time", "10x"], "--tune-time: not a duration: '10x'", "90s, 10m, 1h30m"),
    (["--tune-trials", "0"], "", None),  # typer's own range check
])
def test_cli_bad_flags(conv_onnx, args, message, hint):
    result = runner.invoke(cli.app, ["compile", str(conv_onnx), *args, "--dump-config"])
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "Traceback" not in result.output
    if message:
        assert f"error: {message}" in result.stderr and f"Hint: give seconds or a duration: --tune-time {hint}" in result.stderr


# ------------------------------------------------------------------------------------------------- the cache

def test_target_key_is_target_aware():
    import tvm

    base = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "num-cores": 2}
    key = tuning.target_key(tvm.target.Target(base))
    assert key == tuning.target_key(tvm.target.Target(dict(base), host={"kind": "llvm"}))  # the host does not count
    assert key == tuning.target_key(tvm.target.Target(dict(reversed(list(base.items())))))  # nor the spelling
    assert key != tuning.target_key(tvm.target.Target({**base, "mcpu": "skylake-avx512"}))
    assert key != tuning.target_key(tvm.target.Target({**base, "num-cores": 16}))


def test_default_database_root(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning.default_database_root() == tmp_path / "xdg" / "autoglm-compile" / "tuning"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tuning.default_database_root() == tmp_path / "home" / ".cache" / "autoglm-compile" / "tuning"


# ---------------------------------------------------------------------------------------------- tuned builds

@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """The conv net tuned with a few trials into a fresh database: (model, database, report, progress lines)."""
    root = tmp_path_factory.mktemp("tuned")
    model = root / "conv.onnx"
    onnx.save(conv_net(batch=1), str(model))
    progress = Recorder()
    report = build(model, root / "out", root / "db", quick_config(root), progress, tune_trials=8)
    return model, root / "db", report, progress.lines, root


def test_tuned_build_is_correct_and_fills_the_database(tuned):
    model, db, report, lines, root = tuned
    t = report.tuning
    assert report.accuracy.ok and report.result == "ok"
    assert t.tasks == 4 and t.hits == 0 and t.misses == 4 and not t.fell_back and t.reason is None
    assert t.trials > 0 and t.seconds > 0
    assert {p.status for p in t.per_task} <= {"tuned", "untuned"} and any(p.status == "tuned" and p.best_us for p in t.per_task)
    folder = Path(t.database)
    assert folder.parent == db and folder.name == t.target_key
    assert json.loads((folder / "target.json").read_text())["target"]["kind"] == "llvm"
    records = (folder / "database_tuning_record.json").read_text().splitlines()
    assert len(records) == len(t.per_task) - len(t.untuned)  # one (the best) record per tuned task
    assert (root / "out" / "report.json").exists() and json.loads((root / "out" / "report.json").read_text())["tuning"]["trials"] == t.trials


def test_trials_are_counted_per_workload(tuned):
    _, _, report, _, _ = tuned
    ledger = json.loads((Path(report.tuning.database) / "trials.json").read_text())
    assert sorted(e["name"] for e in ledger.values()) == sorted(p.name for p in report.tuning.per_task)
    assert sum(e["trials"] for e in ledger.values()) == report.tuning.trials
    assert {p.name: p.trials for p in report.tuning.per_task} == {e["name"]: e["trials"] for e in ledger.values()}


def test_more_trials_per_task_resume_tuning(tuned, tmp_path, monkeypatch):
    """Asking for more trials per task than the database has spent tunes those tasks further, from their records."""
    model, db, first, _, _ = tuned
    ledger = json.loads((Path(first.tuning.database) / "trials.json").read_text())
    seen = {}

    def fake_worker(spec, work, progress, total):
        seen.update(spec)
        run = tuning._WorkerRun()
        run.finished = True
        return run

    monkeypatch.setattr(tuning, "run_worker", fake_worker)
    report = build(model, tmp_path / "more", db, quick_config(tmp_path, trials_per_task=5))
    open_tasks = [e for e in ledger.values() if not e["exhausted"] and e["trials"] < 5]
    assert report.tuning.misses == report.tuning.resumed == len(open_tasks) > 0
    assert sorted((t["name"], t["trials_done"]) for t in seen["tasks"]) == sorted((e["name"], e["trials"]) for e in open_tasks)
    assert report.tuning.trials_budget == sum(5 - e["trials"] for e in open_tasks)
    assert not report.tuning.untuned and report.accuracy.ok  # the records already there are applied


def test_progress_line(tuned):
    lines = tuned[3]
    assert lines and lines[0].startswith("tuning: 0/4 tasks")
    assert any("trials" in line and "best" in line for line in lines)


def test_second_build_hits_the_cache(tuned, tmp_path, monkeypatch):
    model, db, first, _, root = tuned
    no_worker(monkeypatch)
    report = build(model, tmp_path / "again", db, quick_config(tmp_path), tune_trials=8)
    t = report.tuning
    assert t.misses == 0 and t.hits == first.tuning.tasks - len(first.tuning.untuned) and t.trials == 0 and not t.fell_back
    assert report.accuracy.ok


def test_strict_build_from_a_full_database(tuned, tmp_path, monkeypatch):
    model, db, first, _, root = tuned
    if first.tuning.untuned:
        pytest.skip("a task got no valid schedule in the few trials of the fixture")
    no_worker(monkeypatch)
    report = build(model, tmp_path / "strict", db, quick_config(tmp_path), tune_strict=True)
    assert report.tuning.strict and report.tuning.hits == 4 and report.accuracy.ok


def test_cache_is_shared_across_models(tuned, tmp_path, monkeypatch):
    """Another model with the same conv (a different classifier) finds the conv's schedule in the cache."""
    _, db, first, _, _ = tuned
    other = conv_net(batch=1)
    fc = next(t for t in other.graph.initializer if t.name == "fc")
    fc.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(fc)[:2], "fc"))
    other.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 2
    path = tmp_path / "other.onnx"
    onnx.save(other, str(path))
    no_worker(monkeypatch)
    with pytest.raises(TuningError) as e:
        build(path, tmp_path / "other", db, quick_config(tmp_path), tune_strict=True)
    assert f"{1 + len(first.tuning.untuned)} of 4 tasks are not in the tuning database" in str(e.value) and "matmul" in str(e.value)


def test_strict_with_an_empty_database_exits_2(conv_onnx, tmp_path):
    result = runner.invoke(cli.app, ["compile", str(conv_onnx), "-o", str(tmp_path / "out"), "--tune-strict", "--tuning-db", str(tmp_path / "empty"),
                                     "--config", str(quick_config(tmp_path))])
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "Traceback" not in result.output
    err = result.stderr.splitlines()
    line = next(i for i, l in enumerate(err) if l.startswith("error: "))
    assert "--tune-strict: 4 of 4 tasks are not in the tuning database" in err[line]
    assert err[line + 1].startswith("Hint: tune them once without --tune-strict")
    assert not (tmp_path / "out").exists()


def test_strict_uses_the_user_cache_dir_by_default(conv_onnx, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    result = runner.invoke(cli.app, ["compile", str(conv_onnx), "-o", str(tmp_path / "out"), "--tune-strict"])
    assert result.exit_code == ExitCode.USAGE, result.output
    assert str(tmp_path / "xdg" / "autoglm-compile" / "tuning") in result.stderr


def test_crash_falls_back(conv_onnx, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(tuning, "worker_command", lambda spec: [sys.executable, "-c", "import os; os.abort()"])
    report = build(conv_onnx, tmp_path / "out", tmp_path / "db", quick_config(tmp_path))
    t = report.tuning
    assert t.fell_back and "killed by signal SIGABRT" in t.reason and "its default (untuned) schedule" in t.reason
    assert t.misses == 4 and sorted(t.untuned) == sorted(p.name for p in t.per_task)
    assert any(w.startswith("tuning fell back to untuned schedules") for w in report.warnings)
    assert report.accuracy.ok and (tmp_path / "out" / "report.json").exists()


def test_error_exit_falls_back(conv_onnx, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(tuning, "worker_command", lambda spec: [sys.executable, "-c", "import sys; print('MetaSchedule blew up', file=sys.stderr); sys.exit(7)"])
    report = build(conv_onnx, tmp_path / "out", tmp_path / "db", quick_config(tmp_path))
    reason = report.tuning.reason
    assert report.tuning.fell_back and "exited with status 7: MetaSchedule blew up" in reason
    log = Path(reason.split("(log: ")[1].split(")")[0])  # kept out of the worker's temporary folder
    assert log.parent == tmp_path / "xdg" / "autoglm-compile" / "logs" and "MetaSchedule blew up" in log.read_text()


def test_timeout_falls_back(conv_onnx, tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "worker_command", lambda spec: [sys.executable, "-c", "import time; time.sleep(120)"])
    monkeypatch.setattr(tuning, "KILL_GRACE_S", 0.0)
    report = build(conv_onnx, tmp_path / "out", tmp_path / "db", quick_config(tmp_path, time_budget=1))
    t = report.tuning
    assert t.fell_back and "hard deadline" in t.reason and t.seconds < 30
    assert report.accuracy.ok and any("fell back" in w for w in report.warnings)


def test_time_budget_stops_tuning(conv_onnx, tmp_path):
    """The real worker with a budget that is spent before its first round: it stops cleanly (no fall back), and the
    report says the budget stopped it and which tasks kept their default schedule."""
    report = build(conv_onnx, tmp_path / "out", tmp_path / "db", quick_config(tmp_path, time_budget=0.01))
    t = report.tuning
    assert not t.fell_back and t.stopped_by == "time budget" and t.trials == 0
    assert len(t.untuned) == 4 and any("use the default one" in w for w in report.warnings)
    assert report.accuracy.ok


def test_killed_worker_keeps_what_it_measured(tuned, tmp_path):
    """A database cut off mid-line (the worker killed while writing) still yields its complete records."""
    _, db, report, _, _ = tuned
    folder = Path(report.tuning.database)
    work = tmp_path / "work"
    work.mkdir()
    for name in ("database_workload.json", "database_tuning_record.json"):
        text = (folder / name).read_text()
        (work / name).write_text(text + text.splitlines()[-1][:40])  # a partial last line
    salvaged = tuning._salvaged_database(work)
    assert len(salvaged.get_all_tuning_records()) == len((folder / "database_tuning_record.json").read_text().splitlines())


def test_tune_refuses_npu_targets(conv_onnx, tmp_path):
    from autoglm_compile.target import builtin_targets

    npu = next(n for n, t in builtin_targets().items() if t.kind not in ("cpu", "cuda"))
    with pytest.raises(Exception) as e:
        compile_model(CompileOptions(source=str(conv_onnx), target=npu, output=tmp_path / "o", tune=True))
    assert "tuning covers CPU (llvm) and CUDA targets" in str(e.value)
    assert getattr(e.value, "exit_code", None) == ExitCode.USAGE


def test_tuning_for_another_machine_needs_its_database(conv_onnx, tmp_path):
    """Tuning measures candidates where it runs: tasks missing for a cross target are an error, with a hint."""
    from autoglm_compile.target import builtin_targets
    from autoglm_compile.toolchain import check_toolchain

    cross = next((t for t in builtin_targets().values() if t.kind == "cpu" and not t.is_host), None)
    if cross is None:
        pytest.skip("no CPU target that differs from this machine")
    try:
        check_toolchain(cross)
    except Exception:
        pytest.skip(f"no toolchain here for {cross.name}")
    result = runner.invoke(cli.app, ["compile", str(conv_onnx), "-t", cross.name, "-o", str(tmp_path / "out"), "--tune", "--tuning-db", str(tmp_path / "db")])
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "tuning measures candidates on this machine" in result.stderr
    assert "Hint: export the tasks with --tune-export DIR" in result.stderr


# ------------------------------------------------------------------------- tuning on the target (--tune-export)

def test_export_tune_merge_round_trip(conv_onnx, tmp_path, monkeypatch):
    """--tune-export writes the missing tasks instead of tuning them; the worker runs them wherever the folder is
    carried; tune-merge brings the records into the database, and the next build finds them there."""
    import shutil
    import subprocess

    no_worker(monkeypatch)
    db, exp = tmp_path / "db", tmp_path / "exp"
    first = build(conv_onnx, tmp_path / "o1", db, quick_config(tmp_path), tune_export=exp)
    t = first.tuning
    assert t.exported == str(exp) and t.trials == 0 and t.hits == 0 and first.accuracy.ok
    assert any("written to" in w and "tune-merge" in w for w in first.warnings)
    spec = json.loads((exp / "spec.json").read_text())
    assert len(spec["tasks"]) == t.tasks and spec["work_dir"] == "db" and spec["measure_defaults"] is True
    assert all(not Path(e["mod"]).is_absolute() and (exp / e["mod"]).is_file() for e in spec["tasks"])

    moved = tmp_path / "carried"  # as on the target machine: another folder, another working directory
    shutil.copytree(exp, moved)
    spec.update(trials=4 * len(spec["tasks"]), trials_per_task=4, time_budget_s=None)
    (moved / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "autoglm_compile.tune_worker", str(moved / "spec.json")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (moved / "db" / "database_tuning_record.json").is_file()

    # A default schedule the worker timed faster than any record (as it does for GPU tasks, whose default is DLight's):
    # that task keeps its default, the others are merged.
    first = spec["tasks"][0]["name"]
    (moved / "db" / "defaults_gpu.json").write_text(json.dumps({first: 0.0}))
    result = runner.invoke(cli.app, ["tune-merge", str(moved), "-t", "host", "--tuning-db", str(db)])
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in result.stdout.splitlines() if "\t" in line]
    merged = [name for name, us in lines if not us.endswith("(default)")]
    assert [name for name, us in lines if us.endswith("(default)")] == [first] and first not in merged
    assert merged and f"merged {len(merged)} task(s)" in result.stderr and "1 keep the default GPU schedule" in result.stderr

    second = build(conv_onnx, tmp_path / "o2", db, quick_config(tmp_path), tune_export=tmp_path / "exp2")
    assert second.tuning.hits == len(merged) and second.accuracy.ok
    assert {x.name for x in second.tuning.per_task if x.status == "cached"} == set(merged)


def test_tune_merge_refuses_another_target(conv_onnx, tmp_path, monkeypatch):
    no_worker(monkeypatch)
    build(conv_onnx, tmp_path / "o", tmp_path / "db", quick_config(tmp_path), tune_export=tmp_path / "exp")
    (tmp_path / "exp" / "db").mkdir()
    (tmp_path / "exp" / "db" / "database_tuning_record.json").write_text("")
    result = runner.invoke(cli.app, ["tune-merge", str(tmp_path / "exp"), "-t", "x86-64-avx2", "--tuning-db", str(tmp_path / "db")])
    assert result.exit_code == ExitCode.USAGE and "were exported for target" in result.stderr
    result = runner.invoke(cli.app, ["tune-merge", str(tmp_path / "nothing"), "-t", "host"])
    assert result.exit_code == ExitCode.USAGE and "no spec.json" in result.stderr


@pytest.mark.skipif(__import__("shutil").which("nvcc") is None, reason="CUDA builds need nvcc")
def test_cuda_tasks_export_for_the_gpu(conv_onnx, tmp_path, monkeypatch):
    """A CUDA target tunes on the GPU machine: the tasks go to the export folder (no default-schedule timing: an
    unscheduled GPU kernel binds no threads), and this build takes DLight's schedules for them."""
    no_worker(monkeypatch)
    report = build(conv_onnx, tmp_path / "o", tmp_path / "db", quick_config(tmp_path), target="nvidia-h100", tune_export=tmp_path / "exp")
    spec = json.loads((tmp_path / "exp" / "spec.json").read_text())
    assert spec["target"]["kind"] == "cuda" and spec["target"]["arch"] == "sm_90" and spec["measure_defaults"] is False
    assert report.tuning.tasks == len(spec["tasks"]) > 0 and report.result == "ok"
    result = runner.invoke(cli.app, ["compile", str(conv_onnx), "-t", "nvidia-h100", "-o", str(tmp_path / "o2"), "--tuning-db", str(tmp_path / "db")])
    assert result.exit_code == ExitCode.USAGE and "--tune-export" in result.stderr


# ---------------------------------------------------------------------------------- databases in the package

def test_shipped_database_fills_an_empty_cache(tuned, tmp_path, monkeypatch):
    """A database packed into the package (tuning.SHIPPED) gives a build with an empty cache its records: no trials."""
    model, db, first, _, root = tuned
    monkeypatch.setattr(tuning, "SHIPPED", tmp_path / "shipped")
    folder = next(p for p in db.iterdir() if (p / "target.json").is_file())
    archive = tuning.pack_database(folder, tuning.SHIPPED)
    assert archive.name == f"{folder.name}.tar.xz"
    no_worker(monkeypatch)
    expected = first.tuning.tasks - len(first.tuning.untuned)
    report = build(model, tmp_path / "o", tmp_path / "empty_db", quick_config(tmp_path), tune_trials=8, tune_export=tmp_path / "exp")
    t = report.tuning
    assert t.shipped == expected and t.hits == expected and t.trials == 0 and report.accuracy.ok
    again = build(model, tmp_path / "o2", tmp_path / "empty_db", quick_config(tmp_path), tune_trials=8, tune_export=tmp_path / "exp2")
    assert again.tuning.hits == expected and again.tuning.shipped == 0  # now in the user's database


def test_pack_database_refuses_a_folder_that_is_not_one(tmp_path):
    with pytest.raises(Exception) as e:
        tuning.pack_database(tmp_path, tmp_path / "out")
    assert "no database_workload.json" in str(e.value)


def test_weight_prepack_makes_its_own_tasks(tuned, tmp_path):
    """tune: {weight_prepack: true}: the kernels' constant weights are marked layout-free before the tasks are
    extracted (so MetaSchedule may choose their layout, and the transform is folded into the constants after
    tuning), which makes tasks of their own: no hit in the plain build's database; the build still matches ONNX
    Runtime."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from autoglm_compile.target import resolve_target
    from autoglm_compile.tvm_build import import_relax, make_target
    from autoglm_compile.inputs import InputSpec

    model, db, first, _, _ = tuned
    target = make_target(resolve_target("host"))
    mod = import_relax(onnx.load(str(model)), [InputSpec("x", (1, 3, 16, 16), "float32")])
    for prepack, expected in ((False, set()), (True, {"fused_conv2d_add_relu", "matmul"})):
        before, _ = tuning._phases(target, prepack)
        with target:
            lowered = tvm.transform.Sequential(before)(mod)
        marked = {t.task_name.rstrip("0123456789") for t in ms.relax_integration.extract_tasks(lowered, target)
                  if any(f.attrs is not None and len(f.attrs.get("layout_free_buffers", [])) for _, f in t.mod.functions_items())}
        assert marked == expected  # the conv and the Gemm read constant weights; mean and reshape do not
    report = build(model, tmp_path / "out", db, quick_config(tmp_path, weight_prepack=True), tune_trials=8)
    assert report.accuracy.ok and report.result == "ok"
    assert report.tuning.hits == 0 and report.tuning.misses == report.tuning.tasks == first.tuning.tasks


def _add_one(a_name: str):
    """A PrimFunc C[i, j] = A[i, j] + 1 whose input buffer is called a_name: modules that differ only there are
    structurally equal (one workload), but the blocks a schedule derives from the buffer are named after it."""
    from tvm import te

    a = te.placeholder((64, 64), "float32", name=a_name)
    c = te.compute((64, 64), lambda i, j: a[i, j] + 1.0, name="C")
    return tvm_ir_module(te.create_prim_func([a, c]))


def tvm_ir_module(func):
    import tvm

    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def _name_bound_record(mod):
    """A tuning record for mod whose trace looks up the cache-read block by its derived name ("A_shared")."""
    import tvm
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    sch = s_tir.Schedule(mod)
    sch.cache_read(sch.get_sblock("C"), 0, "shared")
    sch.get_sblock("A_shared")
    return sch.trace, ms.arg_info.ArgInfo.from_prim_func(mod["main"])


def test_a_record_whose_schedule_does_not_apply_is_skipped_on_merge_and_dropped_on_load(tmp_path):
    """A record tuned on one module and matched, by structure, to another whose buffers are named differently:
    tune-merge leaves it out, and a database already holding one stays readable (the record dropped, counted)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    target = tvm.target.Target({"kind": "llvm"})
    tuned_on, built = _add_one("A"), _add_one("X")
    assert tuning.workload_key(tuned_on) == tuning.workload_key(built)
    trace, args = _name_bound_record(tuned_on)
    worker = tmp_path / "worker"
    worker.mkdir()
    src = ms.database.JSONDatabase(work_dir=str(worker), allow_missing=True)
    src.commit_tuning_record(ms.database.TuningRecord(trace, src.commit_workload(tuned_on), [1e-5], target, args))
    task = types.SimpleNamespace(task_name="add_one", mod=built)
    db = tuning.TuningDatabase(tmp_path / "cache", target)
    assert db.merge(worker, [task]) == {}  # not committed: it would not replay on `built`
    assert tuning.TuningDatabase(tmp_path / "ok", target).merge(worker, [types.SimpleNamespace(task_name="add_one", mod=tuned_on)])
    # a database written before this check: the record against `built` makes TVM's reader fail
    bad = ms.database.JSONDatabase(work_dir=str(db.path), allow_missing=True)
    bad.commit_tuning_record(ms.database.TuningRecord(trace, bad.commit_workload(built), [1e-5], target, args))
    good_trace = tvm.s_tir.Schedule(built).trace
    bad.commit_tuning_record(ms.database.TuningRecord(good_trace, bad.commit_workload(built), [2e-5], target, args))
    with pytest.raises(Exception):
        ms.database.JSONDatabase(work_dir=str(db.path), allow_missing=True)
    loaded = db.load()
    assert db.dropped == 1 and len(loaded.get_all_tuning_records()) == 1
    assert len((db.path / tuning.DROPPED).read_text().splitlines()) == 1  # kept aside, not lost
