"""Shape buckets: --input-shape NAME=S1,S2 / --dim NAME=V1,V2 / --dim NAME=A..B build one variant per bucket into
one artifact, which load() and `autoglm-compile run` dispatch by the inputs' shapes."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
from typer.testing import CliRunner

import autoglm_compile
from autoglm_compile import cli
from autoglm_compile.buckets import Bucket, plan_buckets
from autoglm_compile.errors import InputError
from autoglm_compile.pipeline import CompileOptions
from autoglm_compile.report import Report
from autoglm_compile.runtime import ArtifactError
from conftest import conv_net

runner = CliRunner(env={"COLUMNS": "200"})
RTOL, ATOL = 1e-3, 1e-4
BATCHES = (1, 2, 4)
VARIANT_FILES = {"model.so", "model.opt.onnx", "manifest.json", "verify/inputs.npz", "verify/expected.npz"}


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


def opts(shapes=(), dims=()) -> CompileOptions:
    return CompileOptions(source="m.onnx", input_shapes=list(shapes), dims=list(dims))


# ------------------------------------------------------------------------------------------------------ parsing

def test_ordinary_options_are_no_buckets():
    assert plan_buckets(opts(["x=1x3x16x16", "mask=1x16:int64"], ["batch=1", "seq=8"])) is None
    assert plan_buckets(opts()) is None


@pytest.mark.parametrize("shapes, dims, expected", [
    (["x=1x3x16x16,8x3x16x16"], [], [(["x=1x3x16x16"], []), (["x=8x3x16x16"], [])]),
    (["x=1x3x16x16", "x=8x3x16x16"], [], [(["x=1x3x16x16"], []), (["x=8x3x16x16"], [])]),  # the name given twice
    (["ids=1x128,8x128:int64"], [], [(["ids=1x128:int64"], []), (["ids=8x128:int64"], [])]),  # dtype on every shape
    ([], ["batch=1,4,8"], [([], ["batch=1"]), ([], ["batch=4"]), ([], ["batch=8"])]),
    ([], ["batch=1..8"], [([], [f"batch={b}"]) for b in (1, 2, 4, 8)]),  # a range: doubling, end included
    ([], ["batch=3..20"], [([], [f"batch={b}"]) for b in (3, 6, 12, 20)]),
    ([], ["batch=1,16..32"], [([], [f"batch={b}"]) for b in (1, 16, 32)]),
    # zipped, not crossed; a single value applies to every bucket
    (["ids=1x8,2x8", "mask=1x8,2x8", "pos=1x8"], ["seq=8"],
     [(["ids=1x8", "mask=1x8", "pos=1x8"], ["seq=8"]), (["ids=2x8", "mask=2x8", "pos=1x8"], ["seq=8"])]),
    (["x=1x3x16x16,2x3x16x16"], ["batch=1,2"], [(["x=1x3x16x16"], ["batch=1"]), (["x=2x3x16x16"], ["batch=2"])]),
    ([], ["batch=4..4"], [([], ["batch=4"])]),  # one bucket: an ordinary build with batch=4
])
def test_bucket_plans(shapes, dims, expected):
    got = plan_buckets(opts(shapes, dims))
    assert got == [Bucket(f"b{k}", s, d) for k, (s, d) in enumerate(expected)]


@pytest.mark.parametrize("shapes, dims, message", [
    (["x=1x3,2x3", "y=1x3,2x3,4x3"], [], "must list the same number (--input-shape x: 2, --input-shape y: 3)"),
    (["x=1x3,2x3"], ["batch=1,2,4"], "must list the same number (--input-shape x: 2, --dim batch: 3)"),
    (["x=1x3,1x3"], [], "--input-shape gives x=1x3 twice"),
    (["x=1x3", "x=1x3"], [], "--input-shape gives x=1x3 twice"),
    ([], ["batch=1,1"], "--dim 'batch=1,1' lists a value twice"),
    (["x=1x3,abc"], [], "bad --input-shape 'x=1x3,abc'"),
    (["x=1x3,0x3"], [], "bad --input-shape 'x=1x3,0x3'"),
    (["x=1x3,2x3:float99"], [], "bad --input-shape 'x=1x3,2x3:float99'"),
    ([], ["batch=8..2"], "bad --dim range 'batch=8..2'"),
    ([], ["batch=0..2"], "bad --dim range 'batch=0..2'"),
    ([], ["batch=1,x"], "bad --dim 'batch=x'"),
])
def test_bucket_option_errors(shapes, dims, message):
    with pytest.raises(InputError) as e:
        plan_buckets(opts(shapes, dims))
    assert message in str(e.value)
    assert e.value.hint


def test_cli_mismatched_bucket_counts_exit_2(tmp_path):
    model = tmp_path / "conv.onnx"
    onnx.save(conv_net(), str(model))
    result = invoke("compile", model, "--input-shape", "x=1x3x16x16,2x3x16x16", "--dim", "batch=1,2,4", "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "must list the same number" in result.stderr and "Hint:" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_cli_help_documents_the_bucket_syntax():
    result = invoke("compile", "--help")
    text = " ".join(result.stdout.split())
    assert "NAME=1x3x224x224,8x3x224x224" in text and "batch=1,4,8" in text and "batch=1..8" in text


# --------------------------------------------------------------------------------------------- one artifact, 3 batches

@pytest.fixture(scope="module")
def bucketed(tmp_path_factory):
    """The conv net (dynamic batch) built with --dim batch=1,2,4 through the CLI: (artifact, source model, CLI result)."""
    root = tmp_path_factory.mktemp("buckets")
    model = root / "conv.onnx"
    onnx.save(conv_net(), str(model))
    out = root / "conv"
    result = invoke("compile", model, "--dim", "batch=1,2,4", "--runs", "2", "-o", out)
    assert result.exit_code == 0, result.output
    return out, model, result


def test_manifest_lists_the_buckets(bucketed):
    out, _, _ = bucketed
    m = json.loads((out / "manifest.json").read_text())
    assert m["backend"] == "buckets" and m["library"] is None
    assert [(b["name"], b["path"]) for b in m["buckets"]] == [(f"b{k}", f"variants/b{k}") for k in range(3)]
    assert [b["inputs"] for b in m["buckets"]] == [[{"name": "x", "shape": [n, 3, 16, 16], "dtype": "float32"}] for n in BATCHES]
    assert [b["outputs"] for b in m["buckets"]] == [[{"name": "y", "shape": [n, 4], "dtype": "float32"}] for n in BATCHES]
    assert m["inputs"] == [{"name": "x", "dtype": "float32", "shapes": [[n, 3, 16, 16] for n in BATCHES]}]
    for k in range(3):  # each variant is a complete single-shape artifact, its files hashed in the top manifest
        variant = out / "variants" / f"b{k}"
        assert VARIANT_FILES <= {p.relative_to(variant).as_posix() for p in variant.rglob("*") if p.is_file()}
        assert json.loads((variant / "manifest.json").read_text())["inputs"][0]["shape"] == [BATCHES[k], 3, 16, 16]
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    hashed = set(m["files"])
    assert {f"variants/b{k}/model.so" for k in range(3)} <= hashed
    assert hashed == on_disk - {"manifest.json", *m["reports"]} - {f"variants/b{k}/manifest.json" for k in range(3)}


def test_load_dispatches_each_batch_and_matches_onnxruntime(bucketed):
    out, model_path, _ = bucketed
    model = autoglm_compile.load(out)
    sess = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    for k, n in enumerate(BATCHES):
        x = rng.standard_normal((n, 3, 16, 16)).astype(np.float32)
        assert model.bucket_for({"x": x})["name"] == f"b{k}"
        (got,) = model(x=x)
        (want,) = sess.run(None, {"x": x})
        assert got.shape == (n, 4)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
        # the variant of that bucket, loaded alone, gives the same outputs: the dispatch ran it
        (alone,) = autoglm_compile.load(out / "variants" / f"b{k}")(x=x)
        np.testing.assert_array_equal(got, alone)


def test_a_shape_outside_every_bucket_names_the_buckets(bucketed):
    out, _, _ = bucketed
    model = autoglm_compile.load(out)
    with pytest.raises(ArtifactError) as e:
        model(x=np.zeros((3, 3, 16, 16), np.float32))
    assert "input shapes x=3x3x16x16 match no bucket" in str(e.value)
    assert "b0 (x=1x3x16x16), b1 (x=2x3x16x16), b2 (x=4x3x16x16)" in str(e.value)
    assert e.value.hint
    with pytest.raises(ArtifactError, match="missing \\['x'\\]"):
        model(y=np.zeros((1, 3, 16, 16), np.float32))


def test_run_with_an_out_of_bucket_shape_exits_2(bucketed, tmp_path):
    out, _, _ = bucketed
    np.save(tmp_path / "x.npy", np.zeros((8, 3, 16, 16), np.float32))
    result = invoke("run", out, "--input", f"x={tmp_path / 'x.npy'}")
    assert result.exit_code == 2, result.output
    assert "match no bucket" in result.stderr and "b2 (x=4x3x16x16)" in result.stderr and "Hint:" in result.stderr
    assert "Traceback" not in result.output


def test_run_given_input_uses_its_bucket(bucketed, tmp_path):
    out, model_path, _ = bucketed
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = invoke("run", out, "--input", f"x={tmp_path / 'x.npy'}", "--save", tmp_path / "y.npz")
    assert result.exit_code == 0, result.output
    (want,) = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    with np.load(tmp_path / "y.npz") as z:
        np.testing.assert_allclose(z["y"], want, rtol=RTOL, atol=ATOL)


def test_run_check_checks_every_bucket(bucketed):
    out, _, _ = bucketed
    result = invoke("run", out, "--check", "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert [(b["bucket"], b["outputs"][0]["shape"]) for b in printed["buckets"]] == [(f"b{k}", [n, 4]) for k, n in enumerate(BATCHES)]
    for k in range(3):
        assert f"b{k}: check vs ONNX Runtime (rtol 0.001, atol 0.0001): PASS" in result.stderr


def test_run_check_fails_when_one_bucket_is_wrong(bucketed, tmp_path):
    import shutil

    out, _, _ = bucketed
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    expected = copy / "variants" / "b1" / "verify" / "expected.npz"
    with np.load(expected) as z:
        np.savez(expected, y=z["y"] + 1.0)
    result = invoke("run", copy, "--check")
    assert result.exit_code == 3, result.output
    assert "b0: check vs ONNX Runtime (rtol 0.001, atol 0.0001): PASS" in result.stderr
    assert "b1: check vs ONNX Runtime (rtol 0.001, atol 0.0001): FAIL" in result.stderr


def test_report_gives_latency_and_error_per_bucket(bucketed):
    out, _, result = bucketed
    report = Report.model_validate_json((out / "report.json").read_text())
    assert [b.name for b in report.buckets] == ["b0", "b1", "b2"]
    assert [b.batch for b in report.buckets] == list(BATCHES)
    for b, n in zip(report.buckets, BATCHES):
        assert b.inputs == [{"name": "x", "shape": [n, 3, 16, 16], "dtype": "float32"}]
        assert b.latency.status == "measured" and b.latency.stats.runs == 2 and b.latency.stats.p50_ms > 0
        assert b.samples_per_s == pytest.approx(b.latency.stats.throughput_per_s * n)
        assert b.accuracy_ok is True and 0 <= b.max_abs <= ATOL + RTOL and b.baseline_p50_ms > 0
        variant = Report.model_validate_json((out / b.path / "report.json").read_text())  # the variant's own report
        assert b.max_abs == max(o.max_abs for o in variant.accuracy.outputs)
    assert report.accuracy.ok and report.accuracy.outputs[0].max_abs == max(b.max_abs for b in report.buckets)
    assert report.memory_fit.needed_bytes == max(b.needed_bytes for b in report.buckets)
    md = (out / "report.md").read_text()
    assert "## Shape buckets" in md
    for k, n in enumerate(BATCHES):
        assert f"| b{k} | x {n}x3x16x16 |" in md
        assert f"bucket b{k}" in result.stderr  # the console table
    assert "x=4x3x16x16: p50" in result.stderr


def test_buckets_resolving_to_the_same_shapes_are_refused(tmp_path):
    model = tmp_path / "conv.onnx"
    onnx.save(conv_net(batch=1), str(model))  # static batch: --dim batch changes nothing
    result = invoke("compile", model, "--dim", "batch=1,2", "--runs", "1", "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "buckets b0 (batch=1) and b1 (batch=2) give the model the same input shapes" in result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_single_shape_artifact_has_no_buckets(built_artifact):
    out, report, _ = built_artifact
    m = json.loads((out / "manifest.json").read_text())
    assert "buckets" not in m and m["library"] == "model.so" and not (out / "variants").exists()
    assert report.buckets == []
    assert type(autoglm_compile.load(out)).__name__ == "CompiledModel"


RUNTIME_ONLY = """
import json, sys
for name in ("pydantic", "typer", "rich", "onnx_graphsurgeon", "onnx", "onnxruntime"):
    sys.modules[name] = None  # any import of these now raises ImportError
