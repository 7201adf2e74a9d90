"""Structural re-parameterization on the torch dataflow graph (RepVGG, MobileOne, ACNet, a CPE's
`x + dwconv(x)`): an add whose every term is a Conv of one input x, a Conv followed by its BN, a BN
of x or x itself becomes one Conv of x.

Each Conv term is W ⋆ x + b (a BN after it scales W and b, as in the fold); a BN of x is s·x + t
and x itself s = 1, t = 0. Whether the terms are one Conv, and its float64 kernel, is
bnfold.reparam's (the math and the rule are in its docstring); the result is cast once to the
weight dtype.

The rewrite is on an fx graph: for an eager module the smallest submodule whose forward holds the
add is traced and replaced by its GraphModule (the rest of the model keeps its classes); for a
`.pt2` the program's ATen graph (aten.conv* summed by aten.add.Tensor) is rewritten in place.
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx
from torch import nn

from ..errors import Skip
from ..fold_math import BrokenStatistics, FoldOverflow, cast_exact
from ..reparam import AffineBranch, ConvBranch, Window, merge
from ..report import FoldedBN, FoldReport, MergedBranches, UnmergedBranches
from .fx_graph import FxGraph, reads_shape_only
from .params import attr_at
from .sites import analysis_copy
from .vocabulary import LAYER_FORWARDS, TUPLE_BN_OPS, op_name

STATE_DICT_REASON = "state_dict keeps the architecture; use --to onnx/pt2 or fuse_module to re-parameterize"
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPARENT_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
FX_ADDS = (operator.add, operator.iadd, torch.add)
aten = torch.ops.aten
ATEN_ADDS = (aten.add.Tensor, aten.add_.Tensor)
ATEN_CONVS = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}


@dataclass
class Term:
    """One summand: a Conv (weight and bias in float64, a BN after it already applied) or an
    identity (s·x + t per channel; s = 1, t = 0 for x itself)."""

    label: str
    source: torch.fx.Node | None  # the input this term reads
    nodes: list[torch.fx.Node] = field(default_factory=list)  # its own nodes, erased by the merge
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None
    stride: tuple = ()
    padding: tuple | str = ()
    dilation: tuple = ()
    groups: int = 1
    padding_mode: str = "zeros"
    like: torch.Tensor | None = None  # the Conv weight: dtype and device of the result
    bns: list[str] = field(default_factory=list)  # BNs this term computes (merged away with it)
    module: str = ""  # the Conv (or BN) module path: where the add lives
    problem: str | None = None  # why this term cannot be merged


@dataclass
class Candidate:
    add: torch.fx.Node  # the outermost add
    inner: list[torch.fx.Node]  # the adds (and identity layers) under it
    terms: list[Term]
    owner: str  # the deepest module holding every term: where the add is written

    @property
    def source(self) -> torch.fx.Node:
        return self.terms[0].source


@dataclass
class Merged:
    weight: np.ndarray
    bias: np.ndarray
    padding: tuple
    kernel: list[int]


# -- the merge itself --------------------------------------------------------------------------


def merge_terms(terms: list[Term]) -> Merged:
    """One kernel and bias computing the sum of `terms`, or Skip with the reason."""
    for t in terms:
        if t.problem:
            raise Skip(t.problem)
    if len({id(t.source) for t in terms}) != 1:
        raise Skip("the terms read different inputs")
    merged = merge([_branch(t) for t in terms])
    window = merged.window
    for a, (begin, end) in enumerate(zip(window.pads_begin, window.pads_end)):
        if begin != end:
            raise Skip(f"the merged kernel needs uneven padding on spatial axis {a} ({begin} before, {end} after), "
                       "which a torch Conv does not take")
    for t in terms:
        if t.weight is not None:  # a 1-tap axis reads the same under any dilation; the rewrite reads the first's
            t.dilation = window.dilations
    return Merged(merged.weight, merged.bias, window.pads_begin, list(window.kernel))


def _branch(t: Term) -> ConvBranch | AffineBranch:
    if t.weight is None:
        return AffineBranch(t.label, t.scale, t.shift)
    if t.padding_mode != "zeros":
        raise Skip(f"{t.label} has padding_mode={t.padding_mode!r}, not 'zeros'")
    begin, end = _padding(t)
    window = Window(t.weight.shape[2:], t.stride, t.dilation, begin, end)
    return ConvBranch(t.label, t.weight, t.bias, window, t.groups, storage=f"{t.like.dtype} on {t.like.device}")


def _padding(t: Term) -> tuple[tuple, tuple]:
    """(before, after) per spatial axis. padding="same" puts the odd zero after, as torch does."""
    extents = [d * (k - 1) for d, k in zip(t.dilation, t.weight.shape[2:])]
    if t.padding == "valid":
        return (0,) * len(extents), (0,) * len(extents)
    if t.padding == "same":
        return tuple(e // 2 for e in extents), tuple(e - e // 2 for e in extents)
    return tuple(t.padding), tuple(t.padding)


def merged_tensors(merged: Merged, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 kernel and bias cast once to the dtype (and device) of the Conv weights."""
    np_dtype = np.float32 if like.dtype == torch.bfloat16 else torch.empty((), dtype=like.dtype).numpy().dtype
    weight = cast_exact(merged.weight, np_dtype, "merged weight")
    bias = cast_exact(merged.bias, np_dtype, "merged bias")
    return (torch.from_numpy(weight).to(like.device, like.dtype), torch.from_numpy(bias).to(like.device, like.dtype))


