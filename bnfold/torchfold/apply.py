"""Folding the sites of an eager module into it, by name, and taking the folded BNs out of its forward.

A BN module with torch's own forward becomes nn.Identity. A BN computed inside another module's
forward — timm's BatchNormAct2d (normalize, then drop and act), FrozenBatchNorm2d's affine, a
functional batch_norm — leaves with that module replaced by exactly what remains of its forward:
nothing (nn.Identity), a chain of its children (nn.Sequential), or else an fx GraphModule of the
rest. Where the module's layout must stay (a state_dict loads into the original architecture), or
what remains cannot be had, the BN's tensors are set to the identity γ=1, β=0, μ=0, σ²=1−ε
(a shift the layer has no bias for stays as μ = −t).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx
from torch import nn

from ..errors import Skip
from ..fold_math import BrokenStatistics, FoldOverflow
from ..report import FoldedBN, FoldReport, SkippedBN
from .find import find_sites
from .fx_graph import FxGraph
from .params import attr_at, fold_tensors, key_at, replace_at
from .site_rule import AffineStats, BnStats, FoldSite
from .sites import Found
from .tracer import Traced, Untraceable, trace
from .vocabulary import op_name


@dataclass
class Plan:
    site: FoldSite
    weight: np.ndarray
    bias: np.ndarray | None  # None: the shift stays in the BN
    shift: np.ndarray | None


def fold_module(module: nn.Module, report: FoldReport, mode: str = "remove",
                example: tuple | None = None, shared: set | None = None) -> tuple[nn.Module, Found]:
    """Fold every BN of `module` that folds exactly; returns the module (a new one only where the
    root itself computed a folded BN) and what its graphs showed. `shared`: keys
    (params.tensor_key) of tensors another model in the same file also holds — folding them
    would change that model too."""
    if module.training:
        report.notes.append("the module was in training mode; its inference (eval) behaviour was folded")
        module.eval()
    found = find_sites(module, example)
    report.skipped += found.skipped
    report.notes += found.notes
    report.untraced += found.untraced
    report.unmerged += found.unmerged
    plans = [p for p in (_plan(module, s, mode, report, shared or set()) for s in found.sites) if p is not None]
    remains = _remains(module, plans, report) if mode == "remove" else {}
    plans = [p for p in plans if p.site.scope in remains or not isinstance(p.site.stats, AffineStats)
             or _removed_whole(p, mode) or _affine_identity(module, p, report)]
    for plan in plans:
        _write(module, plan)
        note = None if plan.site.scope in remains else _retire(module, plan, mode)
        if note:
            report.notes.append(note)
        if note or mode == "identity":
            report.identity_bns += 1
        report.folded.append(FoldedBN(plan.site.bn, plan.site.producer, plan.site.kind))
    for scope, new in sorted(remains.items(), key=lambda kv: -kv[0].count(".")):
        module = replace_at(module, scope, new)
    return module, found


def _plan(root: nn.Module, site: FoldSite, mode: str, report: FoldReport, shared: set) -> Plan | None:
    try:
        weight = attr_at(root, site.weight or f"{site.producer}.weight")
        bias = attr_at(root, site.bias) if site.bias else None
        held = next((p for p in (site.weight or f"{site.producer}.weight", site.bias, *site.stats.paths())
                     if p and key_at(root, p) in shared), None)
        if held is not None:
            raise Skip(f"{held} is also held by another model in the file (a weight set folded on its own)")
        affine = site.affine(root, like=weight)
        new_w, new_b = fold_tensors(weight, bias, affine, site.axis, site.groups, site.kind)
    except (Skip, AttributeError) as why:
        report.skipped.append(SkippedBN(site.bn, str(why), site.producer))
        return None
    except BrokenStatistics as why:
        report.warnings.append(f"BatchNorm {site.bn!r}: {why}; the model is broken there, BN kept")
        report.skipped.append(SkippedBN(site.bn, f"broken statistics: {why}", site.producer))
        return None
    except FoldOverflow as why:
        report.skipped.append(SkippedBN(site.bn, str(why), site.producer))
        return None
    # the state_dict layout has no bias to take the shift, nor a layer whose own forward may ignore one
    if bias is None and (mode == "identity" or not site.plain_layer):
        return Plan(site, new_w, None, affine.shift)
    return Plan(site, new_w, new_b, None)


def _removed_whole(plan: Plan, mode: str) -> bool:
    """A module that computes only the BN leaves as nn.Identity: nothing of it stays to be set."""
    return mode == "remove" and plan.shift is None and plan.site.plain_bn


def _write(root: nn.Module, plan: Plan) -> None:
    weight = attr_at(root, plan.site.weight or f"{plan.site.producer}.weight")
    with torch.no_grad():
        weight.copy_(torch.from_numpy(plan.weight).to(weight.device, weight.dtype))
        if plan.bias is None:
            return
        value = torch.from_numpy(plan.bias).to(weight.device, weight.dtype)
        if plan.site.bias:
            attr_at(root, plan.site.bias).copy_(value)
        else:
            root.get_submodule(plan.site.producer).bias = nn.Parameter(value)


def _retire(root: nn.Module, plan: Plan, mode: str) -> str | None:
    """Take a folded BN out: the module removed, or its tensors set to the identity."""
    site = plan.site
    if mode == "remove" and plan.shift is None and site.plain_bn:
        replace_at(root, site.scope, nn.Identity())
        return None
    if isinstance(site.stats, BnStats):
        set_identity(root, site.stats.tensors, site.stats.eps, plan.shift)
    if mode != "remove":
        return None
    if plan.shift is not None:
        return (f"{site.bn} kept as an identity holding the shift (γ=1, β=0, μ=−t, σ²=1−ε): {site.producer} has no "
                "bias and a forward of its own that might not read one")
    return (f"{site.bn} kept as an identity (γ=1, β=0, μ=0, σ²=1−ε): what remains of {site.scope or 'the model'}'s "
            "forward could not be had as a module; --to onnx removes its cost")


def set_identity(root: nn.Module, tensors: dict, eps: float, shift: np.ndarray | None) -> None:
    with torch.no_grad():
        for key, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0 - eps)):
            path = tensors.get(key)
            if path is None:
                continue
            tensor = attr_at(root, path)
            if key == "running_mean" and shift is not None:
                tensor.copy_(torch.from_numpy(-shift).to(tensor.device, tensor.dtype))
            else:
                tensor.fill_(value)


# -- what remains of a module's forward --------------------------------------------------------


def _remains(root: nn.Module, plans: list[Plan], report: FoldReport) -> dict[str, nn.Module]:
    """Scope → the module computing its forward without its folded BNs, for BNs computed inside a
    module of their own (not a plain BN module, not holding a shift)."""
    scopes: dict[str, list[FoldSite]] = {}
    for plan in plans:
        if not plan.site.plain_bn and plan.shift is None and plan.site.scope:
            scopes.setdefault(plan.site.scope, []).append(plan.site)
    out = {}
    for scope, sites in scopes.items():
        try:
            out[scope] = what_remains(root.get_submodule(scope), [_relative(s, scope) for s in sites])
        except Skip as why:
            report.notes.append(f"{scope}: {why}")
    return out


def _relative(site: FoldSite, scope: str) -> str | None:
    mean = site.stats.tensors.get("running_mean") if isinstance(site.stats, BnStats) else None
    return mean[len(scope) + 1:] if mean and mean.startswith(scope + ".") else mean


def what_remains(module: nn.Module, means: list[str | None]) -> nn.Module:
    """`module`'s forward without the BNs reading these running means (None: an affine), or Skip."""
    try:
        traced = trace(module)
    except Untraceable as why:
        raise Skip(f"its forward cannot be traced alone ({why})") from None
    calls = FxGraph(traced.view, traced.calls).bn_calls()
    chosen = [c for c in calls if isinstance(c.stats, BnStats) and c.stats.tensors.get("running_mean") in means]
    affines = [c for c in calls if isinstance(c.stats, AffineStats)]
    if means.count(None) and len(affines) == means.count(None):
        chosen += affines
    if len(chosen) != len(means) or traced.opaque:
        raise Skip("its forward alone does not show the same BNs")
    graph = traced.graph
    for call in chosen:
        for user in list(call.node.users) if op_name(call.node.target) != "add" else []:
            if op_name(user.target) == "getitem" and user.args[1] == 0:
                user.replace_all_uses_with(call.input)
                graph.erase_node(user)
        call.node.replace_all_uses_with(call.input)
    for node in list(graph.nodes):
        if node.op == "call_function" and op_name(node.target) == "_assert":
            graph.erase_node(node)
    graph.eliminate_dead_code()
    return _simplest(traced)


