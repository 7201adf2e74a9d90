"""The vocabulary of the fold rules: where an affine map meets a layer (FoldSite), what a fold
writes (Rewrite), and a rule (FoldRule): data plus one small function.

A rule's `plan` gets a FoldSite, checks what must hold, raising Skip(reason) when it does not,
and returns a Rewrite: the layer's new parameters (NewValue, in float64, with the dtype they are
stored in) and attributes. Writing a Rewrite into the graph is the same for every rule
(fold_pass.apply_rewrite); the rules themselves are listed in one registry (rules.RULES).
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from ..errors import Skip
from ..fold_math import Affine
from .affine import AffineOp, ChannelAxis
from .index import ModelIndex, NotConstant, Scope
from .nodes import node_attr, node_name
from .qdq import constant_or_dequantized


class Shape(enum.Flag):
    """How an affine op meets a layer; a site has one of DIRECT, VIA_ADD, NEXT, and may add the rest."""

    DIRECT = enum.auto()  # layer → op
    VIA_ADD = enum.auto()  # MatMul → Add(constant bias) → op
    NEXT = enum.auto()  # op → layer: the op scales the layer's input channels
    THROUGH = enum.auto()  # … → shape-only ops → op (Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Identity)
    MUL_ADD = enum.auto()  # the op is a Mul or Add by a constant, not a BatchNormalization
    DEQUANTIZED = enum.auto()  # a parameter of the layer is DequantizeLinear(integer constant, scale, zero point)


@dataclass
class FoldSite:
    index: ModelIndex
    scope: Scope
    op: AffineOp  # the BN (or Mul/Add) that goes away
    layer: onnx.NodeProto  # the linear layer its map goes into
    shape: Shape
    affine: Affine | None = None  # per channel of the layer: output channels, or input channels for NEXT
    add: onnx.NodeProto | None = None  # MatMul → Add(bias) → …
    chain: list[onnx.NodeProto] = field(default_factory=list)  # shape-only ops, layer side first
    at: ChannelAxis | None = None  # where the layer's output channels are (not for NEXT)
    rule: "FoldRule | None" = None  # the registry's row for this site
    layer_rule: "FoldRule | None" = None  # the row for this layer were its parameters plain constants

    @property
    def channels(self) -> int:
        return self.affine.scale.shape[0]

    def lookup(self, name: str) -> np.ndarray:
        """The value of a constant parameter; NotConstant(reason) if it has none before run time.
        At a DEQUANTIZED site a parameter behind DequantizeLinear reads as its dequantized value."""
        if Shape.DEQUANTIZED in self.shape:
            return constant_or_dequantized(self.index, self.scope, name)
        return self.index.constant(self.scope, name)

    def const(self, name: str, what: str) -> np.ndarray:
        try:
            return self.lookup(name)
        except NotConstant as exc:
            raise Skip(f"{what} of {self.layer.op_type} is not constant: {exc}") from None

    def optional_const(self, node: onnx.NodeProto, i: int, what: str) -> np.ndarray | None:
        if len(node.input) > i and node.input[i]:
            return self.const(node.input[i], what)
        return None

    def attr(self, name: str, default: Any, node: onnx.NodeProto | None = None) -> Any:
        return node_attr(node or self.layer, name, default)

    def require_channels(self, n: int, what: str) -> None:
        if n != self.channels:
            raise Skip(f"BN has {self.channels} channels but {what} has {n}")

    @property
    def layer_name(self) -> str:
        return node_name(self.layer)


@dataclass
class Scaling:
    """new = factor ⊙ old (+ a shift, for a bias) along `axis`; with groups > 1 the factor is
    indexed per group as fold_math.scale_weight does (ConvTranspose, next Conv)."""

    axis: int
    factor: np.ndarray
    groups: int = 1


@dataclass
class NewValue:
    """Input `input` of `node` (the layer where None) after the fold: `value` in float64, stored
    as `dtype`. `scaling` says how it relates to the old value where it is a per-channel
    rescaling: all a parameter behind DequantizeLinear can take exactly."""

    input: int
    value: np.ndarray
    dtype: np.dtype
    what: str  # "weight", "bias", "scale", …: for messages and new initializers' names
    node: onnx.NodeProto | None = None
    scaling: Scaling | None = None


@dataclass
class Rewrite:
    """What a fold writes. The layer's (or its bias Add's) inputs, attributes, and where the layer
    has no bias input (MatMul) and the shift is not zero, a new Add after it."""

    values: list[NewValue]
    attributes: list[tuple[onnx.NodeProto | None, str, Any]] = field(default_factory=list)  # None: the layer
    bias_add: NewValue | None = None
    add_attributes: dict[str, Any] = field(default_factory=dict)  # on the bias Add (opset < 7 broadcasting)


@dataclass(frozen=True)
class FoldRule:
    """One row of the registry: the pattern shown in the report, the layers it rewrites, the
    shapes it takes, its `plan` (check and rewrite), and where the layer's output channels are
    (for DIRECT, VIA_ADD and THROUGH)."""

    pattern: str
    layers: tuple[str, ...]
    takes: Shape
    plan: Callable[[FoldSite], Rewrite]
    channel_axis: Callable[[FoldSite], ChannelAxis] | None = None

    def matches(self, op_type: str, shape: Shape) -> bool:
        return op_type in self.layers and shape in self.takes
