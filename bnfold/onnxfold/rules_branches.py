"""Merge parallel branches of one input that are summed (structural re-parameterization).

An Add (or Add tree, or Sum) whose every term is a Conv of one input x, a folded Conv, a BN of x
or x itself is one Conv of x when bnfold.reparam says so (its docstring has the math and the
rule); this module reads the branches off the graph and writes the merged Conv.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..errors import Skip
from ..fold_math import cast_exact
from ..reparam import AffineBranch, ConvBranch, Window, merge
from ..report import FoldedBN, FoldReport, MergedBranches, UnmergedBranches
from .affine import BN, bn_op, is_standard, node_attr
from .index import ModelIndex, NotConstant, Scope
from .validity import layer_bias

SUM_OPS = ("Add", "Sum")
MERGED_PATTERN = "merged branches"


@dataclass
class Branch:
    """One summed term and the node that computes it (None for x itself)."""

    node: onnx.NodeProto | None
    term: ConvBranch | AffineBranch
    dtype: np.dtype | None = None  # a Conv's weight dtype: the merged Conv's

    @property
    def label(self) -> str:
        return self.term.label


@dataclass
class MergePlan:
    adds: list[onnx.NodeProto]
    branches: list[Branch]
    source: str
    weight: np.ndarray
    bias: np.ndarray
    attributes: dict


# -- pattern ---------------------------------------------------------------------------------------


def sum_tree(index: ModelIndex, scope: Scope, root: onnx.NodeProto) -> tuple[list[onnx.NodeProto], list[str]]:
    """The Add/Sum nodes under `root` whose results feed only the sum (root last), and the
    values they add, left to right."""
    adds: list[onnx.NodeProto] = []
    terms: list[str] = []
    for value in root.input:
        inner = scope.producers.get(value)
        if inner is not None and is_standard(inner, *SUM_OPS) and id(inner) not in scope.removed \
                and index.uses[value] == 1 and value not in scope.outputs:
            inner_adds, inner_terms = sum_tree(index, scope, inner)
            adds += inner_adds
            terms += inner_terms
        else:
            terms.append(value)
    return adds + [root], terms


def sources_of(scope: Scope, value: str) -> set[str]:
    """What a term can be a branch of: itself (an identity branch), and the data input of the
    Conv or BN that computes it."""
    node = scope.producers.get(value)
    if node is not None and (is_standard(node, "Conv") or is_standard(node, BN)) and node.input:
        return {value, node.input[0]}
    return {value}


def plan_merge(index: ModelIndex, scope: Scope, root: onnx.NodeProto) -> MergePlan | None:
    """None when the sum is not of branches of one input (an ordinary Add); Skip(reason)
    when it is but they cannot be merged exactly."""
    if index.opset < 7:
        return None  # legacy broadcasting Add
    adds, terms = sum_tree(index, scope, root)
    common = set.intersection(*(sources_of(scope, t) for t in terms))
    # x in conv(x) + bn(x) is not itself summed; x in conv(x) + x is.
    source = min(common, key=lambda s: (s in terms, s), default=None)
    if len(terms) < 2 or source is None or \
            not any(t != source and is_standard(scope.producers[t], "Conv") for t in terms):
        return None
    branches = [_branch(index, scope, term, source) for term in terms]
    return _merge(adds, branches, source)


def _branch(index: ModelIndex, scope: Scope, term: str, source: str) -> Branch:
    if term == source:
        return Branch(None, AffineBranch("identity"))
    node = scope.producers[term]
    name = node.name or node.output[0]
    if index.uses[term] != 1 or term in scope.outputs:
        raise Skip(f"the output of {node.op_type} {name!r} is also used outside the sum")
    if is_standard(node, BN):
        try:
            op = bn_op(index, scope, node)
        except Skip as why:
            raise Skip(f"BN {name!r}: {why}") from None
        return Branch(node, AffineBranch(f"BN {name!r} (identity)", op.affine.scale, op.affine.shift))
    return _conv_branch(index, scope, node, name)


def _conv_branch(index: ModelIndex, scope: Scope, conv: onnx.NodeProto, name: str) -> Branch:
    try:
        weight = index.constant(scope, conv.input[1])
        bias = index.constant(scope, conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    except NotConstant as exc:
        raise Skip(f"Conv {name!r} has a parameter that is not constant: {exc}") from None
    if weight.ndim < 3:
        raise Skip(f"Conv {name!r} weight has rank {weight.ndim}")
    layer_bias(conv, bias, weight.shape[0])
    window = _window(index, conv, name, weight.shape[2:])
    label = f"Conv {name!r} {'×'.join(map(str, weight.shape[2:]))}"
    term = ConvBranch(label, weight, bias, window, int(node_attr(conv, "group", 1)), storage=str(weight.dtype))
    return Branch(conv, term, weight.dtype)


def _window(index: ModelIndex, conv: onnx.NodeProto, name: str, kernel: tuple[int, ...]) -> Window:
    dims = len(kernel)
    strides = tuple(int(v) for v in node_attr(conv, "strides", [1] * dims))
    dilations = tuple(int(v) for v in node_attr(conv, "dilations", [1] * dims))
    auto_pad = node_attr(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(index, conv, kernel, strides, dilations, upper=auto_pad == "SAME_UPPER")
    elif auto_pad == "VALID":
        pads = [0] * (2 * dims)
    else:
        pads = [int(v) for v in node_attr(conv, "pads", [0] * (2 * dims))]
    if len(strides) != dims or len(dilations) != dims or len(pads) != 2 * dims:
        raise Skip(f"Conv {name!r} has strides, dilations or pads for another number of axes than its "
                   f"{dims}-d kernel")
    return Window(tuple(kernel), strides, dilations, tuple(pads[:dims]), tuple(pads[dims:]))


def _same_pads(index: ModelIndex, conv: onnx.NodeProto, kernel, strides, dilations, upper: bool) -> list[int]:
    shape = index.shape(conv.input[0])
    spatial = shape[2:] if shape is not None else None
    if spatial is None or len(spatial) != len(kernel) or any(not isinstance(d, int) for d in spatial):
        raise Skip(f"Conv {conv.name!r} uses auto_pad SAME and its input size is not static")
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + d * (k - 1) + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if upper else large)
        end.append(large if upper else small)
    return begin + end


# -- the merged kernel ------------------------------------------------------------------------------


def _merge(adds, branches: list[Branch], source: str) -> MergePlan:
    merged = merge([b.term for b in branches])
    dtype = next(b.dtype for b in branches if b.dtype is not None)
    window = merged.window
    attributes = {"kernel_shape": list(window.kernel), "strides": list(window.strides),
                  "dilations": list(window.dilations), "pads": list(window.pads_begin + window.pads_end),
                  "group": merged.groups}
    return MergePlan(adds, branches, source, cast_exact(merged.weight, dtype, "merged weight"),
                     cast_exact(merged.bias, dtype, "merged bias"), attributes)


# -- rewrite ---------------------------------------------------------------------------------------


def apply_merge(index: ModelIndex, scope: Scope, plan: MergePlan) -> str:
    """One Conv of the source computes the root Add's output; the branches and Adds go."""
    root = plan.adds[-1]
    first = next(b.node for b in plan.branches if isinstance(b.term, ConvBranch))
    name = index.unique_name(f"{first.name or first.output[0]}_merged")
    weight = index.add_initializer(scope, f"{name}_weight", plan.weight)
    bias = index.add_initializer(scope, f"{name}_bias", plan.bias)
    conv = helper.make_node("Conv", [plan.source, weight, bias], [root.output[0]], name=name, **plan.attributes)
    index.insert_after(scope, root, conv)
    for node in [*plan.adds, *(b.node for b in plan.branches if b.node is not None)]:
        scope.dead_names.update(o for o in node.output if o != root.output[0])
        index.remove_node(scope, node)
    return name


