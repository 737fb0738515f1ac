"""The command line, called in process: exit codes, one-line messages with a hint, and no traceback for user errors.

Exit codes (autoglm_compile.errors.ExitCode): 0 ok, 1 internal error, 2 usage or input error, 3 accuracy check
failed, 4 budget failed.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import yaml
from typer.testing import CliRunner

from autoglm_compile import cli, pass_manager, pipeline
from autoglm_compile.pass_manager import GraphPass, PassResult, register_pass, registered_passes
from autoglm_compile.report import Report
from autoglm_compile.target import builtin_targets
from conftest import conv_net

runner = CliRunner(env={"COLUMNS": "200"})  # wide enough that rich tables do not fold names


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


def assert_user_error(result, code: int, message: str, hint: str | list[str] | None = None):
    """Exit `code`, one 'error:' line containing `message`, then a 'Hint:' line containing `hint` (each fragment of
    it), and no traceback."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    line = lines[errors[0]]
    assert message in line, line
    if hint is not None:
        assert errors[0] + 1 < len(lines) and lines[errors[0] + 1].startswith("Hint: "), result.stderr
        for fragment in [hint] if isinstance(hint, str) else hint:
            assert fragment in lines[errors[0] + 1], lines[errors[0] + 1]
    return line


def no_partials(folder: Path) -> bool:
    return not [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


# ------------------------------------------------------------------------------------------------- user errors

def _external_data_model(tmp_path: Path, location: str) -> Path:
    """conv net saved with external data, then the location rewritten to point outside the model's folder."""
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "conv.onnx"
    onnx.save_model(conv_net(batch=1), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="conv.bin", size_threshold=0)
    (folder / "conv.bin").rename(tmp_path / "outside.bin")  # the data exists, but outside the folder
    model = onnx.load(str(path), load_external_data=False)
    edited = 0
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
                edited += 1
    assert edited == len(model.graph.initializer) == 3
    onnx.save_model(model, str(path))
    return path


def case_missing_file(tmp_path, conv):
    return [tmp_path / "nope.onnx"], "model file not found", "package.module:factory"


def case_random_bytes(tmp_path, conv):
    path = tmp_path / "random.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return [path], "not an ONNX model, or a truncated one", "re-export the model"


def case_truncated(tmp_path, conv):
    full = tmp_path / "full.onnx"
    onnx.save(conv_net(batch=1), str(full))
    data = full.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    return [path], "not an ONNX model, or a truncated one", "check the download finished"


def case_unknown_target(tmp_path, conv):
    return [conv, "--target", "tpu-9000"], "unknown target 'tpu-9000'", ["valid targets: ", *builtin_targets()]


def case_bad_yaml(tmp_path, conv):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("passes: [pin-shapes, fold-constants\nverify: {graph: true}\n")
    return [conv, "--config", cfg], f"{cfg}: not valid YAML", "fix the YAML syntax"


def case_unknown_pass(tmp_path, conv):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("passes: [pin-shapes, fold-constant]\n")
    return [conv, "--config", cfg], "unknown pass 'fold-constant'", "valid passes: " + ", ".join(registered_passes())


def case_unknown_option(tmp_path, conv):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("extends: O2\npasses:\n  - fold-constants: {max_iteration: 3}\n")
    return [conv, "--config", cfg], "pass 'fold-constants' option 'max_iteration'", "valid options of fold-constants:"


def case_external_parent(tmp_path, conv):
    path = _external_data_model(tmp_path, "../outside.bin")
    return [path], "external data '../outside.bin' of tensor 'w' is outside the model's folder", "keep external data files beside the model"


def case_external_absolute(tmp_path, conv):
    location = str(tmp_path / "outside.bin")
    path = _external_data_model(tmp_path, location)
    return [path], f"external data '{location}' of tensor 'w' is outside the model's folder", "keep external data files beside the model"


def case_bad_input_shape(tmp_path, conv):
    return [conv, "--input-shape", "x=1by3by16by16"], "bad --input-shape 'x=1by3by16by16'", "NAME=1x3x224x224"


def case_dynamic_dim(tmp_path, conv):
    path = tmp_path / "dyn.onnx"
    onnx.save(conv_net(), str(path))
    return [path], "dynamic dims with no value: x (batch)", "--input-shape x=..."


def case_output_not_artifact(tmp_path, conv):
    out = tmp_path / "somefolder"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    return [conv, "-o", out], "exists and is not an autoglm-compile artifact", "choose another -o path"


def case_precision_not_on_target(tmp_path, conv):
    target = tmp_path / "fp32only.yaml"
    target.write_text("name: fp32only\ndescription: a CPU without fp16\nkind: cpu\nbackend: tvm\ndetect_host: true\nprecisions: [fp32]\n")
    return [conv, "--target", target, "--precision", "fp16"], "target 'fp32only' does not support fp16", "its precisions: fp32"


def case_unknown_precision(tmp_path, conv):
    return [conv, "--precision", "int4"], "unknown precision 'int4'", "valid precisions: fp32, fp16"


CASES = {
    "precision-not-on-target": case_precision_not_on_target,
    "unknown-precision": case_unknown_precision,
    "missing-file": case_missing_file,
    "random-bytes": case_random_bytes,
    "truncated-protobuf": case_truncated,
    "unknown-target": case_unknown_target,
    "bad-yaml": case_bad_yaml,
    "unknown-pass": case_unknown_pass,
    "unknown-pass-option": case_unknown_option,
    "external-data-parent": case_external_parent,
    "external-data-absolute": case_external_absolute,
    "bad-input-shape": case_bad_input_shape,
    "dynamic-dim-no-value": case_dynamic_dim,
    "output-not-artifact": case_output_not_artifact,
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_line_with_hint(case, tmp_path, conv_onnx):
    args, message, hint = CASES[case](tmp_path, conv_onnx)
    out = tmp_path / "out"
    if "-o" not in args:
        args = [*args, "-o", out]
    result = invoke("compile", *args)
    assert_user_error(result, 2, message, hint)
    assert not out.exists()
    assert no_partials(tmp_path)


def test_output_not_artifact_is_left_alone(tmp_path, conv_onnx):
    out = tmp_path / "somefile"
    out.write_text("precious")
    assert_user_error(invoke("compile", conv_onnx, "-o", out), 2, "exists and is not an autoglm-compile artifact")
    assert out.read_text() == "precious"


def test_unknown_option_hint_lists_the_valid_options(tmp_path, conv_onnx):
    args, _, _ = case_unknown_option(tmp_path, conv_onnx)
    result = invoke("compile", *args, "-o", tmp_path / "out")
    valid = list(registered_passes()["fold-constants"].Options.model_fields)
    assert "max_iterations" in valid
    assert_user_error(result, 2, "Extra inputs are not permitted", f"valid options of fold-constants: {', '.join(valid)}")


# --------------------------------------------------------------------------------------------- exit 1, 3 and 4

def test_internal_error_shows_traceback_and_exits_1(tmp_path, conv_onnx):
    # A real process, so what the user sees is what Python prints for an uncaught exception.
    code = (
        "import sys\n"
        "import autoglm_compile.pipeline as p\n"
        "def boom(job):\n"
        "    raise RuntimeError('injected bug in the import stage')\n"
        "names = [n for n, _ in p.STAGES]\n"
        "p.STAGES[names.index('import')] = ('import', boom)\n"
        "from autoglm_compile.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", code, str(conv_onnx), "-o", str(out), "-q"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert "RuntimeError: injected bug in the import stage" in proc.stderr
    assert "error: " not in proc.stderr  # not dressed up as a user error
    assert not out.exists() and no_partials(tmp_path)


def test_internal_error_in_process_is_not_a_user_error(tmp_path, conv_onnx, monkeypatch):
    def boom(job):
        raise RuntimeError("injected")

    assert "schedule" in [n for n, _ in pipeline.STAGES]
    monkeypatch.setattr(pipeline, "STAGES", [(n, boom if n == "schedule" else fn) for n, fn in pipeline.STAGES])
    result = invoke("compile", conv_onnx, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError) and str(result.exception) == "injected"
    assert not (tmp_path / "out").exists() and no_partials(tmp_path)


@pytest.fixture
def scale_output_pass():
    """A test-only pass that multiplies every graph output by 2: a wrong rewrite the graph verifier would catch."""

    @register_pass("test-scale-output")
    class ScaleOutput(GraphPass):
        """Test only: insert a Mul by 2 before each graph output."""

        def run(self, graph, opts, ctx):
            for out in list(graph.outputs):
                producer = out.inputs[0]
                unscaled = gs.Variable(f"{out.name}__unscaled", dtype=out.dtype, shape=out.shape)
                producer.outputs[producer.outputs.index(out)] = unscaled
                two = gs.Constant(f"{out.name}__two", np.array(2.0, dtype=np.float32))
                graph.nodes.append(gs.Node("Mul", name=f"{out.name}__scale", inputs=[unscaled, two], outputs=[out]))
            return PassResult(changed=True, stats={"scaled": len(graph.outputs)})

    yield "test-scale-output"
    pass_manager._REGISTRY.pop("test-scale-output")


def test_accuracy_mismatch_exits_3_and_writes_nothing(tmp_path, conv_onnx, scale_output_pass):
    cfg = tmp_path / "wrong.yaml"
    cfg.write_text("extends: O2\npasses: [pin-shapes, test-scale-output]\nverify: {graph: false}\nmeasure: {enabled: false}\n")
    out = tmp_path / "out"
    result = invoke("compile", conv_onnx, "--config", cfg, "-o", out)
    assert_user_error(result, 3, "the build does not match ONNX Runtime: output 'y'", "no artifact was written")
    assert "accuracy-failed" in result.stderr  # the report is still shown
    assert not out.exists()
    assert no_partials(tmp_path)


def test_accuracy_mismatch_json_report(tmp_path, conv_onnx, scale_output_pass):
    cfg = tmp_path / "wrong.yaml"
    cfg.write_text("passes: [pin-shapes, test-scale-output]\nverify: {graph: false}\nmeasure: {enabled: false}\n")
    result = invoke("compile", conv_onnx, "--config", cfg, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 3
    report = Report.model_validate_json(result.stdout)
    assert report.result == "accuracy-failed" and report.accuracy is not None and not report.accuracy.ok
    assert [p.name for p in report.passes] == ["pin-shapes", "test-scale-output"]
    # The build is off by a factor of 2 on every element: the error is large, not a rounding difference.
    assert report.accuracy.outputs[0].max_rel == pytest.approx(1.0, rel=1e-3, abs=1e-4)


def test_budget_failure_exits_4_and_keeps_the_artifact(tmp_path, conv_onnx):
    out = tmp_path / "out"
    result = invoke("compile", conv_onnx, "-o", out, "--max-latency-ms", "1e-6", "--runs", "3", "--json")
    assert_user_error(result, 4, "exceeds --max-latency-ms 1e-06", "the artifact was written")
    printed = Report.model_validate_json(result.stdout)
    assert printed.result == "budget-failed"
    saved = Report.model_validate_json((out / "report.json").read_text())
    assert saved.result == "budget-failed" and saved.accuracy.ok
    assert (out / "manifest.json").is_file() and (out / "model.so").is_file()
    assert no_partials(tmp_path)


# ------------------------------------------------------------------------------------------------ success paths

def test_json_prints_only_the_report(tmp_path, conv_onnx):
    result = invoke("compile", conv_onnx, "-o", tmp_path / "out", "--json", "--runs", "3")
    assert result.exit_code == 0, result.output
    report = Report.model_validate_json(result.stdout)  # nothing but the JSON on stdout
    assert report.result == "ok" and report.accuracy.ok
    assert report.inputs == [{"name": "x", "shape": [1, 3, 16, 16], "dtype": "float32"}]
    assert report.latency.status == "measured" and report.latency.stats.runs == 3
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_main_inserts_compile_for_a_model_path(tmp_path, conv_onnx, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli.main([str(conv_onnx), "-o", str(out), "--json", "--runs", "3"])
    assert e.value.code == 0
    report = Report.model_validate_json(capsys.readouterr().out)
    assert report.model == str(conv_onnx) and report.result == "ok"
    assert (out / "manifest.json").is_file()


def test_main_keeps_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["passes", "--json"])
    assert e.value.code == 0
    assert "fold-constants" in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("extra, preset", [([], "O2"), (["-O", "0"], "O0"), (["-O", "3"], "O3")])
def test_dump_config(conv_onnx, tmp_path, extra, preset):
    result = invoke("compile", conv_onnx, "--dump-config", *extra, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    dumped = yaml.safe_load(result.stdout)
    expected = yaml.safe_load((Path(pipeline.__file__).parents[1] / "configs" / f"{preset}.yaml").read_text())
    names = [p if isinstance(p, str) else next(iter(p)) for p in expected["passes"]]
    assert dumped["name"] == preset
    assert [p["name"] for p in dumped["passes"]] == names
    assert not (tmp_path / "out").exists()  # dumping does no work


def test_dump_config_of_user_file(conv_onnx, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("extends: O1\npasses: [pin-shapes, {fold-constants: {max_iterations: 3}}]\nverify: {rtol: 0.01}\n")
    result = invoke("compile", conv_onnx, "--config", cfg, "--dump-config")
    assert result.exit_code == 0, result.output
    dumped = yaml.safe_load(result.stdout)
    assert dumped["passes"] == [{"name": "pin-shapes", "options": {}}, {"name": "fold-constants", "options": {"max_iterations": 3}}]
    assert dumped["verify"]["rtol"] == 0.01 and dumped["verify"]["atol"] == 1e-4 and dumped["name"] == "O1"


def test_targets_command():
    result = invoke("targets")
    assert result.exit_code == 0, result.output
    assert "host" in result.stdout and "This machine's CPU" in result.stdout
    as_json = json.loads(invoke("targets", "--json").stdout)
    assert as_json["host"]["kind"] == "cpu" and as_json["host"]["backend"] == "tvm"


def test_passes_command():
    result = invoke("passes")
    assert result.exit_code == 0, result.output
    for name in registered_passes():
        assert name in result.stdout
    as_json = json.loads(invoke("passes", "--json").stdout)
    assert list(as_json) == list(registered_passes())
    assert as_json["fold-constants"]["options"]["max_iterations"] == "10"
    assert as_json["fold-constants"]["module"] == "autoglm_compile.passes.fold_constants"


def test_doctor_command():
    result = invoke("doctor")
    assert result.exit_code == 0, result.output
    for check in ("apache-tvm", "onnxruntime", "TVM compiler", "host CPU"):
        assert check in result.stdout
    assert "LLVM" in result.stdout and "unavailable" not in result.stdout
