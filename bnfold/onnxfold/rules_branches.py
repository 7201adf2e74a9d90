"""Merge parallel branches of one input that are summed (structural re-parameterization).

RepVGG (Ding et al. 2021) trains y = BN(W₃ ⋆ x) + BN(W₁ ⋆ x) + BN(x) and deploys one 3×3 Conv;
MobileOne, ACNet and DBB train similar sums. Once each Conv+BN is folded, every branch is
affine in x, and a Conv is linear in its kernel, so with one stride, dilation and group count

    Σᵢ (Wᵢ ⋆ x + bᵢ) = (Σᵢ W̃ᵢ) ⋆ x + Σᵢ bᵢ,

W̃ᵢ being Wᵢ placed at its offset inside the merged window, zeros elsewhere. A per-channel
affine s·x + t (a bare BN, or x itself: s = 1, t = 0) is the kernel holding s_c at the tap that
reads position o of channel c (within c's group) and t in the bias.

Along one spatial axis, output o of branch i reads input o·stride − pbᵢ + k·d for taps k < Kᵢ
(an identity: pb = 0, K = 1). The merge is exact iff the strides agree, every branch starts a
multiple of d after the earliest one (pb_max − pbᵢ ≡ 0 mod d), and all give the same output
length (pbᵢ + peᵢ − d·(Kᵢ − 1) equal). Zero padding then reads the same zeros in both graphs.
We also require the merged window to be no longer than the longest branch (kernels centred
alike): a merge that grew the kernel could cost more than the branches it replaces.
Everything is summed in float64 and cast once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..errors import Skip
from ..fold_math import Affine, BrokenStatistics, FoldOverflow, cast_exact
from ..report import FoldedBN, FoldReport, MergedBranches, UnmergedBranches
from .affine import BN, bn_op, is_standard, node_attr
from .index import ModelIndex, NotConstant, Scope
from .validity import layer_bias

SUM_OPS = ("Add", "Sum")
MERGED_PATTERN = "merged branches"


@dataclass
class Window:
    """What one branch reads along every spatial axis."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]

    def length_offset(self, a: int, d: int) -> int:
        """Output length along axis a is floor((L + this − 1) / stride) + 1, so equal offsets give
        equal lengths. `d` is the merged dilation: a 1-tap kernel reads the same whatever its own."""
        return self.pads_begin[a] + self.pads_end[a] - d * (self.kernel[a] - 1)


@dataclass
class Branch:
    """One summed term: a Conv of x, a per-channel affine of x (a BN), or x itself."""

    label: str
    node: onnx.NodeProto | None  # None for x itself
    window: Window | None = None  # Convs only
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    group: int = 1
    affine: Affine | None = None  # BN and identity


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
        return Branch("identity", None)
    node = scope.producers[term]
    name = node.name or node.output[0]
    if index.uses[term] != 1 or term in scope.outputs:
        raise Skip(f"the output of {node.op_type} {name!r} is also used outside the sum")
    if is_standard(node, BN):
        try:
            op = bn_op(index, scope, node)
        except (Skip, BrokenStatistics) as why:
            raise Skip(f"BN {name!r}: {why}") from None
        return Branch(f"BN {name!r} (identity)", node, affine=op.affine)
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
    window = _window(index, conv, weight.shape[2:])
    label = f"Conv {name!r} {'×'.join(map(str, weight.shape[2:]))}"
    return Branch(label, conv, window, weight, bias, int(node_attr(conv, "group", 1)))


def _window(index: ModelIndex, conv: onnx.NodeProto, kernel: tuple[int, ...]) -> Window:
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


# -- what must hold, and the merged kernel -----------------------------------------------------------


def _merge(adds, branches: list[Branch], source: str) -> MergePlan:
    convs = [b for b in branches if b.weight is not None]
    first = convs[0]
    _require_alike(first, convs[1:])
    c_out, c_in_group = first.weight.shape[:2]
    dims = first.weight.ndim - 2
    _as_centre_taps([b for b in branches if b.weight is None], c_out, first.group * c_in_group, dims)
    merged = _merged_window(branches, dims)
    weight, bias = _summed_kernel(branches, merged, c_out, c_in_group)
    bias_dtype = next((b.bias.dtype for b in convs if b.bias is not None), first.weight.dtype)
    attributes = {"kernel_shape": list(merged.kernel), "strides": list(merged.strides),
                  "dilations": list(merged.dilations), "pads": list(merged.pads_begin + merged.pads_end),
                  "group": first.group}
    return MergePlan(adds, branches, source, cast_exact(weight, first.weight.dtype, "merged weight"),
                     cast_exact(bias, bias_dtype, "merged bias"), attributes)


