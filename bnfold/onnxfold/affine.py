"""Nodes that compute a per-channel affine map s·x + t, and what that map is.

BatchNormalization in inference mode is the main one; it maps axis 1. A Mul or Add by a
constant that varies along one axis only is another (exporters split BN into the two): it maps
whichever axis the layer before it puts its channels on, and folds with the same rules.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import Skip
from ..fold_math import Affine, BrokenStatistics, bn_affine
from .index import ModelIndex, NotConstant, Scope
from .nodes import is_standard, node_attr, node_name
from .qdq import constant_or_dequantized

BN = "BatchNormalization"
ELEMENTWISE = ("Mul", "Add")

__all__ = ["BN", "ELEMENTWISE", "AffineOp", "ChannelAxis", "bn_op", "elementwise_affine", "is_standard", "node_attr",
           "split_constant_operand"]


@dataclass(frozen=True)
class ChannelAxis:
    """Where a layer's output channels are in a value: axis `axis` of a rank-`rank` tensor."""

    axis: int
    rank: int


@dataclass
class AffineOp:
    """A node computing s·x + t per channel: a BN (its map is known) or a Mul/Add by a constant
    (its map depends on the axis the layer's channels are on; see elementwise_affine)."""

    node: onnx.NodeProto
    data: str  # the input that carries activations
    affine: Affine | None = None  # BN
    constant: np.ndarray | None = None  # Mul/Add

    @property
    def op(self) -> str:
        return self.node.op_type

    @property
    def name(self) -> str:
        return node_name(self.node)

    @property
    def is_bn(self) -> bool:
        return self.affine is not None


def bn_op(index: ModelIndex, scope: Scope, bn: onnx.NodeProto) -> AffineOp:
    """The BN's own conditions: inference mode, per-channel constant parameters.

    Raises Skip with the reason; for NaN/negative variance the Skip carries a warning too.
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
        try:  # a parameter behind DequantizeLinear: the value the quantized model computes with
            params.append(constant_or_dequantized(index, scope, name))
        except NotConstant as exc:
            raise Skip(f"BN {what} is not constant: {exc}") from None
    if any(p.ndim != 1 for p in params) or len({p.shape for p in params}) != 1:
        raise Skip(f"BN parameters are not per-channel vectors of one length: {[p.shape for p in params]}")
    try:
        affine = bn_affine(*params, float(node_attr(bn, "epsilon", 1e-5)))
    except BrokenStatistics as why:
        raise Skip(f"broken statistics: {why}",
                   warning=f"BatchNormalization {node_name(bn)!r}: {why}; the model is broken there, BN kept") from None
    return AffineOp(bn, bn.input[0], affine=affine)


def split_constant_operand(index: ModelIndex, scope: Scope, node: onnx.NodeProto) -> tuple[str, np.ndarray] | None:
    """(the data operand, the constant one) of a two-input node with exactly one constant operand."""
    if len(node.input) != 2:
        return None
    for data, other in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
        try:
            const = index.constant(scope, other)
        except NotConstant:
            continue
        try:
            index.constant(scope, data)
        except NotConstant:
            return data, const
        return None  # both operands constant
    return None


def elementwise_affine(op: AffineOp, at: ChannelAxis, channels: int | None) -> Affine:
    """The map of Mul(x, c) or Add(x, c) per channel of axis `at.axis`, where c varies along that
    axis only (or is one number); `channels` is that axis's length where known."""
    const = op.constant
    if const.ndim > at.rank:
        raise Skip(f"constant of shape {const.shape} has a higher rank than the layer's rank-{at.rank} output")
    padded = (1,) * (at.rank - const.ndim) + const.shape
    if any(d != 1 for axis, d in enumerate(padded) if axis != at.axis):
        raise Skip(f"constant of shape {const.shape} is not per-channel on axis {at.axis}")
    n = padded[at.axis] if padded[at.axis] != 1 else channels
    if n is None:
        raise Skip("channel count of the output is unknown")
    vector = np.broadcast_to(const.astype(np.float64).reshape(-1), (n,)).copy()
    if not np.isfinite(vector).all():
        raise Skip("constant is not finite")
    if op.op == "Mul":
        return Affine(vector, np.zeros(n))
    return Affine(np.ones(n), vector)
