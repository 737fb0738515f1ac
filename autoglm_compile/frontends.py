"""Frontends: read the user's model into an onnx.ModelProto.

ONNX files (external data included) are validated with the full checker. PyTorch models (a `module:factory` entry,
a .pt2 ExportedProgram, TorchScript) are exported to ONNX here. Nothing is unpickled in full unless the user says
--trust-pickle.
"""
from __future__ import annotations

import importlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import InputError

EXPORT_OPSET = 17
EXPORT_IR_VERSION = 8  # what torch.onnx writes, and what every onnxruntime reads


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    source: str  # what the user gave
    source_file: Path | None  # the file hashed into the manifest (None for a module:factory entry)
    frontend: str  # onnx | torch-factory | torch-export | torchscript | torch-pickle


def is_torch_entry(source: str) -> bool:
    return ":" in source and not Path(source).exists() and not source.endswith(".onnx")


def load(source: str, input_shapes: list[str] = (), trust_pickle: bool = False, weights: str | None = None) -> LoadedModel:
    if is_torch_entry(source):
        return load_torch_factory(source, input_shapes, weights)
    path = Path(source)
    if not path.exists():
        raise InputError(f"model file not found: {source}", "check the path, or give a PyTorch entry as package.module:factory")
    if not path.is_file():
        raise InputError(f"not a file: {source}", "give an .onnx file, a .pt2, a TorchScript file or package.module:factory")
    if not os.access(path, os.R_OK):
        raise InputError(f"cannot read {source}: permission denied", "check the file's permissions")
    if path.suffix in (".pt2", ".pt", ".pth", ".ts", ".torchscript"):
        return load_torch_file(path, input_shapes, trust_pickle)
    return LoadedModel(load_onnx(path), source, path, "onnx")


