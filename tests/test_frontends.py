"""The PyTorch frontend through the CLI: a module:factory entry, a .pt2 ExportedProgram, TorchScript, a pickled module
(only with --trust-pickle) and --weights (loaded with weights_only). The model is the small CNN of the zoo."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import autoglm_compile
from autoglm_compile import cli
from autoglm_compile.report import Report
from autoglm_compile.zoo import small_cnn

runner = CliRunner()
FACTORY = "autoglm_compile.zoo:small_cnn"
SHAPE = "x=1x3x32x32"
RTOL, ATOL = 1e-3, 1e-4


class PickledNet(nn.Module):
    """A module class importable by name, as torch.save(module) needs (small_cnn's class is local)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class NotATensor:
    """Something weights_only=True refuses to unpickle."""


@pytest.fixture(scope="module")
def fast_config(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("cfg") / "fast.yaml"
    cfg.write_text("extends: O2\nmeasure: {enabled: false}\n")  # accuracy is still checked; nothing is timed
    return cfg


def compile_json(*args):
    result = runner.invoke(cli.app, ["compile", *[str(a) for a in args], "--json"])
    report = Report.model_validate_json(result.stdout) if result.exit_code == 0 else None
    return result, report


def assert_matches_torch(out, module: nn.Module):
    """The artifact, run on its stored inputs, gives what the PyTorch module gives."""
    with np.load(out / "verify" / "inputs.npz") as z:
        x = z["x"]
    (got,) = autoglm_compile.load(out)({"x": x})
    with torch.no_grad():
        want = module.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    return got


def assert_built(result, report, frontend: str, out):
    assert result.exit_code == 0, result.output
    assert report.frontend == frontend
    assert report.accuracy is not None and report.accuracy.ok
    assert report.accuracy.rtol == RTOL and report.accuracy.atol == ATOL
    assert report.inputs == [{"name": "x", "shape": [1, 3, 32, 32], "dtype": "float32"}]
    assert (out / "manifest.json").is_file()
    assert json.loads((out / "manifest.json").read_text())["source"]["frontend"] == frontend


def test_factory_entry(tmp_path, fast_config):
    out = tmp_path / "cnn"
    result, report = compile_json(FACTORY, "--input-shape", SHAPE, "--config", fast_config, "-o", out)
    assert_built(result, report, "torch-factory", out)
    assert report.outputs == [{"name": "output", "shape": [1, 10], "dtype": "float32"}]  # not torch's value number
    assert json.loads((out / "manifest.json").read_text())["source"]["sha256"] is None  # no file to hash
    assert_matches_torch(out, small_cnn())


def test_exported_program_pt2(tmp_path, fast_config):
    path = tmp_path / "cnn.pt2"
    torch.export.save(torch.export.export(small_cnn(), (torch.randn(1, 3, 32, 32),)), str(path))
    out = tmp_path / "cnn"
    result, report = compile_json(path, "--input-shape", SHAPE, "--config", fast_config, "-o", out)
    assert_built(result, report, "torch-export", out)
    assert json.loads((out / "manifest.json").read_text())["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert_matches_torch(out, small_cnn())


def test_torchscript(tmp_path, fast_config):
    path = tmp_path / "cnn.pt"
    torch.jit.trace(small_cnn(), (torch.randn(1, 3, 32, 32),)).save(str(path))
    out = tmp_path / "cnn"
    result, report = compile_json(path, "--input-shape", SHAPE, "--config", fast_config, "-o", out)
    assert_built(result, report, "torchscript", out)
    assert_matches_torch(out, small_cnn())


def test_pickled_module_needs_trust_pickle(tmp_path, fast_config):
    path = tmp_path / "net.pt"
    torch.save(PickledNet(), str(path))
    out = tmp_path / "net"
    result, _ = compile_json(path, "--input-shape", SHAPE, "--config", fast_config, "-o", out)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "not TorchScript; loading it would unpickle arbitrary code" in result.stderr
    assert "Hint: pass --trust-pickle if you trust this file" in result.stderr
    assert not out.exists()

    result, report = compile_json(path, "--input-shape", SHAPE, "--trust-pickle", "--config", fast_config, "-o", out)
    assert_built(result, report, "torch-pickle", out)
    assert assert_matches_torch(out, PickledNet()).shape == (1, 5)


def test_weights_are_loaded(tmp_path, fast_config):
    trained = small_cnn()
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(-1.5)  # other weights than the factory's seeded ones
    weights = tmp_path / "weights.pt"
    torch.save(trained.state_dict(), str(weights))
    out = tmp_path / "cnn"
    result, report = compile_json(FACTORY, "--input-shape", SHAPE, "--weights", weights, "--config", fast_config, "-o", out)
    assert_built(result, report, "torch-factory", out)
    got = assert_matches_torch(out, trained)
    with np.load(out / "verify" / "inputs.npz") as z, torch.no_grad():
        untrained = small_cnn()(torch.from_numpy(z["x"])).numpy()
    assert np.abs(got - untrained).max() > 1e-2  # the weights made a difference


def test_weights_are_not_unpickled(tmp_path, fast_config):
    weights = tmp_path / "weights.pt"
    torch.save({"stem.0.weight": NotATensor()}, str(weights))
    out = tmp_path / "cnn"
    result, _ = compile_json(FACTORY, "--input-shape", SHAPE, "--weights", weights, "--config", fast_config, "-o", out)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert f"error: cannot load weights {weights}" in result.stderr
    assert "Hint: give a state_dict saved with torch.save" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("kind", ["factory", "torchscript"])
def test_torch_model_needs_input_shape(tmp_path, fast_config, kind):
    if kind == "factory":
        source = FACTORY
    else:
        source = tmp_path / "cnn.pt"
        torch.jit.trace(small_cnn(), (torch.randn(1, 3, 32, 32),)).save(str(source))
    out = tmp_path / "cnn"
    result, _ = compile_json(source, "--config", fast_config, "-o", out)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "a PyTorch model needs its input shapes" in result.stderr
    assert "Hint: add --input-shape NAME=1x3x224x224" in result.stderr
    assert not out.exists()
