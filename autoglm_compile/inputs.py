"""Model inputs: parsing --input-shape, resolving every input to a static shape and dtype, and seeded inputs.

Rule for seeded random inputs (stated in the report):
  floats: standard normal; an input named like a mask: ones, with the last quarter of its last axis zero (padding,
  when that axis has at least 4 elements: an all-ones mask leaves masking untested); booleans: all true;
  integers: uniform in [0, N) where N is the smallest table the input indexes through Gather, else [0, 100).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .errors import InputError

RANDOM_INPUT_RULE = (
    "seeded: floats ~ N(0,1); names containing 'mask' = 1 with the last quarter of the last axis 0 (padding); bool = true; "
    "integers uniform in [0, N) with N the "
    "smallest Gather table they index, else [0, 100)"
)
_DTYPES = {"float32", "float16", "float64", "bfloat16", "int8", "uint8", "int16", "int32", "int64", "bool"}
_SHAPE_RE = re.compile(r"^(?P<name>[^=]+)=(?P<dims>[0-9]+(?:x[0-9]+)*|scalar)(?::(?P<dtype>[a-z0-9]+))?$")


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...], str | None]:
    """'name=1x3x224x224[:float32]' (or 'name=scalar') -> (name, shape, dtype or None)."""
    m = _SHAPE_RE.match(text.strip())
    if not m:
        raise InputError(f"bad --input-shape '{text}'", "write NAME=1x3x224x224 or NAME=1x128:int64")
    dtype = m["dtype"]
    if dtype is not None and dtype not in _DTYPES:
        raise InputError(f"bad dtype '{dtype}' in --input-shape '{text}'", f"valid dtypes: {', '.join(sorted(_DTYPES))}")
    dims = () if m["dims"] == "scalar" else tuple(int(d) for d in m["dims"].split("x"))
    if any(d <= 0 for d in dims):
        raise InputError(f"bad --input-shape '{text}': dims must be positive", "write NAME=1x3x224x224")
    return m["name"], dims, dtype


def parse_dim(text: str) -> tuple[str, int]:
    """'batch=1' -> ('batch', 1): a value for a symbolic dim, by name."""
    name, _, value = text.partition("=")
    if not name or not value.isdigit() or int(value) <= 0:
        raise InputError(f"bad --dim '{text}'", "write DIM_NAME=VALUE, e.g. --dim batch=1")
    return name, int(value)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _dtype_name(elem_type: int) -> str:
    return helper.tensor_dtype_to_np_dtype(elem_type).name if elem_type != onnx.TensorProto.BFLOAT16 else "bfloat16"


def resolve_inputs(model: onnx.ModelProto, shapes: list[str] = (), dims: list[str] = ()) -> list[InputSpec]:
    """Every graph input with a static shape: from --input-shape, else --dim by name, else the model's own dims."""
    user = {}
    for text in shapes:
        name, shape, dtype = parse_input_shape(text)
        user[name] = (shape, dtype)
    named_dims = dict(parse_dim(d) for d in dims)
    inputs = graph_inputs(model)
    names = [i.name for i in inputs]
    for name in user:
        if name not in names:
            raise InputError(f"--input-shape names '{name}', which is not a model input", f"model inputs: {', '.join(names)}")
    specs, unresolved = [], []
    for vi in inputs:
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise InputError(f"input '{vi.name}' is not a tensor", "only tensor inputs are supported")
        model_dtype = _dtype_name(tt.elem_type)
        if vi.name in user:
            shape, dtype = user[vi.name]
            rank = len(tt.shape.dim) if tt.HasField("shape") else None
            if rank is not None and rank != len(shape):
                raise InputError(f"--input-shape gives '{vi.name}' rank {len(shape)}, the model has rank {rank}", "give one dim per axis")
            if dtype is not None and dtype != model_dtype:
                raise InputError(f"--input-shape gives '{vi.name}' dtype {dtype}, the model declares {model_dtype}", f"use :{model_dtype} or leave the dtype out")
            specs.append(InputSpec(vi.name, shape, model_dtype))
            continue
        shape, missing = [], []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            elif d.HasField("dim_param") and d.dim_param in named_dims:
                shape.append(named_dims[d.dim_param])
            else:
                missing.append(d.dim_param or f"axis {i}")
        if missing:
            unresolved.append(f"{vi.name} ({', '.join(missing)})")
        specs.append(InputSpec(vi.name, tuple(shape), model_dtype))
    if unresolved:
        example = " ".join(f"--input-shape {s.name}=..." for s in specs[:2])
        raise InputError(f"dynamic dims with no value: {'; '.join(unresolved)}", f"pin them: {example}, or --dim NAME=VALUE")
    return specs


_PASSTHROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}


def index_ranges(model: onnx.ModelProto) -> dict[str, int]:
    """For each integer graph input that indexes a constant table through Gather: the table's size on that axis."""
    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    out = {}
    for vi in graph_inputs(model):
        frontier, seen, limits = [vi.name], set(), []
        while frontier:
            t = frontier.pop()
            if t in seen:
                continue
            seen.add(t)
            for node in consumers.get(t, []):
                if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == t and node.input[0] in inits:
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    limits.append(list(inits[node.input[0]].dims)[axis])
                elif node.op_type in _PASSTHROUGH and node.input[0] == t:
                    frontier.extend(node.output)
        if limits:
            out[vi.name] = min(limits)
    return out


def random_inputs(specs: list[InputSpec], seed: int = 0, ranges: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ranges = ranges or {}
    out = {}
    for s in specs:
        dt = np.dtype(s.dtype) if s.dtype != "bfloat16" else np.dtype("float32")
        if "mask" in s.name.lower():
            mask = np.ones(s.shape, dtype=dt)
            if len(s.shape) and s.shape[-1] >= 4:
                mask[..., s.shape[-1] - s.shape[-1] // 4:] = 0  # padding: masking is exercised too
            out[s.name] = mask
        elif dt.kind == "f":
            out[s.name] = rng.standard_normal(s.shape).astype(dt)
        elif dt.kind == "b":
            out[s.name] = np.ones(s.shape, dtype=dt)
        else:
            high = ranges.get(s.name, 100)
            if dt.kind == "u" or dt.itemsize == 1:
                high = min(high, np.iinfo(dt).max + 1)
            out[s.name] = rng.integers(0, high, size=s.shape).astype(dt)
    return out
