"""Target descriptors: the typed schema for targets/*.yaml, resolution by name, alias or path, and host detection."""
from __future__ import annotations

import os
import platform
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InputError

Precision = Literal["fp32", "fp16", "bf16", "int8"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CpuSpec(_Strict):
    """The CPU that runs the code (for CUDA and NPU targets: the host CPU of the device, for cross builds)."""

    triple: str = Field(description="LLVM target triple, e.g. x86_64-linux-gnu or aarch64-linux-gnu")
    mcpu: str | None = Field(None, description="LLVM CPU name, e.g. znver3, cortex-a78")
    features: list[str] = Field(default_factory=list, description="LLVM -mattr features, e.g. +avx2, +dotprod")
    cores: int | None = Field(None, ge=1, description="cores used by the runtime")

    @property
    def arch(self) -> str:
        """The triple's architecture, e.g. x86_64 or aarch64."""
        return self.triple.split("-")[0]


class CudaSpec(_Strict):
    arch: str = Field(pattern=r"^sm_\d+[a-z]?$", description="CUDA SM architecture, e.g. sm_90")
    nvcc_supported: bool = Field(True, description="false where the local nvcc cannot target this arch")
    sm_count: int | None = Field(None, ge=1, description="streaming multiprocessors: float16 GEMMs that launch fewer thread blocks than this are split along K (gpu_schedules.split_k); None: no split")


class NpuSpec(_Strict):
    vendor: Literal["huawei-ascend", "cambricon"]
    execution_provider: str = Field(description="the ONNX Runtime execution provider (…ExecutionProvider), or the vendor runtime that takes the ONNX where ONNX Runtime has none (MagicMind)")
    opset: int = Field(ge=7, description="the ONNX opset the vendor ONNX is converted to")
    soc_version: str | None = None
    prefer_fp16: bool = Field(False, description="convert to float16 (convert-float16, float32 inputs and outputs) unless --precision says otherwise")
    op_list: str | None = Field(None, description="YAML list of the ONNX ops the vendor runtime supports, relative to targets/ (or to this file)")
    provider_options: dict[str, str | int | float | bool] = Field(default_factory=dict, description="the runtime's options, written to the artifact's runner.json")


class TargetDescriptor(_Strict):
    name: str
    description: str
    kind: Literal["cpu", "cuda", "npu-onnx"]
    backend: Literal["tvm", "vendor-onnx"]
    aliases: list[str] = Field(default_factory=list)
    detect_host: bool = Field(False, description="fill the CPU fields from this machine at run time")
    cpu: CpuSpec | None = None
    cuda: CudaSpec | None = None
    npu: NpuSpec | None = None
    peak_flops: dict[Precision, float] = Field(default_factory=dict, description="peak FLOP/s per dtype")
    memory_bandwidth_gbps: float | None = Field(None, gt=0)
    memory_capacity_gb: float | None = Field(None, gt=0)
    precisions: list[Precision] = Field(default_factory=lambda: ["fp32"])
    source: str | None = Field(None, description="the YAML file this was read from")

    @model_validator(mode="after")
    def _kind_fields(self) -> "TargetDescriptor":
        if self.kind == "cuda" and self.cuda is None:
            raise ValueError("a cuda target needs a 'cuda' section (arch)")
        if self.kind == "npu-onnx" and (self.npu is None or self.backend != "vendor-onnx"):
            raise ValueError("an npu-onnx target needs an 'npu' section and backend: vendor-onnx")
        if self.kind == "cpu" and self.cpu is None and not self.detect_host:
            raise ValueError("a cpu target needs a 'cpu' section (triple) or detect_host: true")
        return self

    @property
    def is_host(self) -> bool:
        """Whether artifacts for this target run (and are measured) on this machine."""
        return self.not_runnable_here() is None

    def not_runnable_here(self) -> str | None:
        """Why this target's artifacts cannot run on this machine, or None when they can: a CPU target runs here
        only if its triple's arch is this machine's and this CPU has every ISA extension its code may use."""
        if self.kind == "cuda":
            assert self.cuda is not None  # guaranteed by the validator
            return f"target '{self.name}' is a CUDA GPU ({self.cuda.arch}) and this machine runs no CUDA code"
        if self.kind != "cpu":
            return f"target '{self.name}' is a {self.kind} device, not this machine"
        if self.detect_host:
            return None
        assert self.cpu is not None  # guaranteed by the validator
        if self.cpu.arch != host_arch():
            return f"target '{self.name}' is {self.cpu.arch} code and this machine is {host_arch()}"
        missing = missing_cpu_features(self.tvm_target())
        if missing:
            return f"target '{self.name}' uses {', '.join(missing)}, which this CPU lacks"
        return None

    def tvm_target(self) -> dict:
        """The TVM 0.27 target as a JSON dict (TVM no longer takes CLI strings)."""
        cpu = self.cpu
        llvm: dict = {"kind": "llvm"}
        if cpu is not None:
            llvm["mtriple"] = cpu.triple
            if cpu.mcpu:
                llvm["mcpu"] = cpu.mcpu
            if cpu.features:
                llvm["mattr"] = list(cpu.features)
            if cpu.cores:
                llvm["num-cores"] = cpu.cores
        if self.kind == "cuda":
            assert self.cuda is not None  # guaranteed by the validator
            return {"kind": "cuda", "arch": self.cuda.arch, **CUDA_LIMITS, "host": llvm}
        return llvm


# Per-block limits that are the same on every architecture we target (sm_72 to sm_90; the "Technical Specifications per
# Compute Capability" table of the CUDA C++ Programming Guide): 1024 threads, 48 KB of static shared memory, 64 K 32-bit
# registers, warps of 32. TVM's target kind leaves them out unless a tag names the GPU; MetaSchedule's GPU rules need them.
CUDA_LIMITS = {"max_threads_per_block": 1024, "max_shared_memory_per_block": 49152, "registers_per_block": 65536, "thread_warp_size": 32}


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


@lru_cache(maxsize=1)
def detect_host_cpu() -> CpuSpec:
    """This machine's CPU as LLVM sees it. The CPU name comes from LLVM's host detection, which reads CPUID, so
    a VM that masks features (AVX-512, say) gets code it can run."""
    from tvm.target import codegen  # the compiler is needed to detect; the runtime never calls this

    triple = f"{host_arch()}-linux-gnu" if platform.system() == "Linux" else codegen.llvm_get_system_triple()
    return CpuSpec(triple=triple, mcpu=codegen.llvm_get_system_cpu(), features=[], cores=physical_cores())


def physical_cores() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return n
    except ImportError:  # pragma: no cover - psutil is a dependency
        pass
    return os.cpu_count() or 1


# LLVM feature name -> the flag Linux reports in /proc/cpuinfo, for the ISA extensions that decide whether code
# runs here. LLVM features not listed (tuning hints such as fast-gather) never make code unrunnable.
_CPUINFO_FLAG = {
    # x86-64
    "sse4.1": "sse4_1", "sse4.2": "sse4_2", "ssse3": "ssse3", "avx": "avx", "avx2": "avx2", "fma": "fma",
    "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2", "avx512f": "avx512f", "avx512bw": "avx512bw",
    "avx512cd": "avx512cd", "avx512dq": "avx512dq", "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni",
    "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16", "avxvnni": "avx_vnni", "amx-tile": "amx_tile",
    "amx-int8": "amx_int8", "amx-bf16": "amx_bf16",
    # aarch64
    "neon": "asimd", "fullfp16": "asimdhp", "dotprod": "asimddp", "sve": "sve", "sve2": "sve2", "i8mm": "i8mm",
    "bf16": "bf16",
}


def missing_cpu_features(llvm_target: dict) -> list[str]:
    """The ISA extensions that code for `llvm_target` (its mcpu and mattr) may use and this CPU lacks."""
    import tvm
    from tvm.target import codegen

    wanted = codegen.llvm_get_cpu_features(tvm.target.Target(llvm_target))
    flags = set(cpu_flags())
    if not flags:  # no /proc/cpuinfo: ask LLVM what this CPU has
        host = detect_host_cpu()
        have = codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mtriple": host.triple, "mcpu": host.mcpu}))
        return sorted(f for f in wanted if f in _CPUINFO_FLAG and f not in have)
    return sorted(f for f in wanted if f in _CPUINFO_FLAG and _CPUINFO_FLAG[f] not in flags)


def cpu_flags() -> list[str]:
    """The CPU feature flags the kernel reports (Linux), for `doctor` and the report."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def _builtin_dir():
    return resources.files("autoglm_compile.targets")


def _load_file(path: Path | str, text: str) -> TargetDescriptor:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})", "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a target descriptor must be a YAML mapping", "see targets/host.yaml")
    try:
        desc = TargetDescriptor.model_validate({**data, "source": str(path)})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top)"
        raise InputError(f"{path}: invalid target field '{where}': {err['msg']}", "see targets/host.yaml") from None
    if desc.detect_host:
        desc = desc.model_copy(update={"cpu": detect_host_cpu()})
    return desc


def builtin_targets() -> dict[str, TargetDescriptor]:
    """Every descriptor shipped in targets/, by name."""
    out = {}
    for entry in sorted(_builtin_dir().iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            desc = _load_file(f"targets/{entry.name}", entry.read_text())
            out[desc.name] = desc
    return out


def resolve_target(name_or_path: str) -> TargetDescriptor:
    """A target by name, alias, or path to a YAML descriptor."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not p.is_file():
            raise InputError(f"target file not found: {name_or_path}", "give a target name (see 'autoglm-compile targets') or a path to a YAML file")
        return _load_file(p, p.read_text())
    targets = builtin_targets()
    if name_or_path in targets:
        return targets[name_or_path]
    for desc in targets.values():
        if name_or_path in desc.aliases:
            return desc
    names = sorted(list(targets) + [a for d in targets.values() for a in d.aliases])
    raise InputError(f"unknown target '{name_or_path}'", f"valid targets: {', '.join(names)}")
