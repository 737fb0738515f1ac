"""The artifact folder: its manifest, the runtime API and the `run` command, determinism, and atomic writes."""
from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import tvm
from typer.testing import CliRunner

import autoglm_compile
from autoglm_compile import cli, pipeline
from autoglm_compile.pipeline import CompileOptions, compile_model
from autoglm_compile.report import Report

runner = CliRunner()
RTOL, ATOL = 1e-3, 1e-4
ARTIFACT_FILES = {"model.so", "model.opt.onnx", "verify/inputs.npz", "verify/expected.npz"}


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def ort_outputs(model_path: Path, feeds: dict) -> list[np.ndarray]:
    sess = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def replace_stage(monkeypatch, name: str, fn) -> None:
    assert name in [n for n, _ in pipeline.STAGES]
    monkeypatch.setattr(pipeline, "STAGES", [(n, fn if n == name else f) for n, f in pipeline.STAGES])


# ------------------------------------------------------------------------------------------------------ manifest

def test_manifest_fields(built_artifact):
    out, report, model_path = built_artifact
    m = manifest(out)
    assert m["format_version"] == 1
    assert m["library"] == "model.so"
    assert m["inputs"] == [{"name": "x", "shape": [1, 3, 16, 16], "dtype": "float32"}]
    assert m["outputs"] == [{"name": "y", "shape": [1, 4], "dtype": "float32"}]
    assert m["target"]["name"] == "host" and m["target"]["kind"] == "cpu" and m["target"]["device"] == "cpu"
    assert m["target"]["tvm"]["kind"] == "llvm" and m["target"]["tvm"]["mtriple"]
    assert m["versions"]["tvm"] == tvm.__version__
    assert m["versions"]["onnx"] == onnx.__version__
    assert m["versions"]["onnxruntime"] == onnxruntime.__version__
    assert m["versions"]["autoglm_compile"] == autoglm_compile.__version__
    assert m["source"] == {"model": str(model_path), "frontend": "onnx", "sha256": file_sha256(model_path)}
    assert m["verify"] == {"inputs": "verify/inputs.npz", "expected": "verify/expected.npz", "rtol": RTOL, "atol": ATOL}
    assert [p["name"] for p in m["config"]["passes"]][0] == "pin-shapes" and m["config"]["name"] == "O2"
    assert m["reports"] == ["report.json", "report.md"]


def test_manifest_hashes_every_deployable_file(built_artifact):
    out, _, _ = built_artifact
    files = manifest(out)["files"]
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {"manifest.json", "report.json", "report.md"}
    assert ARTIFACT_FILES <= set(files)
    for rel, digest in files.items():
        assert file_sha256(out / rel) == digest, rel


def test_report_files(built_artifact):
    out, report, _ = built_artifact
    saved = Report.model_validate_json((out / "report.json").read_text())
    # report.json is written by the report stage, so it holds every stage's timing but that stage's own.
    assert saved.model_dump(exclude={"stages"}) == report.model_dump(exclude={"stages"})
    assert saved.stages == report.stages[:-1]
    assert [s.name for s in report.stages] == [n for n, _ in pipeline.STAGES]
    assert saved.result == "ok" and saved.accuracy.ok and saved.graph_verify.ok
    md = (out / "report.md").read_text()
    assert md.startswith(f"# autoglm-compile report: {report.model}") and "| result | ok |" in md


