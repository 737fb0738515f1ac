"""Pipeline configuration: the typed schema of configs/*.yaml, presets O0-O3, `extends:` and validation.

A config names passes by their registered name, each with its options. An unknown pass, stage key or option is
an error that lists the valid ones.
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import InputError

PRESETS = ("O0", "O1", "O2", "O3")
DEFAULT_PRESET = "O2"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PassSpec(_Strict):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


# Tolerances against ONNX Runtime on the fp32 source model, by the precision the graph computes in. fp16, int8 and
# mixed builds are checked against an accuracy budget instead (autoglm_compile.precision); their rtol/atol only
# label the max abs / max rel errors that the report still gives.
TOLERANCES = {"fp32": (1e-3, 1e-4), "fp16": (1e-3, 2.5e-3), "int8": (1e-3, 1e-4), "mixed": (1e-3, 1e-4)}
PRECISIONS = ("fp32", "fp16", "int8", "mixed")
# Passes that lower the precision, and the precision they lower it to.
PRECISION_PASSES = {"convert-float16": "fp16"}


class VerifyConfig(_Strict):
    """Checks against ONNX Runtime: the optimized graph after the graph stage, and the built artifact.
    rtol/atol left out follow the precision: fp32 1e-3/1e-4, fp16 (convert-float16 in the passes) 1e-3/2.5e-3."""

    graph: bool = True
    each_pass: bool = False
    rtol: float | None = Field(None, ge=0)
    atol: float | None = Field(None, ge=0)
    seed: int = 0


class ScheduleConfig(_Strict):
    """How TIR gets its schedules. 'default' is the target's default lowering (DLight on GPUs)."""

    strategy: str = "default"
    cuda_graph: bool | None = Field(None, description="CUDA targets: run the static kernel sequences as CUDA graphs (Relax's RewriteCUDAGraph); None: on for CUDA targets; ignored elsewhere")
    split_k: bool = Field(True, description="CUDA targets, fp16: split the K of GEMMs that launch fewer than two waves of thread blocks over the target's cuda.sm_count (gpu_schedules.split_k)")
    attention_kernel: bool = Field(True, description="CUDA targets: self-attention (softmax(Q K^T * scale + bias) V over [batch, sequence, heads, head_dim]) as one kernel (gpu_attention.py) instead of five to seven; taken where a head's keys fit the kernel's shared memory")
    cpu_kernels: bool = Field(True, description="llvm targets: float32 convolutions and matmuls get hand-scheduled kernels (cpu_kernels.py: packed weights, register-blocked vector FMAs), which tuning leaves alone; untuned builds also schedule int8 (AVX512-VNNI), softmax/layer-norm, pooling, transpose and elementwise kernels; false: TVM's default loop nests")
    conv_layout: Literal["NCHW", "NHWC"] = Field("NHWC", description="CUDA targets: the layout of float16 convolutions (gpu_schedules.nhwc_convs): NHWC reads whole runs of channels, which the tensor-core schedule copies with cp.async; NCHW: the ONNX layout")
    winograd: Literal["auto", 0, 2, 4] = Field("auto", description="llvm targets with cpu_kernels: 3x3 stride-1 float32 convolutions as Winograd F(m x m, 3 x 3): m = 2 (2.25x fewer multiplies, the weight 1.8x larger), 4 (4x fewer, 4x larger, more rounding error), auto (4 where the output has at least 32 tiles of 4x4, else 2: cpu_kernels.winograd_tile); 0: direct convolutions")


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(h|m|s)?")


