"""The wire-format walker on its own: field orders protobuf allows, fields it does not know,
lengths past 2 GB, and malformed input. The reference is onnx's own parser."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.onnxfold import wire
from bnfold.onnxfold.io import tensor_to_array

THRESHOLD = 64


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    key = wire.encode_varint(number << 3 | wire_type)
    if wire_type == wire.LEN:
        return key + wire.encode_varint(len(payload)) + payload
    return key + payload


def _tensor_fields(name: str, array: np.ndarray) -> list[bytes]:
    """A TensorProto's fields, serialized one by one (so the test can reorder them)."""
    t = numpy_helper.from_array(array, name)
    return [_field(9, wire.LEN, t.raw_data), _field(8, wire.LEN, name.encode()),
            b"".join(_field(1, 0, wire.encode_varint(d)) for d in t.dims), _field(2, 0, wire.encode_varint(t.data_type))]


def _model_bytes(tensors: list[bytes], extra_graph: bytes = b"", extra_top: bytes = b"", graph_first=False) -> bytes:
    graph = onnx.GraphProto(name="g")
    graph.output.append(helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, None))
    graph_bytes = b"".join(_field(5, wire.LEN, t) for t in tensors) + graph.SerializeToString() + extra_graph
    top = helper.make_model(onnx.GraphProto(), opset_imports=[helper.make_opsetid("", 17)])
    top.ClearField("graph")
    fields = [_field(7, wire.LEN, graph_bytes), top.SerializeToString() + extra_top]
    return b"".join(fields if graph_first else fields[::-1])


@pytest.mark.parametrize("order", ["raw_data_first", "dims_first"])
@pytest.mark.parametrize("graph_first", [True, False], ids=["graph_before_ir_version", "graph_last"])
def test_field_orders_parse_like_onnx(tmp_path, order, graph_first):
    rng = np.random.default_rng(0)
    big, small = rng.normal(size=(8, 8)).astype(np.float32), np.arange(3, dtype=np.float32)
    tensors = []
    for name, array in (("w", big), ("b", small)):
        fields = _tensor_fields(name, array)
        tensors.append(b"".join(fields if order == "raw_data_first" else fields[::-1]))
    path = tmp_path / "m.onnx"
    path.write_bytes(_model_bytes(tensors, graph_first=graph_first))
    reference = onnx.load(str(path))  # onnx's parser is the judge
    lazy = wire.load_lazy(path, THRESHOLD)
    by_name = {t.name: t for t in lazy.graph.initializer}
    assert by_name["w"].data_location == onnx.TensorProto.EXTERNAL  # 256 bytes ≥ threshold: left in the file
    assert not by_name["b"].external_data  # 12 bytes: inline
    for t in reference.graph.initializer:
        np.testing.assert_array_equal(tensor_to_array(by_name[t.name], tmp_path), numpy_helper.to_array(t))
    assert lazy.opset_import[0].version == reference.opset_import[0].version


def test_unknown_fields_are_kept(tmp_path):
    unknown = _field(999, 0, wire.encode_varint(7)) + _field(998, wire.LEN, b"future")
    tensor = b"".join(_tensor_fields("w", np.ones((4, 32), np.float32))) + unknown
    path = tmp_path / "m.onnx"
    path.write_bytes(_model_bytes([tensor], extra_graph=unknown, extra_top=unknown))
    lazy = wire.load_lazy(path, THRESHOLD)
    np.testing.assert_array_equal(tensor_to_array(lazy.graph.initializer[0], tmp_path), np.ones((4, 32), np.float32))
    # Re-serialized, the unknown fields are still there: a newer onnx's fields survive a fuse.
    assert lazy.SerializeToString().count(b"future") == 3


@pytest.mark.parametrize("value", [0, 1, 127, 128, 2**31 - 1, 2**31, 2**32 + 3, 2**63 - 1])
def test_varint_round_trip(value):
    encoded = wire.encode_varint(value)
    assert wire._varint(encoded, 0) == (value, len(encoded))


class CountingSink:
    """Stands in for a file: counts bytes, keeps only the first few KB."""

    def __init__(self):
        self.head, self.size = bytearray(), 0

    def write(self, data) -> int:
        if len(self.head) < 1 << 16:
            self.head += bytes(data)[: (1 << 16) - len(self.head)]
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


def _find_field(head: bytes, pos: int, wanted: int) -> tuple[int, int]:
    """(declared length, value start) of field `wanted`, walking the fields before it."""
    while True:
        key, pos = wire._varint(head, pos)
        number, wire_type = key >> 3, key & 7
        value, after = wire._varint(head, pos)
        if number == wanted:
            return value, after
        pos = after + value if wire_type == wire.LEN else after


@pytest.mark.parametrize("size", [2**31 - 1, 2**31, 2**32 + 3], ids=["just_below_2GB", "2GB", "over_4GB"])
def test_write_inline_lengths_past_2gb(size):
    """A payload at the 2 GB boundary needs 5-byte varint lengths all the way up (tensor, graph);
    the declared lengths must equal what is written, or every reader is lost."""
    tensor = onnx.TensorProto(name="w", dims=[size // 4], data_type=onnx.TensorProto.FLOAT)
    wire.point_to_external(tensor, "elsewhere.bin", 0, size)
    shell = helper.make_model(helper.make_graph([], "g", [], [helper.make_tensor_value_info("w", 1, None)]))
    sink = CountingSink()
    streamed = wire.write_inline(shell, [tensor], sink, lambda t: size, lambda t, out: setattr(out, "size",
                                                                                                out.size + size))
    [(index, offset, length)] = streamed
    assert index == 0 and length == size and sink.size == offset + size
    head = bytes(sink.head)
    graph_len, start = _find_field(head, 0, wire.MODEL_GRAPH)
    assert start + graph_len == sink.size  # the graph ends exactly where the file does
    tensor_len, tensor_start = _find_field(head, start, wire.GRAPH_INITIALIZER)
    assert tensor_start + tensor_len == sink.size
    raw_len, raw_start = _find_field(head, tensor_start, wire.TENSOR_RAW_DATA)
    assert raw_len == size and raw_start == offset


@pytest.mark.parametrize("blob", [b"\x3a\xff\xff\xff\xff\x0f", b"\x3a\x05ab", b"\x0f\x01", b"\x80" * 11],
                         ids=["length_past_end", "truncated", "wire_type_7", "endless_varint"])
def test_malformed_input_is_value_error(tmp_path, blob):
    path = tmp_path / "m.onnx"
    path.write_bytes(blob)
    with pytest.raises((ValueError, IndexError)):
        wire.load_lazy(path, THRESHOLD)
