"""Find where two graphs start to disagree: the first node (in topological order) of the rewritten graph whose
output differs from the tensor of the same name in the original graph, both run under ONNX Runtime."""
from __future__ import annotations

import numpy as np
import onnx

from .measure import run_ort


def _expose_all(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy whose graph outputs include every intermediate tensor whose type shape inference knows."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    known = {vi.name: vi for vi in inferred.graph.value_info if vi.type.tensor_type.elem_type}
    existing = {o.name for o in inferred.graph.output}
    names = []
    for node in inferred.graph.node:
        for out in node.output:
            if out in known and out not in existing:
                inferred.graph.output.append(known[out])
                existing.add(out)
            if out in existing:
                names.append(out)
    return inferred, names


def _run_all(model: onnx.ModelProto, feeds) -> dict[str, np.ndarray]:
    exposed, _ = _expose_all(model)
    values = run_ort(exposed, feeds)
    return {o.name: v for o, v in zip(exposed.graph.output, values)}


def first_differing_node(before: onnx.ModelProto, after: onnx.ModelProto, feeds, rtol: float, atol: float) -> str | None:
    """'node name (OpType) -> tensor' of the first node of `after` whose output differs from `before`'s tensor of
    the same name, or None if every shared tensor agrees."""
    ref = _run_all(before, feeds)
    got = _run_all(after, feeds)
    for node in after.graph.node:
        for out in node.output:
            if out in ref and out in got:
                a, e = np.asarray(got[out], np.float64), np.asarray(ref[out], np.float64)
                if a.shape != e.shape or not np.allclose(a, e, rtol=rtol, atol=atol, equal_nan=True):
                    return f"{node.name or '(unnamed)'} ({node.op_type}) -> {out}"
    return None
