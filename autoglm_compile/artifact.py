"""The artifact folder: staged beside the output path, then swapped in whole.

A build that fails or is interrupted leaves nothing at the output path, and an earlier artifact there is replaced
only once the new one is complete.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from .errors import InputError
from .runtime import MANIFEST

# Files that record a measurement rather than the deployable; they change from run to run and are not hashed.
REPORT_FILES = ("report.json", "report.md")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in REPORT_FILES and rel != MANIFEST:
            out[rel] = sha256(p)
    return out


def dir_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


class Staging:
    """A temporary folder next to `output` that becomes `output` on commit()."""

    def __init__(self, output: Path):
        self.output = output.resolve()
        if self.output.exists() and not (self.output.is_dir() and (self.output / MANIFEST).is_file()):
            raise InputError(f"output path {output} exists and is not an autoglm-compile artifact", "choose another -o path, or remove it yourself")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.partial-", dir=self.output.parent))
        self.committed = False

    def commit(self) -> Path:
        old = None
        if self.output.exists():
            old = self.output.parent / f".{self.output.name}.old-{os.getpid()}"
            os.rename(self.output, old)
        os.rename(self.path, self.output)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.output

    def discard(self) -> None:
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)


def write_archive(folder: Path) -> Path:
    """folder.tar.gz beside the folder, written to a temporary name and renamed into place."""
    dest = folder.parent / f"{folder.name}.tar.gz"
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=folder.parent)
    os.close(fd)
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(folder, arcname=folder.name)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
