"""Per-subgraph fallback to ONNX Runtime: ops TVM's importer lacks run on ONNX Runtime between TVM segments."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import autoglm_compile
from autoglm_compile.cli import app
from autoglm_compile.errors import UnsupportedError
from autoglm_compile.measure import run_ort
from autoglm_compile.partition import FallbackReport, plan, unsupported
from autoglm_compile.pipeline import CompileOptions, compile_model

from conftest import IR_VERSION, make_model

runner = CliRunner()
RTOL, ATOL = 1e-4, 1e-5


def _w(name, shape, seed):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def celu_model() -> onnx.ModelProto:
    """MatMul -> Relu -> Celu (no TVM converter) -> Add (uses a tensor from before the cut) -> MatMul."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Celu", ["r"], ["c"], name="celu", alpha=0.5),
        helper.make_node("Add", ["c", "a"], ["s"], name="add"),
        helper.make_node("MatMul", ["s", "w2"], ["y"], name="mm2"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    return make_model(nodes, [x], [y], [_w("w", (8, 8), 0), _w("w2", (8, 4), 1)])


def contrib_model() -> onnx.ModelProto:
    """Two adjacent ops TVM lacks (com.microsoft QuickGelu, then Celu) between supported ops; two outputs."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"),
        helper.make_node("QuickGelu", ["a"], ["g"], name="qgelu", domain="com.microsoft", alpha=1.702),
        helper.make_node("Celu", ["g"], ["c"], name="celu"),
        helper.make_node("Tanh", ["c"], ["t"], name="tanh"),
        helper.make_node("Sigmoid", ["a"], ["z"], name="sig"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])
    outs = [helper.make_tensor_value_info("t", TensorProto.FLOAT, [3, 8]), helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 8])]
    graph = helper.make_graph(nodes, "contrib", [x], outs, initializer=[_w("w", (8, 8), 2)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = IR_VERSION
    return model


def loop_model() -> onnx.ModelProto:
    """A Loop (no TVM converter) whose body reads `b`, a tensor made by a TVM node before it (an implicit input)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["acc_in", "b"], ["acc_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [2, 4])],
    )
    trip = numpy_helper.from_array(np.array(3, np.int64), "trip")
    cond = numpy_helper.from_array(np.array(True), "cond")
    nodes = [
        helper.make_node("Relu", ["x"], ["b"], name="relu"),
        helper.make_node("Loop", ["trip", "cond", "x"], ["acc"], name="loop", body=body),
        helper.make_node("Mul", ["acc", "b"], ["y"], name="mul"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    return make_model(nodes, [x], [y], [trip, cond])


@pytest.fixture(scope="module")
def celu_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("celu")
    onnx.save(celu_model(), str(root / "celu.onnx"))
    out = root / "celu"
    report = compile_model(CompileOptions(source=str(root / "celu.onnx"), output=out, runs=3))
    return out, report, root / "celu.onnx"


# ---------------------------------------------------------------------------------------------- the partition

def test_the_ops_are_really_unsupported():
    assert [n.name for _, n in unsupported(celu_model())] == ["celu"]
    assert [n.name for _, n in unsupported(contrib_model())] == ["qgelu", "celu"]
    assert [n.name for _, n in unsupported(loop_model())] == ["loop"]


def test_plan_cuts_at_the_unsupported_node():
    model = celu_model()
    x = np.ones((2, 8), np.float32)
    p = plan(model, {"x": x})
    assert [(s.backend, [n.name for n in s.nodes]) for s in p.segments] == [
        ("tvm", ["mm1", "relu"]), ("onnxruntime", ["celu"]), ("tvm", ["add", "mm2"])]
    assert [(s.inputs, s.outputs) for s in p.segments] == [(["x"], ["a", "r"]), (["r"], ["c"]), (["c", "a"], ["y"])]
    assert p.tensor_types["a"] == ([2, 8], "float32")
    assert [(n.name, n.op, n.segment) for n in p.fallback_nodes] == [("celu", "Celu", 1)]
    # the segments, run one after another under ONNX Runtime, are the model
    env = {"x": x}
    for s in p.segments:
        onnx.checker.check_model(s.model)
        env.update(zip(s.outputs, run_ort(s.model, {t: env[t] for t in s.inputs})))
    np.testing.assert_allclose(env["y"], run_ort(model, {"x": x})[0], rtol=RTOL, atol=ATOL)


def test_adjacent_unsupported_nodes_share_a_segment():
    p = plan(contrib_model(), {"x": np.ones((3, 8), np.float32)})
    assert [(s.backend, [n.name for n in s.nodes]) for s in p.segments] == [
        ("tvm", ["mm1"]), ("onnxruntime", ["qgelu", "celu"]), ("tvm", ["tanh", "sig"])]
    assert p.segments[1].model.opset_import[1].domain == "com.microsoft"
    assert p.segments[2].inputs == ["c", "a"] and p.segments[2].outputs == ["t", "z"]


def test_subgraph_reads_are_segment_inputs():
    p = plan(loop_model(), {"x": np.ones((2, 4), np.float32)})
    assert [(s.backend, s.inputs, s.outputs) for s in p.segments] == [
        ("tvm", ["x"], ["b"]), ("onnxruntime", ["x", "b"], ["acc"]), ("tvm", ["acc", "b"], ["y"])]


# ---------------------------------------------------------------------------------------------- the artifact

def test_fallback_build_matches_and_reports(celu_artifact):
    out, report, _ = celu_artifact
    assert report.accuracy is not None and report.accuracy.ok
    fb = report.fallback
    assert isinstance(fb, FallbackReport) and fb.mode == "onnxruntime"
    assert [(n.name, n.op) for n in fb.fallback_nodes] == [("celu", "Celu")]
    assert fb.nodes == {"tvm": 4, "onnxruntime": 1} and fb.node_share["onnxruntime"] == pytest.approx(0.2)
    assert set(fb.time_ms) == {"tvm", "onnxruntime"} and all(s.ms is not None for s in fb.segments)
    md = (out / "report.md").read_text()
    assert "## Backends (--fallback onnxruntime)" in md and "| celu | Celu | 1 |" in md


def test_manifest_lists_segments_and_runtime_dependencies(celu_artifact):
    out, _, _ = celu_artifact
    import onnxruntime

    m = json.loads((out / "manifest.json").read_text())
    assert m["library"] is None and m["backend"] == "tvm+onnxruntime"
    assert [(s["backend"], s["file"]) for s in m["segments"]] == [
        ("tvm", "segments/00.tvm.so"), ("onnxruntime", "segments/01.ort.onnx"), ("tvm", "segments/02.tvm.so")]
    assert m["segments"][2]["inputs"] == [{"name": "c", "shape": [2, 8], "dtype": "float32"}, {"name": "a", "shape": [2, 8], "dtype": "float32"}]
    assert m["runtime_dependencies"]["onnxruntime"] == onnxruntime.__version__
    for s in m["segments"]:
        assert s["file"] in m["files"]


def test_load_and_run_check_round_trip(celu_artifact):
    out, _, model = celu_artifact
    x = np.random.default_rng(7).standard_normal((2, 8)).astype(np.float32)
    got = autoglm_compile.load(out)(x=x)
    np.testing.assert_allclose(got[0], run_ort(onnx.load(str(model)), {"x": x})[0], rtol=RTOL, atol=ATOL)
    res = runner.invoke(app, ["run", str(out), "--check"])
    assert res.exit_code == 0, res.output
    assert "PASS" in res.output


def test_partitioned_artifact_runs_without_the_compiler(celu_artifact, tmp_path):
    """Like test_runtime_only, with onnxruntime present (the manifest's dependency) and TVM's runtime library only."""
    from test_runtime_only import SCRIPT

    out, _, _ = celu_artifact
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TVM_USE_RUNTIME_LIB"] = "1"
    saved = tmp_path / "outputs.npz"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(saved)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["runtime_only"] is True and not facts["compiler_mapped"] and not facts["blocked_loaded"]
    with np.load(saved) as z, np.load(out / "verify" / "expected.npz") as e:
        np.testing.assert_allclose(z["y"], e["y"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("make", [contrib_model, loop_model], ids=["contrib", "loop"])
def test_other_fallback_models_build_and_match(tmp_path, make):
    path = tmp_path / "m.onnx"
    onnx.save(make(), str(path))
    report = compile_model(CompileOptions(source=str(path), output=tmp_path / "out", runs=2))
    assert report.accuracy.ok and report.fallback is not None
    res = runner.invoke(app, ["run", str(tmp_path / "out"), "--check"])
    assert res.exit_code == 0, res.output


def test_a_segment_that_fails_import_moves_to_onnxruntime(tmp_path, monkeypatch):
    """The importer may accept an op and still fail on it: that segment runs on ONNX Runtime, with a warning."""
    import autoglm_compile.tvm_build as tb

    real = tb.import_relax

    def flaky(model, inputs):
        if any(n.op_type == "Add" for n in model.graph.node):
            raise UnsupportedError("TVM's ONNX importer failed: boom")
        return real(model, inputs)

    monkeypatch.setattr(tb, "import_relax", flaky)
    path = tmp_path / "m.onnx"
    onnx.save(celu_model(), str(path))
    report = compile_model(CompileOptions(source=str(path), output=tmp_path / "out", runs=2))
    assert report.accuracy.ok
    # the failing segment [add, mm2] is bisected: add is isolated and joins celu; mm2 stays on TVM
    assert [(s.backend, s.nodes) for s in report.fallback.segments] == [("tvm", 2), ("onnxruntime", 2), ("tvm", 1)]
    reasons = {n.name: n.reason for n in report.fallback.fallback_nodes}
    assert reasons["add"].startswith("TVM import failed") and "boom" in reasons["add"]
    assert any(w.startswith("node add (Add) runs on ONNX Runtime") for w in report.warnings)


def tanh_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
        helper.make_node("Tanh", ["a"], ["t"], name="tanh"),
        helper.make_node("Sigmoid", ["t"], ["s"], name="sig"),
        helper.make_node("Add", ["s", "a"], ["y"], name="add"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    return make_model(nodes, [x], [y], [_w("w", (8, 8), 3)])


def _failing_build(monkeypatch, word):
    """TVM's build raises, as 'CodeGenVM cannot emit' does, for any module with a kernel named after `word`."""
    import autoglm_compile.tvm_build as tb

    real = tb.build

    def build(lowered, target):
        if any(word in gv.name_hint for gv in lowered.get_global_vars()):
            raise RuntimeError(f"CodeGenVM cannot emit this Relax operator: {word}")
        return real(lowered, target)

    monkeypatch.setattr(tb, "build", build)


def test_a_whole_model_that_fails_to_build_isolates_the_node(tmp_path, monkeypatch):
    """Every node imports, but the build fails: with fallback the failing node is found and runs on ONNX Runtime."""
    _failing_build(monkeypatch, "tanh")
    path = tmp_path / "m.onnx"
    onnx.save(tanh_model(), str(path))
    report = compile_model(CompileOptions(source=str(path), output=tmp_path / "out", runs=2))
    assert report.accuracy.ok
    assert [(n.name, n.op) for n in report.fallback.fallback_nodes] == [("tanh", "Tanh")]
    assert "cannot emit" in report.fallback.fallback_nodes[0].reason
    assert [s.backend for s in report.fallback.segments] == ["tvm", "onnxruntime", "tvm"]
    assert any("whole-model TVM build failed" in w for w in report.warnings)
    res = runner.invoke(app, ["run", str(tmp_path / "out"), "--check"])
    assert res.exit_code == 0, res.output


def test_a_build_failure_without_fallback_is_not_hidden(tmp_path, monkeypatch):
    _failing_build(monkeypatch, "tanh")
    path = tmp_path / "m.onnx"
    onnx.save(tanh_model(), str(path))
    with pytest.raises(RuntimeError, match="cannot emit"):
        compile_model(CompileOptions(source=str(path), output=tmp_path / "out", fallback="none"))


# ---------------------------------------------------------------------------------------------- the switches

@pytest.mark.parametrize("flags", [["--no-fallback"], ["--fallback", "none"]])
def test_no_fallback_exits_2_naming_the_node(tmp_path, flags):
    path = tmp_path / "m.onnx"
    onnx.save(contrib_model(), str(path))
    # -O1: O2's decompose-contrib would write QuickGelu as Mul/Sigmoid, which TVM takes.
    res = runner.invoke(app, ["compile", str(path), "-o", str(tmp_path / "out"), "-O1", *flags])
    assert res.exit_code == 2, res.output
    assert "qgelu (com.microsoft.QuickGelu)" in res.output and "celu (Celu)" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_bad_fallback_value_exits_2(tmp_path, conv_onnx):
    res = runner.invoke(app, ["compile", str(conv_onnx), "-o", str(tmp_path / "out"), "--fallback", "cpu"])
    assert res.exit_code == 2 and "unknown --fallback 'cpu'" in res.output


def test_supported_model_has_no_segments(built_artifact):
    out, report, _ = built_artifact
    assert report.fallback is None
    m = json.loads((out / "manifest.json").read_text())
    assert "segments" not in m and m["library"] == "model.so"


def test_a_qdq_segment_reads_float_weights(tmp_path, monkeypatch):
    """A QDQ model's TVM segment gets its dequantized constant weights folded into float32 constants, as a whole-model
    build does (pipeline.stage_import): the module lowered has no dequantize left, and the build matches."""
    import autoglm_compile.tvm_build as tb

    rng = np.random.default_rng(4)
    wq = numpy_helper.from_array(rng.integers(-127, 128, (8, 8)).astype(np.int8), "wq")
    ws = numpy_helper.from_array(rng.uniform(0.01, 0.02, 8).astype(np.float32), "ws")
    wz = numpy_helper.from_array(np.zeros(8, np.int8), "wz")
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=1, name="dq"),
             helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
             helper.make_node("Celu", ["a"], ["y"], name="celu", alpha=0.5)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [wq, ws, wz])
    lowered, real = [], tb.lower
    monkeypatch.setattr(tb, "lower", lambda mod, *a, **k: (lowered.append(mod.script()), real(mod, *a, **k))[1])
    path = tmp_path / "qdq_celu.onnx"
    onnx.save(model, str(path))
    report = compile_model(CompileOptions(source=str(path), output=tmp_path / "out", runs=2))
    assert report.accuracy.ok and [s.backend for s in report.fallback.segments] == ["tvm", "onnxruntime"]
    assert len(lowered) == 1 and "matmul" in lowered[0] and "dequantize" not in lowered[0]


# ---------------------------------------------------------------------------------------------- --backend auto

def _ort_timed_at(monkeypatch, p50_ms):
    """ONNX Runtime's timing in --backend auto, fixed (a timing is never asserted on)."""
    import autoglm_compile.measure as measure
    from autoglm_compile.report import LatencyStats

    def fixed(fn, warmup, runs, min_runs, max_seconds):
        fn()
        return LatencyStats(runs=1, warmup=0, mean_ms=p50_ms, p50_ms=p50_ms, p90_ms=p50_ms, p99_ms=p50_ms, min_ms=p50_ms, max_ms=p50_ms, throughput_per_s=1e3 / p50_ms)

    monkeypatch.setattr(measure, "time_runs", fixed)


def test_backend_auto_packages_onnxruntime_when_faster(tmp_path, monkeypatch, conv_onnx):
    _ort_timed_at(monkeypatch, 1e-6)
    out = tmp_path / "out"
    report = compile_model(CompileOptions(source=str(conv_onnx), output=out, runs=2, backend="auto"))
    c = report.backend_choice
    assert c.chosen == "onnxruntime" and c.onnxruntime_p50_ms == 1e-6
    assert report.latency.status == "measured" and report.latency.stats.p50_ms == c.tvm_p50_ms  # TVM's own
    m = json.loads((out / "manifest.json").read_text())
    assert m["backend"] == "onnxruntime" and [s["file"] for s in m["segments"]] == ["segments/00.ort.onnx"]
    assert not (out / "model.so").exists() and "model.so" not in m["files"]
    res = runner.invoke(app, ["run", str(out), "--check"])
    assert res.exit_code == 0, res.output


def test_backend_auto_keeps_tvm_when_faster(tmp_path, monkeypatch, conv_onnx):
    _ort_timed_at(monkeypatch, 1e6)
    out = tmp_path / "out"
    report = compile_model(CompileOptions(source=str(conv_onnx), output=out, runs=2, backend="auto"))
    assert report.backend_choice.chosen == "tvm"
    m = json.loads((out / "manifest.json").read_text())
    assert m["library"] == "model.so" and "segments" not in m


@pytest.mark.parametrize("args, message", [(["--backend", "ort"], "unknown --backend 'ort'"), (["--backend", "auto", "--target", "ascend-310p"], "--backend auto is for TVM targets")])
def test_backend_option_errors(tmp_path, conv_onnx, args, message):
    res = runner.invoke(app, ["compile", str(conv_onnx), "-o", str(tmp_path / "out"), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output


def test_a_bug_in_the_build_is_not_taken_for_an_unsupported_op(conv_onnx, tmp_path, monkeypatch):
    """The fallback partitions around what TVM cannot lower or build; an ImportError (a broken install or a bug of
    ours) is not that, and surfaces as one (exit 1 with its traceback in the CLI) instead of an all-ORT artifact."""
    from autoglm_compile import tvm_build
    from autoglm_compile.pipeline import CompileOptions, compile_model

    def broken(*args, **kwargs):
        raise ImportError("cannot import name 'x' from 'autoglm_compile.y'")

    monkeypatch.setattr(tvm_build, "build", broken)
    with pytest.raises(ImportError):
        compile_model(CompileOptions(source=str(conv_onnx), output=tmp_path / "o", fallback="onnxruntime", runs=1))
    assert not (tmp_path / "o").exists()
