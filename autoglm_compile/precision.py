"""Accuracy budgets for reduced-precision builds, their metrics, and the report of a quantization.

An fp16, int8 or mixed build is checked against an accuracy budget instead of the fp32 rtol/atol: one metric over
each output, against ONNX Runtime's outputs of the source model, on the verification inputs (the sample inputs,
else the seeded random ones). The defaults (DEFAULT_BUDGETS) are stated in the report; a failed default is exit 3
(the accuracy check), a failed budget the user gave (--accuracy-budget, precision.budget) is exit 4.

The metrics, per output (float64, flattened):
- cosine: cosine similarity; two all-zero arrays are 1, one all-zero array against a non-zero one is 0.
- max-abs: max |a - e|.
- max-rel: max |a - e| / max |e| (the error relative to the output's largest magnitude; element-wise relative
  errors are meaningless near zero).
- top1-agree: the share of positions where the argmax over the last axis agrees (top-1 agreement for (N, classes)).

This module is light (numpy and pydantic): report.py and the runtime-free parts import it.
"""
from __future__ import annotations

import re
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

Metric = Literal["cosine", "max-abs", "max-rel", "top1-agree"]
# The comparison each metric is checked with: similarities from below, errors from above.
DIRECTIONS: dict[str, str] = {"cosine": ">=", "top1-agree": ">=", "max-abs": "<=", "max-rel": "<="}
DEFAULT_BUDGETS = {"fp16": "cosine>=0.999", "int8": "cosine>=0.99", "mixed": "cosine>=0.99"}
REDUCED = tuple(DEFAULT_BUDGETS)
_BUDGET_RE = re.compile(r"^\s*([a-z0-9-]+)\s*(>=|<=)\s*([-+0-9.eE]+)\s*$")
BUDGET_HINT = "write METRIC>=X or METRIC<=X: cosine>=0.995, top1-agree>=0.99, max-rel<=0.02, max-abs<=0.05"


