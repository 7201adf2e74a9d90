"""Nodes that compute a per-channel affine map s·x + t on axis 1, and what that map is.

BatchNormalization in inference mode is the main one. A Mul or Add by a constant that
varies only along the channel axis is another (exporters sometimes split BN into the two);
it folds with the same rules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..errors import Skip
from ..fold_math import Affine, bn_affine
from .index import ModelIndex, NotConstant, Scope

BN = "BatchNormalization"
ELEMENTWISE = ("Mul", "Add")


@dataclass
class AffineOp:
    node: onnx.NodeProto
    affine: Affine
    data: str  # the input that carries activations

    @property
    def op(self) -> str:
        return self.node.op_type

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]


def is_standard(node: onnx.NodeProto, *op_types: str) -> bool:
    return node.op_type in op_types and node.domain in ("", "ai.onnx")


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


def bn_op(index: ModelIndex, scope: Scope, bn: onnx.NodeProto) -> AffineOp:
    """The BN's own conditions: inference mode, per-channel constant parameters.

    Raises Skip with the reason, or fold_math.BrokenStatistics for NaN/negative variance.
    """
    if int(node_attr(bn, "training_mode", 0)):
        raise Skip("training_mode=1: BN normalizes with batch statistics")
    if index.opset < 7 and not int(node_attr(bn, "is_test", 0)):
        raise Skip("is_test=0: BN runs in training mode")
    if not int(node_attr(bn, "spatial", 1)):
        raise Skip("spatial=0: per-activation statistics, only the per-channel form is folded")
    if any(out for out in bn.output[1:]):
        raise Skip("BN's running-statistics outputs are used (training graph)")
    if len(bn.input) < 5:
        raise Skip("BN has fewer than 5 inputs")
    params = []
    for name, what in zip(bn.input[1:5], ("scale", "B", "mean", "var")):
        try:
            params.append(index.constant(scope, name))
        except NotConstant as exc:
            raise Skip(f"BN {what} is not constant: {exc}") from None
    if any(p.ndim != 1 for p in params) or len({p.shape for p in params}) != 1:
        raise Skip(f"BN parameters are not per-channel vectors of one length: {[p.shape for p in params]}")
    affine = bn_affine(*params, float(node_attr(bn, "epsilon", 1e-5)))
    return AffineOp(bn, affine, bn.input[0])


def elementwise_op(index: ModelIndex, scope: Scope, node: onnx.NodeProto) -> AffineOp:
    """Mul(x, c) or Add(x, c) where c is constant and varies only along channel axis 1."""
    if index.opset < 7:
        raise Skip("opset < 7 broadcasting")
    data, const = _split_constant_operand(index, scope, node)
    shape = index.shape(node.output[0])
    if shape is None or len(shape) < 2 or not isinstance(shape[1], int) or shape[1] <= 0:
        raise Skip("channel count of the output is unknown")
    rank, channels = len(shape), shape[1]
    if const.ndim > rank:
        raise Skip("constant has a higher rank than the output")
    padded = (1,) * (rank - const.ndim) + const.shape
    if any(d != 1 for axis, d in enumerate(padded) if axis != 1) or padded[1] not in (1, channels):
        raise Skip(f"constant of shape {const.shape} is not per-channel on axis 1")
    vector = np.broadcast_to(const.astype(np.float64).reshape(-1), (channels,)).copy()
    if node.op_type == "Mul":
        affine = Affine(vector, np.zeros(channels))
    else:
        affine = Affine(np.ones(channels), vector)
    if not (np.isfinite(affine.scale).all() and np.isfinite(affine.shift).all()):
        raise Skip("constant is not finite")
    return AffineOp(node, affine, data)


def _split_constant_operand(index: ModelIndex, scope: Scope, node: onnx.NodeProto) -> tuple[str, np.ndarray]:
    if len(node.input) != 2:
        raise Skip(f"{node.op_type} has {len(node.input)} inputs")
    for data, other in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
        try:
            const = index.constant(scope, other)
        except NotConstant:
            continue
        try:
            index.constant(scope, data)
        except NotConstant:
            return data, const
        raise Skip("both operands are constant")
    raise Skip("no constant operand")
