"""The ONNX folding pass: find where each affine op meets a layer, let the registry's row plan the
fold (rules.rule_for), write its Rewrite (apply_rewrite); then merge summed branches, fold what is
left into the next layer, prune. Every decline is a Skip with its reason. Returns a FoldReport."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from ..errors import Skip
from ..fold_math import cast_exact
from ..report import FoldedBN, FoldReport, SkippedBN
from .affine import BN, ELEMENTWISE, AffineOp, ChannelAxis, bn_op, elementwise_affine, split_constant_operand
from .const_eval import ConstantEvaluator
from .index import ModelIndex, NotConstant, Scope, TensorSpill, find_producer
from .io import iter_graphs
from .nodes import LAYERS, is_standard, node_name, set_attr
from .readers import move_meta_readers, require_sole_use
from .rules import rule_for
from .rules_before import producer_behind_add
from .rules_branches import merge_branches
from .rules_through import MAX_CHAIN, THROUGH_OPS, ThroughStep
from .site import FoldSite, NewValue, Rewrite, Shape
from .standalone import rewrite_standalone


def is_bn(node: onnx.NodeProto) -> bool:
    return is_standard(node, BN)


def count_nodes(model: onnx.ModelProto) -> tuple[int, int]:
    """(all nodes, BatchNormalization nodes), subgraphs included."""
    total = bns = 0
    for graph in iter_graphs(model.graph):
        total += len(graph.node)
        bns += sum(1 for n in graph.node if is_bn(n))
    return total, bns


def fold_model(model: onnx.ModelProto, base_dir: Path | str = ".", report: FoldReport | None = None,
               spill: TensorSpill | None = None, standalone: str = "keep") -> FoldReport:
    """Fold every BN that can be folded exactly, in place on `model`.

    First each BN (and each per-channel Mul/Add) is folded into the layer before it, directly
    or through shape-only ops. Then sums of parallel branches of one input (Convs, folded
    Convs, bare BNs) become one Conv, and a BN that could not fold is tried again (a merged
    Conv may now precede it), then against the layer after it. With standalone="affine" the
    BNs still left become Mul+Add. Parameters computed from constants are evaluated where a
    fold reads them. With `spill`, new payloads go to its scratch file instead of memory
    (see TensorSpill).
    """
    start = time.perf_counter()
    report = report or FoldReport(input="<memory>", output=None, format="onnx")
    report.nodes_before, report.bn_before = count_nodes(model)
    index = ModelIndex(model, base_dir, spill, evaluator=ConstantEvaluator)
    kept: list[tuple[Scope, AffineOp, str]] = []
    folded_muls: dict[tuple[int, str], FoldedBN] = {}
    for scope, node in list(candidate_nodes(index)):
        if id(node) in scope.removed:
            continue
        if is_standard(node, BN):
            _fold_bn_into_previous(index, scope, node, report, kept)
        else:
            _fold_elementwise_into_previous(index, scope, node, report, folded_muls)
    merged_bns = merge_branches(index, report)
    if report.merged:
        kept = _fold_again_into_previous(index, [k for k in kept if id(k[1].node) not in merged_bns], report)
    unfolded = []
    for scope, op, reason in kept:
        skipped = _fold_bn_into_next(index, scope, op, reason, report)
        if skipped is not None:
            unfolded.append((scope, op, skipped))
    if standalone == "affine":
        rewrite_standalone(index, report, unfolded)
    _note_evaluated(index.evaluate_constant.prune(), report)
    dropped_inputs = index.apply()
    if dropped_inputs and model.ir_version >= 4:
        report.notes.append(f"{len(dropped_inputs)} replaced initializer(s) were also graph inputs "
                            "(keep_initializers_as_inputs) and are no longer inputs: the fused model takes the "
                            "feeds the original needs, and its folded weights cannot be overridden by a feed")
    report.nodes_after, report.bn_after = count_nodes(model)
    report.seconds = time.perf_counter() - start
    return report


def candidate_nodes(index: ModelIndex) -> Iterator[tuple[Scope, onnx.NodeProto]]:
    for scope in index.scopes:
        for node in scope.nodes:
            if is_standard(node, BN, *ELEMENTWISE):
                yield scope, node


# -- the three passes over the affine ops -----------------------------------------------------------


def _fold_bn_into_previous(index: ModelIndex, scope: Scope, bn: onnx.NodeProto, report: FoldReport,
                           kept: list[tuple[Scope, AffineOp, str]]) -> None:
    """Fold into the layer before; a BN that is itself foldable but sits wrong goes to `kept`."""
    try:
        op = bn_op(index, scope, bn)
    except Skip as why:  # the BN itself cannot fold anywhere
        if why.warning:
            report.warnings.append(why.warning)
        report.skipped.append(SkippedBN(node_name(bn), str(why), _producer_name(scope, bn), scope.path))
        return
    try:
        site = fold_into_previous(index, scope, op)
    except Skip as why:
        kept.append((scope, op, str(why)))
        return
    report.folded.append(FoldedBN(op.name, site.layer_name, site_pattern(site), scope.path))


def _fold_elementwise_into_previous(index: ModelIndex, scope: Scope, node: onnx.NodeProto, report: FoldReport,
                                    folded_muls: dict[tuple[int, str], FoldedBN]) -> None:
    """A Mul/Add by a constant right after a layer folds like a BN, or is reported kept with the
    reason; any other Mul/Add is just an ordinary node and nothing is reported. A Mul and the Add
    that reads it, both folded, are one BN-like site (`folded_muls`: the Muls folded so far, by output)."""
    op = elementwise_candidate(index, scope, node)
    if op is None:
        return
    try:
        site = fold_into_previous(index, scope, op)
    except Skip as why:
        report.skipped.append(SkippedBN(op.name, str(why), _producer_name(scope, node, op.data), scope.path,
                                        op=node.op_type))
        return
    entry = FoldedBN(op.name, site.layer_name, site_pattern(site), scope.path, op=node.op_type)
    report.folded.append(entry)
    if node.op_type == "Mul":
        folded_muls[(id(scope), node.output[0])] = entry
    elif (id(scope), op.data) in folded_muls:
        mul = folded_muls.pop((id(scope), op.data))
        mul.site = entry.site = f"{mul.bn}+{entry.bn}"


def _fold_again_into_previous(index: ModelIndex, kept, report: FoldReport):
    """A BN that found an Add before it may now find the Conv merged in its place."""
    still_kept = []
    for scope, op, reason in kept:
        try:
            site = fold_into_previous(index, scope, op)
        except Skip:
            still_kept.append((scope, op, reason))
            continue
        report.folded.append(FoldedBN(op.name, site.layer_name, site_pattern(site), scope.path))
    return still_kept


def _fold_bn_into_next(index: ModelIndex, scope: Scope, op: AffineOp, reason: str,
                       report: FoldReport) -> SkippedBN | None:
    """Fold into the layer after; returns the skip entry if that fails too."""
    try:
        site = find_next(index, scope, op)
        fold(site)
    except Skip as why:
        # The reason about the layer before comes first: it is the one users expect to read.
        skipped = SkippedBN(op.name, f"{reason} (next layer: {why})", _producer_name(scope, op.node), scope.path)
        report.skipped.append(skipped)
        return skipped
    report.folded.append(FoldedBN(op.name, site.layer_name, site_pattern(site), scope.path))
    return None


def _note_evaluated(dropped, report: FoldReport) -> None:
    if dropped:
        ops = ", ".join(f"{n} {op}" for op, n in sorted(dropped.items()))
        report.notes.append(f"{sum(dropped.values())} node(s) that computed folded parameters from constants "
                            f"were evaluated once and removed ({ops})")


def _producer_name(scope: Scope, op: onnx.NodeProto, data: str | None = None) -> str | None:
    node = scope.producers.get(data or op.input[0])
    return node_name(node) if node is not None else None


# -- finding a site ---------------------------------------------------------------------------------


def fold_into_previous(index: ModelIndex, scope: Scope, op: AffineOp) -> FoldSite:
    """Fold an affine op into the layer before it; returns the site folded. Raises Skip and
    leaves the graph alone."""
    site = find_previous(index, scope, op)
    fold(site)
    return site


def find_previous(index: ModelIndex, scope: Scope, op: AffineOp) -> FoldSite:
    """layer [→ Add(bias)] [→ shape-only ops] → op, with the layer's channel axis on the op's."""
    chain, value, node = _chain_before(index, scope, op)
    behind = "→".join(n.op_type for n in chain)
    if node is None:
        if chain:
            raise Skip(f"{behind} reads {value!r}, which is not the output of a layer")
        where = "a graph input" if value in scope.inputs or value in scope.initializers else "from an outer graph"
        raise Skip(f"input {value!r} is {where}, not the output of a layer")
    require_sole_use(index, scope, node, value)
    if is_standard(node, "DequantizeLinear"):
        _require_no_rounding_between(scope, node)
    add = None
    if is_standard(node, "Add"):
        add, node = node, producer_behind_add(index, scope, node)
    shape = Shape.VIA_ADD if add is not None else Shape.DIRECT
    shape |= (Shape.THROUGH if chain else Shape(0)) | (Shape(0) if op.is_bn else Shape.MUL_ADD)
    where = f" behind {behind}" if chain else ""
    site = _layer_site(index, scope, op, node, shape, f"producer {node.op_type} {node_name(node)!r}{where}")
    site.add, site.chain = add, chain
    site.at = site.layer_rule.channel_axis(site)
    at = site.at
    for step in chain:
        at = THROUGH_OPS[step.op_type](ThroughStep(index, scope, step, len(op.affine.scale)), at)
    site.affine = _affine_on(site, at, behind)
    return site


def _chain_before(index: ModelIndex, scope: Scope, op: AffineOp):
    """The shape-only ops between a BN and its layer (layer side first), the value the first
    one reads and that value's producer. A Mul/Add folds only directly."""
    chain: list[onnx.NodeProto] = []
    value, node = op.data, scope.producers.get(op.data)
    while op.is_bn and node is not None and is_standard(node, *THROUGH_OPS) and len(chain) < MAX_CHAIN:
        if index.opset < 7:
            raise Skip("opset < 7 broadcasting")
        require_sole_use(index, scope, node, value)
        chain.insert(0, node)
        value, node = node.input[0], scope.producers.get(node.input[0])
    return chain, value, node


