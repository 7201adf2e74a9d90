"""Fold rules: one per producer pattern. Each is data plus one small `plan` function.

A rule's `plan` gets a FoldSite (the BN, its producer and the BN's affine map s·x + t),
checks what must hold, raising Skip(reason) when it does not, and returns a Rewrite: the
new weight and bias and where they go. Applying a Rewrite is the same for every rule
(fold_pass.apply_rewrite). Adding a pattern means adding a rule here and its test.
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from ..errors import Skip
from ..fold_math import Affine, cast_exact, channel_view, fold_bias, scale_weight
from .affine import node_attr
from .index import ModelIndex, NotConstant, Scope
from .readers import require_sole_use
from .validity import broadcast_bias, layer_bias


@dataclass
class FoldSite:
    index: ModelIndex
    scope: Scope
    bn: onnx.NodeProto
    producer: onnx.NodeProto  # the linear layer
    affine: Affine
    add: onnx.NodeProto | None = None  # MatMul → Add(bias) → BN

    @property
    def channels(self) -> int:
        return self.affine.scale.shape[0]

    def const(self, name: str, what: str) -> np.ndarray:
        try:
            return self.index.constant(self.scope, name)
        except NotConstant as exc:
            raise Skip(f"{what} of {self.producer.op_type} is not constant: {exc}") from None

    def optional_const(self, node: onnx.NodeProto, i: int, what: str) -> np.ndarray | None:
        if len(node.input) > i and node.input[i]:
            return self.const(node.input[i], what)
        return None

    def attr(self, name: str, default: Any, node: onnx.NodeProto | None = None) -> Any:
        return node_attr(node or self.producer, name, default)

    def require_channels(self, n: int, what: str) -> None:
        if n != self.channels:
            raise Skip(f"BN has {self.channels} channels but {what} has {n}")


class BiasSlot(enum.Enum):
    """Where a folded bias goes."""

    PRODUCER = "producer"  # the layer's own bias input (Conv B, Gemm C)
    EXISTING_ADD = "add"  # the constant operand of MatMul → Add(bias)
    NEW_ADD = "new_add"  # a new Add after a layer that has no bias input (MatMul)


@dataclass
class Rewrite:
    """What a fold writes: the producer's new weight, the new bias and where it goes."""

    weight_input: int
    weight: np.ndarray
    bias: np.ndarray
    bias_slot: BiasSlot = BiasSlot.PRODUCER
    bias_input: int = 2
    attributes: dict[str, Any] = field(default_factory=dict)  # set on the producer
    add_attributes: dict[str, Any] = field(default_factory=dict)  # legacy broadcast (opset < 7)


@dataclass(frozen=True)
class FoldRule:
    pattern: str  # shown in the report
    producer: str  # op_type of the node before BN
    plan: Callable[[FoldSite], Rewrite]
    via_add: bool = False  # producer → Add(constant) → BN


def _weight_and_bias(site: FoldSite, w: np.ndarray, b: np.ndarray | None, w64: np.ndarray) -> tuple:
    bias_dtype = b.dtype if b is not None else w.dtype
    return (cast_exact(w64, w.dtype, "weight"),
            cast_exact(fold_bias(b, site.affine), bias_dtype, "bias"))


def plan_conv(site: FoldSite) -> Rewrite:
    """Conv weight [C_out, C_in/g, k…]: the output channel is axis 0 whatever the groups."""
    w = site.const(site.producer.input[1], "weight")
    if w.ndim < 3:
        raise Skip(f"Conv weight has rank {w.ndim}, expected ≥ 3")
    site.require_channels(w.shape[0], "the Conv output")
    b = layer_bias(site.producer, site.optional_const(site.producer, 2, "bias"), w.shape[0])
    weight, bias = _weight_and_bias(site, w, b, scale_weight(w, site.affine.scale, axis=0))
    return Rewrite(weight_input=1, weight=weight, bias=bias)


