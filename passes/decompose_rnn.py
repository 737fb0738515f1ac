"""decompose-rnn: rewrite LSTM, GRU and RNN nodes as MatMul/Add/Mul/activation nodes, unrolled over a static
sequence length (TVM 0.27's Relax importer has no converter for the three recurrent ops)."""
from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from autoglm_compile.pass_manager import GraphPass, PassContext, PassOptions, PassResult, register_pass

from ._graph import inferred_shapes

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
# Activations that take no alpha/beta. Those that do (HardSigmoid, LeakyRelu, ...) are left to the runtime: ONNX
# leaves open how activation_alpha/beta are matched to the activations, so a rewrite could silently differ.
ACTIVATIONS = {"Sigmoid", "Tanh", "Relu", "Softsign", "Softplus"}
_CANONICAL = {a.lower(): a for a in ACTIVATIONS}  # ONNX Runtime reads activation names case-insensitively
DIRECTIONS = {"forward": 1, "reverse": 1, "bidirectional": 2}


def _const(t) -> np.ndarray | None:
    return t.values if isinstance(t, gs.Constant) else None


def _given(node: gs.Node, i: int):
    """Input i of the node, or None when it is absent (past the end, or an empty name)."""
    return node.inputs[i] if i < len(node.inputs) and node.inputs[i].name else None


def _wanted(node: gs.Node, i: int):
    return node.outputs[i] if i < len(node.outputs) and node.outputs[i].name else None


def activations_of(node: gs.Node) -> list[str]:
    nd = DIRECTIONS.get(node.attrs.get("direction", "forward"), 1)
    acts = node.attrs.get("activations")
    if not acts:
        return DEFAULT_ACTIVATIONS[node.op] * nd
    names = [a.decode() if isinstance(a, bytes) else str(a) for a in acts]
    return [_CANONICAL.get(a.lower(), a) for a in names]


def why_not(node: gs.Node, seq_len: int | None, max_seq_len: int) -> str | None:
    """Why the node cannot be decomposed (None when it can). A pure check: it changes nothing."""
    direction = node.attrs.get("direction", "forward")
    if direction not in DIRECTIONS:
        return f"direction '{direction}'"
    if node.attrs.get("layout", 0) not in (0, 1):
        return f"layout {node.attrs.get('layout')}"
    acts = activations_of(node)
    if len(acts) != len(DEFAULT_ACTIVATIONS[node.op]) * DIRECTIONS[direction]:
        return f"{len(acts)} activations"
    unsupported = sorted({a for a in acts if a not in ACTIVATIONS})
    if unsupported:
        return f"activation(s) {', '.join(unsupported)} (only {', '.join(sorted(ACTIVATIONS))} are decomposed)"
    if node.attrs.get("activation_alpha") or node.attrs.get("activation_beta"):
        return "activation_alpha/activation_beta given"
    if node.op == "LSTM" and node.attrs.get("input_forget", 0):
        return "input_forget=1"
    if _const(node.inputs[1]) is None or _const(node.inputs[2]) is None:
        return "W or R is not a constant"
    for i, what in ((3, "B"), (7, "P")):
        t = _given(node, i)
        if t is not None and _const(t) is None:
            return f"{what} is not a constant"
    if seq_len is None:
        return "the sequence length is not static (pin the input shapes)"
    if seq_len < 1 or seq_len > max_seq_len:
        return f"sequence length {seq_len} (max_sequence_length is {max_seq_len})"
    return None