def _require_no_rounding_between(scope: Scope, dq: onnx.NodeProto) -> None:
    """layer → QuantizeLinear → DequantizeLinear → BN (onnxruntime's quantize_static with BN in its
    op types): BN(DQ(Q(y))) = s·scale·(q − zp) + t lies on the grid scale·ℤ moved by t and
    stretched by s. A folded layer needs a Q/DQ pair after it that rounds s·y + t to that grid,
    which needs t/(s·scale) to be a whole number in every channel: trained statistics never give
    one, and onnxruntime's quantized kernels take one output scale, not one per channel."""
    q = scope.producers.get(dq.input[0]) if dq.input else None
    layer = scope.producers.get(q.input[0]) if q is not None and is_standard(q, "QuantizeLinear") and q.input else None
    if layer is not None and is_standard(layer, *LAYERS):
        raise Skip(f"a QuantizeLinear→DequantizeLinear pair rounds the output of {layer.op_type} {node_name(layer)!r} "
                   "before the BN, and the BN's shift moves that grid by a fraction of a step, so no pair after a "
                   "folded layer computes the same values: fold before quantizing (or quantize without BN in the "
                   "op types)")


def _affine_on(site: FoldSite, at: ChannelAxis, behind: str):
    """The op's map per channel of the layer: BN maps axis 1, a Mul/Add whichever its constant varies along."""
    op = site.op
    if not op.is_bn:
        shape = site.index.shape(op.node.output[0])
        length = shape[at.axis] if shape is not None and len(shape) == at.rank else None
        return elementwise_affine(op, at, length if isinstance(length, int) and length > 0 else None)
    if at.axis != 1:
        if behind:
            raise Skip(f"{behind} puts the {site.layer.op_type}'s channel axis on axis {at.axis} of a rank-{at.rank} "
                       "tensor; BN normalizes axis 1")
        raise Skip(f"{site.layer.op_type} {site.layer_name!r} puts its channels on axis {at.axis} of a "
                   f"rank-{at.rank} output; BN normalizes axis 1")
    return op.affine


