"""Input specs: --input-shape parsing, resolution of dynamic dims, and valid seeded random inputs."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from autoglm_compile.errors import InputError
from autoglm_compile.inputs import index_ranges, parse_input_shape, random_inputs, resolve_inputs
from conftest import conv_net, make_model


@pytest.mark.parametrize(
    "text, expected",
    [
        ("x=1x3x224x224", ("x", (1, 3, 224, 224), None)),
        ("input_ids=1x128:int64", ("input_ids", (1, 128), "int64")),
        ("rate=scalar:float32", ("rate", (), "float32")),
        ("a.b/c:0=4", ("a.b/c:0", (4,), None)),
    ],
)
def test_parse_input_shape(text, expected):
    assert parse_input_shape(text) == expected


@pytest.mark.parametrize("text, message", [("x", "bad --input-shape"), ("x=1x", "bad --input-shape"), ("x=1x0", "dims must be positive"), ("x=1:float8", "bad dtype 'float8'"), ("=1", "bad --input-shape")])
def test_parse_input_shape_errors(text, message):
    with pytest.raises(InputError, match=message):
        parse_input_shape(text)


def test_resolve_dynamic_dims():
    model = conv_net()  # x: [batch, 3, 16, 16]
    with pytest.raises(InputError) as e:
        resolve_inputs(model)
    assert "x (batch)" in str(e.value) and "--input-shape" in e.value.hint
    assert resolve_inputs(model, ["x=2x3x16x16"])[0].shape == (2, 3, 16, 16)
    assert resolve_inputs(model, dims=["batch=4"])[0].shape == (4, 3, 16, 16)


@pytest.mark.parametrize(
    "shape, message",
    [("y=1x3x16x16", "not a model input"), ("x=1x3x16", "rank 3, the model has rank 4"), ("x=1x3x16x16:int64", "dtype int64, the model declares float32")],
)
def test_resolve_errors_name_the_input(shape, message):
    with pytest.raises(InputError, match=message):
        resolve_inputs(conv_net(), [shape])


def embedding_model(rows: int = 30):
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((rows, 4)).astype(np.float32), "table")
    nodes = [
        helper.make_node("Cast", ["ids"], ["ids32"], name="cast", to=TensorProto.INT32),
        helper.make_node("Gather", ["table", "ids32"], ["emb"], name="gather"),
        helper.make_node("Cast", ["attention_mask"], ["m"], name="castm", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axes"], ["m2"], name="unsq"),
        helper.make_node("Mul", ["emb", "m2"], ["y"], name="mul"),
    ]
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 64])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 4])
    return make_model(nodes, [ids, mask], [y], [table, axes])


def test_random_integer_inputs_stay_inside_the_table():
    model = embedding_model(rows=30)
    assert index_ranges(model) == {"ids": 30}
    feeds = random_inputs(resolve_inputs(model), seed=0, ranges=index_ranges(model))
    assert feeds["ids"].max() < 30 and feeds["ids"].min() >= 0 and len(np.unique(feeds["ids"])) > 5
    # ones, then padding: the last quarter of the sequence masked out, so that masking is verified too
    assert (feeds["attention_mask"][:, :48] == 1).all() and (feeds["attention_mask"][:, 48:] == 0).all()


def test_random_inputs_are_seeded():
    specs = resolve_inputs(conv_net(batch=1))
    a, b, c = random_inputs(specs, 0), random_inputs(specs, 0), random_inputs(specs, 1)
    np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], c["x"])
