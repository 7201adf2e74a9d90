"""Folding in TorchScript modules: the same fold, with edges read from each module's graph.

A scripted container's forward graph calls its children with prim::CallMethod; a BN call
whose input is the only use of a Conv/ConvTranspose call's output is a fold site. All
instances of one scripted class share one graph, so a site is folded for every instance
(each with its own statistics) or for none, and then the BN call is cut from the graph:
the saved TorchScript no longer runs it.
"""
from __future__ import annotations

import torch

from ..errors import Skip
from ..fold_math import Affine, BrokenStatistics, FoldOverflow
from ..report import FoldedBN, FoldReport, SkippedBN
from .params import affine_of, folded_params, write_params

BN_NAMES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm")
LAYERS = {"Conv1d": (0, False), "Conv2d": (0, False), "Conv3d": (0, False),
          "ConvTranspose1d": (1, True), "ConvTranspose2d": (1, True), "ConvTranspose3d": (1, True)}


def fold_script_module(root: torch.jit.ScriptModule, report: FoldReport) -> torch.jit.ScriptModule:
    by_type: dict[str, list[tuple[str, torch.jit.ScriptModule]]] = {}
    for prefix, module in root.named_modules():
        by_type.setdefault(module._c._type().qualified_name(), []).append((prefix, module))
    for instances in by_type.values():
        try:
            graph = instances[0][1].graph
        except (RuntimeError, AttributeError):
            continue
        _fold_graph(instances, graph, report)
    return root


def _fold_graph(instances, graph, report: FoldReport) -> None:
    attrs = {n.output().debugName(): n.s("name") for n in graph.nodes() if n.kind() == "prim::GetAttr"}
    calls = [n for n in graph.nodes() if n.kind() == "prim::CallMethod" and n.s("name") == "forward"]
    counts: dict[str, int] = {}
    for call in calls:
        name = attrs.get(call.inputsAt(0).debugName())
        counts[name] = counts.get(name, 0) + 1
    module = instances[0][1]
    for call in calls:
        bn_name = attrs.get(call.inputsAt(0).debugName())
        if bn_name is None or getattr(getattr(module, bn_name, None), "original_name", "") not in BN_NAMES:
            continue
        full = lambda prefix, name: f"{prefix}.{name}" if prefix else name  # noqa: E731
        try:
            producer = _site(module, call, bn_name, attrs, counts)
            kind = getattr(module, producer).original_name
            axis, grouped = LAYERS[kind]
            plans = []
            for _, inst in instances:  # every instance must fold, or none: they share this graph
                layer = getattr(inst, producer)
                affine = _affine(getattr(inst, bn_name))
                plans.append((layer, folded_params(layer, affine, axis, int(layer.groups) if grouped else 1)))
        except (Skip, BrokenStatistics, FoldOverflow) as why:
            report.skipped.extend(SkippedBN(full(p, bn_name), str(why)) for p, _ in instances)
            continue
        for layer, params in plans:
            write_params(layer, *params)
        call.output().replaceAllUsesWith(call.inputsAt(1))
        call.destroy()
        report.folded.extend(FoldedBN(full(p, bn_name), full(p, producer), kind) for p, _ in instances)


def _site(module, call, bn_name: str, attrs: dict, counts: dict) -> str:
    x = call.inputsAt(1)
    node = x.node()
    if node.kind() != "prim::CallMethod":
        raise Skip(f"input comes from {node.kind()}, not a layer call")
    producer = attrs.get(node.inputsAt(0).debugName())
    kind = getattr(getattr(module, producer, None), "original_name", "") if producer else ""
    if kind == "Linear":
        # BN1d normalizes axis 1, the Linear's feature axis only for [N, C]; a scripted graph
        # does not record the rank, so the fold would be a guess.
        raise Skip("Linear → BatchNorm1d in TorchScript: the rank is not in the graph; fold the eager module "
                   "(state_dict + --arch, or a pickle) instead")
    if kind not in LAYERS:
        raise Skip(f"{producer} ({kind or 'unknown'}) is not a foldable layer")
    if len(x.uses()) != 1:
        raise Skip(f"output of {producer} is also used elsewhere")
    if counts.get(producer) != 1 or counts.get(bn_name) != 1:
        raise Skip(f"{producer} or {bn_name} is called more than once")
    return producer


def _affine(bn) -> Affine:
    if bn.training:
        raise Skip("BN is in training mode")
    if getattr(bn, "running_mean", None) is None:
        raise Skip("track_running_stats=False: BN always uses batch statistics")
    return affine_of(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
