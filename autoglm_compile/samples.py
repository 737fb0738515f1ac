"""User-given inputs: sample inputs (--sample-inputs FILE.npz or a folder of .npz files) and frozen scalar inputs
(--input-value NAME=V).

Sample inputs replace the seeded random inputs: the first file is the latency input and the stored verification
input of the artifact; every file is checked against ONNX Runtime. A missing input, a wrong dtype or a wrong
shape is an InputError (exit 2) that names the input. A dynamic dim that --input-shape / --dim leave open takes
its value from the first sample.

A frozen input becomes an initializer before the graph passes run, so control flow on it (an `If` on a sample
rate, say) folds like any constant.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import InputError
from .inputs import InputSpec, graph_inputs

_HINT = "save the arrays by input name: numpy.savez('x.npz', NAME=array, ...)"


def load_samples(path: str | Path, option: str = "--sample-inputs", hint: str = _HINT) -> list[tuple[str, dict[str, np.ndarray]]]:
    """(file name, arrays by name) for FILE.npz, or for every .npz in a folder (sorted by name). `option` and `hint`
    word the errors (--calib-data reads the same format)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix == ".npz" and f.is_file())
        if not files:
            raise InputError(f"{option} {p}: the folder holds no .npz files", hint)
    elif p.is_file():
        files = [p]
    else:
        raise InputError(f"{option} {p}: no such file or folder", hint)
    out = []
    for f in files:
        try:
            with np.load(f, allow_pickle=False) as z:
                if not hasattr(z, "files"):
                    raise ValueError("not an .npz archive")
                out.append((f.name, {k: np.asarray(z[k]) for k in z.files}))
        except (ValueError, OSError) as e:
            raise InputError(f"{option}: cannot read {f}: {e}", hint) from None
    return out


def sample_shapes(model: onnx.ModelProto, sample: dict[str, np.ndarray], given: set[str]) -> list[str]:
    """--input-shape texts for the inputs with a dynamic dim that the user did not pin, taken from the sample. Only
    a sample that fits the model's rank and static dims is used; a misfit is reported by check_samples."""
    out = []
    for vi in graph_inputs(model):
        if vi.name in given or vi.name not in sample or not vi.type.HasField("tensor_type"):
            continue
        dims = list(vi.type.tensor_type.shape.dim)
        if all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
            continue
        shape = sample[vi.name].shape
        if len(shape) != len(dims) or not shape or any(s <= 0 for s in shape):
            continue
        if any(d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != s for d, s in zip(dims, shape)):
            continue
        out.append(f"{vi.name}={'x'.join(str(s) for s in shape)}")
    return out


def check_samples(samples: list[tuple[str, dict[str, np.ndarray]]], specs: list[InputSpec]) -> None:
    """Every sample has every input with the resolved dtype and shape, and nothing else."""
    names = [s.name for s in specs]
    for file, arrays in samples:
        missing = [n for n in names if n not in arrays]
        if missing:
            raise InputError(f"sample inputs {file}: missing input '{missing[0]}'" + (f" (and {', '.join(repr(m) for m in missing[1:])})" if len(missing) > 1 else ""), f"the model takes: {', '.join(names)}")
        extra = [n for n in arrays if n not in names]
        if extra:
            raise InputError(f"sample inputs {file}: '{extra[0]}' is not a model input", f"the model takes: {', '.join(names)} (a frozen --input-value is no longer an input)")
        for s in specs:
            a = arrays[s.name]
            if a.dtype.name != s.dtype:
                raise InputError(f"sample inputs {file}: input '{s.name}' is {a.dtype.name}, the model takes {s.dtype}", f"cast it: array.astype('{s.dtype}')")
            if tuple(a.shape) != tuple(s.shape):
                raise InputError(f"sample inputs {file}: input '{s.name}' has shape {list(a.shape)}, the model takes {list(s.shape)}", "give arrays of the model's shape, or pin the dims with --input-shape / --dim")


def describe(path: str | Path, count: int) -> str:
    """The report's statement of where the inputs came from."""
    return f"sample inputs from {path} ({count} file{'s' if count != 1 else ''}; the first is timed and stored for 'run --check', all are checked)"


# ---------------------------------------------------------------------------------------------- --input-value

def parse_input_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value.strip():
        raise InputError(f"bad --input-value '{text}'", "write NAME=VALUE, e.g. --input-value sample_rate=16000")
    return name.strip(), value.strip()


def freeze_inputs(model: onnx.ModelProto, values: list[str]) -> onnx.ModelProto:
    """A copy of the model in which each named scalar input is an initializer holding the given value."""
    if not values:
        return model
    parsed = dict(parse_input_value(v) for v in values)
    inputs = {vi.name: vi for vi in graph_inputs(model)}
    for name in parsed:
        if name not in inputs:
            raise InputError(f"--input-value names '{name}', which is not a model input", f"model inputs: {', '.join(inputs) or '(none)'}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for name, text in parsed.items():
        vi = inputs[name]
        if not vi.type.HasField("tensor_type"):
            raise InputError(f"--input-value: input '{name}' is not a tensor", "only tensor inputs can be frozen")
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim] if tt.HasField("shape") else []
        if any(d != 1 for d in dims):
            raise InputError(f"--input-value: input '{name}' has shape {dims}, not a scalar", "only scalar (or one-element) inputs can be frozen")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        try:
            if dtype.kind == "b":
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                value = np.array(text.lower() in ("true", "1"), dtype=dtype)
            elif dtype.kind in "iu":
                value = np.array(int(text), dtype=dtype)
            else:
                value = np.array(float(text), dtype=dtype)
        except (ValueError, OverflowError):
            raise InputError(f"--input-value {name}={text}: not a {dtype.name} value", f"input '{name}' is {dtype.name}") from None
        out.graph.initializer.append(numpy_helper.from_array(value.reshape(dims), name))
        kept = [i for i in out.graph.input if i.name != name]
        del out.graph.input[:]
        out.graph.input.extend(kept)
    return out
