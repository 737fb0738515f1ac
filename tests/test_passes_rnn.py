"""decompose-rnn: LSTM, GRU and RNN unrolled into MatMul/Add/activation nodes. Hand-built nodes (every direction,
initial states given or absent, sequence_lens, peepholes, clip, linear_before_reset, layout 1, opsets before and
after Split's change) and torch exports (bidirectional, two layers, batch_first) must give ONNX Runtime's outputs
(rtol 1e-4, atol 1e-5), and leave nothing that TVM's importer lacks."""
from __future__ import annotations

import io
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from autoglm_compile.config import PassSpec
from autoglm_compile.pass_manager import PassContext, run_passes
from autoglm_compile.tvm_build import unsupported_nodes
from conftest import conv_net, make_model

RTOL, ATOL = 1e-4, 1e-5
# torch's exporter warns about tracing RNNs and about batch sizes other than 1: expected here.
pytestmark = [pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def apply(model, ctx=None, **options):
    out, records = run_passes(model, [PassSpec(name="decompose-rnn", options=options)], ctx or PassContext())
    return out, records[0]


def run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def random_feeds(model, seed=1):
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in model.graph.input:
        shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
        feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def assert_decomposed_same(model, feeds=None, reference=None, **options):
    """Decompose, then check: no recurrent node left, TVM's importer takes every node, outputs equal ORT's."""
    out, rec = apply(model, **options)
    assert rec.changed
    assert not {n.op_type for n in out.graph.node} & set(GATES)
    assert unsupported_nodes(out) == []
    onnx.checker.check_model(out, full_check=True)
    feeds = feeds or random_feeds(model)
    for want, got in zip(run(reference or model, feeds), run(out, feeds)):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    return out, rec


def rnn_model(op, direction="forward", T=4, batch=2, inputs=3, hidden=5, initial=True, seq_lens=None, peepholes=False,
              outputs=(True, True, True), layout=0, opset=17, **attrs):
    """One recurrent node with seeded constant weights; initial states (when given) are graph inputs."""
    rng = np.random.default_rng(0)
    nd, G = (2 if direction == "bidirectional" else 1), GATES[op]
    inits = [
        numpy_helper.from_array((0.5 * rng.standard_normal((nd, G * hidden, inputs))).astype(np.float32), "W"),
        numpy_helper.from_array((0.5 * rng.standard_normal((nd, G * hidden, hidden))).astype(np.float32), "R"),
        numpy_helper.from_array((0.5 * rng.standard_normal((nd, 2 * G * hidden))).astype(np.float32), "B"),
    ]
    state = [nd, batch, hidden] if layout == 0 else [batch, nd, hidden]
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, batch, inputs] if layout == 0 else [batch, T, inputs])]
    names = ["x", "W", "R", "B", ""]
    if seq_lens is not None:
        inits.append(numpy_helper.from_array(np.array(seq_lens, np.int32), "seq_lens"))
        names[4] = "seq_lens"
    for s in (["h0", "c0"] if op == "LSTM" else ["h0"]):
        names.append(s if initial else "")
        if initial:
            graph_inputs.append(helper.make_tensor_value_info(s, TensorProto.FLOAT, state))
    if peepholes:
        inits.append(numpy_helper.from_array(rng.standard_normal((nd, 3 * hidden)).astype(np.float32), "P"))
        names.append("P")
    while names[-1] == "":
        names.pop()
    out_names = [n if want else "" for n, want in zip(["Y", "Y_h", "Y_c"][: 3 if op == "LSTM" else 2], outputs)]
    y_shape = [T, nd, batch, hidden] if layout == 0 else [batch, T, nd, hidden]
    graph_outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in zip(out_names, [y_shape, state, state]) if n]
    if layout:
        attrs["layout"] = layout
    node = helper.make_node(op, names, out_names, name="rnn", hidden_size=hidden, direction=direction, **attrs)
    return make_model([node], graph_inputs, graph_outputs, inits, opset=opset)


# ------------------------------------------------------------------------------------------- hand-built nodes

