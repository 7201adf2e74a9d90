"""The fold rule for a layer whose weight is behind DequantizeLinear (a graph quantized before
its BNs were folded): the fold goes into the quantization scales, not an integer changes.

With W = (W_q − zp)·scale per output channel c, the layer's own rule asks for W'[c] = s_c·W[c]:

    s_c · (W_q[c] − zp_c) · scale_c = (W_q[c] − zp_c) · (|s_c| · scale_c)            s_c > 0
                                    = ((2·zp_c − W_q[c]) − zp_c) · (|s_c| · scale_c)  s_c < 0

exactly, with the same integers (s_c > 0) or the row reflected about its zero point (s_c < 0),
which is exact where 2·zp − W_q stays in the integer type: not for −128 in a symmetric int8 row
(onnxruntime's symmetric weights use −127…127, so never there). Scales stay positive because a
negative scale is not valid for every runtime; a row that cannot be reflected keeps its BN, with
the reason. A channel with s_c = 0 becomes its zero point (W'[c] = 0, scale kept). A per-tensor
weight becomes per-axis (opset ≥ 13; below, the BN is kept) with the same zero point; a per-axis weight must be
quantized along the axis the fold scales (per output channel), else the BN is kept.

The bias: a float bias (or none) folds as for any layer, b' = s·b + t; onnxruntime quantizes a
float bias of a QDQ Conv/Gemm itself when it fuses the node (checked on 1.31: the folded Conv
still becomes QLinearConv). An int32 bias behind its own DequantizeLinear stays int32, so
runtimes that want the quantizer's layout keep it: requantized as round((s·b + t) / scale'),
off by at most scale'/2 per channel. Its new scale keeps the relation onnxruntime checks before
fusing (bias scale = input scale · weight scale, in float32) where the original held it, else is
|s|·scale.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import Skip
from .index import NotConstant, find_producer
from .nodes import is_standard, node_name
from .qdq import Quantized, quantized_constant
from .site import FoldSite, NewValue, Rewrite

INT32 = np.dtype(np.int32)


def plan_dequantized(site: FoldSite) -> Rewrite:
    """The layer's own row plans the fold on the dequantized parameters; each new value that
    belongs behind a DequantizeLinear is then written into that DequantizeLinear's inputs."""
    rw = site.layer_rule.plan(site)
    values, attributes = [], list(rw.attributes)
    weight_scales: tuple[np.ndarray, np.ndarray] | None = None  # old and new per-channel weight scale
    for v in rw.values:
        quantized = _behind_dequantize(site, v)
        if quantized is None:
            values.append(v)
        elif v.what == "weight":
            new, attrs, weight_scales = _rescaled_weight(site, quantized, v)
            values += new
            attributes += attrs
        else:
            new, attrs = _requantized_bias(site, quantized, v, weight_scales)
            values += new
            attributes += attrs
    return dataclasses.replace(rw, values=values, attributes=attributes)


def _behind_dequantize(site: FoldSite, v: NewValue) -> Quantized | None:
    node = v.node or site.layer
    if v.input >= len(node.input) or not node.input[v.input]:
        return None
    name = node.input[v.input]
    try:
        quantized = quantized_constant(site.index, site.scope, name)
    except NotConstant as exc:
        raise Skip(f"the {v.what} of {node.op_type} {node_name(node)!r}: {exc}") from None
    if quantized is not None and site.index.uses[name] != 1:
        raise Skip(f"the DequantizeLinear {node_name(quantized.node)!r} of the {v.what} also feeds "
                   f"{site.index.uses[name] - 1} other node(s)")
    return quantized


def _rescaled_weight(site: FoldSite, q: Quantized, v: NewValue):
    """New scale |s|·scale per output channel; rows with s < 0 reflected, rows with s = 0 at zp."""
    scaling = v.scaling
    if scaling is None or scaling.groups > 1:
        raise Skip("the output channels of a grouped ConvTranspose span two axes of its weight; "
                   "per-axis scales of a quantized weight cannot take the fold")
    axis, factor = scaling.axis, scaling.factor
    n = q.data.shape[axis]
    if q.axis is None:
        if site.index.opset < 13:
            raise Skip("the weight is quantized per tensor and opset < 13 has no per-axis DequantizeLinear")
        scale = np.full(n, q.scale, q.scale.dtype)
        zero_point = None if q.zero_point is None else np.full(n, q.zero_point, q.zero_point.dtype)
    elif q.axis != axis:
        raise Skip(f"the weight is quantized per axis {q.axis}; the fold scales its axis {axis}")
    else:
        scale, zero_point = q.scale, q.zero_point
    data = _reflected_rows(q, axis, factor, zero_point)
    new_scale = scale.astype(np.float64) * np.where(factor == 0, 1.0, np.abs(factor))
    if not (np.isfinite(new_scale).all() and (new_scale.astype(scale.dtype) > 0).all()):
        raise Skip("a rescaled weight scale is not a positive finite number in its dtype")
    dq = q.node
    values = [NewValue(1, new_scale, scale.dtype, "weight scale", node=dq)]
    if zero_point is not None:
        values.append(NewValue(2, zero_point, zero_point.dtype, "weight zero point", node=dq))
    if data is not None:
        values.append(NewValue(0, data, q.data.dtype, "quantized weight", node=dq))
    return values, [(dq, "axis", axis)], (scale.astype(np.float64), new_scale.astype(scale.dtype))


