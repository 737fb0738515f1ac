"""Pipeline configuration: the typed schema of configs/*.yaml, presets O0-O3, `extends:` and validation.

A config names passes by their registered name, each with its options. An unknown pass, stage key or option is
an error that lists the valid ones.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InputError

PRESETS = ("O0", "O1", "O2", "O3")
DEFAULT_PRESET = "O2"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PassSpec(_Strict):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class VerifyConfig(_Strict):
    """Checks against ONNX Runtime: the optimized graph after the graph stage, and the built artifact."""

    graph: bool = True
    each_pass: bool = False
    rtol: float = Field(1e-3, ge=0)
    atol: float = Field(1e-4, ge=0)
    seed: int = 0


class ScheduleConfig(_Strict):
    """How TIR gets its schedules. 'default' is the target's default lowering (DLight on GPUs)."""

    strategy: str = "default"


class MeasureConfig(_Strict):
    enabled: bool = True
    warmup: int = Field(1, ge=0)
    runs: int = Field(10, ge=1)
    min_runs: int = Field(3, ge=1)
    max_seconds: float = Field(30.0, gt=0, description="stop after this much measuring, once min_runs are done")
    baseline: bool = Field(True, description="also time ONNX Runtime on the same machine")


class PipelineConfig(_Strict):
    name: str = "custom"
    description: str = ""
    passes: list[PassSpec] = Field(default_factory=list)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    measure: MeasureConfig = Field(default_factory=MeasureConfig)

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
                field = model.model_fields.get(str(part))
                if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
                    break
                model = field.annotation
            valid = f"; valid keys: {', '.join(model.model_fields)}"
        raise InputError(f"{path}: invalid config key '{where}': {err['msg']}{valid}", "see configs/O2.yaml") from None
    # Pass names and options are checked against the registry, so a typo fails before any work is done.
    from .pass_manager import validate_pass_specs

    validate_pass_specs(cfg.passes, where=path)
    return cfg


def load_config(preset: str = DEFAULT_PRESET, path: str | Path | None = None) -> PipelineConfig:
    """The preset, or a user file (which may `extends: O2` and override parts of it)."""
    if path is None:
        return _validate(f"configs/{preset}.yaml", _preset_data(preset))
    p = Path(path)
    if not p.is_file():
        raise InputError(f"config file not found: {p}", "give a path to a pipeline YAML, or use -O0..-O3")
    data = _read_yaml(str(p), p.read_text())
    base = data.pop("extends", None)
    if base is not None:
        data = _merge(_preset_data(str(base)), data)
    return _validate(str(p), data)
