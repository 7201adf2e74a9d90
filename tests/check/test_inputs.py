"""Seeded inputs that match the graph; shapes and data files checked against it."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from bnfold.errors import BadInput, UsageError
from bnfold.check.inputs import load_inputs, make_inputs, parse_shapes
from onnx_builders import init, make_model


def _model():
    ins = [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, "H", "W"]),
           helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 7]),
           helper.make_tensor_value_info("mask", TensorProto.BOOL, [4]),
           helper.make_tensor_value_info("half", TensorProto.FLOAT16, [2, "T"])]
    outs = [helper.make_tensor_value_info(n, t, None) for n, t in (("o1", TensorProto.FLOAT), ("o2", TensorProto.INT64),
                                                                  ("o3", TensorProto.BOOL), ("o4", TensorProto.FLOAT16))]
    nodes = [helper.make_node("Identity", [i.name], [o.name]) for i, o in zip(ins, outs)]
    return make_model(nodes, ins, outs, [init("w", np.zeros(3, np.float32))])


def test_defaults_fill_dynamic_dims_and_match_dtypes():
    feeds = make_inputs(_model(), seed=1)
    assert set(feeds) == {"img", "ids", "mask", "half"}  # the initializer is not an input
    assert feeds["img"].shape == (2, 3, 32, 32) and feeds["img"].dtype == np.float32
    assert feeds["ids"].shape == (2, 7) and feeds["ids"].dtype == np.int64
    assert feeds["ids"].min() >= 0 and feeds["ids"].max() < 4
    assert feeds["mask"].dtype == np.bool_ and feeds["half"].shape == (2, 1) and feeds["half"].dtype == np.float16


def test_seed_batch_and_shape_overrides():
    a, b = make_inputs(_model(), seed=5), make_inputs(_model(), seed=5)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["img"], make_inputs(_model(), seed=6)["img"])
    feeds = make_inputs(_model(), batch_size=5, shapes={"img": [1, 3, 8, 16]})
    assert feeds["img"].shape == (1, 3, 8, 16) and feeds["ids"].shape == (5, 7)


@pytest.mark.parametrize("shapes,match", [({"nosuch": [1]}, "unknown input"), ({"img": [1, 4, 8, 8]}, "does not match"),
                                          ({"img": [1, 3, 8]}, "does not match")])
def test_bad_shapes_are_usage_errors(shapes, match):
    with pytest.raises(UsageError, match=match):
        make_inputs(_model(), shapes=shapes)


@pytest.mark.parametrize("spec", ["img", "=1,2", "img=1,a", "img=0,3"])
def test_parse_shapes_rejects_malformed(spec):
    with pytest.raises(UsageError):
        parse_shapes([spec])


def test_parse_shapes():
    assert parse_shapes(["img=1,3,224,224", "ids=2x7"]) == {"img": [1, 3, 224, 224], "ids": [2, 7]}


def test_load_inputs_checks_names_dtypes_and_shapes(tmp_path):
    model = _model()
    good = make_inputs(model)
    np.savez(tmp_path / "good.npz", **good)
    loaded = load_inputs(tmp_path / "good.npz", model)
    assert all(np.array_equal(loaded[k], good[k]) for k in good)
    bad_shape = dict(good, ids=np.zeros((2, 6), np.int64))
    np.savez(tmp_path / "shape.npz", **bad_shape)
    with pytest.raises(BadInput, match="'ids' has shape"):
        load_inputs(tmp_path / "shape.npz", model)
    np.save(tmp_path / "one.npy", good["img"])
    with pytest.raises(BadInput, match="use .npz"):
        load_inputs(tmp_path / "one.npy", model)
