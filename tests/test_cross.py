"""Builds on this machine for every target kind, and the artifact each must produce: the x86 host build runs and
is measured; x86-64-avx512 is built and runs only on a CPU with AVX-512; a CUDA build holds SASS and PTX for its SM
(cuobjdump); an aarch64 build is an AArch64 ELF exporting the same entry points as the host build; Jetson is both;
a target this machine cannot build for fails before any work with one line and a hint (exit 2). NPU targets
(vendor-onnx backend) are tested in test_npu.py."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

import autoglm_compile
from autoglm_compile import cli, target as target_mod
from autoglm_compile.errors import ToolchainError
from autoglm_compile.libfile import device_code, read_elf
from autoglm_compile.pipeline import CompileOptions, compile_model
from autoglm_compile.runtime import ArtifactError
from autoglm_compile.target import builtin_targets, cpu_flags, resolve_target
from autoglm_compile.toolchain import check_toolchain, linker, nvcc_archs
from conftest import conv_net

ELF_MACHINE = {"x86_64": "x86-64", "aarch64": "AArch64"}


def cuobjdump() -> str | None:
    """cuobjdump from the PATH, or from the nvidia-cuda-cuobjdump wheel (the dev extra)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("nvidia")
    for base in spec.submodule_search_locations if spec else []:
        for path in sorted(Path(base).glob("cu*/bin/cuobjdump")):
            return str(path)
    return None


needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
needs_cuobjdump = pytest.mark.skipif(cuobjdump() is None, reason="cuobjdump is not installed (pip install nvidia-cuda-cuobjdump)")
needs_cross = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="aarch64-linux-gnu-gcc is not installed (make install installs it)")


def requirements(name: str) -> list:
    desc = resolve_target(name)
    marks = []
    if desc.kind == "cuda":
        marks.append(needs_nvcc)
    if linker(desc) == "aarch64-linux-gnu-gcc":
        marks.append(needs_cross)
    return marks


def build(tmp_path: Path, target: str):
    """The conv net built for `target`, without the hand-scheduled CPU kernels: which ops get them depends on the
    target's vector width (8 channels: NEON's 4 lanes, not AVX-512's 16), and so would the entry points compared
    below. test_cpu_kernels.py cross-builds them."""
    model = tmp_path / "conv.onnx"
    onnx.save(conv_net(batch=1), str(model))
    config = tmp_path / "no-cpu-kernels.yaml"
    config.write_text("extends: O2\nschedule:\n  cpu_kernels: false\n")
    out = tmp_path / target
    report = compile_model(CompileOptions(source=str(model), target=target, output=out, runs=3, config_path=config))
    return out, report


@pytest.fixture(scope="module")
def host_entry_points(tmp_path_factory) -> set[str]:
    out, _ = build(tmp_path_factory.mktemp("host"), "host")
    return {s for s in read_elf(out / "model.so").dynamic_symbols() if s.startswith("__tvm_ffi")}


def hide_cpu_flags(monkeypatch, prefix: str) -> None:
    """Make this CPU look as if it lacked every extension whose flag starts with `prefix`."""
    flags = [f for f in cpu_flags() if not f.startswith(prefix)]
    monkeypatch.setattr(target_mod, "cpu_flags", lambda: flags)


# ------------------------------------------------------------------------------------- every buildable target

BUILDABLE = [n for n, d in builtin_targets().items() if d.backend == "tvm" and not (d.cuda and not d.cuda.nvcc_supported)]


@pytest.mark.parametrize("name", [pytest.param(n, marks=requirements(n)) for n in BUILDABLE])
def test_every_buildable_target_builds_the_artifact_of_its_kind(tmp_path, name, host_entry_points):
    desc = resolve_target(name)
    out, report = build(tmp_path, name)
    elf = read_elf(out / "model.so")
    arch = desc.cpu.arch if desc.cpu else target_mod.host_arch()
    assert elf.machine == ELF_MACHINE[arch]
    assert host_entry_points <= set(elf.dynamic_symbols()), "the library must export the same entry points as the host build"
    assert report.graph_verify is not None and report.graph_verify.ok  # the optimized ONNX is verified everywhere
    if desc.is_host:
        assert report.latency.status == "measured" and report.accuracy.ok
    else:
        assert report.latency.status == "estimate" and report.latency.estimate_ms > 0 and report.accuracy is None
        assert "not run against ONNX Runtime" in report.accuracy_reason
        assert "accuracy" in (out / "report.md").read_text() and "not checked" in (out / "report.md").read_text()
    codes = device_code(out / "model.so")
    if desc.kind == "cuda":
        assert [(kind, fmt) for kind, fmt, _ in codes] == [("cuda", "fatbin")]
    else:
        assert codes == []