# -- finding adds of parallel branches on a graph ------------------------------------------------


class GraphDialect:
    """What an add, a layer that passes its input through, a BN and a Conv look like in one kind
    of graph (fx of an eager module, or ATen)."""

    def __init__(self, gm: torch.fx.GraphModule, probe: nn.Module, prefix: str = ""):
        self.gm, self.probe, self.prefix = gm, probe, prefix  # prefix: the graph's module path, for labels
        self.calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op in ("call_module", "get_attr"):
                self.calls[node.target] = self.calls.get(node.target, 0) + 1

    def is_add(self, node) -> bool:
        raise NotImplementedError

    def transparent(self, node) -> bool:
        raise NotImplementedError

    def value_users(self, node) -> list:
        raise NotImplementedError

    def bn(self, node) -> tuple[torch.fx.Node, list[torch.fx.Node], Term] | None:
        """(its input, its nodes, a Term carrying s, t and the BN's name) if `node` is a BN: the
        one BN recogniser (fx_graph.py), whatever the graph's vocabulary."""
        if not hasattr(self, "_bns"):
            self._graph = FxGraph(self.gm, Counter(self.calls) if isinstance(self, FxDialect) else None)
            self._bns = {c.node: c for c in self._graph.bn_calls()}
        nodes = []
        if isinstance(node, torch.fx.Node) and op_name(node.target) == "getitem" and node.args[1] == 0 \
                and node.args[0] in self._bns:
            nodes, node = [node], node.args[0]
        call = self._bns.get(node)
        if call is None or (op_name(node.target) in TUPLE_BN_OPS and not nodes):
            return None
        nodes += call.nodes or [node]
        label = f"BN '{_join(self.prefix, call.name)}'"
        term = Term(label, None, module=call.name, problem=call.reason, bns=[call.name])
        shared = next((p for p in call.stats.paths() if self._graph.reads(p) != 1), None)
        if term.problem is None and shared is not None:
            term.problem = f"{shared} is read by {self._graph.reads(shared)} ops"
        if term.problem is None:
            try:
                affine = call.stats.affine(self.gm)
                term.scale, term.shift = affine.scale, affine.shift
            except (BrokenStatistics, Skip) as why:
                term.problem = f"BN {call.name}: {why}"
        return call.input, nodes, term

    def conv(self, node) -> Term | None:
        raise NotImplementedError