class _Emitter:
    """Makes the nodes for one recurrent node, in topological order: unique names under a prefix, constants in the
    weights' dtype."""

    def __init__(self, prefix: str, dtype, opset: int, taken: set[str]):
        self.prefix, self.dtype, self.opset, self.taken = prefix, np.dtype(dtype), opset, taken
        self.count = 0
        self.nodes: list[gs.Node] = []

    def name(self, tag: str) -> str:
        while True:
            self.count += 1
            name = f"{self.prefix}/{tag}_{self.count}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def const(self, tag: str, value, dtype=None) -> gs.Constant:
        # np.array, not np.ascontiguousarray: that one turns a scalar (a Gather index) into a 1-D array
        return gs.Constant(self.name(tag), np.array(value, dtype=dtype or self.dtype, order="C"))

    def ints(self, tag: str, value) -> gs.Constant:
        return self.const(tag, value, np.int64)

    def op(self, op: str, inputs: list, attrs: dict | None = None, outputs: int | list = 1, tag: str | None = None):
        """Make a node; returns its output (or the list of them when several)."""
        node_name = self.name(tag or op.lower())
        outs = outputs if isinstance(outputs, list) else [gs.Variable(f"{node_name}_out{i}" if outputs > 1 else node_name) for i in range(outputs)]
        node = gs.Node(op, name=node_name, inputs=list(inputs), outputs=outs, attrs=dict(attrs or {}))
        self.nodes.append(node)  # decompose() puts them in the graph, where the recurrent node was
        return outs if len(outs) > 1 else outs[0]

    # Ops whose form changed across opsets: written here in the form of the model's own opset.
    def split(self, x, sizes: list[int], axis: int):
        if len(sizes) == 1:
            return [x]
        if self.opset < 13:
            return self.op("Split", [x], {"axis": axis, "split": list(sizes)}, outputs=len(sizes))
        return self.op("Split", [x, self.ints("split", sizes)], {"axis": axis}, outputs=len(sizes))

    def clip(self, x, clip: float | None):
        if clip is None:
            return x
        if self.opset < 11:
            return self.op("Clip", [x], {"min": -float(clip), "max": float(clip)})
        return self.op("Clip", [x, self.const("clip_min", -clip), self.const("clip_max", clip)])

    def act(self, name: str, x, clip: float | None):
        return self.op(name, [self.clip(x, clip)])

    def gather(self, x, index: int, axis: int):
        return self.op("Gather", [x, self.ints("index", index)], {"axis": axis})

    def add(self, a, b):
        return self.op("Add", [a, b])

    def mul(self, a, b):
        return self.op("Mul", [a, b])

    def sub(self, a, b):
        return self.op("Sub", [a, b])

    def matmul(self, a, b):
        return self.op("MatMul", [a, b])

    def masked(self, mask, new, prev):
        """new where the step is within the sequence, else prev (None: zeros)."""
        if mask is None:
            return new
        if prev is None:
            return self.mul(mask, new)
        return self.add(prev, self.mul(mask, self.sub(new, prev)))


def _lstm_step(e: _Emitter, xw_t, h, c, rt, peep, acts, clip, hidden):
    f_act, g_act, h_act = acts
    pre = xw_t if h is None else e.add(xw_t, e.matmul(h, rt))
    if peep is None:  # gate order i, o, f, c: the three sigmoid gates are contiguous
        iof, cc = e.split(pre, [3 * hidden, hidden], axis=1)
        i, o, f = e.split(e.act(f_act, iof, clip), [hidden] * 3, axis=1)
    else:
        pi, po, pf = peep
        i, o, f, cc = e.split(pre, [hidden] * 4, axis=1)
        if c is not None:
            i, f = e.add(i, e.mul(pi, c)), e.add(f, e.mul(pf, c))
        i, f = e.act(f_act, i, clip), e.act(f_act, f, clip)
    cand = e.act(g_act, cc, clip)
    c_new = e.mul(i, cand) if c is None else e.add(e.mul(f, c), e.mul(i, cand))
    if peep is not None:
        o = e.act(f_act, e.add(o, e.mul(po, c_new)), clip)
    h_new = e.mul(o, e.op(h_act, [c_new]))
    return h_new, c_new


def _gru_step(e: _Emitter, xw_t, h, rt, rb_h, acts, clip, hidden, linear_before_reset):
    f_act, g_act = acts
    x_zr, x_h = e.split(xw_t, [2 * hidden, hidden], axis=1)
    if linear_before_reset:
        if h is None:
            zr, h_rec = x_zr, rb_h
        else:
            h_zr, h_h = e.split(e.matmul(h, rt), [2 * hidden, hidden], axis=1)
            zr, h_rec = e.add(x_zr, h_zr), e.add(h_h, rb_h)
        z, r = e.split(e.act(f_act, zr, clip), [hidden, hidden], axis=1)
        cand = e.act(g_act, e.add(x_h, e.mul(r, h_rec)), clip)
    else:
        rt_zr, rt_h = rt
        zr = x_zr if h is None else e.add(x_zr, e.matmul(h, rt_zr))
        z, r = e.split(e.act(f_act, zr, clip), [hidden, hidden], axis=1)
        cand = e.act(g_act, x_h if h is None else e.add(x_h, e.matmul(e.mul(r, h), rt_h)), clip)
    # H = (1 - z) * cand + z * H_prev = cand + z * (H_prev - cand)
    if h is None:
        return e.sub(cand, e.mul(z, cand))
    return e.add(cand, e.mul(z, e.sub(h, cand)))


