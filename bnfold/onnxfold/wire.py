"""Read and write ONNX files without holding their weights in memory.

`onnx.load` holds the file's bytes and the parsed model at once (2× the model) and
`onnx.save` serializes a full copy. For a model of several GB that is the difference between
fusing on a laptop and not. Here the protobuf wire format is walked directly: every large
`raw_data` payload of the main graph's initializers is left in the file and the tensor is
parsed as if it used external data pointing back into the .onnx file itself. Writing streams
each payload from wherever it lives, one tensor at a time.

Why not onnx's own helpers or onnx-ir: `onnx.load(..., load_external_data=False)` still parses
every inline payload into memory (protobuf has no lazy bytes), and `external_data_helper`
only moves payloads that are already in memory, or reads ones already external. onnx-ir loads
through the same protobuf parse (it memory-maps only payloads that were external in the file)
and saves inline models by serializing one proto in memory. None of them turns the inline
payloads of a single-file model into references that stay on disk, which is all this module
does; everything else (external data, shape inference, checking) is left to onnx.

Wire format: a field is a varint key (field_number << 3 | wire_type) followed by a varint
(type 0), 8 bytes (1), a varint length and that many bytes (2), or 4 bytes (5).
ModelProto.graph is field 7, GraphProto.initializer field 5, TensorProto.raw_data field 9.
"""
from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import onnx

MODEL_GRAPH, GRAPH_INITIALIZER, TENSOR_RAW_DATA = 7, 5, 9
LEN = 2


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return encode_varint(field << 3 | wire_type)


def fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, value end) for each field in [start, end)."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, value_end = _varint(buf, pos)
            value_start = pos
        elif wire_type == 1:
            value_start, value_end = pos, pos + 8
        elif wire_type == LEN:
            length, value_start = _varint(buf, pos)
            value_end = value_start + length
        elif wire_type == 5:
            value_start, value_end = pos, pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        if value_end > end or number == 0:
            raise ValueError("truncated or malformed protobuf")
        yield number, wire_type, field_start, value_start, value_end
        pos = value_end


def load_lazy(path: Path, threshold: int) -> onnx.ModelProto:
    """Parse `path`, leaving main-graph initializer payloads ≥ threshold bytes in the file.

    Those tensors come back as external-data references to `path.name` at the payload's
    offset, so every external-data reader and writer handles them unchanged.
    """
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        top, graph, tensors = bytearray(), bytearray(), []
        for number, wire_type, fs, vs, ve in fields(buf, 0, len(buf)):
            if number == MODEL_GRAPH and wire_type == LEN:
                for g_number, g_type, gfs, gvs, gve in fields(buf, vs, ve):
                    if g_number == GRAPH_INITIALIZER and g_type == LEN:
                        tensors.append(_lazy_tensor(buf, gvs, gve, path.name, threshold))
                    else:
                        graph += buf[gfs:gve]
            else:
                top += buf[fs:ve]
    model = onnx.ModelProto.FromString(bytes(top))
    model.graph.MergeFromString(bytes(graph))
    model.graph.initializer.extend(tensors)
    return model


def _lazy_tensor(buf, start: int, end: int, location: str, threshold: int) -> onnx.TensorProto:
    header, raw = bytearray(), None
    for number, wire_type, fs, vs, ve in fields(buf, start, end):
        if number == TENSOR_RAW_DATA and wire_type == LEN:
            raw = (vs, ve)
        else:
            header += buf[fs:ve]
    tensor = onnx.TensorProto.FromString(bytes(header))
    if raw is not None:
        vs, ve = raw
        if ve - vs >= threshold:
            point_to_external(tensor, location, vs, ve - vs)
        else:
            tensor.raw_data = bytes(buf[vs:ve])
    return tensor


def point_to_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make `tensor` refer to `length` bytes at `offset` of `location`, dropping inline data.

    external_data_helper.set_external_data insists on raw_data being present; ours may
    already live in another file, so the entries are written directly.
    """
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def shell_without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` without the main graph's initializers, made field by field so that
    their payloads are never copied (CopyFrom would copy every byte of them first)."""
    shell = onnx.ModelProto()
    _copy_top_fields(model, shell)
    shell.graph.SetInParent()
    for descriptor, value in model.graph.ListFields():
        if descriptor.name != "initializer":
            _copy_field(shell.graph, descriptor, value)
    return shell


def _copy_field(target, descriptor, value) -> None:
    if hasattr(value, "extend"):  # a repeated field
        getattr(target, descriptor.name).extend(value)
    elif descriptor.message_type is not None:
        getattr(target, descriptor.name).CopyFrom(value)
    else:
        setattr(target, descriptor.name, value)


def write_inline(shell: onnx.ModelProto, initializers, out: BinaryIO, external_size,
                 copy_payload) -> list[tuple[int, int, int]]:
    """Serialize `shell` with `initializers` as its main graph's initializers, all inline,
    streaming the payloads of those that use external data.

    `external_size(tensor)` gives a payload's length without reading it; `copy_payload(tensor,
    out)` writes it. Returns (initializer index, offset, length) of each streamed payload.
    """
    graph_bytes = shell.graph.SerializeToString()
    top = onnx.ModelProto()
    _copy_top_fields(shell, top)
    entries = []
    for tensor in initializers:
        if onnx.external_data_helper.uses_external_data(tensor):
            head = onnx.TensorProto()
            head.CopyFrom(tensor)
            del head.external_data[:]
            head.ClearField("data_location")
            head_bytes, size = head.SerializeToString(), external_size(tensor)
            payload_head = _key(TENSOR_RAW_DATA, LEN) + encode_varint(size)
            entries.append((tensor, head_bytes + payload_head, size))
        else:
            entries.append((None, tensor.SerializeToString(), 0))
    graph_len = len(graph_bytes) + sum(
        len(_key(GRAPH_INITIALIZER, LEN)) + len(encode_varint(len(h) + n)) + len(h) + n for _, h, n in entries)
    out.write(top.SerializeToString())
    out.write(_key(MODEL_GRAPH, LEN) + encode_varint(graph_len))
    out.write(graph_bytes)
    streamed = []
    for i, (tensor, head, size) in enumerate(entries):
        out.write(_key(GRAPH_INITIALIZER, LEN) + encode_varint(len(head) + size))
        out.write(head)
        if tensor is not None:
            streamed.append((i, out.tell(), size))
            copy_payload(tensor, out)
    return streamed


def _copy_top_fields(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    for descriptor, value in source.ListFields():
        if descriptor.name != "graph":
            _copy_field(target, descriptor, value)
