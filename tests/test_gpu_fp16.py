"""fp16 and CUDA graphs on CUDA targets, checked on the lowered module (no GPU needed): --precision fp16 keeps the
graph in float32 and TVM's ToMixedPrecision makes float16 tensor-core kernels that accumulate in float32; the CUDA
graph switch adds TVM's capture builtins; O3 on a CUDA target leaves out fuse-attention."""
from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from autoglm_compile import cli, tvm_build

from autoglm_compile.config import PRESET_SKIPS, load_config
from autoglm_compile.errors import InputError
from autoglm_compile.inputs import InputSpec
from autoglm_compile.pipeline import CompileOptions, resolve_config
from autoglm_compile.target import resolve_target
from autoglm_compile.tvm_build import ScheduleContext, import_relax, lower
from conftest import make_model

CUDA = "nvidia-h100"


def conv_matmul():
    """Conv 64->128 (3x3, 16x16) -> Relu -> reshape to 128x256 -> MatMul 256x128 -> MatMul 128x128: every GEMM dim
    above DLight's tensor-core threshold (64), and two kernels after the one that reads the input (CUDA graphs
    capture only kernels whose arguments are static)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((128, 64, 3, 3)).astype(np.float32), "w")
    m = numpy_helper.from_array(rng.standard_normal((256, 128)).astype(np.float32), "m")
    m2 = numpy_helper.from_array(rng.standard_normal((128, 128)).astype(np.float32), "m2")
    s = numpy_helper.from_array(np.array([128, 256], np.int64), "s")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "s"], ["f"]), helper.make_node("MatMul", ["f", "m"], ["g"]),
             helper.make_node("MatMul", ["g", "m2"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 16, 16])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [128, 128])], [w, m, m2, s])
    return import_relax(model, [InputSpec("x", (1, 64, 16, 16), "float32")])


@functools.lru_cache
def lowered(fp16: bool = False, cuda_graph: bool = False):
    desc = resolve_target(CUDA)
    return lower(conv_matmul(), desc, "default", ScheduleContext(desc=desc, fp16=fp16, cuda_graph=cuda_graph))[0]


def kernel_buffers(func) -> set[tuple[str, str]]:
    """(scope, dtype) of the buffers a TIR kernel allocates in its blocks."""
    from tvm.s_tir.stmt import SBlock

    from autoglm_compile.memory_fit import walk_stmts

    found = set()
    walk_stmts(func.body, lambda node: found.update((b.scope(), str(b.dtype)) for b in node.alloc_buffers) if isinstance(node, SBlock) else None)
    return found


def kernels(mod) -> dict[str, object]:
    import tvm

    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def test_fp16_kernels_use_tensor_cores_with_float32_accumulation():
    mod = lowered(fp16=True)
    gemms = {n: kernel_buffers(f) for n, f in kernels(mod).items() if "conv2d" in n or "matmul" in n}
    assert any("conv2d" in n for n in gemms) and any("matmul" in n for n in gemms), sorted(gemms)
    for name, buffers in gemms.items():
        assert ("wmma.matrix_a", "float16") in buffers and ("wmma.matrix_b", "float16") in buffers, (name, buffers)
        assert ("wmma.accumulator", "float32") in buffers, (name, buffers)
    main = mod["main"]
    assert [str(p.ty.dtype) for p in main.params] == ["float32"] and str(main.ret_ty.dtype) == "float32"


def test_fp32_kernels_stay_float32():
    buffers = set().union(*(kernel_buffers(f) for f in kernels(lowered()).values()))
    assert not any(dtype == "float16" for _, dtype in buffers)
    assert not any(scope.startswith("wmma") for scope, _ in buffers)


@pytest.mark.parametrize("on", [True, False])
def test_cuda_graph_switch(on):
    mod = lowered(cuda_graph=on)
    names = {gv.name_hint for gv in mod.functions}
    text = mod["main"].script()
    assert ("cuda_graph_alloc" in names) == on
    assert ("vm.builtin.cuda_graph.run_or_capture" in text) == on
    assert ("vm.builtin.cuda_graph.get_cached_alloc" in text) == on


def names(cfg) -> list[str]:
    return [p.name for p in cfg.passes]


def test_fp16_on_cuda_is_relax_mixed_precision_elsewhere_convert_float16():
    cuda = resolve_config(CompileOptions(source="m.onnx", target=CUDA, precision="fp16"), resolve_target(CUDA))
    assert cuda.precision == "fp16" and cuda.relax_fp16 and "convert-float16" not in names(cuda)
    assert cuda.schedule.cuda_graph is True
    host = resolve_config(CompileOptions(source="m.onnx", target="host", precision="fp16"), resolve_target("host"))
    assert host.precision == "fp16" and not host.relax_fp16 and names(host)[-1] == "convert-float16"
    assert host.schedule.cuda_graph is False
    off = resolve_config(CompileOptions(source="m.onnx", target=CUDA, cuda_graph=False), resolve_target(CUDA))
    assert off.schedule.cuda_graph is False and off.precision == "fp32" and not off.relax_fp16


def test_fp16_method_from_config(tmp_path):
    graph = tmp_path / "graph.yaml"
    graph.write_text("extends: O2\nprecision: {fp16: graph}\n")
    cfg = resolve_config(CompileOptions(source="m.onnx", target=CUDA, config_path=graph, precision="fp16"), resolve_target(CUDA))
    assert not cfg.relax_fp16 and names(cfg)[-1] == "convert-float16"
    both = tmp_path / "both.yaml"
    both.write_text("extends: O2\npasses: [convert-float16]\nprecision: {mode: fp16, fp16: relax}\n")
    with pytest.raises(InputError, match="convert-float16"):
        load_config(path=both)


def test_o3_on_cuda_leaves_out_fuse_attention():
    assert "fuse-attention" in PRESET_SKIPS["cuda"]
    cuda = resolve_config(CompileOptions(source="m.onnx", target=CUDA, preset="O3"), resolve_target(CUDA))
    host = resolve_config(CompileOptions(source="m.onnx", target="host", preset="O3"), resolve_target("host"))
    assert "fuse-attention" in names(host) and "fuse-attention" not in names(cuda)
    assert [n for n in names(host) if n != "fuse-attention"] == [n for n in names(cuda) if n != "merge-parallel-matmuls"]
    assert cuda.skipped == ["fuse-attention"] and host.skipped == []


@pytest.mark.parametrize("preset", ["O2", "O3"])
def test_cuda_presets_merge_parallel_matmuls_before_the_final_clean_up(preset):
    cuda = names(resolve_config(CompileOptions(source="m.onnx", target=CUDA, preset=preset), resolve_target(CUDA)))
    host = names(resolve_config(CompileOptions(source="m.onnx", target="host", preset=preset), resolve_target("host")))
    assert cuda.count("merge-parallel-matmuls") == 1 and "merge-parallel-matmuls" not in host
    assert cuda[cuda.index("merge-parallel-matmuls") + 1:] == ["eliminate-dead-code", "infer-shapes"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("flags, fp16, graph", [(["--precision", "fp16"], True, True), (["--no-cuda-graph"], False, False), (["-O", "3"], False, True)])
def test_cli_cuda_build_lowers_with_the_config(conv_onnx, tmp_path, monkeypatch, flags, fp16, graph):
    seen = []
    original = tvm_build.lower

    def spy(mod, desc, strategy, context=None):
        lowered, target = original(mod, desc, strategy, context)
        seen.append((context.fp16, context.cuda_graph, {gv.name_hint for gv in lowered.functions}))
        return lowered, target

    monkeypatch.setattr(tvm_build, "lower", spy)
    out = tmp_path / "a"
    result = CliRunner().invoke(cli.app, ["compile", str(conv_onnx), "-t", CUDA, "-o", str(out), "--quiet", *flags])
    assert result.exit_code == 0, result.output
    (got_fp16, got_graph, functions), = seen
    assert (got_fp16, got_graph, "cuda_graph_alloc" in functions) == (fp16, graph, graph)
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert config["schedule"]["cuda_graph"] is graph and config["precision"]["mode"] == ("fp16" if fp16 else "fp32")
    assert not {"convert-float16", "fuse-attention"} & {p["name"] for p in config["passes"]}
    warnings = json.loads((out / "report.json").read_text())["warnings"]
    assert any("fuse-attention" in w for w in warnings) == (flags == ["-O", "3"])


@pytest.mark.parametrize("side, tensor_cores", [(7, True), (4, False)])
def test_small_fp16_gemms_get_tensor_cores_down_to_the_threshold(side, tensor_cores):
    """A 3x3 conv 64->128 on a side x side image is a GEMM with I = side^2: 49 is below DLight's own threshold (64)
    and above gpu_schedules.TENSOR_CORE_MIN (32); 16 is below both."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((128, 64, 3, 3)).astype(np.float32), "w")
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, side, side])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128, side, side])], [w])
    desc = resolve_target(CUDA)
    mod = import_relax(model, [InputSpec("x", (1, 64, side, side), "float32")])
    lowered_mod = lower(mod, desc, "default", ScheduleContext(desc=desc, fp16=True))[0]
    conv = [kernel_buffers(f) for n, f in kernels(lowered_mod).items() if "conv2d" in n]
    assert len(conv) == 1
    assert (("wmma.accumulator", "float32") in conv[0]) == tensor_cores, conv[0]