def parse_duration(value: str | float | int) -> float:
    """Seconds from a number or a duration such as '90', '90s', '10m', '1.5h' or '1h30m'. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        parts = list(_DURATION_PART.finditer(text))
        if not text or "".join(p.group(0) for p in parts) != text or (len(parts) > 1 and any(p.group(2) is None for p in parts)):
            raise ValueError(f"not a duration: {value!r} (give seconds, or e.g. 90s, 10m, 1h30m)")
        units = [p.group(2) or "s" for p in parts]
        if len(set(units)) != len(units):
            raise ValueError(f"not a duration: {value!r} (a unit appears twice)")
        seconds = sum(float(p.group(1)) * {"h": 3600, "m": 60, "s": 1}[u] for p, u in zip(parts, units))
    if seconds <= 0:
        raise ValueError(f"a duration must be positive, got {value!r}")
    return seconds


class TuneConfig(_Strict):
    """MetaSchedule tuning, used when schedule.strategy is 'tune' (--tune). Results go to a target-aware tuning
    database that later builds reuse; see autoglm_compile/tuning.py."""

    trials: int | None = Field(None, ge=1, description="max trials in one run over all tasks; default: trials_per_task x tasks to tune")
    trials_per_task: int = Field(64, ge=1, description="max trials for one task")
    time_budget: float | None = Field(600.0, description="seconds of tuning, or a duration ('90s', '10m', '1h30m'); null: no limit")
    database: str | None = Field(None, description="tuning database folder; default: $XDG_CACHE_HOME/autoglm-compile/tuning (~/.cache/...)")
    strict: bool = Field(False, description="fail on a task missing from the database instead of tuning it (reproducible CI builds)")
    cost_model: Literal["xgb", "random"] = Field("xgb", description="MetaSchedule's cost model: xgb (its default) or random (no xgboost)")
    export: str | None = Field(None, description="folder: write the tasks missing from the database there, for tuning on the target machine (tune_worker there, then tune-merge here), and build with default schedules for them")
    weight_prepack: bool = Field(False, description="llvm targets: let MetaSchedule choose the layout of constant weights, transformed once at build time (TVM's cpu_weight_prepack); changes the tasks, so a database tuned without it does not apply")

    @field_validator("time_budget", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        return v if v is None else parse_duration(v)


class MeasureConfig(_Strict):
    enabled: bool = True
    warmup: int = Field(1, ge=0)
    runs: int = Field(10, ge=1)
    min_runs: int = Field(3, ge=1)
    max_seconds: float = Field(30.0, gt=0, description="stop after this much measuring, once min_runs are done")
    baseline: bool = Field(True, description="also time ONNX Runtime on the same machine")


class CalibrationConfig(_Strict):
    """INT8 calibration data (autoglm_compile/quantize.py). The ranges come from ONNX Runtime's calibrators."""

    data: str | None = Field(None, description="an .npz (arrays by input name; a leading extra dim holds several samples) or a folder of .npz files, as --sample-inputs")
    method: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="ONNX Runtime's CalibrationMethod")
    samples: int = Field(32, ge=1, description="calibration samples used at most")
    synthetic: bool = Field(False, description="random inputs (the verification rule) when there is no data; the report marks the result 'not representative'")


