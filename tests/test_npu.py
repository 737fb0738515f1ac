"""The vendor-onnx backend (NPU targets: Ascend through ONNX Runtime's CANN provider, Cambricon through MagicMind).

There is no NPU here: each test builds the artifact a user takes to the device and checks it where it can be
checked. The vendor ONNX is at the descriptor's opset, float16 inside with float32 inputs and outputs where the
descriptor prefers float16, and its runner script runs here on ONNX Runtime's CPU provider (saying so) and matches
ONNX Runtime on the source model within the precision's tolerances (config.TOLERANCES). A node outside the vendor's
op list is exit 2 naming it, unless --fallback onnxruntime, and then the report lists it.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import autoglm_compile
from autoglm_compile import cli
from autoglm_compile.config import TOLERANCES
from autoglm_compile.pipeline import CompileOptions, compile_model
from autoglm_compile.target import builtin_targets, resolve_target
from autoglm_compile.vendor import load_op_list
from conftest import conv_net, make_model

NPU_TARGETS = sorted(n for n, d in builtin_targets().items() if d.backend == "vendor-onnx")
MS = "com.microsoft"


def invoke(*args):
    return CliRunner().invoke(cli.app, ["compile", *[str(a) for a in args]])


def build(tmp_path: Path, target: str, model: onnx.ModelProto | None = None, **opts):
    path = tmp_path / "model_in.onnx"
    onnx.save(model or conv_net(batch=1), str(path))
    out = tmp_path / Path(target).stem
    return out, compile_model(CompileOptions(source=str(path), target=target, output=out, **opts))


def elem_types(values) -> set[int]:
    return {v.type.tensor_type.elem_type for v in values}


def fused_matmul_net() -> onnx.ModelProto:
    """The conv net with its Gemm replaced by com.microsoft FusedMatMul: an op of ONNX Runtime's own, in no
    vendor's op list (as in models that ONNX Runtime's optimizer saved). O2's decompose-contrib rewrites it as
    standard ops; the tests of unsupported nodes build at -O 1, which does not."""
    m = conv_net(batch=1)
    g = m.graph
    gemm = next(n for n in g.node if n.op_type == "Gemm")
    gemm.CopyFrom(helper.make_node("FusedMatMul", ["f", "fc"], ["y"], name="fmm", domain=MS, transB=1, alpha=1.0))
    m.opset_import.append(helper.make_opsetid(MS, 1))
    return m


def test_every_npu_target_is_vendor_onnx():
    assert set(NPU_TARGETS) == {"ascend-910b", "ascend-310p", "cambricon-mlu370"}
    for name in NPU_TARGETS:
        t = resolve_target(name)
        ops = load_op_list(t)
        assert t.npu.op_list and ops.ops and ops.source and ops.approximate
        assert "Conv" in ops.ops and f"{MS}.FusedMatMul" not in ops.ops


# --------------------------------------------------------------------------------------- each NPU target

@pytest.mark.parametrize("name", NPU_TARGETS)
def test_npu_artifact(tmp_path, name):
    out, report = build(tmp_path, name)
    t = resolve_target(name)
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"model.onnx", "runner.py", "runner.json", "convert.sh", "README.md", "manifest.json", "report.json", "report.md", "verify/inputs.npz", "verify/expected.npz"} <= files
    assert "model.so" not in files

    # The vendor ONNX: the descriptor's opset, static shapes, float16 inside, float32 at the edges.
    m = onnx.load(str(out / "model.onnx"))
    assert [(o.domain, o.version) for o in m.opset_import] == [("", t.npu.opset)]
    assert m.ir_version == onnx.helper.find_min_ir_version_for(list(m.opset_import))
    onnx.checker.check_model(m, full_check=True)
    assert all(d.dim_value > 0 for v in [*m.graph.input, *m.graph.output] for d in v.type.tensor_type.shape.dim)
    assert t.npu.prefer_fp16 and report.precision == "fp16"
    assert elem_types(m.graph.input) == elem_types(m.graph.output) == {TensorProto.FLOAT}
    assert {init.data_type for init in m.graph.initializer} == {TensorProto.FLOAT16}

    # Verified on ONNX Runtime CPU with the float16 tolerances; latency not measured here (or an estimate).
    rtol, atol = TOLERANCES["fp16"]
    assert report.accuracy.ok and (report.accuracy.rtol, report.accuracy.atol) == (rtol, atol)
    assert "CPUExecutionProvider" in report.accuracy.reference
    assert report.graph_verify.ok
    assert report.latency.status in ("not measured", "estimate") and "runner.py --runs" in report.latency.reason
    assert [p.name for p in report.passes][-3:] == ["convert-float16", "decompose-ops", "convert-opset"]

    # The manifest records the backend, the vendor, the provider and its options.
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "vendor-onnx" and manifest["library"] == "model.onnx"
    v = manifest["vendor"]
    assert v["vendor"] == t.npu.vendor and v["execution_provider"] == t.npu.execution_provider and v["opset"] == t.npu.opset
    assert v["provider_options"]["device_id"] == 0 and v["provider_options"]["precision_mode"]
    assert v["cpu_nodes"] == [] and v["fallback"] == "none"
    runner_cfg = json.loads((out / "runner.json").read_text())
    assert runner_cfg["provider_options"] == v["provider_options"] and runner_cfg["verify"]["atol"] == atol

    # The runner script runs here, on ONNX Runtime's CPU provider with a note, and matches.
    run = subprocess.run([sys.executable, str(out / "runner.py"), "--check"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "ran on: onnxruntime CPUExecutionProvider" in run.stdout and "PASS" in run.stdout
    assert run.stderr.startswith("note: ") and "CPUExecutionProvider instead" in run.stderr

    # And through the Python API and the CLI.
    loaded = autoglm_compile.load(out)
    with np.load(out / "verify" / "inputs.npz") as z, np.load(out / "verify" / "expected.npz") as e:
        got = loaded({k: z[k] for k in z.files})
        np.testing.assert_allclose(got[0], e["y"], rtol=rtol, atol=atol)
    result = CliRunner().invoke(cli.app, ["run", str(out), "--check"])
    assert result.exit_code == 0 and "PASS" in result.stderr


@pytest.mark.parametrize("name", ["ascend-910b", "ascend-310p"])
def test_atc_command_has_soc_version_and_input_shape(tmp_path, name):
    path = tmp_path / "dyn.onnx"
    onnx.save(conv_net(), str(path))
    result = invoke(path, "--target", name, "--dim", "batch=2", "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    command = (tmp_path / "out" / "convert.sh").read_text().splitlines()[-1]
    soc = resolve_target(name).npu.soc_version
    assert command.startswith("atc --framework=5 --model=model.onnx --output=model ")
    assert f"--soc_version={soc}" in command and "--input_shape=x:2,3,16,16" in command
    assert "--precision_mode=allow_fp32_to_fp16" in command
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["vendor"]["offline_command"] == command


def test_cambricon_artifact_has_a_magicmind_build(tmp_path):
    out, report = build(tmp_path, "cambricon-mlu370")
    cfg = json.loads((out / "runner.json").read_text())
    assert cfg["runtime"] == "magicmind" and cfg["magicmind"] == {"arch": "mtp_372", "precision_mode": "force_float16"}
    assert (out / "build_magicmind.py").is_file() and "python3 build_magicmind.py" in (out / "convert.sh").read_text()
    assert report.vendor.runtime == "Cambricon MagicMind"
    run = subprocess.run([sys.executable, str(out / "build_magicmind.py")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "MagicMind" in run.stderr  # not installed here: one line, no traceback
    assert "Traceback" not in run.stderr


def test_cambricon_fp32_when_asked(tmp_path):
    out, report = build(tmp_path, "cambricon-mlu370", precision="fp32")
    m = onnx.load(str(out / "model.onnx"))
    assert report.precision == "fp32" and {i.data_type for i in m.graph.initializer} == {TensorProto.FLOAT}
    assert report.accuracy.ok and (report.accuracy.rtol, report.accuracy.atol) == TOLERANCES["fp32"]
    assert json.loads((out / "runner.json").read_text())["magicmind"]["precision_mode"] == "force_float32"


def test_ascend_refuses_fp32(tmp_path, conv_onnx):
    result = invoke(conv_onnx, "--target", "ascend-310p", "--precision", "fp32", "-o", tmp_path / "x")
    assert result.exit_code == 2 and "does not support fp32" in result.stderr


def test_layernorm_and_gelu_are_decomposed_for_the_vendor_opset(tmp_path):
    """A model at opset 20 with LayerNormalization (17) and Gelu (20), which have no version at opset 11."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32) * 0.3, "w")
    s = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "s")
    b = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")
    m = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("LayerNormalization", ["h", "s", "b"], ["n"], name="ln", axis=-1),
            helper.make_node("Gelu", ["n"], ["y"], name="gelu"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16])],
        [w, s, b], opset=20,
    )
    out, report = build(tmp_path, "ascend-910b", model=m)
    decomposed = next(p for p in report.passes if p.name == "decompose-ops")
    assert decomposed.stats["decomposed"] == {"LayerNormalization": 1, "Gelu": 1}
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert not ops & {"LayerNormalization", "Gelu"} and {"ReduceMean", "Erf"} <= ops
    assert report.accuracy.ok