def _reflected_rows(q: Quantized, axis: int, factor: np.ndarray, zero_point: np.ndarray | None):
    """The integers with each row of a channel with s < 0 reflected about its zero point
    (2·zp − W_q) and each row with s = 0 set to it; None if no row changes."""
    if not (factor <= 0).any():
        return None
    shape = [1] * q.data.ndim
    shape[axis] = -1
    zp = (zero_point if zero_point is not None else np.zeros(len(factor), np.int64)).astype(np.int64).reshape(shape)
    data = q.data.astype(np.int64)
    data = np.where(factor.reshape(shape) < 0, 2 * zp - data, data)
    data = np.where(factor.reshape(shape) == 0, zp, data)
    info = np.iinfo(q.data.dtype)
    outside = np.moveaxis((data < info.min) | (data > info.max), axis, 0).reshape(len(factor), -1).any(axis=1)
    if outside.any():
        channels = np.flatnonzero(outside)[:5].tolist()
        raise Skip(f"BN scale s < 0 in channel(s) {channels} and their quantized weights hold a value whose reflection "
                   f"about the zero point is outside {q.data.dtype} (e.g. {info.min} in a symmetric row); a negative "
                   "scale instead is not valid for every runtime")
    return data


def _requantized_bias(site: FoldSite, q: Quantized, v: NewValue, weight_scales):
    """An int32 bias behind DequantizeLinear: round((s·b + t) / scale') with scale' as the module docstring says."""
    if q.data.dtype != INT32 or v.node is not None:
        raise Skip(f"the {v.what} is quantized to {q.data.dtype}: requantizing it would round by half a step of "
                   "that grid")
    value = np.asarray(v.value, np.float64).reshape(-1)
    if q.data.ndim != 1 or q.data.shape[0] != value.size:
        raise Skip(f"the quantized {v.what} has shape {list(q.data.shape)}, not one value per output channel")
    old_scale = np.broadcast_to(q.scale, value.shape).astype(np.float64)
    scale = _bias_scale(site, old_scale, v, weight_scales).astype(q.scale.dtype)
    zero_point = np.zeros(value.size, np.int64) if q.zero_point is None else \
        np.broadcast_to(q.zero_point, value.shape).astype(np.int64)
    data = np.round(value / scale.astype(np.float64)) + zero_point
    info = np.iinfo(INT32)
    if not (np.isfinite(data).all() and (data >= info.min).all() and (data <= info.max).all()):
        raise Skip(f"the requantized {v.what} does not fit in int32")
    dq = q.node
    values = [NewValue(0, data, INT32, "quantized bias", node=dq), NewValue(1, scale, q.scale.dtype, "bias scale", node=dq)]
    if q.zero_point is not None:
        values.append(NewValue(2, zero_point, q.zero_point.dtype, "bias zero point", node=dq))
    return values, [(dq, "axis", 0)]


def _bias_scale(site: FoldSite, old: np.ndarray, v: NewValue, weight_scales) -> np.ndarray:
    """input scale · new weight scale (float32 products) where the old bias scale was input scale ·
    old weight scale; else |s|·old scale (the old one where the plan gives no per-channel factor)."""
    x_scale = _input_scale(site)
    if x_scale is not None and weight_scales is not None:
        w_old, w_new = weight_scales
        dtype = w_new.dtype
        if np.array_equal(old.astype(dtype), (x_scale.astype(dtype) * w_old.astype(dtype)).astype(dtype)):
            return x_scale.astype(dtype) * w_new
    if v.scaling is None:
        return old
    return old * np.where(v.scaling.factor == 0, 1.0, np.abs(v.scaling.factor))


def _input_scale(site: FoldSite) -> np.ndarray | None:
    """The per-tensor scale of the DequantizeLinear that feeds the layer's data input, if any."""
    found = find_producer(site.scope, site.layer.input[0])
    if found is None or not is_standard(found[1], "DequantizeLinear") or len(found[1].input) < 2:
        return None
    try:
        scale = site.index.constant(found[0], found[1].input[1])
    except NotConstant:
        return None
    return scale.reshape(()) if scale.size == 1 else None
