"""The memory-fit check (autoglm_compile/memory_fit.py): weights + inputs + peak activations + workspace against the
target's memory_capacity_gb, less a reserve. Too large: exit 2 with the figures; --max-memory-mb: a budget (exit 4)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from autoglm_compile import cli, memory_fit, pipeline
from autoglm_compile.cpu_kernels import vector_unit
from autoglm_compile.inputs import resolve_inputs
from autoglm_compile.memory_fit import GB, graph_memory, plan_figures, reserve
from autoglm_compile.report import Report, summary_rows
from autoglm_compile.target import resolve_target
from autoglm_compile.tvm_build import build, import_relax, lower, make_target
from conftest import conv_net, make_model

runner = CliRunner(env={"COLUMNS": "200"})
F32 = 4


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


def conv_chain(n: int = 4, c: int = 4, hw: int = 8) -> onnx.ModelProto:
    """n 3x3 convs in a row: TVM runs each as its own kernel (convs do not fuse), so its plan can reuse storages."""
    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "x"
    for i in range(n):
        inits.append(numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        prev = f"c{i}"
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                      [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, c, hw, hw])], inits)


# ----------------------------------------------------------------------------------------------- graph estimate

def test_graph_liveness_estimate():
    """x[1,1024] -> Relu a -> Reshape v (a view of a) -> Relu b -> Add(b, v) c [output]; Relu d of x is never used.
    Live activations: a (4 KiB); d is born and dies at its node (+4 KiB, once); then b while v (=a) is alive: a + b;
    then c while a and b are still read: a + b + c = 12 KiB, the peak."""
    n = 1024 * F32
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Relu", ["x"], ["d"]),
        helper.make_node("Reshape", ["a", "shape"], ["v"]),
        helper.make_node("Relu", ["v"], ["b"]),
        helper.make_node("Add", ["b", "v"], ["c"]),
    ]
    shape = numpy_helper.from_array(np.array([-1, 1024], np.int64), "shape")
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1024])],
                   [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["batch", 1024])], [shape])
    g = graph_memory(m, {"x": [1, 1024]})
    assert g.input_bytes == n and g.output_bytes == n and g.weight_bytes == 2 * 8
    assert g.activation_bytes == 3 * n  # a, b, c; the view v costs nothing, dead d is freed at once
    assert g.intermediate_bytes == 4 * n  # a, d, b, c
    assert g.unknown == []
    assert graph_memory(m, {"x": [4, 1024]}).activation_bytes == 4 * 3 * n  # scales with the pinned batch


def test_graph_estimate_of_a_conv_chain():
    g = graph_memory(conv_chain(), {"x": [1, 4, 8, 8]})
    t = 4 * 8 * 8 * F32
    assert g.activation_bytes == 2 * t  # one conv's input and output at a time (the model input counted apart)
    assert g.intermediate_bytes == 4 * t
    assert g.weight_bytes == 4 * 4 * 4 * 9 * F32


# --------------------------------------------------------------------------------------------- TVM's memory plan

def _lowered(model, target="host"):
    mod = import_relax(model, resolve_inputs(model))
    return lower(mod, resolve_target(target), "default")


def test_plan_figures_count_planned_tensors_and_storages():
    lowered, _ = _lowered(conv_chain())
    f = plan_figures(lowered)
    t = 4 * 8 * 8 * F32
    assert (f.tensors, f.tensor_bytes) == (4, 4 * t)  # the four conv outputs
    assert (f.storages, f.storage_bytes) == (3, 3 * t)  # two storages used in turn, and the output's
    assert f.unplanned_bytes == 0 and f.dynamic == 0


def test_workspace_is_read_after_storage_rewrite():
    """The host's default lowering keeps a fused conv's padded input and intermediates as global scratch buffers.
    Before TVM's StorageRewrite they sum to pad + conv + add; after it, the add reuses the conv's buffer."""
    model = conv_net(batch=2)
    lowered, target = _lowered(model)
    before = plan_figures(lowered)
    pad, conv = 2 * 3 * 18 * 18 * F32, 2 * 8 * 16 * 16 * F32
    assert (before.workspace_kernel, before.workspace_bytes) == ("fused_conv2d_add_relu", pad + 2 * conv)
    result = build(lowered, target)
    f = result.figures
    assert f.workspace_source == "kernel buffers after TVM's StorageRewrite"
    assert f.workspace_kernel == "fused_conv2d_add_relu" and 0 < f.workspace_bytes < before.workspace_bytes


def test_cuda_kernels_need_no_global_workspace():
    lowered, target = _lowered(conv_net(batch=2), "jetson-orin-nano")
    assert plan_figures(lowered).workspace_bytes == 0  # DLight keeps intermediates in shared memory and registers


# ------------------------------------------------------------------------------------------------------ capacity

@pytest.mark.parametrize("capacity, expected", [(8 * GB, 1 * GB), (80 * GB, 8 * GB), (1 * GB, GB // 2), (int(0.1 * GB), int(0.05 * GB))])
def test_reserve_rule(capacity, expected):
    assert reserve(capacity) == expected


def test_capacity_sources():
    nano = resolve_target("jetson-orin-nano")
    assert memory_fit.capacity(nano) == (8 * GB, "memory_capacity_gb 8 of jetson-orin-nano.yaml")
    cap, source = memory_fit.capacity(resolve_target("host"))
    total_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:"))
    assert cap == total_kb * 1024 and "MemTotal" in source


# ----------------------------------------------------------------------------------------------- the check itself

@pytest.fixture
def dyn_conv(tmp_path) -> Path:
    path = tmp_path / "conv.onnx"
    onnx.save(conv_net(), str(path))
    return path


def test_too_large_for_jetson_orin_nano_exits_2_before_anything_runs(dyn_conv, tmp_path, monkeypatch):
    """Batch 10^6 of the conv net: a 3.07 GB input and 8.19 GB conv outputs, on an 8 GB Orin Nano. Refused in the
    validate stage: no seeded input is drawn, ONNX Runtime never runs, nothing is built or written."""
    def must_not_run(*a, **k):
        raise AssertionError("ran after the memory-fit check should have refused the model")

    monkeypatch.setattr(pipeline, "random_inputs", must_not_run)
    monkeypatch.setattr(pipeline, "run_ort", must_not_run)
    out = tmp_path / "big"
    result = invoke("compile", dyn_conv, "--target", "jetson-orin-nano", "--dim", "batch=1000000", "-o", out)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    line = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    t = 8 * 16 * 16 * F32 * 10**6
    assert f"the model needs {(3072 * 10**6 + 2 * t + 1024) / GB:.2f} GB" in line  # the input, conv and relu outputs, weights
    assert "ONNX graph liveness estimate, before building" in line
    assert "target 'jetson-orin-nano' has 7.00 GB usable (8.00 GB capacity, from memory_capacity_gb 8 of jetson-orin-nano.yaml, less 1.00 GB reserved" in line
    assert "Hint: use smaller input shapes" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".big.partial-*"))


def test_a_fitting_model_builds_for_jetson_orin_nano(conv_onnx, tmp_path):
    out = tmp_path / "nano"
    result = invoke("compile", conv_onnx, "--target", "jetson-orin-nano", "-o", out)
    assert result.exit_code == 0, result.output
    report = Report.model_validate_json((out / "report.json").read_text())
    f = report.memory_fit
    assert f.fits is True and f.basis == "TVM static memory plan"
    assert (f.capacity_bytes, f.reserve_bytes, f.usable_bytes) == (8 * GB, 1 * GB, 7 * GB)
    assert f.needed_bytes == f.weight_bytes + f.input_bytes + f.activation_bytes + f.workspace_bytes
    assert f.input_bytes == 3 * 16 * 16 * F32 and f.weight_bytes == (8 * 27 + 8 + 32) * F32
    assert f.activation_bytes == report.memory.planned_activation_bytes > 0 and f.workspace_bytes == 0
    assert f.graph_activation_bytes == 2 * 8 * 16 * 16 * F32  # conv and relu outputs, before TVM fused them
    assert any(k == "memory fit" and v.endswith(": fits") and "usable 7.00 GB of 8.00 GB" in v for k, v in summary_rows(report))
    assert "| memory fit | needs" in (out / "report.md").read_text()


def test_tvm_plan_check_refuses_what_the_graph_estimate_let_through(dyn_conv, tmp_path):
    """A 0.085 GB device (usable 42.5 MB): the conv net at batch 2000 passes the graph estimate (6.1 MB input +
    32.8 MB activations) but not TVM's host plan (16.5 MB of storages + the fused conv's 24.2 MB of scratch). That
    scratch is the default loop nest's: the hand-scheduled conv kernel (cpu_kernels.py) keeps one register tile, and
    the net then fits, so this build turns the kernels off."""
    desc = yaml.safe_load(Path(resolve_target("host").source).read_text())
    desc.update(name="small-host", description="this CPU with 85 MB", memory_capacity_gb=0.085)
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(desc))
    (tmp_path / "plain.yaml").write_text("extends: O2\nschedule:\n  cpu_kernels: false\n")
    out = tmp_path / "out"
    result = invoke("compile", dyn_conv, "--target", tmp_path / "small.yaml", "--dim", "batch=2000", "-o", out, "--config", tmp_path / "plain.yaml")
    assert result.exit_code == 2, result.output
    line = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert "; TVM static memory plan)" in line and "workspace" in line and "target 'small-host' has 42.50 MB usable" in line
    assert not out.exists()


def test_max_memory_mb_is_a_budget(conv_onnx, tmp_path):
    out = tmp_path / "out"
    result = invoke("compile", conv_onnx, "--max-memory-mb", "0.01", "--runs", "1", "-o", out)
    assert result.exit_code == 4, result.output
    report = Report.model_validate_json((out / "report.json").read_text())  # a budget: the artifact is written
    assert report.result == "budget-failed"
    needed = report.memory_fit.needed_bytes
    assert f"the model needs {needed / 1e6:.1f} MB (TVM static memory plan), more than --max-memory-mb 0.01" in result.stderr
    ok = invoke("compile", conv_onnx, "--max-memory-mb", str(needed / 1e6 * 1.01), "--runs", "1", "-o", tmp_path / "ok")
    assert ok.exit_code == 0, ok.output


def test_report_shows_planning_savings(built_artifact):
    _, report, _ = built_artifact
    m = report.memory
    if vector_unit(make_target(resolve_target("host"))) is None:
        assert m.intermediate_bytes == (8 * 16 * 16 + 8 + 4) * F32  # the fused conv's, the pool's and the gemm's outputs
    else:  # the hand-scheduled conv (cpu_kernels.py) reads its input NHWC and padded
        assert m.intermediate_bytes == (18 * 18 * 3 + 8 * 16 * 16 + 8 + 4) * F32
    assert m.planning_saved_bytes == m.intermediate_bytes - m.planned_activation_bytes
    rows = dict(summary_rows(report))
    assert rows["memory planning"].startswith(f"intermediate tensors {m.intermediate_bytes / 2**20:.1f} MiB -> planned")
    assert rows["memory fit"].startswith("needs ") and report.memory_fit.fits is True


def test_planning_saves_on_a_conv_chain(tmp_path):
    path = tmp_path / "chain.onnx"
    onnx.save(conv_chain(), str(path))
    out = tmp_path / "chain"
    (tmp_path / "plain.yaml").write_text("extends: O2\nschedule:\n  cpu_kernels: false\n")  # the chain's own four tensors
    result = invoke("compile", path, "--runs", "1", "-o", out, "--json", "--no-fallback", "--config", tmp_path / "plain.yaml")
    assert result.exit_code == 0, result.output
    report = Report.model_validate_json(result.stdout)
    t = 4 * 8 * 8 * F32
    assert (report.memory.intermediate_bytes, report.memory.planned_activation_bytes) == (4 * t, 3 * t)
    assert report.memory.planning_saved_bytes == t
    assert "saved 0.0 MiB (25%)" in dict(summary_rows(report))["memory planning"]
    saved = json.loads((out / "report.json").read_text())["memory"]
    assert saved["intermediate_bytes"] == 4 * t