def _rnn_step(e: _Emitter, xw_t, h, rt, acts, clip):
    pre = xw_t if h is None else e.add(xw_t, e.matmul(h, rt))
    return e.act(acts[0], pre, clip)


def decompose(graph: gs.Graph, node: gs.Node, seq_len: int, opset: int, taken: set[str], prefix: str) -> None:
    """Replace one recurrent node (checked by why_not) with its unrolled equations."""
    op, G = node.op, GATES[node.op]
    x, W, R = node.inputs[0], node.inputs[1].values, node.inputs[2].values
    B = _const(_given(node, 3)) if _given(node, 3) is not None else None
    seq_lens, h0, c0 = _given(node, 4), _given(node, 5), _given(node, 6) if op == "LSTM" else None
    P = _const(_given(node, 7)) if op == "LSTM" and _given(node, 7) is not None else None
    direction = node.attrs.get("direction", "forward")
    nd = DIRECTIONS[direction]
    layout = node.attrs.get("layout", 0)
    hidden = int(node.attrs.get("hidden_size", R.shape[-1]))
    clip = node.attrs.get("clip")
    acts = activations_of(node)
    per_dir = len(DEFAULT_ACTIVATIONS[op])
    lbr = op == "GRU" and bool(node.attrs.get("linear_before_reset", 0))
    e = _Emitter(prefix, W.dtype, opset, taken)
    time_axis = 0 if layout == 0 else 1
    state_axis = 0 if layout == 0 else 1  # of initial_h/c and Y_h/Y_c: [nd, B, H] or [B, nd, H]

    # sequence_lens: steps past a batch entry's length keep its state and write zeros to Y (constant lengths that
    # all equal the static length change nothing and are dropped).
    mask = None
    if seq_lens is not None:
        lens = _const(seq_lens)
        if lens is None or np.any(lens != seq_len):
            steps = e.const("steps", np.arange(seq_len).reshape(-1, 1, 1), np.int32)  # [T, 1, 1]
            lens_b = e.op("Reshape", [e.op("Cast", [seq_lens], {"to": onnx.TensorProto.INT32}), e.ints("shape", [1, -1, 1])])
            to = onnx.helper.np_dtype_to_tensor_dtype(e.dtype)
            mask = e.op("Cast", [e.op("Less", [steps, lens_b])], {"to": to})  # [T, B, 1]

    ys, hs, cs = [], [], []
    for d in range(nd):
        reverse = direction == "reverse" or d == 1
        w_d, r_d = W[d], R[d]  # [G*H, I], [G*H, H]
        wb, rb = (B[d][: G * hidden], B[d][G * hidden:]) if B is not None else (np.zeros(G * hidden, W.dtype),) * 2
        bias = wb + rb
        if lbr:  # Rb_h stays inside r * (H R_h^T + Rb_h)
            bias = wb + np.concatenate([rb[: 2 * hidden], np.zeros(hidden, W.dtype)])
        xw = e.matmul(x, e.const("WT", w_d.T))
        if np.any(bias):
            xw = e.add(xw, e.const("bias", bias))
        if op == "GRU" and not lbr:
            rt = (e.const("RT_zr", r_d[: 2 * hidden].T), e.const("RT_h", r_d[2 * hidden:].T))
        else:
            rt = e.const("RT", r_d.T)
        rb_h = e.const("Rb_h", rb[2 * hidden:]) if lbr else None
        peep = None
        if P is not None:
            p = P[d]
            peep = tuple(e.const(k, p[j * hidden:(j + 1) * hidden]) for j, k in enumerate(("P_i", "P_o", "P_f")))
        h = e.gather(h0, d, state_axis) if h0 is not None else None
        c = e.gather(c0, d, state_axis) if c0 is not None else None
        d_acts = acts[d * per_dir:(d + 1) * per_dir]
        outs: dict[int, object] = {}
        for t in (range(seq_len - 1, -1, -1) if reverse else range(seq_len)):
            xw_t = e.gather(xw, t, time_axis)  # [B, G*H]
            m = e.gather(mask, t, 0) if mask is not None else None  # [B, 1]
            if op == "LSTM":
                h_new, c_new = _lstm_step(e, xw_t, h, c, rt, peep, d_acts, clip, hidden)
                c = e.masked(m, c_new, c)
            elif op == "GRU":
                h_new = _gru_step(e, xw_t, h, rt, rb_h, d_acts, clip, hidden, lbr)
            else:
                h_new = _rnn_step(e, xw_t, h, rt, d_acts, clip)
            h_out = h_new if m is None else e.mul(m, h_new)
            h = h_out if h is None else e.masked(m, h_new, h)
            outs[t] = h_out
        ys.append([outs[t] for t in range(seq_len)])
        hs.append(h)
        cs.append(c)

    def finish(parts: list, shape: list[int], axis: int, target) -> None:
        """Reshape each direction's part to its slice of the output and write the output tensor."""
        if len(parts) == 1:
            e.op("Reshape", [parts[0], e.ints("shape", shape)], outputs=[target])
        else:
            shaped = [e.op("Reshape", [p, e.ints("shape", shape)]) for p in parts]
            e.op("Concat", shaped, {"axis": axis}, outputs=[target])

    y, y_h, y_c = _wanted(node, 0), _wanted(node, 1), _wanted(node, 2) if op == "LSTM" else None
    node.inputs.clear()
    node.outputs.clear()
    if y is not None:  # Y: [T, nd, B, H] (layout 0) or [B, T, nd, H] (layout 1)
        shape = [seq_len, 1, -1, hidden] if layout == 0 else [-1, seq_len, 1, hidden]
        finish([e.op("Concat", steps, {"axis": time_axis}) for steps in ys], shape, 1 if layout == 0 else 2, y)
    for target, states in ((y_h, hs), (y_c, cs)):  # Y_h, Y_c: [nd, B, H] (layout 0) or [B, nd, H] (layout 1)
        if target is not None:
            finish(states, [1, -1, hidden] if layout == 0 else [-1, 1, hidden], state_axis, target)
    # In place of the recurrent node, so the graph stays sorted: onnx-graphsurgeon's toposort recurses once per
    # level of depth, and a long unrolled chain placed after its consumers would pass Python's recursion limit.
    at = next(i for i, n in enumerate(graph.nodes) if n is node)
    graph.nodes[at:at + 1] = e.nodes


