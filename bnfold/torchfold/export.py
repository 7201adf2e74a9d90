"""Folding in torch.export programs: the same fold on the ATen-level graph of ep.module().

Exported graphs call aten.batch_norm (or _native_batch_norm_legit_no_training) on the
output of aten.conv*/conv_transpose*/linear, with parameters as get_attr nodes. The fold
rewrites those attributes in place, gives a bias-less layer a bias, and removes the BN node;
the module is then exported again with the program's own example inputs.
"""
from __future__ import annotations

import operator

import torch
from torch import nn

from ..errors import Skip
from ..fold_math import Affine, BrokenStatistics, FoldOverflow
from ..report import FoldedBN, FoldReport, SkippedBN
from .params import affine_of, attr_at, fold_tensors

aten = torch.ops.aten
# BN op → positions of (input, weight, bias, running_mean, running_var, eps), and whether it returns a tuple
BN_OPS = {
    aten.batch_norm.default: ((0, 1, 2, 3, 4, 7), False),
    aten._native_batch_norm_legit_no_training.default: ((0, 1, 2, 3, 4, 6), True),
}
# layer op → (output-channel axis of the weight, position of groups or None, kind)
LAYER_OPS = {
    aten.conv1d.default: (0, None, "Conv1d"), aten.conv2d.default: (0, None, "Conv2d"),
    aten.conv3d.default: (0, None, "Conv3d"),
    aten.conv_transpose1d.default: (1, 6, "ConvTranspose1d"), aten.conv_transpose2d.input: (1, 6, "ConvTranspose2d"),
    aten.conv_transpose3d.input: (1, 6, "ConvTranspose3d"),
    aten.linear.default: (0, None, "Linear"),
}


def fold_exported(gm: torch.fx.GraphModule, report: FoldReport) -> torch.fx.GraphModule:
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in BN_OPS:
            continue
        try:
            layer, kind = _fold_node(gm, node)
        except (Skip, BrokenStatistics, FoldOverflow) as why:
            report.skipped.append(SkippedBN(node.name, str(why)))
            continue
        report.folded.append(FoldedBN(node.name, layer, kind))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _attr(gm: torch.fx.GraphModule, node) -> torch.Tensor | None:
    if node is None:
        return None
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        raise Skip(f"{node} is not a constant attribute")
    return attr_at(gm, node.target)


def _fold_node(gm: torch.fx.GraphModule, bn: torch.fx.Node) -> tuple[str, str]:
    (xi, wi, bi, mi, vi, ei), returns_tuple = BN_OPS[bn.target]
    if bn.target is aten.batch_norm.default and bn.args[5]:
        raise Skip("batch_norm called with training=True")
    mean, var = _attr(gm, bn.args[mi]), _attr(gm, bn.args[vi])
    if mean is None or var is None:
        raise Skip("no running statistics: BN uses batch statistics")
    affine = affine_of(_attr(gm, bn.args[wi]), _attr(gm, bn.args[bi]), mean, var, bn.args[ei])
    producer = bn.args[xi]
    if not isinstance(producer, torch.fx.Node) or producer.target not in LAYER_OPS:
        raise Skip(f"input comes from {getattr(producer, 'target', producer)}, not a conv or linear")
    if len(producer.users) != 1:
        raise Skip(f"output of {producer.name} is also used elsewhere")
    axis, groups_at, kind = LAYER_OPS[producer.target]
    if kind == "Linear":
        val = producer.meta.get("val")
        if val is None or val.dim() != 2:
            raise Skip("Linear output is not [N, C]; BN's channel axis is not the Linear's feature axis")
    w_node = producer.args[1]
    if len(w_node.users) != 1:
        raise Skip(f"weight {w_node.target} is shared by several layers")
    if returns_tuple and any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in bn.users):
        raise Skip("BN's saved statistics are used")
    groups = int(producer.args[groups_at]) if groups_at is not None and len(producer.args) > groups_at else 1
    _rewrite(gm, producer, affine, axis, groups)
    _remove_bn(gm, bn, producer, returns_tuple)
    return producer.name, kind


def _rewrite(gm, producer: torch.fx.Node, affine: Affine, axis: int, groups: int) -> None:
    weight = _attr(gm, producer.args[1])
    b_node = producer.args[2] if len(producer.args) > 2 else None
    bias = _attr(gm, b_node)
    new_w, new_b = fold_tensors(weight, bias, affine, axis, groups, producer.name)
    with torch.no_grad():
        weight.copy_(torch.from_numpy(new_w).to(weight.device, weight.dtype))
        if bias is not None:
            bias.copy_(torch.from_numpy(new_b).to(weight.device, weight.dtype))
            return
    name = producer.args[1].target.replace(".", "_") + "_bnfold_bias"
    gm.register_parameter(name, nn.Parameter(torch.from_numpy(new_b).to(weight.device, weight.dtype)))
    with gm.graph.inserting_before(producer):
        new_node = gm.graph.get_attr(name)
    args = list(producer.args) + [None] * max(0, 3 - len(producer.args))
    args[2] = new_node
    producer.args = tuple(args)


def _remove_bn(gm, bn: torch.fx.Node, producer: torch.fx.Node, returns_tuple: bool) -> None:
    if returns_tuple:
        for user in list(bn.users):
            if user.target is operator.getitem and user.args[1] == 0:
                user.replace_all_uses_with(producer)
                gm.graph.erase_node(user)
    else:
        bn.replace_all_uses_with(producer)
    if not bn.users:
        gm.graph.erase_node(bn)