# ------------------------------------------------------------------------------------------------------- x86

def test_x86_host_build_runs_and_is_measured(built_artifact):
    _, report, _ = built_artifact
    assert report.latency.status == "measured" and report.latency.stats.runs >= 1
    assert report.accuracy.ok and report.accuracy_reason is None


def test_avx512_runs_here_only_with_avx512():
    avx512 = resolve_target("x86-64-avx512")
    has = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni"} <= set(cpu_flags())
    assert avx512.is_host == has
    assert resolve_target("x86-64-avx2").is_host == ({"avx2", "fma"} <= set(cpu_flags()))


def test_avx512_without_avx512_is_built_not_run(tmp_path, monkeypatch):
    hide_cpu_flags(monkeypatch, "avx512")
    desc = resolve_target("x86-64-avx512")
    assert not desc.is_host
    assert "avx512f" in desc.not_runnable_here() and "which this CPU lacks" in desc.not_runnable_here()
    assert resolve_target("x86-64-avx2").is_host == ({"avx2", "fma"} <= set(cpu_flags()))
    out, report = build(tmp_path, "x86-64-avx512")
    assert read_elf(out / "model.so").machine == "x86-64"
    lat = report.latency
    assert lat.status == "estimate" and lat.stats is None and "avx512f" in lat.reason
    assert report.accuracy is None and "avx512f" in report.accuracy_reason
    assert "latency | estimate" in (out / "report.md").read_text()


def test_aarch64_targets_never_run_on_x86():
    if target_mod.host_arch() != "x86_64":
        pytest.skip("checks an x86-64 machine")
    for name in ("arm-cortex-a76", "arm-neoverse-v1", "arm-cortex-a78", "jetson-orin"):
        assert not resolve_target(name).is_host


# ------------------------------------------------------------------------------------------------------ CUDA

@needs_nvcc
@needs_cuobjdump
@pytest.mark.parametrize("name, sm", [("nvidia-h100", "sm_90"), pytest.param("jetson-orin", "sm_87", marks=needs_cross)])
def test_cuda_library_holds_sass_and_ptx_for_its_sm(tmp_path, name, sm):
    out, report = build(tmp_path, name)
    lib = out / "model.so"
    # Compiled device code only: no CUDA C source for the device to compile at load (TVM's default keeps it).
    assert b"__global__" not in lib.read_bytes() and b"extern \"C\"" not in lib.read_bytes()
    tool = cuobjdump()
    elf_list = subprocess.run([tool, "--list-elf", str(lib)], capture_output=True, text=True, check=True).stdout
    ptx_list = subprocess.run([tool, "--list-ptx", str(lib)], capture_output=True, text=True, check=True).stdout
    assert f".{sm}.cubin" in elf_list and elf_list.count(".cubin") == 1, elf_list
    assert f".{sm}.ptx" in ptx_list, ptx_list
    # The copy that runs is the one in TVM's blob: the same fatbin, holding the model's kernels.
    [(_, fmt, fatbin)] = device_code(lib)
    elf = read_elf(lib)
    assert fmt == "fatbin" and elf.section_bytes(elf.section(".nv_fatbin")) == fatbin
    (tmp_path / "kernels.fatbin").write_bytes(fatbin)
    usage = subprocess.run([tool, "--dump-resource-usage", str(tmp_path / "kernels.fatbin")], capture_output=True, text=True, check=True).stdout
    assert f"arch = {sm}" in usage
    for kernel in ("fused_conv2d_add_relu_kernel", "matmul_kernel", "mean_kernel"):
        assert f"Function {kernel}:" in usage, usage
    # Nothing ran here, and the report says so.
    assert report.latency.status == "estimate" and "CUDA GPU" in report.latency.reason
    assert report.accuracy is None and "this machine runs no CUDA code" in report.accuracy_reason