@register_pass("decompose-rnn")
class DecomposeRNN(GraphPass):
    """Unroll LSTM, GRU and RNN nodes into MatMul/Add/Mul/Sigmoid/Tanh nodes over their static sequence length.

    Covers forward, reverse and bidirectional nodes, layouts 0 and 1, initial states given or absent,
    sequence_lens (steps past a length keep the state and write zeros, as ONNX Runtime does), peepholes, clip,
    GRU's linear_before_reset, and every output (Y, Y_h, Y_c). W, R, B and P must be constants. Activations other
    than the parameter-free Sigmoid/Tanh/Relu/Softsign/Softplus, LSTM's input_forget, and a dynamic sequence length
    leave the node as it is, with the reason in the stats ("skipped")."""

    class Options(PassOptions):
        ops: list[Literal["LSTM", "GRU", "RNN"]] = ["LSTM", "GRU", "RNN"]
        # Longer sequences are left alone: the unrolled graph grows with the length. Measured here (2 cores): a
        # two-layer bidirectional GRU (hidden 128) at 128 steps unrolls to 7.2k nodes and builds in 160-225 s.
        max_sequence_length: int = 256

    def run(self, graph: gs.Graph, opts: Options, ctx: PassContext) -> PassResult:
        targets = [n for n in graph.nodes if n.op in GATES and n.op in opts.ops and (n.domain or "") in ("", "ai.onnx")]
        if not targets:
            return PassResult(changed=False, stats={"decomposed": {}, "skipped": {}})
        shapes = inferred_shapes(graph, ctx.ir_version)
        opset = graph.opset
        taken = set(graph.tensors()) | {n.name for n in graph.nodes}
        decomposed: dict[str, int] = {}
        skipped: dict[str, str] = {}
        for k, node in enumerate(targets):
            label = node.name or f"{node.op}#{k}"
            shape = shapes.get(node.inputs[0].name)
            axis = 0 if node.attrs.get("layout", 0) == 0 else 1
            seq_len = shape[axis] if shape is not None and len(shape) == 3 and isinstance(shape[axis], (int, np.integer)) else None
            reason = why_not(node, seq_len, opts.max_sequence_length)
            if reason is not None:
                skipped[label] = reason
                ctx.log(f"decompose-rnn: {label} ({node.op}) left as it is: {reason}")
                continue
            decompose(graph, node, int(seq_len), opset, taken, prefix=node.name or f"{node.op.lower()}{k}")
            decomposed[node.op] = decomposed.get(node.op, 0) + 1
        return PassResult(changed=bool(decomposed), stats={"decomposed": decomposed, "skipped": skipped})
