"""Models from transformers configs (seeded random weights) through the whole pipeline.

bert-tiny has BERT-base's graph structure (the ConstantOfShape / computed-shape subgraphs that TVM's importer
cannot take raw) and runs in the default suite. The full-size models are marked slow: `make test-models`.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from autoglm_compile.errors import UnsupportedError
from autoglm_compile.pipeline import CompileOptions, compile_model
from autoglm_compile.zoo import bert, bert_tiny, mobilenet_v2, resnet50


def _no_measure_config(tmp_path):
    cfg = tmp_path / "fast.yaml"
    cfg.write_text("extends: O2\nmeasure: {enabled: false}\n")
    return cfg


def _check_build(model_path, out, dims, tmp_path):
    import autoglm_compile

    report = compile_model(CompileOptions(source=str(model_path), output=out, dims=dims, config_path=_no_measure_config(tmp_path)))
    assert report.accuracy.ok and report.graph_verify.ok
    assert report.accuracy.rtol == 1e-3 and report.accuracy.atol == 1e-4
    # The artifact reproduces the report's outputs on the stored inputs.
    m = autoglm_compile.load(out)
    with np.load(out / "verify" / "inputs.npz") as z:
        outputs = m({k: z[k] for k in z.files})
    for summary, a in zip(report.output_summary, outputs):
        assert list(a.shape) == summary["shape"]
        assert np.isclose(float(np.abs(a.astype(np.float64)).sum()), summary["abs_sum"], rtol=1e-9)
    return report


def test_bert_tiny_imports_only_after_folding(tmp_path):
    path = bert_tiny(tmp_path / "bert-tiny.onnx")
    with pytest.raises(UnsupportedError, match="importer failed"):
        compile_model(CompileOptions(source=str(path), output=tmp_path / "o0", dims=["batch=1", "sequence=16"], preset="O0"))
    assert not (tmp_path / "o0").exists()
    report = _check_build(path, tmp_path / "o2", ["batch=1", "sequence=16"], tmp_path)
    folded = next(p for p in report.passes if p.name == "fold-constants")
    assert folded.nodes_after < folded.nodes_before and "ConstantOfShape" not in folded.ops_after


@pytest.mark.slow
def test_resnet50_host(tmp_path):
    path = resnet50(tmp_path / "resnet50.onnx")
    report = _check_build(path, tmp_path / "resnet50", ["batch=1"], tmp_path)
    assert report.outputs[0]["shape"] == [1, 2048, 1, 1]


@pytest.mark.slow
def test_bert_base_seq128_host(tmp_path):
    path = bert(tmp_path / "bert.onnx", seq=128)
    assert len(onnx.load(str(path), load_external_data=False).graph.node) > 1000
    report = _check_build(path, tmp_path / "bert", ["batch=1", "sequence=128"], tmp_path)
    assert report.outputs[0]["shape"] == [1, 128, 768]


@pytest.mark.slow
def test_mobilenet_v2_imports_only_after_folding(tmp_path):
    path = mobilenet_v2(tmp_path / "mnv2.onnx")
    with pytest.raises(UnsupportedError, match="Dynamic pads"):
        compile_model(CompileOptions(source=str(path), output=tmp_path / "o0", dims=["batch=1"], preset="O0"))
    _check_build(path, tmp_path / "mnv2", ["batch=1"], tmp_path)
