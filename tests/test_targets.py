"""Target descriptors: the schema, resolution by name / alias / path, host detection."""
from __future__ import annotations

import re
from importlib import resources

import pytest
import yaml

from autoglm_compile.errors import InputError
from autoglm_compile.target import CUDA_LIMITS, TargetDescriptor, builtin_targets, cpu_flags, resolve_target


def test_every_shipped_descriptor_validates():
    files = [p for p in resources.files("autoglm_compile.targets").iterdir() if p.name.endswith(".yaml")]
    assert files
    for f in files:
        text = f.read_text()
        assert text.lstrip().startswith("#"), f"{f.name} must say where its numbers come from in a comment"
        TargetDescriptor.model_validate(yaml.safe_load(text))
    assert set(builtin_targets()) >= {"host"}


def test_host_is_detected_and_runnable_here():
    host = resolve_target("host")
    assert host.is_host and host.kind == "cpu" and host.backend == "tvm"
    assert host.cpu.mcpu and host.cpu.cores >= 1
    spec = host.tvm_target()
    assert spec["kind"] == "llvm" and spec["mcpu"] == host.cpu.mcpu
    import tvm

    tvm.target.Target(spec)  # TVM 0.27 accepts the dict


def test_host_cpu_name_matches_cpu_features():
    # LLVM must not pick a CPU whose instructions this machine lacks (a VM may mask AVX-512).
    import tvm
    from tvm.target import codegen

    host = resolve_target("host")
    if "avx512f" not in cpu_flags():
        assert not codegen.llvm_cpu_has_features(["avx512f"], tvm.target.Target({"kind": "llvm", "mcpu": host.cpu.mcpu}))


def test_target_from_yaml_path(tmp_path):
    f = tmp_path / "gpu.yaml"
    f.write_text(
        "# test descriptor\nname: my-gpu\ndescription: t\nkind: cuda\nbackend: tvm\n"
        "cuda: {arch: sm_90}\ncpu: {triple: x86_64-linux-gnu}\nprecisions: [fp32, fp16]\n"
    )
    t = resolve_target(str(f))
    assert t.name == "my-gpu" and not t.is_host
    assert t.tvm_target() == {"kind": "cuda", "arch": "sm_90", **CUDA_LIMITS, "host": {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}}
    assert CUDA_LIMITS["max_threads_per_block"] == 1024  # MetaSchedule's GPU rules need the per-block limits


@pytest.mark.parametrize(
    "body, message",
    [
        ("name: x\ndescription: d\nkind: gpu\nbackend: tvm\n", "invalid target field 'kind'"),
        ("name: x\ndescription: d\nkind: cuda\nbackend: tvm\n", "needs a 'cuda' section"),
        ("name: x\ndescription: d\nkind: cuda\nbackend: tvm\ncuda: {arch: ampere}\n", "invalid target field 'cuda.arch'"),
        ("name: x\ndescription: d\nkind: cpu\nbackend: tvm\n", "needs a 'cpu' section"),
        ("name: x\ndescription: d\nkind: npu-onnx\nbackend: tvm\n", "needs an 'npu' section"),
        ("name: x\ndescription: d\nkind: cpu\nbackend: tvm\ndetect_host: true\nspeed: 3\n", "invalid target field 'speed'"),
        ("name: x\ndescription: d\nkind: cpu\nbackend: tvm\ndetect_host: true\nprecisions: [fp8]\n", "invalid target field 'precisions.0'"),
        ("[not, a, mapping]\n", "must be a YAML mapping"),
        ("name: [\n", "not valid YAML"),
    ],
)
def test_bad_descriptor_messages(tmp_path, body, message):
    f = tmp_path / "t.yaml"
    f.write_text(body)
    with pytest.raises(InputError) as e:
        resolve_target(str(f))
    assert message in str(e.value)


def test_unknown_target_lists_valid_ones():
    with pytest.raises(InputError) as e:
        resolve_target("jetsonn")
    assert "unknown target 'jetsonn'" in str(e.value) and "host" in e.value.hint


def test_missing_target_file():
    with pytest.raises(InputError, match="target file not found"):
        resolve_target("nowhere/t.yaml")


# ----------------------------------------------------------------------------------- the descriptors in scope

IN_SCOPE = {
    "host", "x86-64-avx2", "x86-64-avx512", "nvidia-h100", "nvidia-a100", "nvidia-l4", "nvidia-rtx4090",
    "jetson-orin", "jetson-orin-nano", "jetson-xavier", "arm-cortex-a76", "arm-neoverse-v1", "arm-cortex-a78",
    "ascend-910b", "ascend-310p", "cambricon-mlu370",
}


def test_every_target_in_scope_is_shipped():
    assert set(builtin_targets()) >= IN_SCOPE


@pytest.mark.parametrize("alias, name", [("jetson", "jetson-orin"), ("h100", "nvidia-h100"), ("arm", "arm-cortex-a76"), ("ascend", "ascend-910b")])
def test_aliases_resolve(alias, name):
    assert resolve_target(alias).name == name


def test_names_and_aliases_are_unique():
    targets = builtin_targets()
    seen = list(targets) + [a for d in targets.values() for a in d.aliases]
    assert len(seen) == len(set(seen)), sorted(n for n in seen if seen.count(n) > 1)


@pytest.mark.parametrize("name", sorted(IN_SCOPE - {"host"}))
def test_descriptor_has_roofline_figures_with_sources(name):
    desc = builtin_targets()[name]
    assert desc.memory_bandwidth_gbps and desc.memory_capacity_gb
    assert set(desc.precisions) <= set(desc.peak_flops), f"{name}: a peak figure for every precision it lists"
    assert all(v > 1e9 for v in desc.peak_flops.values())
    comment = "\n".join(line for line in resources.files("autoglm_compile.targets").joinpath(f"{name}.yaml").read_text().splitlines() if line.startswith("#"))
    assert re.search(r'"[A-Z][^"]{8,}"', comment), f"{name}: the comment names its source documents in quotes"
    for key in desc.peak_flops:
        assert f"peak_flops.{key}" in comment or f"/ {key}" in comment, f"{name}: the source of peak_flops.{key}"


def test_descriptor_kinds_are_consistent():
    for desc in builtin_targets().values():
        if desc.kind == "cuda":
            assert desc.cpu is not None, f"{desc.name}: a CUDA target names its host CPU"
        if desc.cpu is not None and desc.cpu.arch == "aarch64":
            assert desc.cpu.triple == "aarch64-linux-gnu" and desc.cpu.mcpu
    jetson = resolve_target("jetson")
    assert jetson.cuda.arch == "sm_87" and jetson.cpu.arch == "aarch64"
    assert not resolve_target("jetson-xavier").cuda.nvcc_supported


@pytest.mark.parametrize("name", sorted(n for n, d in builtin_targets().items() if d.cpu is not None))
def test_cpu_names_are_known_to_llvm(name):
    import tvm
    from tvm.target import codegen

    desc = builtin_targets()[name]
    assert codegen.llvm_is_valid_cpu(desc.cpu.mcpu or "generic", desc.cpu.triple)
    tvm.target.Target(desc.tvm_target()["host"] if desc.kind == "cuda" else desc.tvm_target())
