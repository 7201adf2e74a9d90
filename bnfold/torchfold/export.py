"""Folding a `.pt2` program in its own ATen graph.

The program's module (`ep.module()`) is an fx graph whose parameters are get_attr nodes named by
their module paths; the fold rule reads it like any fx graph (fx_graph.py). Each site's layer
weight and bias are rewritten in place (a bias-less layer gets a bias), the BN's nodes go, and the
program takes the same edits in its own graph (in_program); where it cannot, or branches were
merged, the module is exported again with the program's own example inputs (convert.py).
"""
from __future__ import annotations

import dataclasses

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


def fold_exported(gm: torch.fx.GraphModule, report: FoldReport, done: list | None = None) -> torch.fx.GraphModule:
    """Fold the program's module (`ep.module()`, its graph with get_attr parameters); `done`
    receives each site folded, with the bias it was given (its attribute name), if one."""
    sites, kept = sites_and_kept(FxGraph(gm))
    report.skipped += kept
    for site in sites:
        try:
            weight = attr_at(gm, site.weight) if site.weight else None
            added = _rewrite(gm, site.nodes["producer"], site.affine(gm, like=weight), site)
        except (Skip, BrokenStatistics, FoldOverflow) as why:
            report.skipped.append(SkippedBN(site.bn, str(why), site.producer))
            continue
        _remove_bn(gm, site)
        report.folded.append(FoldedBN(site.bn, site.producer, site.kind))
        if done is not None:
            done.append((site, added))
    _tidy(gm)
    return gm


def in_program(program, gm: torch.fx.GraphModule, done: list):
    """The program itself, its graph given the edits fold_exported made to its module `gm` (same
    node names), so that it need not be exported again: exporting anew takes seconds and may
    narrow a dynamic dimension. A bias a layer gains is lifted as the program lifts constants.
    None where the program does not take the edits (then the module is exported)."""
    from torch._export.passes.lift_constants_pass import ConstantAttrMap, lift_constants_pass

    graph_module = program.graph_module
    try:
        for name, tensor in (*program.state_dict.items(), *program.constants.items()):
            if isinstance(tensor, torch.Tensor):  # the folded values, where the module holds copies
                mine = attr_at(gm, name)
                if mine is not tensor:
                    with torch.no_grad():
                        tensor.copy_(mine)
        nodes = {n.name: n for n in graph_module.graph.nodes}
        names, taken = ConstantAttrMap(), {*program.state_dict, *program.constants}
        for site, added in done:
            mapped = {k: [nodes[n.name] for n in v] if isinstance(v, list) else nodes[v.name]
                      for k, v in site.nodes.items() if v is not None}
            if added is not None:
                bias = attr_at(gm, added).detach()
                graph_module.register_buffer(added, bias)
                names.add(bias, _bias_name(site.weight, taken))
                _read_bias(graph_module, mapped["producer"], added)
            _remove_bn(graph_module, dataclasses.replace(site, nodes=mapped))
        _same_ops(graph_module, gm)
        program.constants.update(lift_constants_pass(graph_module, program.graph_signature, names))
        graph_module.recompile()
        program.validate()
    except Exception:  # noqa: BLE001 — any program torch's own passes do not take is exported anew
        return None
    return program


def _bias_name(weight: str, taken: set) -> str:
    """The program's name of a bias a layer gains: LAYER.bnfold_bias beside LAYER.weight, else
    WEIGHT_bnfold_bias (a functional conv's weight `w1`); never a name the program has."""
    owner, _, leaf = weight.rpartition(".")
    base = f"{owner}.bnfold_bias".lstrip(".") if leaf == "weight" else f"{weight}_bnfold_bias"
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _same_ops(graph_module: torch.fx.GraphModule, gm: torch.fx.GraphModule) -> None:
    """Leave the program's graph the ops of the folded module's: what only served a removed BN
    (a FrozenBatchNorm2d's statistics, read from placeholders here, and checks of them) goes.
    Raises where anything else would."""
    keep = {n.name for n in gm.graph.nodes if n.op == "call_function"}
    doomed = [n for n in graph_module.graph.nodes if n.op == "call_function" and n.name not in keep]
    if any(user not in set(doomed) for n in doomed for user in n.users):
        raise ValueError("the program's graph differs from its module's")
    for node in reversed(doomed):
        graph_module.graph.erase_node(node)
    if {n.name for n in graph_module.graph.nodes if n.op == "call_function"} != keep:
        raise ValueError("the program's graph differs from its module's")


def _tidy(gm: torch.fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):  # checks of a removed affine's constants keep them alive
        if op_name(node.target) in CHECKS and is_constant(node.args[0] if node.args else None):
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def count_aten_bn(gm: torch.fx.GraphModule) -> int:
    """batch_norm ops and per-channel affines of constants in the graph."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and op_name(n.target) in BN_OPS) + \
        sum(1 for c in FxGraph(gm).bn_calls() if c.axis_from_end is not None)


def _rewrite(gm, producer: torch.fx.Node, affine: Affine, site: FoldSite) -> str | None:
    """The layer's weight and bias folded; returns the name of a bias the layer was given."""
    if site.weight is None:
        raise Skip(f"{producer.name} reads no weight attribute")
    weight = attr_at(gm, site.weight)
    bias = attr_at(gm, site.bias) if site.bias else None
    new_w, new_b = fold_tensors(weight, bias, affine, site.axis, site.groups, producer.name)
    with torch.no_grad():
        weight.copy_(torch.from_numpy(new_w).to(weight.device, weight.dtype))
        if bias is not None:
            bias.copy_(torch.from_numpy(new_b).to(weight.device, weight.dtype))
            return None
    name = site.weight.replace(".", "_") + "_bnfold_bias"
    gm.register_parameter(name, nn.Parameter(torch.from_numpy(new_b).to(weight.device, weight.dtype)))
    _read_bias(gm, producer, name)
    return name


def _read_bias(gm, producer: torch.fx.Node, name: str) -> None:
    with gm.graph.inserting_before(producer):
        new_node = gm.graph.get_attr(name)
    new_node.meta["nn_module_stack"] = dict(producer.meta.get("nn_module_stack", {}))
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
