"""convert-opset: move the model to another ONNX opset with onnx.version_converter, around three of its gaps.

onnx.version_converter (onnx 1.23) converts upwards well, but downwards it stops at ops it has no adapter for, and
one of its adapters is wrong. This pass works around each, and leaves the conversion itself to it:

1. Ops that changed only in the types they accept (Identity 14 -> 16, Add 13 -> 14, ...) have no downgrade adapter
   ("No Adapter From Version $16 for Identity"), and neither do ops that gained an attribute whose default keeps the
   old meaning (Reshape-14's allowzero). The pass converts one opset at a time; at each step, a node whose op got a
   new version at that step with the same inputs and outputs as the version before, and the same attributes or
   added ones that the node leaves out or sets to their defaults (which are then dropped), is passed through
   unchanged (hidden from the converter in a private domain for that step). Whether its types are valid at
   the target opset is then checked by ONNX's strict type and shape inference on the result, which names the node
   if not (say, an int8 Add at opset 13).
2. Softmax, LogSoftmax and Hardmax changed meaning at opset 13 with the same signature: before 13 they flatten
   the input to 2-D at `axis`, from 13 they reduce along `axis` alone. The converter's 13 -> 12 adapter keeps
   the attribute, which gives wrong numbers for any axis but the last. The pass moves such an axis last with
   Transposes first, so that both meanings agree.
3. Ops with no version at the target opset (LayerNormalization, Gelu, HardSwish below their opsets) cannot be
   converted: that is an error naming the nodes. Run decompose-ops before this pass to rewrite them.

Large initializers (over 1 KiB) are taken out of the model while the converter runs (it copies the whole model
at each step) and put back after; the small ones stay, for the adapters that read constant inputs (Squeeze's axes).
Upgrades go to the converter in one call.
"""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
from pydantic import Field

from autoglm_compile.errors import UnsupportedError
from autoglm_compile.pass_manager import GraphPass, PassContext, PassOptions, PassResult, export_model, register_pass

from ._graph import inferred

PASS_DOMAIN = "autoglm.passthrough"  # where a node hides from the converter during one step
SOFTMAX_OPS = ("Softmax", "LogSoftmax", "Hardmax")
SOFTMAX_CHANGED = 13
# Ops whose meaning changed at a version with an unchanged signature: never passed through.
SEMANTIC_CHANGES = {**{op: {SOFTMAX_CHANGED} for op in SOFTMAX_OPS}, "RoiAlign": {16}}  # RoiAlign-16: new default coordinates
STRIP_BYTES = 1024


def _onnx_domain(node) -> bool:
    return node.domain in ("", "ai.onnx")


def _params(params) -> tuple:
    return tuple((p.name, p.option) for p in params)


def _attr_default(schema: onnx.defs.OpSchema, name: str):
    default = schema.attributes[name].default_value
    return onnx.helper.get_attribute_value(default) if default.type != onnx.AttributeProto.UNDEFINED else None


def pass_through(node: onnx.NodeProto, step: int) -> list[str] | None:
    """Whether an ONNX node can cross from opset `step` to `step - 1` unchanged: its op got no new version at `step`,
    or the new version differs from the one before only in types, or in attributes added at `step` that the node
    leaves out or sets to their defaults (Reshape-14's allowzero=0). Returns the attributes to drop, or None."""
    op = node.op_type
    if step in SEMANTIC_CHANGES.get(op, set()):
        return None
    try:
        new = onnx.defs.get_schema(op, step, "")
        old = onnx.defs.get_schema(op, step - 1, "")
    except onnx.defs.SchemaError:
        return None
    if new.since_version != step or _params(new.inputs) != _params(old.inputs) or _params(new.outputs) != _params(old.outputs):
        return None
    for name, a in old.attributes.items():
        b = new.attributes.get(name)
        if b is None or (b.required, b.type) != (a.required, a.type):
            return None
    drop = []
    for attr in node.attribute:
        if attr.name in new.attributes and attr.name not in old.attributes:
            default = _attr_default(new, attr.name)
            if default is None or onnx.helper.get_attribute_value(attr) != default:
                return None
            drop.append(attr.name)
    return drop


def missing_at(model: onnx.ModelProto, opset: int) -> list[str]:
    """'name (Op)' for each ONNX-domain node whose op has no version at `opset`."""
    out = []
    for node in model.graph.node:
        if _onnx_domain(node):
            try:
                onnx.defs.get_schema(node.op_type, opset, "")
            except onnx.defs.SchemaError:
                out.append(f"'{node.name}' ({node.op_type})")
    return out


