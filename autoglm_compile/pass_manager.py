"""Graph passes: the registry, typed options, and the runner that times each pass and counts nodes.

A pass is one class in passes/ (or in a third-party package registered under the entry-point group
"autoglm_compile.passes"). The core never imports a particular pass: it discovers them here.
"""
from __future__ import annotations

import importlib
import pkgutil
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, ClassVar

import onnx
import onnx_graphsurgeon as gs
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import InputError

ENTRY_POINT_GROUP = "autoglm_compile.passes"


class PassOptions(BaseModel):
    """Options of a pass. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class PassContext:
    """What a pass may read about the job. Passes hold no state of their own between calls."""

    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    input_dtypes: dict[str, str] = field(default_factory=dict)
    ir_version: int = 8
    log: Callable[[str], None] = lambda msg: None


@dataclass
class PassResult:
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    graph: gs.Graph | None = None  # set by passes that rebuild the graph rather than edit it in place


class GraphPass:
    """Base class. The first line of a subclass's docstring is its help text."""

    name: ClassVar[str]
    Options: ClassVar[type[PassOptions]] = PassOptions

    def run(self, graph: gs.Graph, opts: Any, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def doc(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


_REGISTRY: dict[str, type[GraphPass]] = {}
_DISCOVERED = False


def register_pass(name: str):
    def deco(cls: type[GraphPass]) -> type[GraphPass]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"pass '{name}' is registered twice ({_REGISTRY[name].__module__}, {cls.__module__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def registered_passes() -> dict[str, type[GraphPass]]:
    """All passes: the built-in ones in autoglm_compile.passes and those of installed plug-ins."""
    global _DISCOVERED
    if not _DISCOVERED:
        _DISCOVERED = True
        pkg = importlib.import_module("autoglm_compile.passes")
        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            ep.load()  # the module registers its passes with @register_pass when imported
    return dict(sorted(_REGISTRY.items()))


def validate_pass_specs(specs, where: str) -> list[tuple[type[GraphPass], PassOptions]]:
    passes = registered_passes()
    out = []
    for spec in specs:
        cls = passes.get(spec.name)
        if cls is None:
            raise InputError(f"{where}: unknown pass '{spec.name}'", f"valid passes: {', '.join(passes)}")
        try:
            opts = cls.Options.model_validate(spec.options)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            valid = ", ".join(cls.Options.model_fields) or "(none)"
            raise InputError(f"{where}: pass '{spec.name}' option '{key}': {err['msg']}", f"valid options of {spec.name}: {valid}") from None
        out.append((cls, opts))
    return out


class PassRecord(BaseModel):
    name: str
    seconds: float
    changed: bool
    nodes_before: int
    nodes_after: int
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    stats: dict[str, Any] = {}


def op_counts(graph: gs.Graph) -> dict[str, int]:
    return dict(sorted(Counter(n.op for n in graph.nodes).items()))


def export_model(graph: gs.Graph, ir_version: int) -> onnx.ModelProto:
    """gs.export_onnx, keeping the source model's IR version (onnx 1.23 writes 14; older runtimes read less)."""
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = ir_version
    return model


def run_passes(
    model: onnx.ModelProto,
    specs,
    ctx: PassContext,
    on_pass: Callable[[str], None] = lambda name: None,
    after_pass: Callable[[str, onnx.ModelProto], None] | None = None,
) -> tuple[onnx.ModelProto, list[PassRecord]]:
    """Run the passes in order. The runner, not each pass, cleans up and sorts the graph after each pass."""
    resolved = validate_pass_specs(specs, where="pipeline")
    graph = gs.import_onnx(model)
    records = []
    for cls, opts in resolved:
        on_pass(cls.name)
        before_n, before_ops = len(graph.nodes), op_counts(graph)
        t0 = time.perf_counter()
        result = cls().run(graph, opts, ctx)
        if result.graph is not None:
            graph = result.graph
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        records.append(
            PassRecord(
                name=cls.name,
                seconds=time.perf_counter() - t0,
                changed=result.changed,
                nodes_before=before_n,
                nodes_after=len(graph.nodes),
                ops_before=before_ops,
                ops_after=op_counts(graph),
                stats=result.stats,
            )
        )
        if after_pass is not None:
            after_pass(cls.name, export_model(graph, ctx.ir_version))
    return export_model(graph, ctx.ir_version), records
