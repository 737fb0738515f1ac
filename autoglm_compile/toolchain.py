"""Toolchains for builds on this machine for other machines: the linker for the target's CPU, nvcc for CUDA
device code, and the export of the library with both.

- A CPU of another architecture links with `<triple>-gcc` (Debian's gcc-aarch64-linux-gnu for aarch64-linux-gnu);
  TVM's LLVM writes the objects for the descriptor's triple, CPU and features.
- CUDA: TVM's codegen writes CUDA C++, which TVM would otherwise keep as source in the library and compile on the
  device at load time. Here the local nvcc compiles it into a fatbin that holds SASS for the target's SM and PTX
  for it (so a newer GPU can still JIT it), and the library carries that fatbin: the device loads the code as it
  is, and what was built here is what runs there. A copy goes in an `.nv_fatbin` section as well, where CUDA's
  tools (cuobjdump, Nsight) look for device code; the runtime loads the copy inside TVM's blob.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

from .errors import ToolchainError, UnsupportedError
from .libfile import BLOB_SYMBOL, pack_str, parse_imports_blob, split_cuda_payload
from .target import TargetDescriptor, host_arch

CROSS_PACKAGES = {"aarch64": "gcc-aarch64-linux-gnu"}  # Debian packages of the cross linkers


def linker(desc: TargetDescriptor) -> str | None:
    """The C compiler that links the library: None for this machine's own (TVM's default), else `<triple>-gcc`."""
    if desc.cpu is None or desc.cpu.arch == host_arch():
        return None
    return f"{desc.cpu.triple}-gcc"


@lru_cache(maxsize=1)
def nvcc_archs() -> frozenset[str]:
    """The SM numbers the local nvcc compiles for, e.g. {"75", "80", ...} (empty without nvcc)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return frozenset()
    out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=False).stdout
    return frozenset(re.findall(r"compute_(\d+)", out))


def nvcc_version() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "none"
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else "unknown"


def sm_number(arch: str) -> str:
    """"87" for "sm_87" (and for "sm_90a")."""
    return re.match(r"sm_(\d+)", arch).group(1)


def check_toolchain(desc: TargetDescriptor) -> None:
    """Fail before any work if this machine cannot build for `desc`."""
    if desc.backend == "vendor-onnx":
        return  # ONNX for the vendor's runtime (autoglm_compile/vendor.py): onnx and ONNX Runtime are all it needs here
    if desc.backend != "tvm":
        raise UnsupportedError(f"target '{desc.name}' uses the {desc.backend} backend, which is not supported", "see 'autoglm-compile targets'")
    cc = linker(desc)
    if cc is not None and shutil.which(cc) is None:
        package = CROSS_PACKAGES.get(desc.cpu.arch, f"a cross compiler for {desc.cpu.triple}")
        raise ToolchainError(
            f"target '{desc.name}' needs the linker {cc} for {desc.cpu.triple}, and it is not installed",
            f"install Debian's {package} (apt-get install {package}; 'make install' does it as root)",
        )
    if desc.kind == "cuda":
        assert desc.cuda is not None  # guaranteed by the validator
        if shutil.which("nvcc") is None:
            raise ToolchainError(f"target '{desc.name}' needs nvcc to compile CUDA code, and it is not on the PATH", "install the CUDA toolkit, or put its bin folder on the PATH")
        arch = desc.cuda.arch
        if sm_number(arch) not in nvcc_archs():
            raise ToolchainError(
                f"nvcc {nvcc_version()} cannot compile for {arch} (target '{desc.name}'; it lists sm_{', sm_'.join(sorted(nvcc_archs(), key=int))})",
                f"build with an nvcc that still supports {arch} on the PATH (CUDA 12.x for sm_72), or pick a target of a newer GPU",
            )


# ---------------------------------------------------------------------------------------------------- export

def export_library(executable, path: str, desc: TargetDescriptor, tvm_target) -> None:
    """Write the built executable as a shared library for the target's CPU, with CUDA code compiled for its SM."""
    kwargs = {}
    cc = linker(desc)
    if cc is not None:
        kwargs["fcompile"] = _cross_linker(cc)
    if desc.kind == "cuda":
        kwargs["fpack_imports"] = lambda mod, system_lib, prefix, workdir: _pack_with_fatbin(mod, system_lib, prefix, workdir, desc, tvm_target)
    executable.export_library(path, **kwargs)


def _cross_linker(cc: str):
    from tvm.support import cc as tvm_cc

    def fcompile(output, objects, options=None):
        tvm_cc.create_shared(output, objects, options=list(options or []), cc=cc)

    fcompile.output_format = "so"
    return fcompile


def compile_fatbin(source: str, arch: str, tvm_target) -> bytes:
    """CUDA C++ -> fatbin with SASS for `arch` and its PTX, through TVM's nvcc driver (TVM's own flags)."""
    from tvm.support.nvcc import compile_cuda

    n = sm_number(arch)
    with tvm_target:  # TVM's driver reads the arch's compute version from the current target
        try:
            return bytes(compile_cuda(source, target_format="fatbin", arch=["-gencode", f"arch=compute_{n},code=[sm_{n},compute_{n}]"], compiler="nvcc"))
        except RuntimeError as e:
            tail = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            raise ToolchainError(f"nvcc failed to compile the CUDA kernels for {arch}: {tail[:300]}", "report the bug with the model") from None


def _pack_with_fatbin(mod, system_lib: bool, prefix: str, workdir: str, desc: TargetDescriptor, tvm_target) -> str:
    """TVM's fpack_imports hook: the imports blob with every CUDA module's source replaced by its fatbin, as an
    assembly file that the (cross) linker assembles."""
    import tvm

    if system_lib or prefix:
        raise ValueError("system-lib builds are not supported for CUDA targets")
    sources = [m.inspect_source("") for m in mod._collect_from_import_tree(lambda m: m.kind == "cuda")]
    blob = parse_imports_blob(bytes(tvm.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes()))
    fatbins = []
    for m in blob.modules:
        if m.kind != "cuda":
            continue
        code = next((s.encode() for s in sources if m.payload.endswith(pack_str(s.encode()))), None)
        if code is None:
            raise ValueError("a CUDA module in the library does not hold the source TVM generated")
        fmt, table, _ = split_cuda_payload(m.payload, len(code))
        if fmt != "cuda":
            continue  # already compiled (a future TVM may do it)
        fatbin = compile_fatbin(code.decode(), desc.cuda.arch, tvm_target)
        m.payload = pack_str(b"fatbin") + table + pack_str(fatbin)
        fatbins.append(fatbin)
    work = Path(workdir)
    (work / "devc.bin").write_bytes(blob.to_bytes())
    lines = [
        f'\t.section .rodata.{BLOB_SYMBOL},"a",@progbits',
        f"\t.globl {BLOB_SYMBOL}",
        f"\t.type {BLOB_SYMBOL}, @object",
        "\t.p2align 4",
        f"{BLOB_SYMBOL}:",
        f'\t.incbin "{work / "devc.bin"}"',
        f"\t.size {BLOB_SYMBOL}, . - {BLOB_SYMBOL}",
    ]
    for i, fatbin in enumerate(fatbins):
        (work / f"kernels{i}.fatbin").write_bytes(fatbin)
        lines += ['\t.section .nv_fatbin,"a",@progbits', "\t.p2align 3", f'\t.incbin "{work / f"kernels{i}.fatbin"}"']
    lines.append('\t.section .note.GNU-stack,"",@progbits')
    asm = work / "devc.s"
    asm.write_text("\n".join(lines) + "\n")
    return str(asm)