class PrecisionConfig(_Strict):
    """The precision the build computes in. fp16 adds convert-float16 to the passes, or (fp16: relax) leaves the graph
    in float32 for TVM's ToMixedPrecision; int8 and mixed quantize the graph at the end of the graph stage (QDQ,
    per-channel weights) and keep in float the nodes the accuracy budget needs."""

    mode: Literal["fp32", "fp16", "int8", "mixed"] | None = Field(None, description="None: what the passes compute in (convert-float16: fp16, else fp32)")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    keep_float: list[str] = Field(default_factory=list, description="node names or op types never quantized")
    budget: str | None = Field(None, description="accuracy budget, e.g. 'cosine>=0.995', 'max-rel<=0.02', 'top1-agree>=0.99'; None: the precision's default")
    per_channel: bool = Field(True, description="per-channel weights (opset 13 or later; the graph is upgraded where needed)")
    max_rounds: int = Field(256, ge=0, description="protection trials: each measures, on ONNX Runtime, the QDQ model with one set of activation tensors in float (quantize.search); 0: no protection")
    margin: float = Field(0.1, ge=0, lt=1, description="the protection search meets the budget with this share of the way to a perfect metric to spare (cosine>=0.99: 0.991), since the TVM build's int8 arithmetic rounds differently from ONNX Runtime's; 0: none")
    search_calibration: int = Field(4, ge=0, description="calibration samples the protection search checks besides the sample inputs (those that every node quantized hurts most), so that what it keeps in float holds on more than the few sample inputs")
    scan: int = Field(128, ge=0, description="activation tensors whose contribution to the output error is measured one by one, to order the protection search; with more candidates, those with the lowest quantization SQNR (the others are ordered by their SQNR)")
    fp16: Literal["graph", "relax"] | None = Field(None, description="how fp16 is made: graph (the convert-float16 pass; float16 accumulation in TVM's kernels) or relax (TVM's ToMixedPrecision: float16 operands, float32 accumulation in conv/matmul; TVM targets); None: relax on CUDA targets, graph elsewhere")

    @field_validator("budget")
    @classmethod
    def _budget(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from .precision import parse_budget

        return parse_budget(v).text  # raises ValueError with the reason


class PipelineConfig(_Strict):
    model_config = ConfigDict(extra="forbid", serialize_by_alias=True)

    name: str = "custom"
    description: str = ""
    passes: list[PassSpec] = Field(default_factory=list)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    measure: MeasureConfig = Field(default_factory=MeasureConfig)
    # The YAML key is `precision:`; the name `precision` is the property below (the precision the build computes in).
    precision_config: PrecisionConfig = Field(default_factory=PrecisionConfig, alias="precision")
    _skipped: list[str] = PrivateAttr(default_factory=list)  # preset passes adapt_to_target left out

    @property
    def skipped(self) -> list[str]:
        """Preset passes left out for the target (adapt_to_target)."""
        return self._skipped

    @property
    def precision(self) -> str:
        """int8 or mixed when precision.mode says so, else the lowest precision a pass converts the graph to (fp32
        when none does)."""
        if self.precision_config.mode in ("int8", "mixed"):
            return self.precision_config.mode
        if self.relax_fp16:
            return "fp16"
        return self._pass_precision()

    @property
    def relax_fp16(self) -> bool:
        """fp16 made by ToMixedPrecision at the Relax level (precision.fp16 relax), not by a graph pass: an fp16
        build, or the float part of a mixed one."""
        return self.precision_config.mode in ("fp16", "mixed") and self.precision_config.fp16 == "relax"

    def _pass_precision(self) -> str:
        found = [PRECISION_PASSES[p.name] for p in self.passes if p.name in PRECISION_PASSES]
        return found[-1] if found else "fp32"

    @property
    def accuracy_budget(self):
        """The accuracy budget in force (precision.Budget): the user's, else the precision's default; None for fp32,
        which is checked with rtol/atol."""
        from .precision import default_budget, parse_budget

        if self.precision_config.budget is not None:
            return parse_budget(self.precision_config.budget, source="user", precision=self.precision)
        return default_budget(self.precision)

    @model_validator(mode="after")
    def _tolerances(self) -> "PipelineConfig":
        pc, by_passes = self.precision_config, self._pass_precision()
        if pc.mode is None:
            pc.mode = by_passes
        elif pc.mode == "fp16" and pc.fp16 == "relax" and by_passes != "fp32":
            raise ValueError("precision.fp16 relax makes fp16 in TVM, but the passes convert the graph already (convert-float16): drop one")
        elif pc.mode in ("fp32", "fp16") and pc.mode != by_passes and not self.relax_fp16:
            raise ValueError(f"precision.mode is {pc.mode}, but the passes compute in {by_passes} (convert-float16 makes fp16)")
        elif pc.mode in ("int8", "mixed") and by_passes == "fp16":
            raise ValueError(f"precision.mode {pc.mode} on a float16 graph (convert-float16) is not built: drop the pass")
        if pc.budget is not None and self.precision == "fp32":
            raise ValueError("an accuracy budget applies to fp16, int8 and mixed builds; fp32 builds are checked with verify.rtol/atol (use --max-error for a budget)")
        rtol, atol = TOLERANCES[self.precision]
        if self.verify.rtol is None:
            self.verify.rtol = rtol
        if self.verify.atol is None:
            self.verify.atol = atol
        return self

    @field_validator("passes", mode="before")
    @classmethod
    def _short_forms(cls, v: Any) -> Any:
        # "- fold-constants" and "- fold-constants: {max_iterations: 4}" are short for {name, options}
        if not isinstance(v, list):
            return v
        out = []
        for item in v:
            if isinstance(item, str):
                item = {"name": item}
            elif isinstance(item, dict) and len(item) == 1 and "name" not in item:
                (name, opts), = item.items()
                item = {"name": name, "options": opts or {}}
            out.append(item)
        return out


# Passes a preset leaves out on a target kind, and why (measured: docs/benchmarks.md, GPU section).
PRESET_SKIPS = {"cuda": {"fuse-attention": "TVM lowers the fused com.microsoft Attention to slow GPU kernels (the unfused pattern gets gpu_attention's kernel)"}}
# Passes a preset gets on a target kind, before its final clean-up (eliminate-dead-code, infer-shapes), and why.
PRESET_ADDS = {"cuda": {"merge-parallel-matmuls": "one GEMM for Q, K and V: at batch 1 each projection alone launches too few thread blocks"}}


def adapt_to_target(cfg: PipelineConfig, kind: str) -> list[str]:
    """Drop from a preset's passes those PRESET_SKIPS lists for the target kind, and add those PRESET_ADDS lists
    (once, before the trailing eliminate-dead-code / infer-shapes); returns the names dropped."""
    skip = PRESET_SKIPS.get(kind, {})
    dropped = [p.name for p in cfg.passes if p.name in skip]
    cfg.passes = [p for p in cfg.passes if p.name not in skip]
    cfg._skipped = dropped
    for name in PRESET_ADDS.get(kind, {}):
        if any(p.name == name for p in cfg.passes):
            continue
        at = len(cfg.passes)
        while at > 0 and cfg.passes[at - 1].name in ("eliminate-dead-code", "infer-shapes"):
            at -= 1
        cfg.passes.insert(at, PassSpec(name=name))
    return dropped


def apply_tune_flags(cfg: PipelineConfig, trials: int | None = None, time: str | float | None = None,
                     database: str | Path | None = None, strict: bool = False, export: str | Path | None = None) -> None:
    """--tune and the --tune-* flags (each implies --tune): the 'tune' schedule strategy, with the flags given
    overriding the config's tune: section."""
    cfg.schedule.strategy = "tune"
    if trials is not None:
        if trials < 1:
            raise InputError(f"--tune-trials must be at least 1, got {trials}", "give the number of tuning trials, e.g. --tune-trials 200")
        cfg.tune.trials = trials
    if time is not None:
        try:
            cfg.tune.time_budget = parse_duration(time)
        except ValueError as e:
            raise InputError(f"--tune-time: {e}", "give seconds or a duration: --tune-time 90s, 10m, 1h30m") from None
    if database is not None:
        cfg.tune.database = str(database)
    if strict:
        cfg.tune.strict = True
    if export is not None:
        cfg.tune.export = str(export)


def _read_yaml(path: str, text: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})", "fix the YAML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: a pipeline config must be a YAML mapping", "see configs/O2.yaml")
    return data


