"""Structural re-parameterization of torch models: the sums of parallel branches that
branch_terms.py finds become one Conv.

The rewrite is on an fx graph: for an eager module the smallest submodule whose forward holds the
add is traced and replaced by its GraphModule (the rest of the model keeps its classes); for a
`.pt2` the program's ATen graph (aten.conv* summed by aten.add.Tensor) is rewritten in place.
"""
from __future__ import annotations

import operator

import torch
import torch.fx
from torch import nn

from ..errors import Skip
from ..fold_math import FoldOverflow
from ..report import FoldedBN, FoldReport, MergedBranches, UnmergedBranches
from .branch_terms import (Candidate, GraphDialect, Merged, Term, candidates, conv_term, join_path, kernel_label,
                           merge_terms, merged_tensors)
from .fx_graph import FxGraph, reads_shape_only
from .params import attr_at, replace_at
from .sites import analysis_copy
from .tracer import GraphView, Traced, Untraceable, trace
from .vocabulary import changed_call, plain_layer

STATE_DICT_REASON = "state_dict keeps the architecture; use --to onnx/pt2 or fuse_module to re-parameterize"
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPARENT_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
FX_ADDS = (operator.add, operator.iadd, torch.add)
aten = torch.ops.aten
ATEN_ADDS = (aten.add.Tensor, aten.add_.Tensor)
ATEN_CONVS = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}


# -- eager modules (torch.fx) ---------------------------------------------------------------------


class FxDialect(GraphDialect):
    counts_calls = True

    def is_add(self, node) -> bool:
        return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in FX_ADDS \
            and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1 and not node.kwargs.get("out")

    def transparent(self, node) -> bool:
        return isinstance(node, torch.fx.Node) and node.op == "call_module" \
            and isinstance(self.gm.get_submodule(node.target), TRANSPARENT_MODULES)

    def value_users(self, node) -> list:
        return [u for u in node.users if not reads_shape_only(u, node)]

    def add_scope(self, node) -> str | None:
        stack = node.meta.get("nn_module_stack")  # the tracer records no stack in the root's own forward
        if not stack:
            return ""
        path = list(stack.values())[-1]
        return path[0] if isinstance(path, tuple) else str(path)

    def conv(self, node):
        if not isinstance(node, torch.fx.Node) or node.op != "call_module":
            return None
        layer = self.gm.get_submodule(node.target)
        if not isinstance(layer, CONV_MODULES):
            return None
        problem = None
        if plain_layer(layer) is None:  # a forward of its own, hooks, or a forward set on the instance
            problem = f"{node.target} ({type(layer).__name__}) has a forward of its own"
        elif self.calls.get(node.target, 0) != 1:
            problem = f"{node.target} is called {self.calls[node.target]} times"
        if self.shallow:
            return Term(f"Conv '{node.target}'", node.args[0], [node], module=node.target, problem=problem)
        return conv_term(f"Conv '{join_path(self.prefix, node.target)}' {kernel_label(layer.weight)}", node.args[0], [node], layer.weight,
                          layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups, node.target,
                          layer.padding_mode, problem)


def branch_owners(view, graph: FxGraph) -> tuple[set[str], list[UnmergedBranches], set[frozenset]]:
    """The modules whose forward sums parallel branches in this graph (paths relative to it),
    read off the graph the fold found its sites on: folding turns a BN into the identity, so it
    adds no sum and takes none away. A sum this whole graph shows cannot merge (a branch Conv its
    block's parent also calls, a branch BN's statistics read elsewhere) is kept, with the reason:
    its block, traced alone after the fold, would not show it; such a sum is also returned as the
    module paths of its terms, so that the block's merge leaves it."""
    dialect = FxDialect(view, view, "", graph)
    dialect.shallow = True
    owners, kept, refused = set(), [], set()
    for cand in candidates(dialect):
        problem = next((t.problem for t in cand.terms if t.problem), None)
        if problem is None:
            owners.add(cand.owner)
        else:
            kept.append(UnmergedBranches(cand.add.name, problem))
            refused.add(_term_modules(cand, ""))
    return owners, kept, refused


def _term_modules(cand: Candidate, path: str) -> frozenset:
    return frozenset(join_path(path, t.module) for t in cand.terms if t.module)


def merge_module(module: nn.Module, report: FoldReport, keep_layout: bool = False,
                 owners: set[str] | None = None, walk: set[str] | None = None,
                 refused: set[frozenset] | None = None) -> nn.Module:
    """Merge the parallel branches of `module` (already folded); returns it, or a GraphModule
    standing in for it where the add is in its own forward. `owners` (from branch_owners) says
    which modules hold sums, deepest merged first, each traced alone; `walk`, which modules no
    fx graph showed (they and their children are traced again); None: the whole module.
    `refused`: sums (by their terms' module paths) the fold's graphs showed cannot merge."""
    if owners is None:
        return _merge_in(module, "", report, keep_layout)
    for path in sorted(owners | (walk or set()), key=lambda p: (-p.count(".") if p else 1, p)):
        try:
            sub = module.get_submodule(path)
        except AttributeError:  # the fold replaced a module above it: read that part again
            continue
        new = _merge_in(sub, path, report, keep_layout) if path in (walk or ()) else \
            _merge_here(sub, path, report, keep_layout, refused or set())
        module = replace_at(module, path, new)
    return module


