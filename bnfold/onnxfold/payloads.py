"""What a tensor's payload must be before anything reads it (README, "Security").

A model file comes from anywhere, so its tensors are checked, once, when it is loaded:
- external data names a regular file inside the model's folder: a relative location that
  stays inside after `..` and symlinks are resolved (an absolute location, `../`, or a link
  to a file elsewhere would let a model copy any file on the machine into its output);
- offset and length are non-negative integers, and the bytes they name lie within the file;
- the payload has exactly the bytes (or values) its dims and dtype say: a mismatch or an
  absurd element count is refused, not read.
onnx's loader refuses such locations too, but bnfold reads payloads itself (lazily, to stream
large models), so the rule is kept here, in one place.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..errors import BadInput

T = onnx.TensorProto
# Bytes per element of raw_data, for the types whose size is whole bytes.
_ITEMSIZE = {T.FLOAT: 4, T.UINT8: 1, T.INT8: 1, T.UINT16: 2, T.INT16: 2, T.INT32: 4, T.INT64: 8, T.BOOL: 1,
             T.FLOAT16: 2, T.DOUBLE: 8, T.UINT32: 4, T.UINT64: 8, T.COMPLEX64: 8, T.COMPLEX128: 16,
             T.BFLOAT16: 2, T.FLOAT8E4M3FN: 1, T.FLOAT8E4M3FNUZ: 1, T.FLOAT8E5M2: 1, T.FLOAT8E5M2FNUZ: 1}
# Packed types: bits per element (onnx packs them into whole bytes, rounding the total up).
_PACKED_BITS = {getattr(T, name): bits for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4),
                                                          ("INT2", 2), ("UINT2", 2), ("FLOAT6E2M3", 6),
                                                          ("FLOAT6E3M2", 6)) if hasattr(T, name)}
if hasattr(T, "FLOAT8E8M0"):
    _ITEMSIZE[T.FLOAT8E8M0] = 1
# Typed fields: which one holds which data type, and how many entries an element takes.
_TYPED = {"float_data": {T.FLOAT: 1, T.COMPLEX64: 2}, "double_data": {T.DOUBLE: 1, T.COMPLEX128: 2},
          "int64_data": {T.INT64: 1}, "uint64_data": {T.UINT32: 1, T.UINT64: 1}, "string_data": {T.STRING: 1}}
_TYPED_OTHER = {t for per in _TYPED.values() for t in per}  # every other type lives in int32_data


@dataclass(frozen=True)
class ExternalRef:
    file: Path  # resolved, inside the model's folder
    offset: int
    length: int


def check_tensor(tensor: onnx.TensorProto, root: Path, model_path: Path | str | None) -> ExternalRef | None:
    """Raise BadInput naming the tensor if its payload is not what it claims; returns where an
    external payload lives."""
    if tensor.data_type not in _ITEMSIZE and tensor.data_type not in _PACKED_BITS and tensor.data_type != T.STRING:
        raise _bad(tensor, f"has a data type bnfold does not read ({tensor.data_type})", model_path)
    count = element_count(tensor, model_path)
    if tensor.data_type == T.STRING and (tensor.HasField("raw_data") or len(tensor.external_data)):
        raise _bad(tensor, "is a string tensor with a binary payload (strings live in string_data)", model_path)
    expected = _expected_bytes(tensor.data_type, count)
    if tensor.data_location == T.EXTERNAL or len(tensor.external_data):
        ref = external_ref(tensor, root, model_path)
        if expected is not None and ref.length != expected:
            raise _bad(tensor, f"external data holds {ref.length} bytes, its dims and dtype need {expected}",
                       model_path)
        return ref
    if tensor.HasField("raw_data"):
        if expected is not None and len(tensor.raw_data) != expected:
            raise _bad(tensor, f"raw_data holds {len(tensor.raw_data)} bytes, its dims and dtype need {expected}",
                       model_path)
        return None
    _check_typed_fields(tensor, count, model_path)
    return None


def element_count(tensor: onnx.TensorProto, model_path) -> int:
    if any(d < 0 for d in tensor.dims):
        raise _bad(tensor, f"has negative dims {list(tensor.dims)}", model_path)
    return math.prod(tensor.dims)


def _expected_bytes(data_type: int, count: int) -> int | None:
    if data_type in _ITEMSIZE:
        return count * _ITEMSIZE[data_type]
    if data_type in _PACKED_BITS:
        return (count * _PACKED_BITS[data_type] + 7) // 8
    return None  # strings: one entry per element, checked in string_data


def _check_typed_fields(tensor: onnx.TensorProto, count: int, model_path) -> None:
    for field, per_type in _TYPED.items():
        values = getattr(tensor, field)
        if len(values) and tensor.data_type in per_type and len(values) != count * per_type[tensor.data_type]:
            raise _bad(tensor, f"{field} holds {len(values)} values, its dims need {count * per_type[tensor.data_type]}",
                       model_path)
    if len(tensor.int32_data) and tensor.data_type not in _TYPED_OTHER:
        bits = _PACKED_BITS.get(tensor.data_type)
        want = (count * bits + 7) // 8 if bits else count  # packed types: one byte per int32 entry
        if len(tensor.int32_data) != want:
            raise _bad(tensor, f"int32_data holds {len(tensor.int32_data)} values, its dims need {want}", model_path)


def external_ref(tensor: onnx.TensorProto, root: Path, model_path) -> ExternalRef:
    """The checked file, offset and length of an external payload."""
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    if not location:
        raise _bad(tensor, "uses external data but names no location", model_path)
    if os.path.isabs(location) or Path(location).drive or location.startswith(("/", "\\")):
        raise _bad(tensor, f"external data location {location!r} is absolute; only files inside the model's "
                           "folder are read", model_path)
    target = (root / location).resolve()
    if target != root and root not in target.parents:
        raise _bad(tensor, f"external data location {location!r} leads outside the model's folder; refused",
                   model_path)
    if not target.exists():
        raise _bad(tensor, f"external data file {location!r} is missing", model_path)
    if not target.is_file():
        raise _bad(tensor, f"external data location {location!r} is not a regular file", model_path)
    size = target.stat().st_size
    offset = _non_negative(tensor, entries, "offset", 0, model_path)
    length = _non_negative(tensor, entries, "length", None, model_path)
    if offset > size:
        raise _bad(tensor, f"external data offset {offset} is past the end of {location!r} ({size} bytes)",
                   model_path)
    length = size - offset if length is None else length
    if offset + length > size:
        raise _bad(tensor, f"external data {location!r} is truncated: bytes {offset}…{offset + length} of a "
                           f"{size}-byte file", model_path)
    return ExternalRef(target, offset, length)


def _non_negative(tensor, entries: dict, key: str, default, model_path) -> int | None:
    if key not in entries:
        return default
    text = entries[key].strip()
    if not text.isdigit():  # no sign, no spaces inside, no decimals
        raise _bad(tensor, f"external data {key} {entries[key]!r} is not a non-negative integer", model_path)
    return int(text)


def check_text(message, model_path, depth: int = 0) -> None:
    """Every string field of the model must be UTF-8: protobuf hands undecodable text back as
    bytes, which no name lookup, report or runtime expects. Tensor payloads are not walked."""
    if depth > 64:
        raise BadInput("the model nests subgraphs more than 64 deep", model_path)
    for descriptor, value in _fields(message):
        values = value if descriptor.is_repeated else (value,)
        if descriptor.type == descriptor.TYPE_STRING:
            bad = next((v for v in values if isinstance(v, bytes)), None)
            if bad is not None:
                raise BadInput(f"{descriptor.containing_type.name}.{descriptor.name} {bad[:40]!r} is not UTF-8 "
                               "text", model_path)
        elif descriptor.type == descriptor.TYPE_MESSAGE:
            for item in values:
                check_text(item, model_path, depth + 1)


def _fields(message):
    if isinstance(message, onnx.TensorProto):  # ListFields would copy the payload
        return [(message.DESCRIPTOR.fields_by_name[f], getattr(message, f)) for f in ("name", "doc_string",
                                                                                     "external_data")]
    return message.ListFields()


def _bad(tensor: onnx.TensorProto, problem: str, model_path) -> BadInput:
    return BadInput(f"tensor {tensor.name!r}: {problem}", model_path)