def candidates(dialect: GraphDialect) -> list[Candidate]:
    """Adds whose terms include a Conv and at least two terms that read the same input."""
    found = []
    for node in dialect.gm.graph.nodes:
        if not dialect.is_add(node) or _feeds_add(dialect, node):
            continue
        inner: list[torch.fx.Node] = []
        summands = _summands(dialect, node, inner)
        if summands is None or len(summands) < 2:
            continue
        terms = [_term(dialect, s) for s in summands]
        sources = [id(t.source) for t in terms if t.source is not None]
        if not any(t.weight is not None or "Conv" in t.label for t in terms) \
                or max(sources.count(s) for s in sources) < 2:
            continue
        owners = [t.module.rpartition(".")[0] for t in terms if t.module]
        found.append(Candidate(node, inner, terms, _common_prefix(owners)))
    return found


def _feeds_add(dialect: GraphDialect, node) -> bool:
    users = dialect.value_users(node)
    while len(users) == 1 and dialect.transparent(users[0]):
        users = dialect.value_users(users[0])
    return len(users) == 1 and dialect.is_add(users[0])


def _summands(dialect: GraphDialect, add, inner: list) -> list | None:
    out = []
    for arg in add.args[:2]:
        if isinstance(arg, (int, float)) and arg == 0:
            continue  # sum() starts from 0
        if not isinstance(arg, torch.fx.Node):
            return None
        chain, node = [], arg
        while dialect.transparent(node) and len(dialect.value_users(node)) == 1:
            chain.append(node)
            node = node.args[0]
        if dialect.is_add(node) and len(dialect.value_users(node)) == 1:
            inner += chain + [node]
            more = _summands(dialect, node, inner)
            if more is None:
                return None
            out += more
        else:
            out.append(arg)
    return out


def _term(dialect: GraphDialect, node) -> Term:
    term = _parse_term(dialect, node)
    # every node of the term but its input is erased: none may be read anywhere else
    term.problem = term.problem or _single_use(dialect, term.nodes)
    return term


def _parse_term(dialect: GraphDialect, node) -> Term:
    nodes, node = _strip(dialect, node)
    bn = dialect.bn(node)
    if bn is None:
        conv = dialect.conv(node)
        if conv is not None:
            conv.nodes = nodes + conv.nodes
            return conv
        return Term("identity", node, nodes)
    bn_input, bn_nodes, affine = bn
    inner, conv_node = _strip(dialect, bn_input)
    conv = dialect.conv(conv_node)
    if conv is None:  # a BN of the input itself
        affine.source, affine.nodes = bn_input, nodes + bn_nodes
        return affine
    conv.nodes = nodes + bn_nodes + inner + conv.nodes
    conv.problem = conv.problem or affine.problem
    conv.bns = affine.bns
    if affine.scale is not None:
        conv.weight = conv.weight * affine.scale.reshape(-1, *([1] * (conv.weight.ndim - 1)))
        conv.bias = affine.scale * conv.bias + affine.shift
    return conv


def _strip(dialect: GraphDialect, node) -> tuple[list, torch.fx.Node]:
    nodes = []
    while isinstance(node, torch.fx.Node) and dialect.transparent(node):
        nodes.append(node)
        node = node.args[0]
    return nodes, node


def _single_use(dialect: GraphDialect, nodes: list) -> str | None:
    for node in nodes:
        users = len(dialect.value_users(node))
        if users != 1:
            return f"the output of {node.name} is also used by {users - 1} other node(s)"
    return None


def _common_prefix(paths: list[str]) -> str:
    if not paths:
        return ""
    parts = [p.split(".") if p else [] for p in paths]
    common = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return ".".join(common)


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _conv_term(label: str, source, nodes: list, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
               dilation, groups: int, module: str, padding_mode: str = "zeros", problem: str | None = None) -> Term:
    ndim = weight.ndim - 2
    spread = lambda v: tuple(v) * ndim if len(tuple(v)) == 1 else tuple(v)  # noqa: E731
    as_tuple = lambda v: spread(v if isinstance(v, (tuple, list)) else (v,))  # noqa: E731
    return Term(label, source, nodes, _f64(weight), _f64(bias) if bias is not None else np.zeros(weight.shape[0]),
                stride=as_tuple(stride), padding=padding if isinstance(padding, str) else as_tuple(padding),
                dilation=as_tuple(dilation), groups=int(groups), padding_mode=padding_mode, like=weight,
                module=module, problem=problem)