def plan_conv_transpose(site: FoldSite) -> Rewrite:
    """ConvTranspose weight [C_in, C_out/g, k…]: output channel g·(C_out/g)+j is column j of group g."""
    w = site.const(site.producer.input[1], "weight")
    if w.ndim < 3:
        raise Skip(f"ConvTranspose weight has rank {w.ndim}, expected ≥ 3")
    groups = int(site.attr("group", 1))
    if w.shape[0] % groups:
        raise Skip(f"ConvTranspose weight rows {w.shape[0]} not divisible by group={groups}")
    site.require_channels(groups * w.shape[1], "the ConvTranspose output")
    b = layer_bias(site.producer, site.optional_const(site.producer, 2, "bias"), groups * w.shape[1])
    w64 = scale_weight(w, site.affine.scale, axis=1, groups=groups)
    weight, bias = _weight_and_bias(site, w, b, w64)
    return Rewrite(weight_input=1, weight=weight, bias=bias)


def plan_gemm(site: FoldSite) -> Rewrite:
    """Y = α·A'·B' + β·C. The output channel is the column of B' (axis 0 of B if transB).

    BN(Y) = α·A'·(B'·s) + (β·C·s + t): scale B along that axis, set C' = β·C·s + t, β = 1.
    """
    b_mat = site.const(site.producer.input[1], "B")
    if b_mat.ndim != 2:
        raise Skip(f"Gemm B has rank {b_mat.ndim}, expected 2")
    axis = 0 if int(site.attr("transB", 0)) else 1
    site.require_channels(b_mat.shape[axis], "the Gemm output")
    c = broadcast_bias(site.producer, site.optional_const(site.producer, 2, "C"), (1, b_mat.shape[axis]), "C")
    beta = float(site.attr("beta", 1.0))
    s, t = site.affine.scale, site.affine.shift
    weight = cast_exact(scale_weight(b_mat, s, axis=axis), b_mat.dtype, "weight")
    if c is None:
        c64 = t
    else:
        if c.ndim > 2:
            raise Skip(f"Gemm C has rank {c.ndim}")
        c64 = beta * c.astype(np.float64) * s + t
    attributes: dict[str, Any] = {"beta": 1.0}
    if site.index.opset < 7:
        attributes["broadcast"] = 1
    bias = cast_exact(c64, c.dtype if c is not None else b_mat.dtype, "bias")
    return Rewrite(weight_input=1, weight=weight, bias=bias, attributes=attributes)


def _matmul_orientation(site: FoldSite, mm: onnx.NodeProto, out_name: str) -> tuple[int, np.ndarray, int]:
    """(weight input index, weight, axis of the weight that becomes BN's channel axis 1).

    x @ W with a rank-2 result puts W's columns on axis 1; W @ x with a rank-3 result
    [N, C, L] puts W's rows on axis 1. Any other rank puts the BN channel elsewhere.
    """
    out_rank = site.index.rank(out_name)
    problems = []
    for w_index, other in ((1, 0), (0, 1)):
        try:
            w = site.index.constant(site.scope, mm.input[w_index])
        except NotConstant as exc:
            problems.append(str(exc))
            continue
        if w.ndim != 2:
            raise Skip(f"MatMul constant operand has rank {w.ndim}, expected 2")
        if out_rank is None:
            other_rank = site.index.rank(mm.input[other])
            out_rank = other_rank if (other_rank is not None and other_rank >= 2) else None
        if out_rank is None:
            raise Skip("rank of the MatMul output is unknown, so the BN channel axis cannot be matched")
        wanted = 2 if w_index == 1 else 3
        if out_rank != wanted:
            side = "x @ W" if w_index == 1 else "W @ x"
            raise Skip(f"{side} gives a rank-{out_rank} output; BN's channel axis 1 is not the weight's "
                       f"free axis (needs rank {wanted})")
        return w_index, w, 1 if w_index == 1 else 0
    raise Skip(f"MatMul has no constant operand: {'; '.join(problems)}")