def _preset_data(name: str) -> dict:
    if name not in PRESETS:
        raise InputError(f"unknown preset '{name}'", f"valid presets: {', '.join(PRESETS)}")
    text = resources.files("autoglm_compile.configs").joinpath(f"{name}.yaml").read_text()
    return _read_yaml(f"configs/{name}.yaml", text)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _validate(path: str, data: dict) -> PipelineConfig:
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top)"
        valid = ""
        if err["type"] == "extra_forbidden":
            model = PipelineConfig
            for part in err["loc"][:-1]:
                field = next((f for n, f in model.model_fields.items() if (f.alias or n) == str(part)), None)
                if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
                    break
                model = field.annotation
            valid = f"; valid keys: {', '.join(f.alias or n for n, f in model.model_fields.items())}"
        if err["type"] == "value_error":  # a validator's own message (precision.budget, precision.mode)
            hint = "see the precision section in README.md" if not err["loc"] or err["loc"][0] == "precision" else "see configs/O2.yaml"
            raise InputError(f"{path}: {where + ': ' if err['loc'] else ''}{err['msg'].removeprefix('Value error, ')}", hint) from None
        raise InputError(f"{path}: invalid config key '{where}': {err['msg']}{valid}", "see configs/O2.yaml") from None
    # Pass names and options are checked against the registry, so a typo fails before any work is done.
    from .pass_manager import validate_pass_specs

    validate_pass_specs(cfg.passes, where=path)
    return cfg


def _pass_names(items: list) -> list[str]:
    names = []
    for item in items or []:
        if isinstance(item, str):
            names.append(item)
        elif isinstance(item, dict):
            names.append(item.get("name") or next(iter(item), ""))
    return names


def load_config(preset: str = DEFAULT_PRESET, path: str | Path | None = None, precision: str | None = None, relax_fp16: bool = False) -> PipelineConfig:
    """The preset, or a user file (which may `extends: O2` and override parts of it). precision (--precision, else
    the config's precision.mode): fp16 appends convert-float16 to the passes unless they convert already, or, with
    precision.fp16 relax (the default when relax_fp16 is true: CUDA targets), leaves the graph in float32 for TVM's
    ToMixedPrecision; int8 and mixed set precision.mode (the graph stage then quantizes); the tolerances follow
    (TOLERANCES)."""
    if path is None:
        where, data = f"configs/{preset}.yaml", _preset_data(preset)
    else:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"config file not found: {p}", "give a path to a pipeline YAML, or use -O0..-O3")
        where, data = str(p), _read_yaml(str(p), p.read_text())
        base = data.pop("extends", None)
        if base is not None:
            data = _merge(_preset_data(str(base)), data)
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"unknown precision '{precision}'", f"valid precisions: {', '.join(PRECISIONS)}")
    section = data.get("precision") if isinstance(data.get("precision"), dict) else {}
    mode = precision or section.get("mode")
    converts = [n for n in _pass_names(data.get("passes")) if n in PRECISION_PASSES]
    method = section.get("fp16") or ("relax" if relax_fp16 and not converts else None)
    if mode == "fp16" and method == "relax":
        section = {**section, "mode": "fp16", "fp16": "relax"}
        data = {**data, "precision": section}
    elif mode == "mixed" and method == "relax":  # the nodes left in float run in float16 (ToMixedPrecision)
        section = {**section, "fp16": "relax"}
        data = {**data, "precision": section}
    elif mode == "fp16":
        wanted = {v: k for k, v in PRECISION_PASSES.items()}
        if wanted[mode] not in converts:
            data = {**data, "passes": [*(data.get("passes") or []), wanted[mode]]}
    elif mode in ("fp32", "int8", "mixed") and converts and precision is not None:
        raise InputError(f"{where} converts to a lower precision ({converts[0]}), but --precision {precision} was asked", "drop --precision, or the convert pass from the config")
    if precision is not None and "precision" in data or precision in ("int8", "mixed"):
        data = {**data, "precision": {**section, "mode": precision}}
    return _validate(where, data)