def test_stored_verification_data(built_artifact):
    out, _, model_path = built_artifact
    with np.load(out / "verify" / "inputs.npz") as z:
        feeds = {k: z[k] for k in z.files}
    with np.load(out / "verify" / "expected.npz") as z:
        expected = {k: z[k] for k in z.files}
    assert list(feeds) == ["x"] and feeds["x"].shape == (1, 3, 16, 16) and feeds["x"].dtype == np.float32
    np.testing.assert_allclose(expected["y"], ort_outputs(model_path, feeds)[0], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------------- runtime

def test_load_matches_onnxruntime(built_artifact):
    out, _, model_path = built_artifact
    model = autoglm_compile.load(out)
    x = np.random.default_rng(123).standard_normal((1, 3, 16, 16)).astype(np.float32)
    (got,) = model({"x": x})
    (want,) = ort_outputs(model_path, {"x": x})
    assert got.shape == (1, 4) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    (by_keyword,) = model(x=x)
    np.testing.assert_array_equal(by_keyword, got)


def test_calls_reuse_the_input_tensors_with_new_values(built_artifact):
    out, _, model_path = built_artifact
    model = autoglm_compile.load(out)
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((1, 3, 16, 16)).astype(np.float32) for _ in range(3)]
    firsts = []
    for x in xs:
        (got,) = model({"x": x})
        np.testing.assert_allclose(got, ort_outputs(model_path, {"x": x})[0], rtol=RTOL, atol=ATOL)
        firsts.append(model._staged[0])
    assert firsts[0] is firsts[1] is firsts[2]  # one device tensor, refilled each call
    assert not np.allclose(model({"x": xs[0]})[0], model({"x": xs[1]})[0])


def test_run_json_reproduces_output_summary(built_artifact):
    out, report, _ = built_artifact
    result = invoke("run", out, "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["inputs"] == "stored verification inputs"
    assert len(printed["outputs"]) == len(report.output_summary) == 1
    for got, want in zip(printed["outputs"], report.output_summary):
        assert got["name"] == want["name"] and got["shape"] == want["shape"] and got["dtype"] == want["dtype"]
        for key in ("mean", "std", "abs_sum"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key


def test_run_check_passes(built_artifact):
    out, _, _ = built_artifact
    result = invoke("run", out, "--check")
    assert result.exit_code == 0, result.output
    assert "check vs ONNX Runtime (rtol 0.001, atol 0.0001): PASS" in result.stderr


def test_run_check_fails_on_a_wrong_expectation(built_artifact, tmp_path):
    out, _, _ = built_artifact
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with np.load(copy / "verify" / "expected.npz") as z:
        expected = {k: z[k] for k in z.files}
    np.savez(copy / "verify" / "expected.npz", **{k: v + 1.0 for k, v in expected.items()})
    result = invoke("run", copy, "--check")
    assert result.exit_code == 3
    assert "FAIL" in result.stderr


def test_run_with_input_file_and_save(built_artifact, tmp_path):
    out, _, model_path = built_artifact
    x = np.random.default_rng(7).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    saved = tmp_path / "outputs.npz"
    result = invoke("run", out, "--input", f"x={tmp_path / 'x.npy'}", "--save", saved)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("y: float32[1, 4] mean=")
    with np.load(saved) as z:
        assert z.files == ["y"]
        got = z["y"]
    np.testing.assert_allclose(got, ort_outputs(model_path, {"x": x})[0], rtol=RTOL, atol=ATOL)


def test_run_wrong_input_shape_names_the_input(built_artifact, tmp_path):
    out, _, _ = built_artifact
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 8, 8), dtype=np.float32))
    result = invoke("run", out, "--input", f"x={tmp_path / 'x.npy'}")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "error: input 'x' is float32[1, 3, 8, 8], the artifact takes float32[1, 3, 16, 16]" in result.stderr
    assert "Hint: reshape or cast the input" in result.stderr


def test_run_wrong_input_name(built_artifact, tmp_path):
    out, _, _ = built_artifact
    np.save(tmp_path / "a.npy", np.zeros((1, 3, 16, 16), dtype=np.float32))
    result = invoke("run", out, "--input", f"pixels={tmp_path / 'a.npy'}")
    assert result.exit_code == 2
    assert "missing ['x'], unexpected ['pixels']" in result.stderr and "Hint: the artifact takes: x" in result.stderr


