"""The one registry of fold rules.

A row is data (the pattern shown in the report, the layers it rewrites, the shapes of site it
takes, where the layer puts its output channels) and one function, `plan`: check what must hold,
raising Skip(reason) when it does not, and return the Rewrite. The pass (fold_pass) finds a site,
asks `rule_for` which row takes it, and writes the row's Rewrite with the one applier.
A new pattern is a new row here and its test.
"""
from __future__ import annotations

from .rules_after import plan_next_conv, plan_next_gemm, plan_next_matmul
from .rules_before import (conv_channel_axis, gemm_channel_axis, matmul_channel_axis, plan_conv, plan_conv_transpose,
                           plan_gemm, plan_matmul)
from .rules_quantized import plan_dequantized
from .site import FoldRule, Shape

DIRECT, VIA_ADD, NEXT = Shape.DIRECT, Shape.VIA_ADD, Shape.NEXT
THROUGH, MUL_ADD, DEQUANTIZED = Shape.THROUGH, Shape.MUL_ADD, Shape.DEQUANTIZED

RULES: tuple[FoldRule, ...] = (
    FoldRule("Conv", ("Conv",), DIRECT | THROUGH | MUL_ADD, plan_conv, conv_channel_axis),
    FoldRule("ConvTranspose", ("ConvTranspose",), DIRECT | THROUGH | MUL_ADD, plan_conv_transpose, conv_channel_axis),
    FoldRule("Gemm", ("Gemm",), DIRECT | THROUGH | MUL_ADD, plan_gemm, gemm_channel_axis),
    # [..., C] = x @ W, then per-feature Mul/Add (tf2onnx's Keras Dense+BN: MatMul → Add → Mul → Add). A bare
    # MatMul's own Add is its bias (the pass never offers it); a Mul needs no Add (plan_matmul).
    FoldRule("MatMul", ("MatMul",), DIRECT | THROUGH | MUL_ADD, plan_matmul, matmul_channel_axis),
    FoldRule("MatMul+Add", ("MatMul",), VIA_ADD | THROUGH | MUL_ADD, plan_matmul, matmul_channel_axis),
    FoldRule("next Gemm", ("Gemm",), NEXT, plan_next_gemm),
    FoldRule("next MatMul", ("MatMul",), NEXT, plan_next_matmul),
    FoldRule("next Conv", ("Conv",), NEXT, plan_next_conv),
    # Any row above but next-layer, with a weight (and maybe bias) behind DequantizeLinear; its pattern names the row.
    FoldRule("DequantizeLinear→{layer}", ("Conv", "ConvTranspose", "Gemm", "MatMul"),
             DEQUANTIZED | DIRECT | VIA_ADD | THROUGH | MUL_ADD, plan_dequantized),
)


def rule_for(op_type: str, shape: Shape) -> FoldRule | None:
    """The first row that rewrites `op_type` and takes every part of `shape`."""
    return next((r for r in RULES if r.matches(op_type, shape)), None)