def _simplest(traced: Traced) -> nn.Module:
    """nn.Identity or an nn.Sequential of children where the graph is that; else the GraphModule
    (made now: it holds only what the graph still reads, so not the folded BN's tensors)."""
    graph = traced.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    body = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    out = next(n for n in graph.nodes if n.op == "output")
    previous = inputs[0] if len(inputs) == 1 else None
    for node in body:
        if node.op != "call_module" or "." in node.target or node.args != (previous,) or node.kwargs \
                or len(previous.users) != 1:
            previous = None
            break
        previous = node
    if previous is None or out.args[0] is not previous:
        return traced.gm
    if not body:
        return nn.Identity()
    return nn.Sequential(OrderedDict((n.target, traced.root.get_submodule(n.target)) for n in body))


def _affine_identity(root: nn.Module, plan: Plan, report: FoldReport) -> bool:
    """An affine BN that must stay in place (state_dict layout, a shift to hold) as the identity:
    only where its module keeps BN's tensors by BN's names and, set so, computes x + shift."""
    site, module = plan.site, None
    try:
        module = root.get_submodule(site.scope) if site.scope is not None else None
    except AttributeError:
        pass
    names = ("weight", "bias", "running_mean", "running_var")
    if module is None or not all(isinstance(getattr(module, n, None), torch.Tensor) for n in names) \
            or not isinstance(getattr(module, "eps", None), float):
        report.skipped.append(SkippedBN(site.bn, "a per-channel affine that must stay in place (state_dict layout, "
                                        "or a shift the layer has no bias for) has no identity bnfold can set; "
                                        "use --to onnx/pt2 or fuse_module", site.producer))
        return False
    if not _computes_identity(module, plan.shift, 0 if site.kind == "Linear" else int(site.kind[-2])):
        report.skipped.append(SkippedBN(site.bn, f"{site.scope} set to BN's identity does not compute the identity; "
                                        "kept", site.producer))
        return False
    tensors = {n: f"{site.scope}.{n}" if site.scope else n for n in names}
    plan.site.stats = BnStats(tensors, module.eps)
    return True


def _computes_identity(module: nn.Module, shift: np.ndarray | None, spatial: int) -> bool:
    """Run a copy set to the identity: does it give x (+ shift) back, within its dtype's rounding?"""
    probe = copy.deepcopy(module)
    set_identity(probe, {n: n for n in ("weight", "bias", "running_mean", "running_var")}, probe.eps, shift)
    mean = probe.running_mean
    channels = mean.shape[0]
    x = torch.randn(2, channels, *([3] * spatial), generator=torch.Generator().manual_seed(0)).to(mean.dtype)
    expected = x.double() + (torch.from_numpy(shift).reshape(1, channels, *([1] * spatial)) if shift is not None else 0)
    try:
        with torch.no_grad():
            got = probe(x)
    except Exception:  # noqa: BLE001 — a module that cannot run alone is not known to be the identity
        return False
    tol = 8 * torch.finfo(mean.dtype).eps
    return isinstance(got, torch.Tensor) and got.shape == x.shape and torch.allclose(got.double(), expected, rtol=tol,
                                                                                       atol=tol)