def test_run_not_an_artifact(tmp_path):
    result = invoke("run", tmp_path)
    assert result.exit_code == 2
    assert f"error: {tmp_path}: not an artifact (no manifest.json)" in result.stderr


# ---------------------------------------------------------------------------------------- determinism, atomicity

def test_two_builds_have_equal_manifests(built_artifact, tmp_path):
    out, _, model_path = built_artifact
    again = tmp_path / "again"
    compile_model(CompileOptions(source=str(model_path), output=again, runs=3))
    first, second = manifest(out), manifest(again)
    assert first.pop("created_at") and second.pop("created_at")
    assert first == second


def test_interrupted_build_leaves_nothing(tmp_path, conv_onnx, monkeypatch):
    def interrupt(job):
        assert (job.staging.path / "manifest.json").is_file()  # packaged, but not committed
        raise KeyboardInterrupt

    replace_stage(monkeypatch, "measure", interrupt)
    parent = tmp_path / "builds"
    result = invoke("compile", conv_onnx, "-o", parent / "conv", "-q")
    assert result.exit_code == 130
    assert "interrupted: no artifact was written" in result.stderr
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize("failure", [RuntimeError("bug"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failed_rebuild_keeps_the_earlier_artifact(built_artifact, tmp_path, monkeypatch, failure):
    out, _, model_path = built_artifact
    earlier = tmp_path / "conv"
    shutil.copytree(out, earlier)
    before = {p.relative_to(earlier).as_posix(): file_sha256(p) for p in earlier.rglob("*") if p.is_file()}

    def fail(job):
        raise failure

    replace_stage(monkeypatch, "measure", fail)
    with pytest.raises(type(failure)):
        compile_model(CompileOptions(source=str(model_path), output=earlier))
    after = {p.relative_to(earlier).as_posix(): file_sha256(p) for p in earlier.rglob("*") if p.is_file()}
    assert after == before
    assert manifest(earlier) == manifest(out)
    assert leftovers(tmp_path) == []


def test_successful_rebuild_replaces_the_artifact(built_artifact, tmp_path):
    out, _, model_path = built_artifact
    target = tmp_path / "conv"
    shutil.copytree(out, target)
    (target / "stale.txt").write_text("from an earlier build")
    compile_model(CompileOptions(source=str(model_path), output=target, preset="O0", runs=3))
    assert not (target / "stale.txt").exists()
    assert manifest(target)["config"]["name"] == "O0"
    assert leftovers(tmp_path) == []


def test_archive(tmp_path, conv_onnx):
    out = tmp_path / "conv"
    result = invoke("compile", conv_onnx, "-o", out, "--archive", "--runs", "3", "-q")
    assert result.exit_code == 0, result.output
    archive = tmp_path / "conv.tar.gz"
    assert archive.is_file()
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        packed = json.loads(tar.extractfile("conv/manifest.json").read())
    assert {f"conv/{f}" for f in ARTIFACT_FILES} <= names and "conv/report.json" in names
    assert packed == manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv", "conv.onnx", "conv.tar.gz"]  # no temporary left


def test_run_profile_times_every_kernel(built_artifact):
    out, _, model_path = built_artifact
    plain = invoke("run", out, "--json")
    result = invoke("run", out, "--json", "--profile", "3")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["outputs"] == json.loads(plain.stdout)["outputs"]  # profiling does not change the results
    kernels = printed["profile"]["kernels"]
    assert printed["profile"]["runs"] == 3
    assert [k["ms"] for k in kernels] == sorted((k["ms"] for k in kernels), reverse=True) and all(k["ms"] >= 0 for k in kernels)
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(model_path)).graph.node)
    assert sum(k["calls"] for k in kernels if k["name"].startswith("fused_conv2d")) == convs > 0  # TVM never fuses two convs
    text = invoke("run", out, "--profile", "2")
    assert text.exit_code == 0 and "profile: " in text.stdout and "fused_conv2d" in text.stdout
