"""`--standalone affine`: a BN that cannot be folded becomes Mul(s) then Add(t).

Some runtimes (older mobile and embedded ones, some quantizers) have no BatchNormalization
kernel; y = s·x + t with s = γ/sqrt(σ²+ε), t = β − s·μ computes the same per-channel map
with two elementwise ops. The constants are shaped [C, 1, …] to broadcast on axis 1.
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from .affine import AffineOp
from ..errors import Skip
from ..fold_math import cast_exact, channel_view
from .index import ModelIndex, Scope
from ..report import FoldReport, RewrittenBN, SkippedBN


def rewrite_standalone(index: ModelIndex, report: FoldReport,
                       unfolded: list[tuple[Scope, AffineOp, SkippedBN]]) -> None:
    for scope, op, skipped in unfolded:
        rank = index.rank(op.data)
        if rank is None or rank < 2:
            skipped.reason += "; not rewritten as Mul+Add: rank of its input is unknown"
            continue
        try:
            _rewrite(index, scope, op, rank)
        except Skip as why:  # a folded value that overflows its dtype
            skipped.reason += f"; not rewritten as Mul+Add: {why}"
            continue
        report.skipped.remove(skipped)
        report.rewritten.append(RewrittenBN(op.name, skipped.reason, scope.path))


def _rewrite(index: ModelIndex, scope: Scope, op: AffineOp, rank: int) -> None:
    dtype = _data_dtype(index, scope, op)
    legacy = index.opset < 7  # opset < 7 broadcasts a [C] vector along `axis`
    shape_axis, shape_rank = (0, 1) if legacy else (0, rank - 1)
    scale = cast_exact(channel_view(op.affine.scale, shape_axis, shape_rank), dtype, "scale")
    shift = cast_exact(channel_view(op.affine.shift, shape_axis, shape_rank), dtype, "shift")
    attrs = {"broadcast": 1, "axis": 1} if legacy else {}
    base = op.name
    scale_name = index.add_initializer(scope, f"{base}_scale_bnfold", scale)
    shift_name = index.add_initializer(scope, f"{base}_shift_bnfold", shift)
    mid = index.unique_name(f"{base}_scaled")
    mul = helper.make_node("Mul", [op.data, scale_name], [mid], name=index.unique_name(f"{base}_mul"), **attrs)
    add = helper.make_node("Add", [mid, shift_name], [op.node.output[0]], name=index.unique_name(f"{base}_add"),
                           **attrs)
    index.insert_after(scope, op.node, mul)
    index.insert_after(scope, op.node, add)
    index.remove_node(scope, op.node)


def _data_dtype(index: ModelIndex, scope: Scope, op: AffineOp) -> np.dtype:
    elem = index.elem_type(op.data)
    if elem:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    return index.constant(scope, op.node.input[1]).dtype
