"""Fold a BN that sits behind shape-only ops: layer → Reshape/Flatten/Squeeze/Unsqueeze/Transpose → BN.

timm's LeViT (`LinearNorm`) computes `bn(linear(x).flatten(0, 1)).reshape_as(x)`: MatMul →
Flatten(axis=2) → BatchNormalization → Reshape. Shape-only ops move elements without
changing them. If the chain carries the layer's output-channel axis whole and in order onto
BN's channel axis 1, channel c of BN's input holds exactly the elements of channel c of the
layer's output z, so with BN(v) = s·v + t per channel

    BN(chain(z)) = chain(s ⊙ z + t) = chain(z')      with z' the layer with W' = s·W, b' = s·b + t

(⊙ along the layer's channel axis). Each op below maps the channel axis forward or raises
Skip: it is proved from static shapes where an op needs them (Reshape, Flatten, Squeeze
without axes) and from the op's attributes otherwise (Transpose, Unsqueeze, Squeeze).
The layer's own rule folds it as it would directly (the rules never look at BN's axis); the
shift goes after the layer: into its bias (Conv, ConvTranspose, Gemm), the constant of an
existing MatMul → Add(bias), or a new Add after a MatMul. This module maps the axis.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import Skip
from .affine import ChannelAxis
from .index import ModelIndex, NotConstant, Scope
from .nodes import is_standard, node_attr

MAX_CHAIN = 8


@dataclass
class ThroughStep:
    index: ModelIndex
    scope: Scope
    node: onnx.NodeProto
    channels: int  # BN's; the layer must have as many (its rule checks)

    def input_shape(self) -> list[int | str | None] | None:
        return self.index.shape(self.node.input[0])

    def constant_ints(self, i: int, attr: str) -> list[int] | None:
        """Axes or a shape, from input i (newer opsets) or the attribute (older ones)."""
        if len(self.node.input) > i and self.node.input[i]:
            try:
                return [int(v) for v in self.index.constant(self.scope, self.node.input[i]).reshape(-1)]
            except NotConstant as exc:
                raise Skip(f"{self.node.op_type} {attr} are computed at run time: {exc}") from None
        value = node_attr(self.node, attr, None)
        return None if value is None else [int(v) for v in value]


def through_identity(step: ThroughStep, at: ChannelAxis) -> ChannelAxis:
    return at


def through_transpose(step: ThroughStep, at: ChannelAxis) -> ChannelAxis:
    perm = node_attr(step.node, "perm", None)
    perm = list(range(at.rank))[::-1] if perm is None else [int(p) for p in perm]
    if len(perm) != at.rank:
        raise Skip(f"Transpose perm {perm} does not match rank {at.rank}")
    return ChannelAxis(perm.index(at.axis), at.rank)


def through_flatten(step: ThroughStep, at: ChannelAxis) -> ChannelAxis:
    """Flatten(axis=k) gives [∏ d<k, ∏ d≥k]: the channel axis stays whole only if every other
    axis of its half has size 1."""
    k = int(node_attr(step.node, "axis", 1))
    k = k + at.rank if k < 0 else k
    half = range(0, k) if at.axis < k else range(k, at.rank)
    shape = step.input_shape()
    others = [a for a in half if a != at.axis]
    if others and (shape is None or any(shape[a] != 1 for a in others)):
        raise Skip(f"Flatten(axis={k}) merges the channel axis {at.axis} with axes {others} "
                   f"of shape {_shape_text(shape, others)}")
    return ChannelAxis(0 if at.axis < k else 1, 2)


def through_squeeze(step: ThroughStep, at: ChannelAxis) -> ChannelAxis:
    axes = step.constant_ints(1, "axes")
    if axes is None:  # every axis of size 1
        shape = step.input_shape()
        if shape is None or any(not isinstance(d, int) for d in shape):
            raise Skip("Squeeze without axes on a tensor whose shape is not static")
        axes = [a for a, d in enumerate(shape) if d == 1]
    axes = sorted({a + at.rank if a < 0 else a for a in axes})
    if at.axis in axes:
        raise Skip("Squeeze removes the channel axis")
    return ChannelAxis(at.axis - sum(a < at.axis for a in axes), at.rank - len(axes))


def through_unsqueeze(step: ThroughStep, at: ChannelAxis) -> ChannelAxis:
    axes = step.constant_ints(1, "axes") or []
    rank = at.rank + len(axes)
    inserted = {a + rank if a < 0 else a for a in axes}
    kept = [a for a in range(rank) if a not in inserted]
    return ChannelAxis(kept[at.axis], rank)


def through_reshape(step: ThroughStep, at: ChannelAxis) -> ChannelAxis:
    """Row-major reshape keeps the channel axis whole iff some output axis b has the same size
    and the same number of elements after it (or, equivalently, before it)."""
    shape_in = step.input_shape()
    if shape_in is None or len(shape_in) != at.rank:
        raise Skip("the input shape of Reshape is unknown")
    shape_in = list(shape_in)
    if isinstance(shape_in[at.axis], int) and shape_in[at.axis] != step.channels:
        raise Skip(f"BN has {step.channels} channels but the layer's channel axis has {shape_in[at.axis]}")
    shape_in[at.axis] = step.channels  # known even where inference left it symbolic
    shape_out = _reshape_target(step, shape_in)
    for b, size in enumerate(shape_out):
        if size != step.channels:
            continue
        if _same_product(shape_in[at.axis + 1:], shape_out[b + 1:]) or _same_product(shape_in[:at.axis], shape_out[:b]):
            return ChannelAxis(b, len(shape_out))
    raise Skip(f"Reshape {_dims(shape_in)} → {_dims(shape_out)} does not keep the channel axis {at.axis} whole "
               f"(or its shapes are not static enough to show it)")


def _reshape_target(step: ThroughStep, shape_in: list) -> list[int | None]:
    """Output dims as far as known: the inferred shape, else the target's literal entries."""
    inferred = step.index.shape(step.node.output[0])
    literal = _target_entries(step)
    if literal is None and inferred is None:
        raise Skip("the target shape of Reshape is unknown")
    rank = len(literal) if literal is not None else len(inferred)
    allow_zero = int(node_attr(step.node, "allowzero", 0))
    dims: list[int | None] = []
    for b in range(rank):
        known = inferred[b] if inferred is not None and len(inferred) == rank else None
        if isinstance(known, int):
            dims.append(known)
            continue
        entry = literal[b] if literal is not None else None
        if entry is not None and entry > 0:
            dims.append(entry)
        elif entry == 0 and not allow_zero and b < len(shape_in) and isinstance(shape_in[b], int):
            dims.append(shape_in[b])
        elif entry == 0 and allow_zero:
            dims.append(0)
        else:
            dims.append(None)
    return dims