def load_onnx(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as e:
        raise InputError(f"{path}: not an ONNX model, or a truncated one ({e})", "re-export the model; check the download finished") from None
    except Exception as e:  # onnx raises plain exceptions for unreadable protobufs
        raise InputError(f"{path}: cannot parse as ONNX ({type(e).__name__}: {e})", "give a valid .onnx file") from None
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{path}: not an ONNX model (no graph)", "give a valid .onnx file")
    base = path.resolve().parent
    for tensor in _external_tensors(model):
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(base):
            raise InputError(f"{path}: external data '{location}' of tensor '{tensor.name}' is outside the model's folder", "keep external data files beside the model (a relative path inside its folder)")
        if not target.is_file():
            raise InputError(f"{path}: external data file '{location}' of tensor '{tensor.name}' is missing", "copy the data file beside the model")
    try:
        # The path form checks models over 2 GB and external data too.
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise InputError(f"{path}: invalid ONNX model: {first}", "the model fails onnx.checker (full check); fix the exporter or the model") from None
    except onnx.shape_inference.InferenceError as e:
        first = str(e).strip().splitlines()[0]
        raise InputError(f"{path}: ONNX shape inference fails: {first}", "the model is inconsistent; re-export it") from None
    if any(True for _ in _external_tensors(model)):
        onnx.load_external_data_for_model(model, str(base))
    return model


def _external_tensors(model: onnx.ModelProto):
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield t


# ---------------------------------------------------------------------------------------------------- PyTorch

def _torch():
    try:
        import torch
    except ImportError:
        raise InputError("the PyTorch frontend needs torch", "pip install 'autoglm-compile[torch]' (CPU: pip install torch==2.13.0)") from None
    return torch


def _example_args(input_shapes: list[str], what: str):
    from .inputs import parse_input_shape

    torch = _torch()
    if not input_shapes:
        raise InputError(f"{what}: a PyTorch model needs its input shapes", "add --input-shape NAME=1x3x224x224[:float32] for each input, in order")
    names, args = [], []
    for text in input_shapes:
        name, shape, dtype = parse_input_shape(text)
        dtype = dtype or "float32"
        tdtype = getattr(torch, dtype)
        gen = torch.Generator().manual_seed(0)
        t = torch.randn(shape, generator=gen).to(tdtype) if tdtype.is_floating_point else torch.zeros(shape, dtype=tdtype)
        names.append(name)
        args.append(t)
    return names, tuple(args)


def _export(module, names, args, what: str) -> onnx.ModelProto:
    torch = _torch()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.onnx"
        try:
            with torch.no_grad():
                torch.onnx.export(module, args, str(out), input_names=names, opset_version=EXPORT_OPSET, dynamo=False)
        except Exception as e:
            raise InputError(f"{what}: torch.onnx.export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "check --input-shape matches the model's forward()") from None
        model = onnx.load(str(out))
    model.ir_version = EXPORT_IR_VERSION
    _name_outputs(model)
    return model


def _name_outputs(model: onnx.ModelProto) -> None:
    """torch.onnx names outputs after internal values ('29'); name them output (or output_0, output_1, ...)."""
    outputs = model.graph.output
    taken = {t for n in model.graph.node for t in (*n.input, *n.output)} | {i.name for i in model.graph.input}
    for i, out in enumerate(outputs):
        new = "output" if len(outputs) == 1 else f"output_{i}"
        if not out.name.isdigit() or new in taken:
            continue
        for node in model.graph.node:
            node.output[:] = [new if t == out.name else t for t in node.output]
            node.input[:] = [new if t == out.name else t for t in node.input]
        out.name = new


def load_torch_factory(entry: str, input_shapes: list[str], weights: str | None) -> LoadedModel:
    torch = _torch()
    mod_name, _, attr = entry.partition(":")
    try:
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(mod_name)
        finally:
            sys.path.pop(0)
    except ImportError as e:
        raise InputError(f"cannot import '{mod_name}' for {entry}: {e}", "give package.module:factory importable from here") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise InputError(f"'{attr}' in {mod_name} is not a callable factory", "the factory takes no arguments and returns a torch.nn.Module")
    net = factory()
    if not isinstance(net, torch.nn.Module):
        raise InputError(f"{entry} returned {type(net).__name__}, not a torch.nn.Module", "make the factory return an nn.Module")
    if weights:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"cannot load weights {weights}: {str(e).splitlines()[0]}", "give a state_dict saved with torch.save") from None
        net.load_state_dict(state)
    names, args = _example_args(input_shapes, entry)
    return LoadedModel(_export(net.eval(), names, args, entry), entry, None, "torch-factory")


def load_torch_file(path: Path, input_shapes: list[str], trust_pickle: bool) -> LoadedModel:
    torch = _torch()
    names, args = _example_args(input_shapes, str(path))
    if path.suffix == ".pt2":
        try:
            program = torch.export.load(str(path))
        except Exception as e:
            raise InputError(f"{path}: cannot load as a torch.export program: {str(e).splitlines()[0]}", "save it with torch.export.save") from None
        net = program.module()
        # module() patches train()/eval() to raise, and torch.onnx.export calls train(False): restore nn.Module's.
        # The mode of the graph's ops was fixed when the program was exported; this only sets the flags.
        for method in ("train", "eval"):
            net.__dict__.pop(method, None)
        return LoadedModel(_export(net.eval(), names, args, str(path)), str(path), path, "torch-export")
    try:
        net = torch.jit.load(str(path), map_location="cpu")
        return LoadedModel(_export(net, names, args, str(path)), str(path), path, "torchscript")
    except RuntimeError:
        pass  # not TorchScript: a pickled module
    if not trust_pickle:
        raise InputError(f"{path}: not TorchScript; loading it would unpickle arbitrary code", "pass --trust-pickle if you trust this file, or export it with torch.export / torch.jit.save")
    try:
        net = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:
        raise InputError(f"{path}: cannot load: {str(e).splitlines()[0]}", "save the module with torch.save(model)") from None
    if not isinstance(net, torch.nn.Module):
        raise InputError(f"{path} holds {type(net).__name__}, not an nn.Module", "a state_dict needs a factory: use module:factory with --weights")
    return LoadedModel(_export(net.eval(), names, args, str(path)), str(path), path, "torch-pickle")