def test_exact_nodes_of_a_two_step_rnn():
    model = rnn_model("RNN", T=2)
    out, rec = assert_decomposed_same(model)
    # x W^T + b once for every step; per step: Gather the step, H W_r^T, Add, Tanh; then Y and Y_h.
    assert Counter(n.op_type for n in out.graph.node) == Counter(
        {"MatMul": 3, "Add": 3, "Gather": 3, "Tanh": 2, "Concat": 1, "Reshape": 2}
    )
    assert [o.name for o in out.graph.output] == ["Y", "Y_h"]
    assert rec.stats == {"decomposed": {"RNN": 1}, "skipped": {}}


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("initial", [True, False])
def test_every_direction_with_and_without_initial_states(op, direction, initial):
    assert_decomposed_same(rnn_model(op, direction, initial=initial))


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("initial", [True, False])
def test_sequence_lens_keep_the_state_and_zero_the_padding(op, initial):
    assert_decomposed_same(rnn_model(op, "bidirectional", T=5, batch=3, seq_lens=[5, 2, 1], initial=initial))


def test_sequence_lens_from_a_graph_input_with_a_dynamic_batch():
    model = rnn_model("GRU", "bidirectional", T=5)
    for value in model.graph.input:  # x [T, batch, I], h0 [2, batch, H]
        value.type.tensor_type.shape.dim[1].dim_param = "batch"
    model.graph.input.append(helper.make_tensor_value_info("lens", TensorProto.INT32, ["batch"]))
    model.graph.node[0].input[4] = "lens"
    out, rec = apply(model)
    assert rec.changed and unsupported_nodes(out) == []
    rng = np.random.default_rng(3)
    for batch in (1, 4):
        feeds = {
            "x": rng.standard_normal((5, batch, 3)).astype(np.float32),
            "h0": rng.standard_normal((2, batch, 5)).astype(np.float32),
            "lens": rng.integers(1, 6, batch).astype(np.int32),
        }
        for want, got in zip(run(model, feeds), run(out, feeds)):
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_lstm_peepholes_and_clip():
    assert_decomposed_same(rnn_model("LSTM", "bidirectional", peepholes=True, clip=0.7))


@pytest.mark.parametrize("initial", [True, False])
def test_gru_linear_before_reset(initial):
    assert_decomposed_same(rnn_model("GRU", "bidirectional", initial=initial, linear_before_reset=1, clip=1.5))


def test_parameter_free_activations():
    assert_decomposed_same(rnn_model("RNN", "bidirectional", activations=["Relu", "Softsign"]))
    assert_decomposed_same(rnn_model("GRU", "forward", activations=["sigmoid", "relu"]))  # ORT ignores the case


@pytest.mark.parametrize("wanted", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)])
def test_any_subset_of_outputs(wanted):
    assert_decomposed_same(rnn_model("LSTM", "bidirectional", outputs=wanted))


@pytest.mark.parametrize("opset", [9, 11, 13, 18])
def test_split_and_clip_follow_the_model_opset(opset):
    assert_decomposed_same(rnn_model("LSTM", "forward", opset=opset, clip=2.0))


def test_layout_1_against_layout_0_between_transposes():
    # ONNX Runtime refuses layout 1 ("Batchwise recurrent operations (layout == 1) are not supported"): the reference
    # is the same LSTM in layout 0 with the batch-major tensors transposed around it.
    model = rnn_model("LSTM", "bidirectional", layout=1, seq_lens=[4, 2])
    lstm = rnn_model("LSTM", "bidirectional", layout=0, seq_lens=[4, 2]).graph.node[0]
    lstm.input[0], lstm.input[5], lstm.input[6] = "x_t", "h0_t", "c0_t"
    lstm.output[:] = ["Y_t", "Y_h_t", "Y_c_t"]
    nodes = [
        *(helper.make_node("Transpose", [n], [f"{n}_t"], perm=[1, 0, 2]) for n in ("x", "h0", "c0")),
        lstm,
        helper.make_node("Transpose", ["Y_t"], ["Y"], perm=[2, 0, 1, 3]),
        *(helper.make_node("Transpose", [f"{n}_t"], [n], perm=[1, 0, 2]) for n in ("Y_h", "Y_c")),
    ]
    g = model.graph
    reference = make_model(nodes, list(g.input), list(g.output), list(g.initializer))
    assert_decomposed_same(model, reference=reference)


def test_a_long_unrolled_sequence_stays_sorted():
    # 300 steps make a chain about 900 nodes deep, read by a node listed before the unrolled ones would be if they
    # were appended: onnx-graphsurgeon's recursive toposort would then pass Python's recursion limit.
    model = rnn_model("RNN", T=300, batch=1, inputs=2, hidden=2, outputs=(False, True))
    model.graph.output[0].name = "h"
    model.graph.node.append(helper.make_node("Relu", ["Y_h"], ["h"], name="relu"))
    out, rec = apply(model, max_sequence_length=300)
    assert rec.stats["decomposed"] == {"RNN": 1} and len(out.graph.node) > 900
    feeds = random_feeds(model)
    np.testing.assert_allclose(run(out, feeds)[0], run(model, feeds)[0], rtol=RTOL, atol=ATOL)


