"""Parameters behind DequantizeLinear: what such a parameter holds, and its value.

DequantizeLinear(x, scale, zero_point) computes y = (x − zero_point) · scale with x an integer
tensor, per tensor (one scale) or per axis (a scale and zero point per index of `axis`, opset
≥ 13), in the scale's float dtype. A quantizer that ran before the BNs were folded writes each
weight as such a node of constants (onnxruntime's `quantize_static`, QAT exports).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .index import ModelIndex, NotConstant, Scope, find_producer
from .nodes import is_standard, node_attr

INTEGER_DTYPES = (np.int8, np.uint8, np.int16, np.uint16, np.int32)


@dataclass
class Quantized:
    """The constant inputs of one DequantizeLinear."""

    node: onnx.NodeProto
    data: np.ndarray  # integer
    scale: np.ndarray  # float: one number, or one per index of `axis`
    zero_point: np.ndarray | None
    axis: int | None  # None: per tensor

    def value(self) -> np.ndarray:
        """(x − zero_point) · scale as the operator computes it: the difference made a float of
        the scale's dtype, then multiplied in that dtype."""
        diff = self.data.astype(np.int64)
        if self.zero_point is not None:
            diff = diff - self._along(self.zero_point).astype(np.int64)
        return diff.astype(self.scale.dtype) * self._along(self.scale)

    def _along(self, values: np.ndarray) -> np.ndarray:
        if self.axis is None:
            return values.reshape(())
        shape = [1] * self.data.ndim
        shape[self.axis] = -1
        return values.reshape(shape)


def quantized_constant(index: ModelIndex, scope: Scope, name: str) -> Quantized | None:
    """The DequantizeLinear of constants that computes `name`; None if no DequantizeLinear does.
    NotConstant if one does but an input is computed at run time or is of a kind not folded."""
    found = find_producer(scope, name)
    if found is None or not is_standard(found[1], "DequantizeLinear"):
        return None
    where, dq = found
    if int(node_attr(dq, "block_size", 0)):
        raise NotConstant(f"{name!r} is block-quantized (DequantizeLinear block_size)")
    data, scale = (index.constant(where, n) for n in dq.input[:2])
    zero_point = index.constant(where, dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if data.dtype not in [np.dtype(d) for d in INTEGER_DTYPES]:
        raise NotConstant(f"{name!r} is quantized to {data.dtype}, which bnfold does not fold")
    if scale.size == 1:
        return Quantized(dq, data, scale.reshape(()), None if zero_point is None else zero_point.reshape(()), None)
    axis = int(node_attr(dq, "axis", 1))
    axis = axis + data.ndim if axis < 0 else axis
    if scale.ndim != 1 or not 0 <= axis < data.ndim or scale.shape[0] != data.shape[axis] or \
            (zero_point is not None and zero_point.shape != scale.shape):
        raise NotConstant(f"{name!r} has per-axis scales that do not match its axis {axis}")
    return Quantized(dq, data, scale, zero_point, axis)


def constant_or_dequantized(index: ModelIndex, scope: Scope, name: str) -> np.ndarray:
    """A constant's value, reading through a DequantizeLinear of constants; NotConstant if neither."""
    try:
        return index.constant(scope, name)
    except NotConstant:
        quantized = quantized_constant(index, scope, name)
        if quantized is None:
            raise
        return quantized.value()

