"""Folding on the ATen graph of torch.export: rewriting a `.pt2` program, and finding the fold
sites of an eager module that torch.fx cannot trace.

Exported graphs call aten.batch_norm (or _native_batch_norm_legit_no_training) on the
output of aten.conv*/conv_transpose*/linear — for LeViT's tokens through a flatten — with
parameters as get_attr nodes of ep.module(), named by their module paths. A `.pt2` is folded
in that graph: the attributes are rewritten in place, a bias-less layer gets a bias, the BN node
goes, and the module is exported again with the program's own example inputs. For an eager
module the same sites are applied to the module itself, by those paths (sites.py).
"""
from __future__ import annotations

import operator

import torch
from torch import nn

from ..errors import Skip
from ..fold_math import Affine, BrokenStatistics, FoldOverflow
from ..report import FoldedBN, FoldReport, SkippedBN
from .params import attr_at, fold_tensors
from .sites import FoldSite, Found, bn_name, check_linear_axis, owner

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
RESHAPE_OPS = (aten.view.default, aten.reshape.default, aten.flatten.using_ints, aten._unsafe_view.default)
SHAPE_OPS = (aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default)
SHAPE_OF_SECOND = (aten.reshape_as.default, aten.view_as.default, aten.expand_as.default)


def fold_exported(gm: torch.fx.GraphModule, report: FoldReport) -> torch.fx.GraphModule:
    """Fold the program's graph itself (a `.pt2`)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in BN_OPS:
            continue
        try:
            site = aten_site(gm, gm, node)
            _rewrite(gm, site.nodes["producer"], site.affine(gm), site.axis, site.groups)
        except (Skip, BrokenStatistics, FoldOverflow) as why:
            report.skipped.append(SkippedBN(_display(node), str(why)))
            continue
        _remove_bn(gm, node, BN_OPS[node.target][1])
        report.folded.append(FoldedBN(site.bn, site.producer, site.kind))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def aten_found(gm: torch.fx.GraphModule, probe: nn.Module) -> Found:
    """Fold sites of an eager module from its exported graph (`probe` has the module's types)."""
    found = Found()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in BN_OPS:
            try:
                found.sites.append(aten_site(gm, probe, node))
            except Skip as why:
                found.skipped.append(SkippedBN(_display(node), str(why)))
    return found


def _display(bn: torch.fx.Node) -> str:
    mean = bn.args[BN_OPS[bn.target][0][3]]
    return owner(mean.target) if isinstance(mean, torch.fx.Node) and mean.op == "get_attr" else bn.name


def _path(node) -> str | None:
    if node is None:
        return None
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        raise Skip(f"{node} is not a constant attribute")
    if len(node.users) != 1:
        raise Skip(f"{node.target} is read by {len(node.users)} ops (a module called more than once?)")
    return node.target


def _value_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [u for u in node.users if u.target not in SHAPE_OPS
            and not (u.target in SHAPE_OF_SECOND and u.args[1] is node and u.args[0] is not node)]


def aten_site(gm: torch.fx.GraphModule, probe: nn.Module, bn: torch.fx.Node) -> FoldSite:
    """Check what must hold for this BN call to fold into the layer before it."""
    (xi, wi, bi, mi, vi, ei), returns_tuple = BN_OPS[bn.target]
    if bn.target is aten.batch_norm.default and bn.args[5]:
        raise Skip("batch_norm called with training=True")
    tensors = {"running_mean": _path(bn.args[mi]), "running_var": _path(bn.args[vi])}
    if tensors["running_mean"] is None or tensors["running_var"] is None:
        raise Skip("no running statistics: BN uses batch statistics")
    tensors.update(weight=_path(bn.args[wi]), bias=_path(bn.args[bi]))
    name = bn_name(probe, tensors, owner(tensors["running_mean"]) or bn.name)
    producer, reshape = bn.args[xi], None
    if isinstance(producer, torch.fx.Node) and producer.target in RESHAPE_OPS \
            and getattr(producer.args[0], "target", None) is aten.linear.default:
        producer, reshape = producer.args[0], producer
    if not isinstance(producer, torch.fx.Node) or producer.target not in LAYER_OPS:
        raise Skip(f"input comes from {getattr(producer, 'target', producer)}, not a conv or linear")
    others = len(_value_users(producer)) - 1 + (len(_value_users(reshape)) - 1 if reshape is not None else 0)
    if others:
        raise Skip(f"output of {producer.name} is also used elsewhere")
    axis, groups_at, kind = LAYER_OPS[producer.target]
    if kind == "Linear":
        check_linear_axis(_shape(producer), _shape(reshape or producer), reshape is not None)
    weight = _path(producer.args[1])
    bias = _path(producer.args[2] if len(producer.args) > 2 else None)
    if returns_tuple and any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in bn.users):
        raise Skip("BN's saved statistics are used")
    groups = int(producer.args[groups_at]) if groups_at is not None and len(producer.args) > groups_at else 1
    return FoldSite(name, owner(weight), kind, axis, groups, tensors, float(bn.args[ei]),
                    {"bn": bn, "producer": producer}, weight, bias)


def _shape(node: torch.fx.Node) -> tuple | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _rewrite(gm, producer: torch.fx.Node, affine: Affine, axis: int, groups: int) -> None:
    weight = attr_at(gm, producer.args[1].target)
    b_node = producer.args[2] if len(producer.args) > 2 else None
    bias = attr_at(gm, b_node.target) if b_node is not None else None
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


def _remove_bn(gm, bn: torch.fx.Node, returns_tuple: bool) -> None:
    """The BN's output becomes its input (the layer's output, or the flatten of it)."""
    source = bn.args[0]
    if returns_tuple:
        for user in list(bn.users):
            if user.target is operator.getitem and user.args[0] is bn and user.args[1] == 0:
                user.replace_all_uses_with(source)
                gm.graph.erase_node(user)
    else:
        bn.replace_all_uses_with(source)
    if not bn.users:
        gm.graph.erase_node(bn)