def merge_branches(index: ModelIndex, report: FoldReport) -> set[int]:
    """Merge every sum of branches of one input; returns id() of the BNs merged away."""
    merged_bns: set[int] = set()
    for scope in index.scopes:
        # Roots first (a sum inside a larger one is merged with it); reported in graph order.
        merged, folded, unmerged = [], [], []
        for root in reversed(scope.nodes):
            if id(root) in scope.removed or not is_standard(root, *SUM_OPS):
                continue
            name = root.name or root.output[0]
            try:
                plan = plan_merge(index, scope, root)
                if plan is None:
                    continue
                conv = apply_merge(index, scope, plan)
            except Skip as why:
                unmerged.append(UnmergedBranches(name, str(why), scope.path))
                continue
            merged.append(MergedBranches(name, conv, [b.label for b in plan.branches],
                                         plan.attributes["kernel_shape"], scope.path))
            bns = [b.node for b in plan.branches if b.node is not None and is_standard(b.node, BN)]
            merged_bns.update(id(bn) for bn in bns)
            folded += [FoldedBN(bn.name or bn.output[0], conv, MERGED_PATTERN, scope.path) for bn in reversed(bns)]
        report.merged += merged[::-1]
        report.folded += folded[::-1]
        report.unmerged += unmerged[::-1]
    return merged_bns