def _target_entries(step: ThroughStep) -> list[int | None] | None:
    """The target shape's entries, None where computed at run time. A target concatenated
    from pieces (dynamo: Concat(batch·T, [C])) keeps its constant pieces."""
    name = step.node.input[1] if len(step.node.input) > 1 else ""
    if not name:
        shape = node_attr(step.node, "shape", None)  # Reshape-1
        return None if shape is None else [int(v) for v in shape]
    try:
        return [int(v) for v in step.index.constant(step.scope, name).reshape(-1)]
    except NotConstant:
        pass
    concat = step.scope.producers.get(name)
    if concat is None or not is_standard(concat, "Concat"):
        return None
    entries: list[int | None] = []
    for piece in concat.input:
        try:
            entries += [int(v) for v in step.index.constant(step.scope, piece).reshape(-1)]
        except NotConstant:
            shape = step.index.shape(piece)
            if shape is None or len(shape) != 1 or not isinstance(shape[0], int):
                return None
            entries += [None] * shape[0]
    return entries


def _same_product(a: list, b: list) -> bool:
    if any(not isinstance(d, int) for d in (*a, *b)):
        return False
    return int(np.prod(a, dtype=np.int64)) == int(np.prod(b, dtype=np.int64))


def _dims(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _shape_text(shape, axes) -> str:
    return "unknown" if shape is None else _dims([shape[a] for a in axes])


# Shape-only ops: op_type → how it moves the channel axis (its data is always input 0).
THROUGH_OPS: dict[str, Callable[[ThroughStep, ChannelAxis], ChannelAxis]] = {
    "Identity": through_identity,
    "Transpose": through_transpose,
    "Flatten": through_flatten,
    "Squeeze": through_squeeze,
    "Unsqueeze": through_unsqueeze,
    "Reshape": through_reshape,
}