def find_next(index: ModelIndex, scope: Scope, op: AffineOp) -> FoldSite:
    """op → layer, the op's output read by that layer alone."""
    out = op.node.output[0]
    if out in scope.outputs:
        raise Skip("BN output is a graph output")
    consumers = [n for n in scope.nodes if id(n) not in scope.removed and out in n.input]
    if index.uses[out] != 1 or len(consumers) != 1:
        raise Skip(f"BN output has {index.uses[out]} consumers")
    consumer = consumers[0]
    site = _layer_site(index, scope, op, consumer, Shape.NEXT, f"{consumer.op_type} {node_name(consumer)!r}")
    site.affine = op.affine
    return site


def _layer_site(index: ModelIndex, scope: Scope, op: AffineOp, layer: onnx.NodeProto, shape: Shape,
                what: str) -> FoldSite:
    """The site with the registry's row for it; Skip if no row takes it."""
    if quantized_parameters(index, scope, layer):
        shape |= Shape.DEQUANTIZED
    standard = layer.domain in ("", "ai.onnx")
    plain = rule_for(layer.op_type, shape & ~Shape.DEQUANTIZED) if standard else None
    if plain is None:
        raise Skip(f"{what} is not a foldable layer")
    rule = rule_for(layer.op_type, shape) if Shape.DEQUANTIZED in shape else plain
    if rule is None:
        raise Skip(f"{what} reads a quantized (DequantizeLinear) parameter; fold before quantizing")
    if len(layer.input) < 2 or not layer.input[0] or not layer.input[1]:
        raise Skip(f"{layer.op_type} {node_name(layer)!r} lacks its data or weight input")
    return FoldSite(index, scope, op, layer, shape, rule=rule, layer_rule=plain)


