"""Folding a `.pt2` program in its own ATen graph.

The program's module (`ep.module()`) is an fx graph whose parameters are get_attr nodes named by
their module paths; the fold rule reads it like any fx graph (fx_graph.py). Each site's layer
weight and bias are rewritten in place (a bias-less layer gets a bias), the BN's nodes go, and the
module is exported again with the program's own example inputs (convert.py).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import Skip
from ..fold_math import Affine, BrokenStatistics, FoldOverflow
from ..report import FoldedBN, FoldReport, SkippedBN
from .constants import is_constant
from .fx_graph import CHECKS, FxGraph, sites_and_kept
from .params import attr_at, fold_tensors
from .site_rule import FoldSite
from .vocabulary import BN_OPS, TUPLE_BN_OPS, op_name


def fold_exported(gm: torch.fx.GraphModule, report: FoldReport) -> torch.fx.GraphModule:
    """Fold the program's graph itself (a `.pt2`)."""
    sites, kept = sites_and_kept(FxGraph(gm))
    report.skipped += kept
    for site in sites:
        try:
            _rewrite(gm, site.nodes["producer"], site.affine(gm), site)
        except (Skip, BrokenStatistics, FoldOverflow) as why:
            report.skipped.append(SkippedBN(site.bn, str(why), site.producer))
            continue
        _remove_bn(gm, site)
        report.folded.append(FoldedBN(site.bn, site.producer, site.kind))
    for node in list(gm.graph.nodes):  # checks of a removed affine's constants keep them alive
        if op_name(node.target) in CHECKS and is_constant(node.args[0] if node.args else None):
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def count_aten_bn(gm: torch.fx.GraphModule) -> int:
    """batch_norm ops and per-channel affines of constants in the graph."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and op_name(n.target) in BN_OPS) + \
        sum(1 for c in FxGraph(gm).bn_calls() if c.axis_from_end is not None)


def _rewrite(gm, producer: torch.fx.Node, affine: Affine, site: FoldSite) -> None:
    if site.weight is None:
        raise Skip(f"{producer.name} reads no weight attribute")
    weight = attr_at(gm, site.weight)
    bias = attr_at(gm, site.bias) if site.bias else None
    new_w, new_b = fold_tensors(weight, bias, affine, site.axis, site.groups, producer.name)
    with torch.no_grad():
        weight.copy_(torch.from_numpy(new_w).to(weight.device, weight.dtype))
        if bias is not None:
            bias.copy_(torch.from_numpy(new_b).to(weight.device, weight.dtype))
            return
    name = site.weight.replace(".", "_") + "_bnfold_bias"
    gm.register_parameter(name, nn.Parameter(torch.from_numpy(new_b).to(weight.device, weight.dtype)))
    with gm.graph.inserting_before(producer):
        new_node = gm.graph.get_attr(name)
    args = list(producer.args) + [None] * max(0, 3 - len(producer.args))
    args[2] = new_node
    producer.args = tuple(args)
    producer.kwargs = {k: v for k, v in producer.kwargs.items() if k != "bias"}


def _remove_bn(gm, site: FoldSite) -> None:
    """The BN's output becomes its input (the layer's output, or the reshape of it)."""
    bn, source = site.nodes["bn"], site.nodes["input"]
    if op_name(bn.target) in TUPLE_BN_OPS:
        for user in list(bn.users):
            if op_name(user.target) == "getitem" and user.args[1] == 0:
                user.replace_all_uses_with(source)
                gm.graph.erase_node(user)
    else:
        bn.replace_all_uses_with(source)
    if not bn.users:
        gm.graph.erase_node(bn)
    # an affine's mul goes too: dead-code elimination keeps an in-place `mul_`, which would still scale the layer's output
    for part in reversed(site.nodes.get("parts", [])):
        if part is not bn and not part.users:
            gm.graph.erase_node(part)