def _merge_here(module: nn.Module, path: str, report: FoldReport, keep_layout: bool,
                refused: set[frozenset]) -> nn.Module:
    """The sums in `module`'s own forward, merged; its submodules are left as they are."""
    try:
        traced = trace(analysis_copy(module))
    except Untraceable:
        return module
    return _merged(module, traced, path, report, keep_layout, refused)


def _merged(module: nn.Module, traced: Traced, path: str, report: FoldReport, keep_layout: bool,
            refused: set[frozenset] = frozenset()) -> nn.Module:
    """A GraphModule of `module`'s trace with the sums of its own forward merged, or `module`
    where none merged. The graph is rewritten first and compiled once, holding only what it reads."""
    view = traced.view
    here = [c for c in candidates(FxDialect(view, module, path))
            if not c.owner and _term_modules(c, path) not in refused]
    why = _not_replaceable(module, traced) if here else None
    if why is not None:  # the GraphModule standing in for it would compute less than it does
        report.unmerged += [UnmergedBranches(f"{path}:{c.add.name}" if path else c.add.name, why) for c in here]
        return module
    merged_any = False
    for cand in here:
        merged_any |= _merge_candidate(view, cand, path, report, keep_layout, _fx_rewrite)
    if not merged_any:
        return module
    traced.graph.eliminate_dead_code()
    traced.graph.lint()
    return traced.gm


def _not_replaceable(module: nn.Module, traced: Traced) -> str | None:
    """Why a GraphModule of `module`'s forward, traced alone, would not compute what calling it does."""
    why = changed_call(module)
    if why is not None:
        return f"{type(module).__name__} has {why}, which a re-parameterized GraphModule would not run"
    if sum(1 for n in traced.graph.nodes if n.op == "placeholder") != 1:
        return (f"{type(module).__name__}'s forward takes more than one input: traced alone, what its caller "
                "passes is not known")
    return None


def _merge_in(module: nn.Module, path: str, report: FoldReport, keep_layout: bool) -> nn.Module:
    """Every sum in `module` and below, each merged where its add is: for a part of the model no
    fx graph showed whole, so where its sums are is not known."""
    if not any(isinstance(m, CONV_MODULES) for m in module.modules()):
        return module
    try:
        traced = trace(analysis_copy(module))
    except Untraceable:  # its own forward is untraceable: its children may trace
        for name, child in list(module.named_children()):
            _replace_child(module, name, _merge_in(child, join_path(path, name), report, keep_layout))
        return module
    for inner in traced.opaque:  # submodules fx cannot trace are merged on their own
        parent, _, name = inner.rpartition(".")
        holder = module.get_submodule(parent) if parent else module
        _replace_child(holder, name, _merge_in(getattr(holder, name), join_path(path, inner), report, keep_layout))
    found = candidates(FxDialect(traced.view, module, path))
    below = sorted({c.owner.split(".")[0] for c in found if c.owner})
    for name in below:
        _replace_child(module, name, _merge_in(getattr(module, name), join_path(path, name), report, keep_layout))
    if not any(not c.owner for c in found):
        return module
    if below:  # the children changed: trace again
        traced = trace(analysis_copy(module))
    return _merged(module, traced, path, report, keep_layout)


def _replace_child(module: nn.Module, name: str, new: nn.Module) -> None:
    if new is not getattr(module, name):
        setattr(module, name, new)


def _merge_candidate(gm, cand: Candidate, path: str, report: FoldReport, keep_layout: bool, rewrite) -> bool:
    add_name = f"{path}:{cand.add.name}" if path else cand.add.name
    try:
        merged = merge_terms(cand.terms)
        if keep_layout:
            raise Skip(STATE_DICT_REASON)
        like = next(t.like for t in cand.terms if t.like is not None)
        weight, bias = merged_tensors(merged, like)
    except (Skip, FoldOverflow) as why:
        report.unmerged.append(UnmergedBranches(add_name, str(why)))
        return False
    conv_name = rewrite(gm, cand, merged, weight, bias)
    full = join_path(path, conv_name)
    report.merged.append(MergedBranches(add_name, full, [t.label for t in cand.terms], merged.kernel))
    _count_merged_bns(report, [join_path(path, b) for t in cand.terms for b in t.bns], full)
    return True


def _count_merged_bns(report: FoldReport, bns: list[str], conv: str) -> None:
    """A BN merged into the Conv is folded: one kept before (a BN of the input) moves over, and a
    note that it stayed as an identity no longer holds."""
    report.notes = [n for n in report.notes if not any(f" {bn} " in n for bn in bns)]
    for bn in bns:
        kept = [s for s in report.skipped if s.bn == bn]
        if kept:
            report.skipped = [s for s in report.skipped if s.bn != bn]
            report.folded.append(FoldedBN(bn, conv, "merged branches"))


