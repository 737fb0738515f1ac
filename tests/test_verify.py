"""Verification inside the pipeline: a pass that changes the outputs is caught, and --verify-each-pass names the
pass and the first ONNX node whose output differs."""
from __future__ import annotations

import onnx
import pytest

from autoglm_compile import pass_manager
from autoglm_compile.bisect import first_differing_node
from autoglm_compile.errors import AccuracyError, ExitCode
from autoglm_compile.pass_manager import GraphPass, PassResult, register_pass
from autoglm_compile.pipeline import CompileOptions, compile_model
from conftest import conv_net


@pytest.fixture
def breaking_pass():
    @register_pass("test-relu-to-sigmoid")
    class ReluToSigmoid(GraphPass):
        """Test only: turn Relu into Sigmoid (a wrong rewrite)."""

        def run(self, graph, opts, ctx):
            n = 0
            for node in graph.nodes:
                if node.op == "Relu":
                    node.op = "Sigmoid"
                    n += 1
            return PassResult(changed=n > 0)

    yield "test-relu-to-sigmoid"
    pass_manager._REGISTRY.pop("test-relu-to-sigmoid")


def _config(tmp_path, each: bool):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "passes: [pin-shapes, eliminate-noops, test-relu-to-sigmoid, infer-shapes]\n"
        f"verify: {{graph: true, each_pass: {str(each).lower()}}}\nmeasure: {{enabled: false}}\n"
    )
    return cfg


def test_each_pass_names_pass_and_first_node(tmp_path, conv_onnx, breaking_pass):
    with pytest.raises(AccuracyError) as e:
        compile_model(CompileOptions(source=str(conv_onnx), output=tmp_path / "out", config_path=_config(tmp_path, True)))
    msg = str(e.value)
    assert "pass 'test-relu-to-sigmoid' changed the outputs" in msg
    assert "first differing node: relu (Sigmoid) -> r" in msg
    assert e.value.exit_code == ExitCode.ACCURACY
    assert not (tmp_path / "out").exists()


def test_graph_verify_catches_it_without_each_pass(tmp_path, conv_onnx, breaking_pass):
    with pytest.raises(AccuracyError, match="the graph passes changed output 'y'") as e:
        compile_model(CompileOptions(source=str(conv_onnx), output=tmp_path / "out", config_path=_config(tmp_path, False)))
    assert "--verify-each-pass" in e.value.hint


def test_first_differing_node_none_when_equal():
    from autoglm_compile.inputs import random_inputs, resolve_inputs

    model = conv_net(batch=1)
    feeds = random_inputs(resolve_inputs(model))
    assert first_differing_node(model, onnx.ModelProto.FromString(model.SerializeToString()), feeds, 1e-3, 1e-4) is None
