"""The terms of a sum of parallel branches, as any torch graph shows them (RepVGG, MobileOne,
ACNet, a CPE's `x + dwconv(x)`): a Conv of one input x, a Conv followed by its BN, a BN of x or x
itself; and whether they are one Conv.

Each Conv term is W ⋆ x + b (a BN after it scales W and b, as in the fold); a BN of x is s·x + t
and x itself s = 1, t = 0. Whether the terms are one Conv, and its float64 kernel, is
bnfold.reparam's (the math and the rule are in its docstring); the result is cast once to the
weight dtype. A graph kind says what its adds, Convs and BNs are through GraphDialect; BNs are
recognised by the one recogniser of fx_graph.py.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx
from torch import nn

from ..errors import Skip
from ..fold_math import BrokenStatistics, cast_exact
from ..reparam import AffineBranch, ConvBranch, Window, merge
from .fx_graph import FxGraph
from .params import as_f64
from .vocabulary import TUPLE_BN_OPS, op_name


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

    counts_calls = False  # whether the graph's call_module counts say how often a module runs
    shallow = False  # Convs as terms without their tensors: enough to say where sums are

    def __init__(self, gm: torch.fx.GraphModule, probe: nn.Module, prefix: str = "", graph: FxGraph | None = None):
        self.gm, self.probe, self.prefix = gm, probe, prefix  # prefix: the graph's module path, for labels
        if graph is not None:  # the fold's reading of the same graph: its BNs are known already
            self._graph, self._bns = graph, {c.node: c for c in graph.bn_calls()}
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
            self._graph = FxGraph(self.gm, Counter(self.calls) if self.counts_calls else None)
            self._bns = {c.node: c for c in self._graph.bn_calls()}
        nodes = []
        if isinstance(node, torch.fx.Node) and op_name(node.target) == "getitem" and node.args[1] == 0 \
                and node.args[0] in self._bns:
            nodes, node = [node], node.args[0]
        call = self._bns.get(node)
        if call is None or (op_name(node.target) in TUPLE_BN_OPS and not nodes):
            return None
        nodes += call.nodes or [node]
        return call.input, nodes, bn_term(call, self.prefix, self._graph.reads, self.gm)

    def conv(self, node) -> Term | None:
        raise NotImplementedError

    def add_scope(self, node) -> str | None:
        """The module path (relative to the graph's) whose forward holds the add, if the graph
        records it; else the owner is the deepest module holding every term."""
        return None


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
        held = dialect.add_scope(node)  # the module whose forward holds the add, where the graph says
        found.append(Candidate(node, inner, terms, _common_prefix(owners) if held is None else held))
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
    if affine.scale is not None and conv.weight is not None:  # a Conv term with a problem has no weight
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


def conv_term(label: str, source, nodes: list, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
               dilation, groups: int, module: str, padding_mode: str = "zeros", problem: str | None = None) -> Term:
    ndim = weight.ndim - 2
    spread = lambda v: tuple(v) * ndim if len(tuple(v)) == 1 else tuple(v)  # noqa: E731
    as_tuple = lambda v: spread(v if isinstance(v, (tuple, list)) else (v,))  # noqa: E731
    return Term(label, source, nodes, as_f64(weight), as_f64(bias) if bias is not None else np.zeros(weight.shape[0]),
                stride=as_tuple(stride), padding=padding if isinstance(padding, str) else as_tuple(padding),
                dilation=as_tuple(dilation), groups=int(groups), padding_mode=padding_mode, like=weight,
                module=module, problem=problem)


def kernel_label(weight: torch.Tensor) -> str:
    return "×".join(str(k) for k in weight.shape[2:])


def bn_term(call, prefix: str, reads, root) -> Term:
    """The Term of a BN of the sum's input (s·x + t), or one carrying why it cannot merge; `reads`
    counts the ops reading a tensor path in the graph, `root` holds the tensors."""
    term = Term(f"BN '{join_path(prefix, call.name)}'", None, module=call.name, problem=call.reason, bns=[call.name])
    shared = next((p for p in call.stats.paths() if reads(p) != 1), None)
    if term.problem is None and shared is not None:
        term.problem = f"{join_path(prefix, shared)} is read by {reads(shared)} ops"
    if term.problem is None:
        try:
            affine = call.stats.affine(root)
            term.scale, term.shift = affine.scale, affine.shift
        except (BrokenStatistics, Skip) as why:
            term.problem = f"BN {call.name}: {why}"
    return term


def join_path(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