def _kernel_label(weight: torch.Tensor) -> str:
    return "×".join(str(k) for k in weight.shape[2:])


# -- eager modules (torch.fx) ---------------------------------------------------------------------


class FxDialect(GraphDialect):
    def is_add(self, node) -> bool:
        return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in FX_ADDS \
            and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1 and not node.kwargs.get("out")

    def transparent(self, node) -> bool:
        return isinstance(node, torch.fx.Node) and node.op == "call_module" \
            and isinstance(self.gm.get_submodule(node.target), TRANSPARENT_MODULES)

    def value_users(self, node) -> list:
        return [u for u in node.users if not reads_shape_only(u, node)]

    def conv(self, node):
        if not isinstance(node, torch.fx.Node) or node.op != "call_module":
            return None
        layer = self.gm.get_submodule(node.target)
        if not isinstance(layer, CONV_MODULES):
            return None
        problem = None
        if type(layer).forward not in LAYER_FORWARDS:
            problem = f"{node.target} ({type(layer).__name__}) has a forward of its own"
        elif self.calls.get(node.target, 0) != 1:
            problem = f"{node.target} is called {self.calls[node.target]} times"
        return _conv_term(f"Conv '{_join(self.prefix, node.target)}' {_kernel_label(layer.weight)}", node.args[0], [node], layer.weight,
                          layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups, node.target,
                          layer.padding_mode, problem)


def merge_module(module: nn.Module, report: FoldReport, keep_layout: bool = False) -> nn.Module:
    """Merge the parallel branches of `module` (already folded); returns it, or a GraphModule
    standing in for it where the add is in its own forward."""
    return _merge_in(module, "", report, keep_layout)


def _merge_in(module: nn.Module, path: str, report: FoldReport, keep_layout: bool) -> nn.Module:
    if not any(isinstance(m, CONV_MODULES) for m in module.modules()):
        return module
    try:
        gm = torch.fx.symbolic_trace(analysis_copy(module))
    except Exception:  # noqa: BLE001 — untraceable here: its children may trace
        for name, child in list(module.named_children()):
            _replace_child(module, name, _merge_in(child, _join(path, name), report, keep_layout))
        return module
    found = candidates(FxDialect(gm, module, path))
    below = sorted({c.owner.split(".")[0] for c in found if c.owner})
    for name in below:
        _replace_child(module, name, _merge_in(getattr(module, name), _join(path, name), report, keep_layout))
    here = [c for c in found if not c.owner]
    if not here:
        return module
    if below:  # the children changed: trace again
        gm = torch.fx.symbolic_trace(analysis_copy(module))
        here = [c for c in candidates(FxDialect(gm, module, path)) if not c.owner]
    merged_any = False
    for cand in here:
        merged_any |= _merge_candidate(gm, cand, path, report, keep_layout, _fx_rewrite)
    if not merged_any:
        return module
    _finish(gm)
    gm.delete_all_unused_submodules()
    return gm


def _replace_child(module: nn.Module, name: str, new: nn.Module) -> None:
    if new is not getattr(module, name):
        setattr(module, name, new)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


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
    full = _join(path, conv_name)
    report.merged.append(MergedBranches(add_name, full, [t.label for t in cand.terms], merged.kernel))
    _count_merged_bns(report, [_join(path, b) for t in cand.terms for b in t.bns], full)
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


def _fx_rewrite(gm: torch.fx.GraphModule, cand: Candidate, merged: Merged, weight, bias) -> str:
    first = next(t for t in cand.terms if t.weight is not None)
    conv_type = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(merged.kernel) - 1]
    out_ch, per_group = weight.shape[:2]
    layer = conv_type(per_group * first.groups, out_ch, tuple(merged.kernel), first.stride, merged.padding,
                      first.dilation, first.groups, True, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    name = _fresh_name(gm, _join(cand.owner, "reparam_conv"))
    gm.add_submodule(name, layer)
    _replace(gm, cand, lambda: gm.graph.call_module(name, (cand.source,)))
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
        return _conv_term(f"Conv '{weight_path.rpartition('.')[0] or node.name}' {_kernel_label(weight)}", x,
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