def _require_alike(first: Branch, others: list[Branch]) -> None:
    for b in others:
        if b.group != first.group:
            raise Skip(f"groups differ: {first.label} has {first.group}, {b.label} {b.group}")
        if b.weight.shape[:2] != first.weight.shape[:2] or b.weight.ndim != first.weight.ndim:
            raise Skip(f"weights differ in shape: {first.label} {first.weight.shape}, {b.label} {b.weight.shape}")
        if b.weight.dtype != first.weight.dtype:
            raise Skip(f"weights differ in dtype: {first.weight.dtype} and {b.weight.dtype}")


def _as_centre_taps(affines: list[Branch], c_out: int, c_in: int, dims: int) -> None:
    """A per-channel affine is a 1-tap kernel with no padding: it reads position o of channel c."""
    if affines and c_out != c_in:
        raise Skip(f"an identity branch needs as many output as input channels ({c_out} ≠ {c_in})")
    for b in affines:
        if b.affine is None:  # x itself
            b.affine = Affine(np.ones(c_out), np.zeros(c_out))
        elif b.affine.scale.shape[0] != c_out:
            raise Skip(f"{b.label} has {b.affine.scale.shape[0]} channels, the Convs {c_out}")
        b.window = Window((1,) * dims, (1,) * dims, (1,) * dims, (0,) * dims, (0,) * dims)


def _summed_kernel(branches: list[Branch], merged: Window, c_out: int, c_in_group: int) -> tuple[np.ndarray, ...]:
    """Σ W̃ᵢ and Σ bᵢ in float64; an affine puts s_c at [c, c mod (C_in/g), centre]."""
    dims = len(merged.kernel)
    weight = np.zeros((c_out, c_in_group, *merged.kernel))
    bias = np.zeros(c_out)
    channels = np.arange(c_out)
    for b in branches:
        offset = [(merged.pads_begin[a] - b.window.pads_begin[a]) // merged.dilations[a] for a in range(dims)]
        if b.weight is not None:
            weight[(slice(None), slice(None), *(slice(o, o + k) for o, k in zip(offset, b.window.kernel)))] += b.weight
            if b.bias is not None:
                bias += b.bias.astype(np.float64).reshape(-1)
        else:
            weight[(channels, channels % c_in_group, *offset)] += b.affine.scale
            bias += b.affine.shift
    return weight, bias


def _merged_window(branches: list[Branch], dims: int) -> Window:
    convs = [b for b in branches if b.weight is not None]
    with_identity = len(convs) < len(branches)
    windows = [b.window for b in branches]
    kernel, strides, dilations, begin, end = [], [], [], [], []
    for a in range(dims):
        conv_strides = {b.window.strides[a] for b in convs}
        if len(conv_strides) > 1 or (with_identity and conv_strides != {1}):
            raise Skip(f"strides differ on spatial axis {a}: " + ", ".join(
                f"{b.label} {b.window.strides[a]}" for b in branches))
        spread = {w.dilations[a] for w in windows if w.kernel[a] > 1}
        if len(spread) > 1:
            raise Skip(f"dilations differ on spatial axis {a}: {sorted(spread)}")
        d = spread.pop() if spread else 1
        lengths = {w.length_offset(a, d) for w in windows}
        if len(lengths) > 1:
            raise Skip(f"paddings give different output lengths on spatial axis {a}: " + _pads_text(branches, a))
        start = max(w.pads_begin[a] for w in windows)
        if any((start - w.pads_begin[a]) % d for w in windows):
            raise Skip(f"paddings do not put the taps on one dilation grid on spatial axis {a}: "
                       + _pads_text(branches, a))
        size = max((start - w.pads_begin[a]) // d + w.kernel[a] for w in windows)
        longest = max(w.kernel[a] for w in windows)
        if size > longest:
            raise Skip(f"paddings do not centre the kernels alike on spatial axis {a}: "
                       + _pads_text(branches, a) + f" would need a {size}-tap kernel (largest: {longest})")
        kernel.append(size)
        strides.append(conv_strides.pop())
        dilations.append(d)
        begin.append(start)
        end.append(lengths.pop() + d * (size - 1) - start)
    return Window(tuple(kernel), tuple(strides), tuple(dilations), tuple(begin), tuple(end))


def _pads_text(branches: list[Branch], a: int) -> str:
    return ", ".join(f"{b.label} pads ({b.window.pads_begin[a]}, {b.window.pads_end[a]})" for b in branches)


# -- rewrite ---------------------------------------------------------------------------------------


def apply_merge(index: ModelIndex, scope: Scope, plan: MergePlan) -> str:
    """One Conv of the source computes the root Add's output; the branches and Adds go."""
    root = plan.adds[-1]
    first = next(b.node for b in plan.branches if b.weight is not None)
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
            except (Skip, FoldOverflow) as why:
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