def _channel_bias_view(site: FoldSite, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """s and t shaped to broadcast along axis 1 of a rank-`rank` output (right-aligned)."""
    s, t = site.affine.scale, site.affine.shift
    return channel_view(s, 0, rank - 1), channel_view(t, 0, rank - 1)


def plan_matmul(site: FoldSite, add_bias: np.ndarray | None = None) -> Rewrite:
    mm = site.producer
    w_index, w, axis = _matmul_orientation(site, mm, (site.add or mm).output[0])
    site.require_channels(w.shape[axis], "the MatMul output")
    weight = cast_exact(scale_weight(w, site.affine.scale, axis=axis), w.dtype, "weight")
    rank = 2 if w_index == 1 else 3
    s_view, t_view = _channel_bias_view(site, rank)
    legacy = site.index.opset < 7
    if add_bias is None:
        b64 = site.affine.shift if legacy else t_view
        bias = cast_exact(b64, w.dtype, "bias")
        add_attrs = {"broadcast": 1, "axis": 1} if legacy else {}
        return Rewrite(w_index, weight, bias, BiasSlot.NEW_ADD, bias_input=1, add_attributes=add_attrs)
    add_attrs = {}
    if legacy:
        b64 = site.affine.scale * _legacy_channel_bias(site, add_bias, rank) + site.affine.shift
        add_attrs = {"broadcast": 1, "axis": 1}
    else:
        broadcast_bias(site.add, add_bias, (1, site.channels) if rank == 2 else (1, site.channels, 1), "bias")
        b64 = add_bias.astype(np.float64) * s_view + t_view
        if b64.ndim > rank:
            raise Skip(f"bias of rank {add_bias.ndim} does not broadcast to the rank-{rank} output")
    bias = cast_exact(b64, add_bias.dtype, "bias")
    slot = list(site.add.input).index(_add_bias_name(site))
    return Rewrite(w_index, weight, bias, BiasSlot.EXISTING_ADD, bias_input=slot, add_attributes=add_attrs)


def _legacy_channel_bias(site: FoldSite, add_bias: np.ndarray, rank: int) -> np.ndarray:
    """Opset < 7 Add broadcasts a contiguous block of dims at `axis` (default: the suffix)."""
    if add_bias.size == 1:
        return np.full(site.channels, float(add_bias.reshape(-1)[0]))
    broadcast = int(site.attr("broadcast", 0, site.add))
    axis = int(site.attr("axis", rank - add_bias.ndim, site.add))
    if broadcast != 1 or add_bias.shape != (site.channels,) or axis != 1:
        raise Skip("bias is not a per-channel vector on axis 1 (opset < 7 broadcasting)")
    return add_bias.astype(np.float64)


def _add_bias_name(site: FoldSite) -> str:
    mm_out = site.producer.output[0]
    return next(name for name in site.add.input if name != mm_out)


def producer_behind_add(index: ModelIndex, scope: Scope, add: onnx.NodeProto) -> onnx.NodeProto:
    """MatMul → Add(constant bias) → BN: the MatMul, if the Add's other operand is constant."""
    for mm_out in add.input:
        mm = scope.producers.get(mm_out)
        if mm is None or mm.op_type != "MatMul":
            continue
        other = next((n for n in add.input if n != mm_out), None)
        if other is None:
            continue
        try:
            index.constant(scope, other)
        except NotConstant:
            continue
        require_sole_use(index, scope, mm, mm_out)
        return mm
    raise Skip("producer Add is not a MatMul plus a constant bias")


def plan_matmul_add(site: FoldSite) -> Rewrite:
    add_bias = site.const(_add_bias_name(site), "the bias Add operand")
    return plan_matmul(site, add_bias=add_bias)


RULES: tuple[FoldRule, ...] = (
    FoldRule("Conv", "Conv", plan_conv),
    FoldRule("ConvTranspose", "ConvTranspose", plan_conv_transpose),
    FoldRule("Gemm", "Gemm", plan_gemm),
    FoldRule("MatMul", "MatMul", plan_matmul),
    FoldRule("MatMul+Add", "MatMul", plan_matmul_add, via_add=True),
)


# A per-channel Mul/Add folds only where the layer has a bias slot of its own; after a
# MatMul it would just move the Add.
ELEMENTWISE_RULES: tuple[FoldRule, ...] = RULES[:3]