# ------------------------------------------------------------------------------------ operator coverage

def test_unsupported_node_is_exit_2_listing_it(tmp_path):
    path = tmp_path / "fmm.onnx"
    onnx.save(fused_matmul_net(), str(path))
    result = invoke(path, "--target", "ascend", "-O", 1, "-o", tmp_path / "x", "-q")
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: target 'ascend-910b': 1 node(s) use ops outside the huawei-ascend supported-op list: 'fmm' (com.microsoft.FusedMatMul)")
    assert lines[1].startswith("Hint: ") and "--fallback onnxruntime" in lines[1]
    assert not (tmp_path / "x").exists()


def test_o2_rewrites_the_contrib_op_for_the_vendor(tmp_path):
    """At the default -O 2, decompose-contrib turns the FusedMatMul into standard ops the vendor lists."""
    path = tmp_path / "fmm.onnx"
    onnx.save(fused_matmul_net(), str(path))
    out = tmp_path / "x"
    result = invoke(path, "--target", "ascend", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["vendor"]["cpu_nodes"] == [] and report["accuracy"]["ok"]
    assert all(n.domain in ("", "ai.onnx") for n in onnx.load(str(out / "model.onnx")).graph.node)


def test_fallback_onnxruntime_lists_the_cpu_nodes(tmp_path):
    path = tmp_path / "fmm.onnx"
    onnx.save(fused_matmul_net(), str(path))
    out = tmp_path / "x"
    result = invoke(path, "--target", "ascend-310p", "-O", 1, "--fallback", "onnxruntime", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["vendor"]["fallback"] == "onnxruntime"
    assert report["vendor"]["cpu_nodes"] == [{"name": "fmm", "op": "FusedMatMul", "domain": MS}]
    assert "| fmm | com.microsoft.FusedMatMul |" in (out / "report.md").read_text()
    assert any("run on ONNX Runtime's CPU provider" in w for w in report["warnings"])
    assert report["accuracy"]["ok"]
    assert json.loads((out / "runner.json").read_text())["cpu_nodes"] == report["vendor"]["cpu_nodes"]
    assert "fmm (com.microsoft.FusedMatMul)" in (out / "README.md").read_text()


def test_cambricon_cannot_fall_back(tmp_path):
    path = tmp_path / "fmm.onnx"
    onnx.save(fused_matmul_net(), str(path))
    result = invoke(path, "--target", "cambricon-mlu370", "-O", 1, "--fallback", "onnxruntime", "-o", tmp_path / "x")
    assert result.exit_code == 2 and "cannot hand nodes to the CPU" in result.stderr.splitlines()[0]
    result = invoke(path, "--target", "cambricon-mlu370", "-O", 1, "-o", tmp_path / "x")
    assert result.exit_code == 2 and "'fmm' (com.microsoft.FusedMatMul)" in result.stderr and "MagicMind has no CPU fallback" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "ascend", "--fallback", "gpu"], "unknown --fallback 'gpu'"),
        (["--target", "ascend", "--fallback", "onnxruntime", "--no-fallback"], "contradict"),
        (["--target", "host", "--fallback", "gpu"], "unknown --fallback 'gpu'"),  # host: per-subgraph fallback (test_fallback.py)
    ],
)
def test_fallback_option_errors(tmp_path, conv_onnx, args, message):
    result = invoke(conv_onnx, *args, "-o", tmp_path / "x")
    assert result.exit_code == 2 and message in result.stderr.splitlines()[0]