def quantized_parameters(index: ModelIndex, scope: Scope, layer: onnx.NodeProto) -> bool:
    """Does a parameter of the layer come from DequantizeLinear of a constant (an int8 weight)?
    A DequantizeLinear of activations reads a value computed at run time and does not count."""
    names = layer.input if is_standard(layer, "MatMul") else layer.input[1:]
    for name in names:
        dq = find_producer(scope, name)
        if dq is not None and is_standard(dq[1], "DequantizeLinear") and dq[1].input:
            try:
                index.constant(dq[0], dq[1].input[0])
            except NotConstant:
                continue
            return True
    return False


def elementwise_candidate(index: ModelIndex, scope: Scope, node: onnx.NodeProto) -> AffineOp | None:
    """Mul(x, c) or Add(x, c), c constant, right after a layer with a constant weight (or after
    its Add(bias)), where a row folds such an op: a BN an exporter split, or a per-feature scale
    or shift. None for any other Mul/Add: an ordinary node, not reported."""
    if index.opset < 7 or not any(_is_layer_or_add(scope.producers.get(i)) for i in node.input):
        return None  # cheap test first: most Mul/Add nodes are nowhere near a layer
    split = split_constant_operand(index, scope, node)
    if split is None:
        return None
    data, constant = split
    producer = scope.producers.get(data)
    if producer is None:
        return None
    try:
        require_sole_use(index, scope, producer, data)
        layer, shape = producer, Shape.DIRECT
        if is_standard(producer, "Add"):
            layer, shape = producer_behind_add(index, scope, producer), Shape.VIA_ADD
    except Skip:
        return None
    if is_standard(layer, "MatMul") and shape == Shape.DIRECT and node.op_type == "Add":
        return None  # the MatMul's own bias
    if rule_for(layer.op_type, shape | Shape.MUL_ADD) is None or not _has_constant_weight(index, scope, layer):
        return None
    return AffineOp(node, data, constant=constant)


def _is_layer_or_add(node: onnx.NodeProto | None) -> bool:
    return node is not None and is_standard(node, *LAYERS, "Add")


def _has_constant_weight(index: ModelIndex, scope: Scope, layer: onnx.NodeProto) -> bool:
    names = layer.input[:2] if is_standard(layer, "MatMul") else layer.input[1:2]
    for name in names:
        try:
            index.constant(scope, name)
            return True
        except NotConstant:
            pass
    return quantized_parameters(index, scope, layer)


