"""What a node is: a standard-domain op of a given type, and its attributes read with a type check."""
from __future__ import annotations

import math

import onnx
from onnx import helper

from ..errors import Skip

LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def is_standard(node: onnx.NodeProto, *op_types: str) -> bool:
    return node.op_type in op_types and node.domain in ("", "ai.onnx")


def node_name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def node_attr(node: onnx.NodeProto, name: str, default):
    """An attribute's value, or `default`; Skip if it is not of the default's kind (a float
    where a float is meant, an int, a list, a string), as in a malformed model."""
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            if not _same_kind(value, default):
                raise Skip(f"attribute {name}={value!r} of {node.op_type} {node.name!r} is not of the expected type")
            return value
    return default


def _same_kind(value, default) -> bool:
    if default is None:
        return value is not None
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value)
    return isinstance(value, type(default))


def set_attr(node: onnx.NodeProto, key: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == key:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(key, value))