import numpy as np
import autoglm_compile, tvm.base
m = autoglm_compile.load(sys.argv[1])
shapes = [list(m(x=np.ones(b["inputs"][0]["shape"], np.float32))[0].shape) for b in m.buckets]
print(json.dumps({"shapes": shapes, "runtime_only": tvm.base._RUNTIME_ONLY,
                  "modules": sorted(k for k in sys.modules if k.startswith("autoglm_compile"))}))
"""


def test_bucketed_artifact_runs_with_the_runtime_only(bucketed, tmp_path):
    import os
    import subprocess
    import sys

    out, _, _ = bucketed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TVM_USE_RUNTIME_LIB"] = "1"
    proc = subprocess.run([sys.executable, "-c", RUNTIME_ONLY, str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["shapes"] == [[n, 4] for n in BATCHES]
    assert facts["runtime_only"] is True
    assert facts["modules"] == ["autoglm_compile", "autoglm_compile.bucket_runtime", "autoglm_compile.runtime"]


def test_top_level_says_what_to_install_and_how_to_run(bucketed):
    out, _, _ = bucketed
    req = (out / "requirements-runtime.txt").read_text().splitlines()
    assert req == list(dict.fromkeys(req)) and any(line.startswith("apache-tvm==") for line in req)
    assert set(req) == set((out / "variants" / "b0" / "requirements-runtime.txt").read_text().splitlines())
    run = (out / "RUN.md").read_text()
    assert f"{len(BATCHES)} shape buckets" in run
    assert all(f"`b{k}` (variants/b{k}): x float32[{n},3,16,16]" in run for k, n in enumerate(BATCHES))


def test_run_profile_of_a_bucketed_artifact_exits_2(bucketed):
    out, _, _ = bucketed
    result = invoke("run", out, "--profile", "2")
    assert result.exit_code == 2, result.output
    assert "--profile times the kernels of a TVM artifact of one shape" in result.stderr and "variants/<bucket>" in result.stderr
    profiled = invoke("run", out / "variants" / "b0", "--profile", "2")  # one variant is an artifact of its own
    assert profiled.exit_code == 0, profiled.output