def _fresh_name(gm: nn.Module, base: str) -> str:
    name, i = base, 1
    while True:
        try:
            attr_at(gm, name)
        except AttributeError:
            return name
        name, i = f"{base}_{i}", i + 1


def _fx_rewrite(view: GraphView, cand: Candidate, merged: Merged, weight, bias) -> str:
    first = next(t for t in cand.terms if t.weight is not None)
    conv_type = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(merged.kernel) - 1]
    out_ch, per_group = weight.shape[:2]
    layer = conv_type(per_group * first.groups, out_ch, tuple(merged.kernel), first.stride, merged.padding,
                      first.dilation, first.groups, True, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    name = _fresh_name(view, "reparam_conv")  # the add is in the traced module's own forward
    view.root.add_module(name, layer)
    _replace(view, cand, lambda: view.graph.call_module(name, (cand.source,)))
    return name


def _replace(gm: torch.fx.GraphModule, cand: Candidate, make) -> None:
    """The add's value becomes the new node's; the branches' nodes go. Users that read only the
    shape of a branch (an assert on ndim) read the new node's: it has the sum's shape."""
    doomed = [cand.add, *cand.inner, *(n for t in cand.terms for n in t.nodes)]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    with gm.graph.inserting_before(min(doomed, key=order.__getitem__)):
        new = make()
    cand.add.replace_all_uses_with(new)
    doomed_set = set(doomed)
    for node in doomed:
        for user in list(node.users):
            if user not in doomed_set:
                user.replace_input_with(node, new)
    for node in sorted(doomed_set, key=order.__getitem__, reverse=True):
        if not node.users:
            gm.graph.erase_node(node)


def _finish(gm: torch.fx.GraphModule) -> None:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


# -- a `.pt2` program's ATen graph -------------------------------------------------------------


class AtenDialect(GraphDialect):
    def is_add(self, node) -> bool:
        return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in ATEN_ADDS \
            and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1

    def transparent(self, node) -> bool:
        return isinstance(node, torch.fx.Node) and node.op == "call_function" and (
            node.target is aten.clone.default
            or (node.target is aten.dropout.default and len(node.args) > 2 and not node.args[2]))

    def value_users(self, node) -> list:
        return [u for u in node.users if not reads_shape_only(u, node)]

    def _param(self, node) -> str | None:
        if isinstance(node, torch.fx.Node) and node.op == "get_attr" and len(node.users) == 1:
            return node.target
        return None

    def conv(self, node):
        if not isinstance(node, torch.fx.Node) or node.op != "call_function" or node.target not in ATEN_CONVS:
            return None
        args = list(node.args) + [None, 1, 0, 1, 1][len(node.args) - 2:]
        x, w, b, stride, padding, dilation, groups = args[:7]
        weight_path, bias_path = self._param(w), self._param(b) if b is not None else None
        if weight_path is None or (b is not None and bias_path is None):
            return Term(f"Conv '{node.name}'", x, [node], problem=f"{node.name}'s weight or bias is not a constant "
                        "read by it alone")
        weight = attr_at(self.gm, weight_path)
        return conv_term(f"Conv '{weight_path.rpartition('.')[0] or node.name}' {kernel_label(weight)}", x,
                          [node], weight, attr_at(self.gm, bias_path) if bias_path else None, stride, padding,
                          dilation, groups, weight_path)


def merge_exported(gm: torch.fx.GraphModule, report: FoldReport) -> torch.fx.GraphModule:
    """Merge the parallel branches in a `.pt2` program's graph (already folded), in place."""
    merged_any = False
    for cand in candidates(AtenDialect(gm, gm)):
        cand.owner = ""
        merged_any |= _merge_candidate(gm, cand, "", report, False, _aten_rewrite)
    if merged_any:
        before = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        _finish(gm)
        after = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for path in before - after:  # the branches' weights: not carried into the re-exported program
            parent, _, leaf = path.rpartition(".")
            delattr(gm.get_submodule(parent) if parent else gm, leaf)
    return gm


def _aten_rewrite(gm: torch.fx.GraphModule, cand: Candidate, merged: Merged, weight, bias) -> str:
    first = next(t for t in cand.terms if t.weight is not None)
    base = first.module.rpartition(".")[0].replace(".", "_") or "branches"
    name = _fresh_name(gm, f"{base}_reparam_weight").removesuffix("_weight")
    gm.register_parameter(f"{name}_weight", nn.Parameter(weight, requires_grad=False))
    gm.register_parameter(f"{name}_bias", nn.Parameter(bias, requires_grad=False))
    op = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}[len(merged.kernel)]

    def make():
        w, b = gm.graph.get_attr(f"{name}_weight"), gm.graph.get_attr(f"{name}_bias")
        return gm.graph.call_function(op, (cand.source, w, b, list(first.stride), list(merged.padding),
                                           list(first.dilation), first.groups))

    _replace(gm, cand, make)
    return name