def site_pattern(site: FoldSite) -> str:
    """As the report shows it: the row's pattern, the shape-only ops, the Mul/Add."""
    pattern = site.rule.pattern.format(layer=site.layer_rule.pattern)
    if site.chain:
        pattern = "→".join([pattern, *(n.op_type for n in site.chain)])
    if Shape.MUL_ADD in site.shape:
        pattern += f"+{site.op.op}"
    return pattern


# -- writing a fold ---------------------------------------------------------------------------------


def fold(site: FoldSite) -> None:
    """Plan with the site's row, store every new value (Skip if one does not fit), write."""
    rw = site.rule.plan(site)
    arrays = [_stored(site, v) for v in rw.values]
    bias = None if rw.bias_add is None else cast_exact(rw.bias_add.value, rw.bias_add.dtype, rw.bias_add.what)
    apply_rewrite(site, rw, arrays, bias)


def _stored(site: FoldSite, v: NewValue) -> np.ndarray:
    """The value cast once to its dtype. A plain value never replaces a quantized one: that
    would silently dequantize the layer (only a row that takes DEQUANTIZED writes those)."""
    node = v.node or site.layer
    name = node.input[v.input] if v.input < len(node.input) else ""
    producer = find_producer(site.scope, name) if name else None
    if producer is not None and is_standard(producer[1], "DequantizeLinear"):
        raise Skip(f"the {v.what} of {node.op_type} {node_name(node)!r} is quantized (DequantizeLinear)")
    return cast_exact(v.value, v.dtype, v.what)


def apply_rewrite(site: FoldSite, rw: Rewrite, arrays: list[np.ndarray], bias: np.ndarray | None) -> None:
    """The one applier: write the new values and attributes, put a new bias Add after the layer
    if there is one, and wire the layer (or the shape-only chain after it) in the op's place."""
    index, scope, layer = site.index, site.scope, site.layer
    for v, array in zip(rw.values, arrays):
        index.replace_input(scope, v.node or layer, v.input, array, f"{site.layer_name}_{v.what}")
    for node, key, value in rw.attributes:
        set_attr(node or layer, key, value)
    end = site.add or layer
    if site.add is not None:
        for key, value in rw.add_attributes.items():
            set_attr(site.add, key, value)
    if bias is not None:
        end = _add_bias_after(site, bias, rw.add_attributes)
    if Shape.NEXT in site.shape:
        _read_op_input(site)
    else:
        _take_op_output(site, site.chain[-1] if site.chain else end)
    index.remove_node(scope, site.op.node)


def _add_bias_after(site: FoldSite, bias: np.ndarray, attributes: dict) -> onnx.NodeProto:
    """layer → Add(bias), the Add taking the layer's output name: a MatMul has no bias input."""
    index, scope, layer = site.index, site.scope, site.layer
    base, out = site.layer_name, layer.output[0]
    mid = index.unique_name(f"{out}_bnfold_matmul")
    layer.output[0] = mid
    scope.producers[mid] = layer
    bias_name = index.add_initializer(scope, f"{base}_bias_bnfold", bias)
    add = onnx.helper.make_node("Add", [mid, bias_name], [out], name=index.unique_name(f"{base}_bnfold_bias_add"),
                                **attributes)
    index.insert_after(scope, layer, add)
    return add


def _take_op_output(site: FoldSite, last: onnx.NodeProto) -> None:
    """`last` (the layer, its bias Add, or the chain's last op) now computes the op's output."""
    index, scope = site.index, site.scope
    new = site.op.node.output[0]
    old = last.output[0]
    last.output[0] = new
    scope.producers[new] = last
    # `old` is gone; else releasing it with the op would retire `last` if it is an Identity.
    scope.producers.pop(old, None)
    scope.dead_names.add(old)
    move_meta_readers(index, scope, old, new)


def _read_op_input(site: FoldSite) -> None:
    """Next-layer fold: the layer reads the op's input directly."""
    index, op = site.index, site.op
    out = op.node.output[0]
    for i, name in enumerate(site.layer.input):
        if name == out:
            site.layer.input[i] = op.data
            index.uses[op.data] += 1
            index.uses[name] -= 1
    site.scope.dead_names.add(out)