def test_no_recurrent_node_no_change():
    model = conv_net(batch=1)
    out, rec = apply(model)
    assert not rec.changed and [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]


@pytest.mark.parametrize(
    "model, reason",
    [
        (rnn_model("RNN", activations=["HardSigmoid"]), "activation(s) HardSigmoid"),
        (rnn_model("LSTM", input_forget=1), "input_forget=1"),
        (rnn_model("GRU", T=40), "sequence length 40 (max_sequence_length is 32)"),
    ],
)
def test_unsupported_nodes_are_left_with_a_reason(model, reason):
    out, rec = apply(model, max_sequence_length=32)
    assert not rec.changed and [n.op_type for n in out.graph.node] == [model.graph.node[0].op_type]
    assert reason in rec.stats["skipped"]["rnn"]


def test_dynamic_sequence_length_is_left_with_a_reason():
    model = rnn_model("LSTM")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "seq"
    out, rec = apply(model)
    assert not rec.changed and "sequence length is not static" in rec.stats["skipped"]["rnn"]


# ------------------------------------------------------------------------------------------------ torch exports

class Recurrent(torch.nn.Module):
    def __init__(self, kind: str, batch_first: bool, with_state: bool):
        super().__init__()
        self.kind, self.with_state = kind, with_state
        kwargs = {"nonlinearity": "relu"} if kind == "RNN" else {}
        self.rnn = getattr(torch.nn, kind)(8, 16, num_layers=2, bidirectional=True, batch_first=batch_first, **kwargs)

    def forward(self, x, h0):
        if not self.with_state:
            y, state = self.rnn(x)
        elif self.kind == "LSTM":
            y, state = self.rnn(x, (h0, torch.tanh(h0)))
        else:
            y, state = self.rnn(x, h0)
        return (y, *state) if isinstance(state, tuple) else (y, state)


def torch_export(module, args) -> onnx.ModelProto:
    torch.manual_seed(0)
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module.eval(), args, buf, dynamo=False, opset_version=17, input_names=["x", "h0"])
    model = onnx.load_from_string(buf.getvalue())
    model.ir_version = 8
    return model


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("batch_first, with_state", [(True, False), (False, True)])
def test_torch_bidirectional_two_layer_exports(kind, batch_first, with_state):
    torch.manual_seed(0)
    module = Recurrent(kind, batch_first, with_state)
    x = torch.randn((2, 6, 8) if batch_first else (6, 2, 8))
    h0 = torch.randn(4, 2, 16)
    model = torch_export(module, (x, h0))
    assert Counter(n.op_type for n in model.graph.node)[kind] == 2
    feeds = {i.name: a.numpy() for i, a in zip(model.graph.input, (x, h0))}
    _, rec = assert_decomposed_same(model, feeds)
    assert rec.stats["decomposed"] == {kind: 2}
    with torch.no_grad():
        expected = module(x, h0)
    for want, got in zip(expected, run(apply(model)[0], feeds)):
        np.testing.assert_allclose(got, want.numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_end_to_end_compile_of_a_torch_rnn(tmp_path, kind):
    """A two-layer bidirectional LSTM (GRU) runs fully on TVM after decomposition, and matches ONNX Runtime."""
    from autoglm_compile.pipeline import CompileOptions, compile_model

    torch.manual_seed(0)
    model = torch_export(Recurrent(kind, batch_first=True, with_state=False), (torch.randn(1, 5, 8), torch.zeros(4, 1, 16)))
    path = tmp_path / "rnn.onnx"
    onnx.save(model, str(path))
    config = tmp_path / "rnn.yaml"
    config.write_text(
        "extends: O2\n"
        "passes:\n"
        "  - pin-shapes\n"
        "  - fold-constants\n"
        "  - decompose-rnn\n"
        "  - eliminate-noops\n"
        "  - eliminate-dead-code\n"
        "  - infer-shapes\n"
    )
    report = compile_model(CompileOptions(source=str(path), output=tmp_path / "out", runs=1, config_path=config))
    assert report.accuracy is not None and report.accuracy.ok
    record = next(p for p in report.passes if p.name == "decompose-rnn")
    assert record.stats["decomposed"] == {kind: 2} and kind not in record.ops_after