def test_a_copied_descriptor_with_its_own_op_list(tmp_path):
    """Users edit a copy of the descriptor and of its op list (the shipped lists are approximate)."""
    shipped = resolve_target("ascend-910b")
    ops = load_op_list(shipped)
    (tmp_path / "my_ops.yaml").write_text(f"# mine\nvendor: huawei-ascend\nsource: my CANN version\napproximate: false\nops: {ops.ops + [MS + '.FusedMatMul']}\n")
    text = (Path(autoglm_compile.__file__).parent.parent / "targets" / "ascend-910b.yaml").read_text()
    (tmp_path / "mine.yaml").write_text(text.replace("name: ascend-910b", "name: my-ascend").replace("aliases: [ascend]", "aliases: []").replace("op_list: ops/huawei-ascend.yaml", "op_list: my_ops.yaml"))
    out, report = build(tmp_path, str(tmp_path / "mine.yaml"), model=fused_matmul_net())
    assert report.vendor.cpu_nodes == [] and "my_ops.yaml" in report.vendor.op_list and report.accuracy.ok


def test_sample_inputs_check_every_file(tmp_path):
    """--sample-inputs: the vendor ONNX is checked on every file, and the report says where the inputs came from."""
    samples = tmp_path / "samples"
    samples.mkdir()
    rng = np.random.default_rng(3)
    for i in range(2):
        np.savez(samples / f"{i}.npz", x=rng.standard_normal((1, 3, 16, 16)).astype(np.float32))
    _, report = build(tmp_path, "ascend-910b", sample_inputs=samples)
    assert report.accuracy is not None and report.accuracy.ok
    assert "sample inputs from" in report.accuracy.inputs and "2 files" in report.accuracy.inputs
