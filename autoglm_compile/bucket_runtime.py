"""Run a bucketed artifact (shape buckets, autoglm_compile/buckets.py): pick the variant whose input shapes equal
the inputs' shapes, and run it. Imports numpy and autoglm_compile.runtime only, like the runtime itself.

A variant (variants/<name>, a complete single-shape artifact) is loaded on its first use and kept, so a process that
only ever runs batch 1 holds only that variant in memory.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .runtime import ArtifactError, load


def _shape_text(shape) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


class BucketedModel:
    """A loaded bucketed artifact: called like CompiledModel, with inputs of one of the buckets' shapes."""

    def __init__(self, path: str | Path, manifest: dict, device: str | None = None, threads: int | None = None):
        self.path, self.manifest = Path(path), manifest
        self.buckets: list[dict] = manifest["buckets"]
        self.inputs, self.outputs = manifest["inputs"], manifest["outputs"]  # per input/output: name, dtype, shapes
        self._device, self._threads = device, threads
        self._loaded: dict[str, object] = {}

    def describe(self) -> str:
        """The buckets as text: 'b0 (x=1x3x224x224), b1 (x=8x3x224x224)'."""
        return ", ".join(f"{b['name']} ({' '.join(i['name'] + '=' + _shape_text(i['shape']) for i in b['inputs'])})" for b in self.buckets)

    def bucket_for(self, feeds: dict) -> dict:
        """The bucket whose input shapes are the feeds' shapes; ArtifactError naming the buckets when none is."""
        names = [i["name"] for i in self.inputs]
        missing = [n for n in names if n not in feeds]
        extra = [n for n in feeds if n not in names]
        if missing or extra:
            raise ArtifactError(f"inputs do not match the artifact: missing {missing}, unexpected {extra}", f"the artifact takes: {', '.join(names)}")
        shapes = {n: list(np.shape(feeds[n])) for n in names}
        for b in self.buckets:
            if all(list(i["shape"]) == shapes[i["name"]] for i in b["inputs"]):
                return b
        given = " ".join(f"{n}={_shape_text(s)}" for n, s in shapes.items())
        raise ArtifactError(f"input shapes {given} match no bucket of {self.path}: {self.describe()}",
                            "give inputs of one of these shapes, or rebuild with that shape added to --input-shape (e.g. x=1x3x224x224,4x3x224x224)")

    def variant(self, bucket: dict | str):
        """The loaded variant of a bucket (by name or entry), loading it on first use."""
        name = bucket if isinstance(bucket, str) else bucket["name"]
        if name not in self._loaded:
            entry = next((b for b in self.buckets if b["name"] == name), None)
            if entry is None:
                raise ArtifactError(f"{self.path} has no bucket '{name}'", f"its buckets: {self.describe()}")
            self._loaded[name] = load(self.path / entry["path"], self._device, self._threads)
        return self._loaded[name]

    def unload(self, name: str | None = None) -> None:
        """Drop a loaded variant (all of them when name is None); it is loaded again on its next use."""
        if name is None:
            self._loaded.clear()
        else:
            self._loaded.pop(name, None)

    def __call__(self, feeds: dict[str, np.ndarray] | None = None, **kwargs: np.ndarray) -> list[np.ndarray]:
        feeds = {**(feeds or {}), **kwargs}
        return self.variant(self.bucket_for(feeds))(feeds)