class Budget(BaseModel):
    """An accuracy budget in force: the metric, its comparison, the threshold and who set it."""

    metric: Metric
    op: Literal[">=", "<="]
    threshold: float
    source: Literal["default", "user"] = "user"
    precision: str = ""

    @property
    def text(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"

    def describe(self) -> str:
        return f"{self.text} ({'default for ' + self.precision if self.source == 'default' else 'given by the user'})"

    def holds(self, value: float) -> bool:
        if value != value:  # NaN
            return False
        return value >= self.threshold if self.op == ">=" else value <= self.threshold

    def tightened(self, share: float) -> "Budget":
        """The budget moved `share` of the way towards a perfect value (1 for cosine and top1-agree, 0 for the
        errors): cosine>=0.99 tightened by 0.1 is cosine>=0.991, max-rel<=0.02 is max-rel<=0.018."""
        t = self.threshold + share * (1.0 - self.threshold) if self.op == ">=" else self.threshold * (1.0 - share)
        return self.model_copy(update={"threshold": t})

    def worse(self, a: float, b: float) -> float:
        """The worse of two metric values (NaN is the worst)."""
        if a != a or b != b:
            return float("nan")
        return min(a, b) if self.op == ">=" else max(a, b)

    def better(self, a: float, b: float) -> bool:
        """Whether value a is strictly better than value b."""
        if a != a:
            return False
        if b != b:
            return True
        return a > b if self.op == ">=" else a < b


def parse_budget(text: str, source: str = "user", precision: str = "") -> Budget:
    """'cosine>=0.995' -> Budget. Raises ValueError with a message naming what is wrong."""
    m = _BUDGET_RE.match(str(text))
    if not m:
        raise ValueError(f"not an accuracy budget: {text!r}")
    metric, op, value = m.groups()
    if metric not in DIRECTIONS:
        raise ValueError(f"unknown accuracy metric '{metric}' (valid: {', '.join(DIRECTIONS)})")
    if op != DIRECTIONS[metric]:
        raise ValueError(f"{metric} is checked with {DIRECTIONS[metric]}, not {op}")
    try:
        threshold = float(value)
    except ValueError:
        raise ValueError(f"not a number: {value!r}") from None
    if metric in ("cosine", "top1-agree") and not -1.0 <= threshold <= 1.0:
        raise ValueError(f"{metric} lies in [{'-1' if metric == 'cosine' else '0'}, 1], got {threshold:g}")
    if metric in ("max-abs", "max-rel") and threshold < 0:
        raise ValueError(f"{metric} is an error, it cannot be below 0 (got {threshold:g})")
    return Budget(metric=metric, op=op, threshold=threshold, source=source, precision=precision)


def default_budget(precision: str) -> Budget | None:
    text = DEFAULT_BUDGETS.get(precision)
    return None if text is None else parse_budget(text, source="default", precision=precision)


def metric_value(metric: str, actual: np.ndarray, expected: np.ndarray) -> float:
    """The metric of one output against its reference (same shape)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if metric == "top1-agree":
        a2, e2 = a.reshape(-1, a.shape[-1] if a.ndim else 1), e.reshape(-1, e.shape[-1] if e.ndim else 1)
        if a2.size == 0:
            return 1.0
        if np.isnan(a2).any():
            return float("nan")
        return float(np.mean(np.argmax(a2, axis=-1) == np.argmax(e2, axis=-1)))
    a, e = a.ravel(), e.ravel()
    if metric == "cosine":
        na, ne = float(np.linalg.norm(a)), float(np.linalg.norm(e))
        if na == 0.0 and ne == 0.0:
            return 1.0
        if na == 0.0 or ne == 0.0:
            return 0.0
        return float(np.dot(a, e) / (na * ne))
    diff = float(np.max(np.abs(a - e), initial=0.0)) if not np.isnan(a).any() else float("nan")
    if metric == "max-abs":
        return diff
    if metric == "max-rel":
        scale = float(np.max(np.abs(e), initial=0.0))
        return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    raise ValueError(f"unknown metric {metric!r}")


def budget_value(budget: Budget, actual: list[np.ndarray], expected: list[np.ndarray]) -> float:
    """The worst metric value over the outputs (a shape mismatch counts as NaN, which fails every budget)."""
    worst = None
    for a, e in zip(actual, expected):
        v = metric_value(budget.metric, a, e) if np.shape(a) == np.shape(e) else float("nan")
        worst = v if worst is None else budget.worse(worst, v)
    return float("nan") if worst is None else worst


# ------------------------------------------------------------------------------------------------ the report

class CalibrationReport(BaseModel):
    source: str = Field(description="where the calibration data came from")
    samples: int
    method: str
    representative: bool = Field(description="false for --calib-synthetic: random data says nothing about real inputs")


class ProtectedNode(BaseModel):
    """A node kept in float: by the config (keep_float) or by the accuracy-driven protection."""

    name: str
    op: str
    reason: str
    tensor: str | None = Field(None, description="the activation tensor whose quantization the node was protected for")
    alone_cosine: float | None = Field(None, description="output cosine to fp32 with only that tensor quantized (its own contribution)")
    local_sqnr_db: float | None = Field(None, description="that tensor's quantization SQNR on the float activations")
    round: int | None = Field(None, description="the protection trial that kept it in float")
    trial_value: float | None = Field(None, description="the budget's metric in that trial, with the tensor quantized on top of the final set")


class ProtectionRound(BaseModel):
    round: int
    tensors: int = Field(description="activation tensors kept in float (round 0: none; round 1: all of them)")
    float_nodes: int = Field(description="nodes that write or read those tensors in float, keep_float ones included")
    value: float = Field(description="the budget's metric on ONNX Runtime, QDQ model against the fp32 reference (the search's trials: on its inputs, search_budget)")
    holds: bool = Field(description="round 0: the budget; the search's trials: the search's budget (search_budget)")


class QuantizationReport(BaseModel):
    mode: str
    format: str
    tool: str
    opset: str = Field(description="ONNX opset before -> after")
    per_channel: bool
    calibration: CalibrationReport
    budget: str
    value_before: float = Field(description="the metric with every node quantized (keep_float apart)")
    value: float = Field(description="the metric of the final QDQ model, on ONNX Runtime")
    ok: bool
    quantized_nodes: int = Field(description="nodes that read dequantized inputs in the final model")
    protected: list[ProtectedNode] = Field(default_factory=list)
    rounds: list[ProtectionRound] = Field(default_factory=list)
    scanned: int = Field(0, description="activation tensors whose contribution was measured one by one")
    search_budget: str | None = Field(None, description="what the protection search held: the budget tightened by precision.margin")
    candidates: int = Field(0, description="quantized activation tensors")
    int8_kernels: str
    seconds: float = 0.0
