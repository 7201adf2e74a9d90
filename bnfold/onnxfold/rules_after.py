"""Fold rules for a BN that feeds a linear layer (the *next* layer) instead of following one.

With x̂ = s·x + t per input channel c of the layer:
  Gemm   α·(x̂)·B + β·C          = α·x·(diag(s)·B) + (α·t·B + β·C)
  MatMul x̂ @ W                   = x @ (diag(s)·W) + t·W
  Conv   W ⋆ x̂ + b               = (W·s over input channels) ⋆ x + (b + Σ_{c,k} W[o,c,k]·t_c)
The Conv identity holds only where every output reads real inputs: with zero padding. With
padding, border outputs read padded zeros where the original read t, so it is not exact.
Each plan gets a FoldSite whose `layer` is that next layer and whose affine is per input channel.
"""
from __future__ import annotations

import numpy as np

from ..errors import Skip
from ..fold_math import scale_weight
from .site import FoldSite, NewValue, Rewrite, Scaling
from .validity import broadcast_bias, layer_bias


def _input_rank(site: FoldSite) -> int | None:
    return site.index.rank(site.op.data)


def _scaled_input_channels(site: FoldSite, i: int, w: np.ndarray, axis: int, groups: int = 1) -> NewValue:
    s = site.affine.scale
    return NewValue(i, scale_weight(w, s, axis=axis, groups=groups), w.dtype, "weight",
                    scaling=Scaling(axis, s, groups))


def plan_next_gemm(site: FoldSite) -> Rewrite:
    gemm = site.layer
    if gemm.input[0] != site.op.node.output[0]:
        raise Skip("BN output is not Gemm's A operand")
    if int(site.attr("transA", 0)):
        raise Skip("Gemm transA=1: BN's channel axis is not Gemm's reduction axis")
    b = site.const(gemm.input[1], "B")
    trans_b = int(site.attr("transB", 0))
    b_kn = (b.T if trans_b else b).astype(np.float64)
    site.require_channels(b_kn.shape[0], "the Gemm reduction axis")
    t = site.affine.shift
    alpha, beta = float(site.attr("alpha", 1.0)), float(site.attr("beta", 1.0))
    c = broadcast_bias(gemm, site.optional_const(gemm, 2, "C"), (1, b_kn.shape[1]), "C")
    c64 = alpha * (t @ b_kn) + (beta * c.astype(np.float64) if c is not None else 0.0)
    attributes = [(None, "beta", 1.0)]
    if site.index.opset < 7:
        attributes.append((None, "broadcast", 1))
    bias = NewValue(2, np.asarray(c64), c.dtype if c is not None else b.dtype, "bias")
    return Rewrite([_scaled_input_channels(site, 1, b, axis=1 if trans_b else 0), bias], attributes)


def plan_next_matmul(site: FoldSite) -> Rewrite:
    mm = site.layer
    rank = _input_rank(site)
    if mm.input[0] == site.op.node.output[0]:  # x̂ @ W: channels are W's rows when x is [N, C]
        if rank != 2:
            raise Skip(f"BN input has rank {rank}; x @ W reduces over BN's channel axis only for rank 2")
        w_index, axis = 1, 0
    else:  # W @ x̂ with x̂ [N, C, L]: channels are W's columns
        if rank != 3:
            raise Skip(f"BN input has rank {rank}; W @ x reduces over BN's channel axis only for rank 3")
        w_index, axis = 0, 1
    w = site.const(mm.input[w_index], "weight")
    if w.ndim != 2:
        raise Skip(f"MatMul constant operand has rank {w.ndim}, expected 2")
    site.require_channels(w.shape[axis], "the MatMul reduction axis")
    t, w64 = site.affine.shift, w.astype(np.float64)
    bias = t @ w64 if axis == 0 else (w64 @ t)[:, None]  # [N_out], or [C_out, 1] for [N, C_out, L]
    add_attrs = {"broadcast": 1, "axis": 1} if site.index.opset < 7 else {}
    if add_attrs:
        bias = bias.reshape(-1)
    return Rewrite([_scaled_input_channels(site, w_index, w, axis)], bias_add=NewValue(1, bias, w.dtype, "bias"),
                   add_attributes=add_attrs)


def plan_next_conv(site: FoldSite) -> Rewrite:
    conv = site.layer
    if conv.input[0] != site.op.node.output[0]:
        raise Skip("BN output is not the Conv's data input")
    pads = site.attr("pads", None)
    auto_pad = site.attr("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if (pads is not None and any(pads)) or auto_pad not in ("NOTSET", "VALID"):
        raise Skip("the next Conv pads its input; padded borders would see 0 instead of BN's shift")
    w = site.const(conv.input[1], "weight")
    groups = int(site.attr("group", 1))
    c_out, c_in_per_group = w.shape[0], w.shape[1]
    site.require_channels(groups * c_in_per_group, "the next Conv's input")
    t = site.affine.shift.reshape(groups, 1, c_in_per_group, *([1] * (w.ndim - 2)))
    grouped = w.astype(np.float64).reshape(groups, c_out // groups, c_in_per_group, *w.shape[2:])
    shift = (grouped * t).reshape(c_out, -1).sum(axis=1)
    b = layer_bias(conv, site.optional_const(conv, 2, "bias"), c_out)
    bias = shift + (b.astype(np.float64) if b is not None else 0.0)
    return Rewrite([_scaled_input_channels(site, 1, w, axis=1, groups=groups),
                    NewValue(2, bias, b.dtype if b is not None else w.dtype, "bias")])
