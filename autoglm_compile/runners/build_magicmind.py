#!/usr/bin/env python3
"""Build model.mm, the Cambricon MagicMind model, from this artifact's model.onnx: MagicMind's ONNX parser, the
static input shapes from runner.json, the MLU architecture and precision mode from runner.json's "magicmind".
Run it on a host with MagicMind installed (the MLU host, or a build host with MagicMind's cross-compilation
support); then `python runner.py --check` runs model.mm on the MLU.

This is the MagicMind Python API as Cambricon's magicmind_cloud samples use it (Parser(ModelKind.kOnnx),
BuilderConfig.parse_from_string, Builder.build_model, Model.serialize_to_file). It was written without MagicMind
at hand and has not been run: if your MagicMind version differs, its User Guide has the equivalent calls.
Written by autoglm-compile; the same file is autoglm_compile/runners/build_magicmind.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    folder = Path(__file__).resolve().parent
    config = json.loads((folder / "runner.json").read_text())
    settings = config["magicmind"]
    try:
        import magicmind.python.runtime as mm
        from magicmind.python.runtime.parser import Parser
    except ImportError:
        print("error: MagicMind (magicmind.python.runtime) is not installed\nHint: run this on the Cambricon host, with MagicMind's Python wheel installed", file=sys.stderr)
        return 2
    network = mm.Network()
    parser = Parser(mm.ModelKind.kOnnx)
    if not parser.parse(network, str(folder / config["model"])).ok():
        print("error: MagicMind's ONNX parser rejected model.onnx (see its log above)", file=sys.stderr)
        return 2
    for i, spec in enumerate(config["inputs"]):
        if not network.get_input(i).set_dimension(mm.Dims(tuple(spec["shape"]))).ok():
            print(f"error: cannot set the shape of input {i} ({spec['name']}) to {spec['shape']}", file=sys.stderr)
            return 2
    builder_config = mm.BuilderConfig()
    for setting in (
        {"archs": [settings["arch"]]},
        {"graph_shape_mutable": False},
        {"precision_config": {"precision_mode": settings["precision_mode"]}},
    ):
        if not builder_config.parse_from_string(json.dumps(setting)).ok():
            print(f"error: MagicMind does not accept the build setting {json.dumps(setting)}", file=sys.stderr)
            return 2
    model = mm.Builder().build_model("model", network, builder_config)
    if model is None:
        print("error: MagicMind could not build the model (see its log above)", file=sys.stderr)
        return 2
    out = folder / config["magicmind_model"]
    if not model.serialize_to_file(str(out)).ok():
        print(f"error: cannot write {out}", file=sys.stderr)
        return 2
    print(f"wrote {out} for {settings['arch']} ({settings['precision_mode']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