@needs_nvcc
def test_nvcc_supported_flags_match_the_local_nvcc():
    archs = nvcc_archs()
    if "75" not in archs or "72" in archs:
        pytest.skip("the flags describe nvcc 13 (compute_75 and up)")
    for desc in builtin_targets().values():
        if desc.cuda is not None:
            assert desc.cuda.nvcc_supported == (desc.cuda.arch[3:] in archs), desc.name


@needs_nvcc
def test_xavier_fails_clearly_with_nvcc_13(tmp_path, conv_onnx):
    if "72" in nvcc_archs():
        pytest.skip("this nvcc still compiles for sm_72")
    result = CliRunner().invoke(cli.app, ["compile", str(conv_onnx), "--target", "jetson-xavier", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: nvcc 13") and "cannot compile for sm_72" in lines[0]
    assert lines[1].startswith("Hint: ") and "CUDA 12" in lines[1]
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------------- aarch64

@needs_cross
def test_aarch64_library_header_and_exports(tmp_path, host_entry_points):
    out, _ = build(tmp_path, "arm")
    lib = out / "model.so"
    head = lib.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[4] == 2 and int.from_bytes(head[18:20], "little") == 183  # ELF64, EM_AARCH64
    readelf = shutil.which("readelf")
    if readelf:
        assert "AArch64" in subprocess.run([readelf, "-h", str(lib)], capture_output=True, text=True, check=True).stdout
        syms = subprocess.run([readelf, "--dyn-syms", "-W", str(lib)], capture_output=True, text=True, check=True).stdout
        defined = {line.split()[-1] for line in syms.splitlines() if " UND " not in line and line.strip()[:1].isdigit()}
        assert host_entry_points <= defined
    manifest = (out / "manifest.json").read_text()
    assert '"mtriple": "aarch64-linux-gnu"' in manifest and '"mcpu": "cortex-a76"' in manifest
    if target_mod.host_arch() != "aarch64":  # the runtime refuses it here with one line, before dlopen
        with pytest.raises(ArtifactError, match="built for aarch64"):
            autoglm_compile.load(out)


# ------------------------------------------------------------------------------------ what cannot be built here

@pytest.mark.parametrize("name", ["ascend-910b", "ascend-310p", "cambricon-mlu370", "ascend"])
def test_npu_targets_need_no_toolchain(name):
    # The vendor-onnx backend writes ONNX for the vendor's runtime (tests/test_npu.py checks its artifacts).
    check_toolchain(resolve_target(name))


def test_missing_cross_linker_is_a_clear_error(tmp_path):
    f = tmp_path / "riscv.yaml"
    f.write_text("# test\nname: rv\ndescription: t\nkind: cpu\nbackend: tvm\ncpu: {triple: riscv64-linux-gnu}\n")
    desc = resolve_target(str(f))
    if shutil.which("riscv64-linux-gnu-gcc"):
        pytest.skip("a riscv64 cross linker is installed")
    with pytest.raises(ToolchainError) as e:
        check_toolchain(desc)
    assert "needs the linker riscv64-linux-gnu-gcc" in str(e.value) and "install" in e.value.hint


def test_missing_aarch64_linker_names_the_debian_package(monkeypatch):
    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "aarch64-linux-gnu-gcc" else real(name))
    with pytest.raises(ToolchainError) as e:
        check_toolchain(resolve_target("arm-cortex-a76"))
    assert "aarch64-linux-gnu-gcc" in str(e.value) and "gcc-aarch64-linux-gnu" in e.value.hint


def test_library_blob_reads_back_byte_for_byte(built_artifact):
    import struct

    from autoglm_compile.libfile import BLOB_SYMBOL, library_blob

    lib = built_artifact[0] / "model.so"
    elf = read_elf(lib)
    addr = elf.dynamic_symbols()[BLOB_SYMBOL]
    (nbytes,) = struct.unpack("<Q", elf.read_at(addr, 8))
    blob = library_blob(lib)
    assert blob.to_bytes() == elf.read_at(addr, nbytes + 8)
    assert [m.kind for m in blob.modules] == ["relax.VMExecutable", "_lib"]
