"""Loading and saving: lazy payloads round-trip byte-exactly, writes are atomic."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.onnxfold.io import load_onnx, save_onnx, tensor_to_array
from onnx_builders import make_model, vi


def _model(n_layers=3, channels=16):
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(n_layers):
        inits.append(numpy_helper.from_array(rng.normal(size=(channels, channels, 3, 3)).astype(np.float32), f"W{i}"))
        inits.append(numpy_helper.from_array(np.arange(channels, dtype=np.float32), f"b{i}"))  # < 1 KB: inline
        nodes.append(helper.make_node("Conv", [x, f"W{i}", f"b{i}"], [f"y{i}"], pads=[1, 1, 1, 1]))
        x = f"y{i}"
    inits.append(numpy_helper.from_array(rng.normal(size=(64, 8)).astype(np.float16), "unused_fp16"))
    return make_model(nodes, [vi("x", [1, channels, 4, 4])], [vi(x, None)], inits)


def _arrays(model, base_dir="."):
    return {t.name: tensor_to_array(t, base_dir) for t in model.graph.initializer}


@pytest.mark.parametrize("stored", ["inline", "external"])
@pytest.mark.parametrize("written", ["inline", "external"])
def test_lazy_load_and_streaming_save_round_trip(tmp_path, stored, written):
    model = _model()
    reference = _arrays(model)
    src = tmp_path / "src.onnx"
    onnx.save(model, str(src), save_as_external_data=stored == "external", location="src.bin")
    source = load_onnx(src)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in source.model.graph.initializer
               if t.name.startswith("W")), "large payloads stay in their file"
    assert source.has_external_data == (stored == "external")
    dst = tmp_path / "out" / "dst.onnx"
    dst.parent.mkdir()
    save_onnx(source.model, dst, base_dir=source.base_dir, external=written == "external")
    assert sorted(p.name for p in dst.parent.iterdir()) == (
        ["dst.onnx", "dst.onnx.data"] if written == "external" else ["dst.onnx"])
    back = onnx.load(str(dst))
    got = _arrays(back)
    assert got.keys() == reference.keys()
    for name, array in reference.items():
        assert got[name].dtype == array.dtype
        np.testing.assert_array_equal(got[name], array)
    stripped = lambda m: [n.SerializeToString() for n in m.graph.node]  # noqa: E731
    assert stripped(back) == stripped(model)


def test_failed_check_leaves_nothing_behind(tmp_path):
    model = _model()
    model.graph.node[0].input[1] = "no_such_tensor"
    dst = tmp_path / "bad.onnx"
    with pytest.raises(onnx.checker.ValidationError):
        save_onnx(model, dst)
    assert list(tmp_path.iterdir()) == []


def test_overwriting_an_existing_output_is_atomic(tmp_path):
    dst = tmp_path / "m.onnx"
    dst.write_bytes(b"old")
    save_onnx(_model(), dst)
    assert onnx.load(str(dst)).graph.node[0].op_type == "Conv"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "loaded"])
@pytest.mark.parametrize("external", [True, False], ids=["external", "inline"])
def test_save_leaves_the_callers_model_alone(tmp_path, lazy, external):
    src = tmp_path / "src.onnx"
    onnx.save(_model(), str(src))
    model = load_onnx(src, lazy=lazy).model
    before = model.SerializeToString()
    save_onnx(model, tmp_path / "a.onnx", base_dir=tmp_path,
              external=external)
    assert model.SerializeToString() == before
    np.testing.assert_array_equal(_arrays(onnx.load(str(tmp_path / "a.onnx")))["W1"], _arrays(_model())["W1"])