def softmax_axis_last(graph: gs.Graph) -> int:
    """Rewrite Softmax-like nodes (opset >= 13) whose axis is not the last: Transpose, op on the last axis,
    Transpose back. Returns how many were rewritten."""
    rewritten = 0
    for node in list(graph.nodes):
        if node.op not in SOFTMAX_OPS or (node.domain or "") not in ("", "ai.onnx"):
            continue
        x = node.inputs[0]
        if x.shape is None:
            raise UnsupportedError(
                f"convert-opset: the rank of {node.op} node '{node.name}' is unknown, and below opset {SOFTMAX_CHANGED} its axis means another thing",
                "pin the input shapes (pin-shapes) so that shape inference knows the rank",
            )
        rank = len(x.shape)
        axis = int(node.attrs.get("axis", -1))
        axis = axis + rank if axis < 0 else axis
        if axis == rank - 1:
            node.attrs["axis"] = -1
            continue
        perm = list(range(rank))
        perm[axis], perm[-1] = perm[-1], perm[axis]  # a swap is its own inverse
        moved = gs.Variable(f"{node.name}/axis_last_in", dtype=x.dtype)
        result = gs.Variable(f"{node.name}/axis_last_out", dtype=node.outputs[0].dtype)
        y = node.outputs[0]
        graph.nodes.append(gs.Node("Transpose", name=f"{node.name}/Transpose_in", attrs={"perm": perm}, inputs=[x], outputs=[moved]))
        graph.nodes.append(gs.Node("Transpose", name=f"{node.name}/Transpose_out", attrs={"perm": perm}, inputs=[result], outputs=[y]))
        node.inputs[0], node.outputs[0] = moved, result
        node.attrs["axis"] = -1
        rewritten += 1
    return rewritten


def _strip(model: onnx.ModelProto) -> dict[str, bytes]:
    stash = {}
    for init in model.graph.initializer:
        if len(init.raw_data) > STRIP_BYTES:
            stash[init.name] = init.raw_data
            init.ClearField("raw_data")
    return stash


def _restore(model: onnx.ModelProto, stash: dict[str, bytes]) -> None:
    for init in model.graph.initializer:
        if init.name in stash:
            init.raw_data = stash[init.name]


def _convert(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    try:
        return onnx.version_converter.convert_version(model, target)
    except (RuntimeError, onnx.checker.ValidationError) as e:
        text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UnsupportedError(f"convert-opset: onnx.version_converter cannot convert to opset {target}: {text[:300]}", "report the model; a decomposition or an adapter is missing") from None


def step_down(model: onnx.ModelProto, source: int, target: int) -> tuple[onnx.ModelProto, int]:
    """Convert one opset at a time, passing type-only changes through. Returns (model, nodes passed through)."""
    passed = 0
    for step in range(source, target, -1):
        hidden = []
        for n in model.graph.node:
            drop = pass_through(n, step) if _onnx_domain(n) else None
            if drop is None:
                continue
            kept_attrs = [a for a in n.attribute if a.name not in drop]
            del n.attribute[:]
            n.attribute.extend(kept_attrs)
            n.domain = PASS_DOMAIN
            hidden.append(n)
        if hidden:
            model.opset_import.append(onnx.helper.make_opsetid(PASS_DOMAIN, 1))
        model = _convert(model, step - 1)
        for n in model.graph.node:
            if n.domain == PASS_DOMAIN:
                n.domain = ""
        kept = [o for o in model.opset_import if o.domain != PASS_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept)
        passed += len(hidden)
    return model, passed


def check_types(model: onnx.ModelProto, opset: int) -> None:
    """ONNX's strict type and shape inference at the new opset; a node that it rejects is a user error."""
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as e:
        text = " ".join(str(e).split())
        raise UnsupportedError(f"convert-opset: the model is not valid at opset {opset}: {text[:400]}", "that node's types or attributes have no equivalent at this opset") from None


@register_pass("convert-opset")
class ConvertOpset(GraphPass):
    """Convert the model to another ONNX opset with onnx.version_converter (type-only changes passed through)."""

    class Options(PassOptions):
        opset: int = Field(ge=7)  # the ONNX-domain opset to convert to

    def run(self, graph: gs.Graph, opts: Options, ctx: PassContext) -> PassResult:
        source, target = graph.opset, opts.opset
        if source == target:
            return PassResult(changed=False, stats={"opset": target})
        stats: dict = {"from": source, "to": target}
        if source >= SOFTMAX_CHANGED > target:
            graph = inferred(graph, ctx.ir_version)
            stats["softmax_axis_moved"] = softmax_axis_last(graph)
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        model = export_model(graph, ctx.ir_version)
        if target < source:
            missing = missing_at(model, target)
            if missing:
                raise UnsupportedError(
                    f"convert-opset: {len(missing)} node(s) have no version at opset {target}: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""),
                    "run decompose-ops with opset: " + str(target) + " before convert-opset (it rewrites LayerNormalization, Gelu, HardSwish, Mish)",
                )
        stash = _strip(model)
        if target < source:
            model, stats["passed_through"] = step_down(model, source, target)
        else:
            model = _convert(model, target)
        check_types(model, target)  # on the stripped model: types and shapes need no weights
        _restore(model, stash)
        model = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
        return PassResult(changed=True, stats=stats, graph=gs.import_onnx(model))
