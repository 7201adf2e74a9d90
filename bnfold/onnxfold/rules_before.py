"""Fold rules for a map after its layer: Conv, ConvTranspose, Gemm, MatMul (with or without its
Add(bias)). Each `plan_*` checks what must hold (Skip(reason) if not) and returns the Rewrite;
each `*_channel_axis` says where the layer puts its output channels, which the pass follows
through shape-only ops and compares with the axis the map normalizes.

With the map s·x + t per output channel c (fold_math has the BN derivation): W'[c] = s_c·W[c]
along the layer's output-channel axis, b' = s·b + t.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..errors import Skip
from ..fold_math import fold_bias, scale_weight
from .affine import ChannelAxis
from .index import ModelIndex, NotConstant, Scope
from .readers import require_sole_use
from .site import FoldSite, NewValue, Rewrite, Scaling
from .validity import broadcast_bias, layer_bias


def scaled_weight(site: FoldSite, i: int, w: np.ndarray, axis: int, groups: int = 1) -> NewValue:
    """Input i of the layer, the weight w, times s along its output-channel axis."""
    s = site.affine.scale
    return NewValue(i, scale_weight(w, s, axis=axis, groups=groups), w.dtype, "weight",
                    scaling=Scaling(axis, s, groups))


def plan_conv(site: FoldSite) -> Rewrite:
    """Conv weight [C_out, C_in/g, k…]: the output channel is axis 0 whatever the groups."""
    w = site.const(site.layer.input[1], "weight")
    if w.ndim < 3:
        raise Skip(f"Conv weight has rank {w.ndim}, expected ≥ 3")
    site.require_channels(w.shape[0], "the Conv output")
    return Rewrite([scaled_weight(site, 1, w, axis=0), _folded_bias(site, w, w.shape[0])])


def plan_conv_transpose(site: FoldSite) -> Rewrite:
    """ConvTranspose weight [C_in, C_out/g, k…]: output channel g·(C_out/g)+j is column j of group g."""
    w = site.const(site.layer.input[1], "weight")
    if w.ndim < 3:
        raise Skip(f"ConvTranspose weight has rank {w.ndim}, expected ≥ 3")
    groups = int(site.attr("group", 1))
    if w.shape[0] % groups:
        raise Skip(f"ConvTranspose weight rows {w.shape[0]} not divisible by group={groups}")
    site.require_channels(groups * w.shape[1], "the ConvTranspose output")
    return Rewrite([scaled_weight(site, 1, w, axis=1, groups=groups), _folded_bias(site, w, groups * w.shape[1])])


def _folded_bias(site: FoldSite, w: np.ndarray, channels: int) -> NewValue:
    """The Conv/ConvTranspose bias input: b' = s·b + t (t alone where there was none)."""
    b = layer_bias(site.layer, site.optional_const(site.layer, 2, "bias"), channels)
    dtype = b.dtype if b is not None else w.dtype
    return NewValue(2, fold_bias(b, site.affine), dtype, "bias", scaling=Scaling(0, site.affine.scale))


def conv_channel_axis(site: FoldSite) -> ChannelAxis:
    return ChannelAxis(1, site.const(site.layer.input[1], "weight").ndim)


def plan_gemm(site: FoldSite) -> Rewrite:
    """Y = α·A'·B' + β·C. The output channel is the column of B' (axis 0 of B if transB).

    BN(Y) = α·A'·(B'·s) + (β·C·s + t): scale B along that axis, set C' = β·C·s + t, β = 1.
    """
    b_mat = site.const(site.layer.input[1], "B")
    if b_mat.ndim != 2:
        raise Skip(f"Gemm B has rank {b_mat.ndim}, expected 2")
    axis = 0 if int(site.attr("transB", 0)) else 1
    site.require_channels(b_mat.shape[axis], "the Gemm output")
    c = broadcast_bias(site.layer, site.optional_const(site.layer, 2, "C"), (1, b_mat.shape[axis]), "C")
    beta = float(site.attr("beta", 1.0))
    s, t = site.affine.scale, site.affine.shift
    scaling = Scaling(0, beta * s)
    if c is None:
        c64 = t
    else:
        if c.ndim > 2:
            raise Skip(f"Gemm C has rank {c.ndim}")
        c64 = beta * c.astype(np.float64) * s + t
        scaling = Scaling(0, beta * s) if c.shape == (site.channels,) else None
    attributes = [(None, "beta", 1.0)]
    if site.index.opset < 7:
        attributes.append((None, "broadcast", 1))
    bias = NewValue(2, c64, c.dtype if c is not None else b_mat.dtype, "bias", scaling=scaling)
    return Rewrite([scaled_weight(site, 1, b_mat, axis=axis), bias], attributes)


def gemm_channel_axis(site: FoldSite) -> ChannelAxis:
    return ChannelAxis(1, 2)


def plan_matmul(site: FoldSite) -> Rewrite:
    """x @ W: channels are W's columns, on the output's last axis; W @ x: W's rows, on the
    second-to-last. The shift broadcasts along that axis ([C] or [C, 1]) and goes into the
    MatMul's Add(bias), or a new Add after it; a map with no shift (a Mul) needs neither."""
    w_index, w = matmul_weight(site)
    axis = 1 if w_index == 1 else 0
    site.require_channels(w.shape[axis], "the MatMul output")
    values = [scaled_weight(site, w_index, w, axis=axis)]
    s, t = site.affine.scale, site.affine.shift
    view = (-1,) if w_index == 1 else (-1, 1)
    legacy = {"broadcast": 1, "axis": 1} if site.index.opset < 7 else {}
    if site.add is None:
        if not t.any():
            return Rewrite(values)
        bias = NewValue(1, t if legacy else t.reshape(view), w.dtype, "bias")
        return Rewrite(values, bias_add=bias, add_attributes=legacy)
    slot, name = next((i, n) for i, n in enumerate(site.add.input) if n != site.layer.output[0])
    add_bias = site.const(name, "the bias Add operand")
    if legacy:
        b64 = s * _legacy_channel_bias(site, add_bias, site.at.rank) + t
    else:
        rank = site.at.rank or 2
        out = (1,) * (rank - 1) + (site.channels,) if w_index == 1 else (1,) * (rank - 2) + (site.channels, 1)
        broadcast_bias(site.add, add_bias, out, "bias")
        b64 = add_bias.astype(np.float64) * s.reshape(view) + t.reshape(view)
        if b64.ndim > site.at.rank:
            raise Skip(f"bias of shape {add_bias.shape} does not broadcast along the MatMul's channel axis")
    scaling = Scaling(0, s) if add_bias.size == b64.size == site.channels else None
    values.append(NewValue(slot, b64, add_bias.dtype, "bias", node=site.add, scaling=scaling))
    return Rewrite(values, add_attributes=legacy)


def _legacy_channel_bias(site: FoldSite, add_bias: np.ndarray, rank: int) -> np.ndarray:
    """Opset < 7 Add broadcasts a contiguous block of dims at `axis` (default: the suffix)."""
    if add_bias.size == 1:
        return np.full(site.channels, float(add_bias.reshape(-1)[0]))
    broadcast = int(site.attr("broadcast", 0, site.add))
    axis = int(site.attr("axis", rank - add_bias.ndim, site.add))
    if broadcast != 1 or add_bias.shape != (site.channels,) or axis != 1:
        raise Skip("bias is not a per-channel vector on axis 1 (opset < 7 broadcasting)")
    return add_bias.astype(np.float64)


def matmul_weight(site: FoldSite) -> tuple[int, np.ndarray]:
    """(which input is the constant weight, its value): input 1 (x @ W) is tried first."""
    problems = []
    for w_index in (1, 0):
        try:
            w = site.lookup(site.layer.input[w_index])
        except NotConstant as exc:
            problems.append(str(exc))
            continue
        if w.ndim != 2:
            raise Skip(f"MatMul constant operand has rank {w.ndim}, expected 2")
        return w_index, w
    raise Skip(f"MatMul has no constant operand: {'; '.join(problems)}")


def matmul_channel_axis(site: FoldSite) -> ChannelAxis:
    """x @ W puts W's columns on the output's last axis, W @ x W's rows on the second-to-last.
    The output's rank is inferred, or that of the other operand (a 2-d weight keeps it)."""
    w_index, _ = matmul_weight(site)
    rank = site.index.rank(site.layer.output[0])
    if rank is None:
        other = site.index.rank(site.layer.input[1 - w_index])
        rank = other if other is not None and other >= 2 else None
    if rank is None or rank < 2:
        raise Skip("rank of the MatMul output is unknown, so its channel axis cannot be followed")
    return ChannelAxis(rank - 1 if w_index == 1 else rank - 2, rank)


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
