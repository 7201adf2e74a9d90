"""The ONNX folding pass: find BN fold sites, apply rules, prune, check. Returns a FoldReport."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import helper

from ..errors import Skip
from ..fold_math import BrokenStatistics, FoldOverflow
from ..report import FoldedBN, FoldReport, SkippedBN
from .affine import BN, ELEMENTWISE, AffineOp, bn_op, elementwise_op, is_standard
from .const_eval import ConstantEvaluator
from .index import ModelIndex, Scope, TensorSpill
from .io import iter_graphs
from .readers import move_meta_readers, require_sole_use
from .rules_after import next_rule_for
from .rules_before import ELEMENTWISE_RULES, RULES, BiasSlot, FoldRule, FoldSite, Rewrite, producer_behind_add
from .rules_branches import merge_branches
from .rules_through import THROUGH_OPS, ThroughSite, find_through_site
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
    index = ModelIndex(model, base_dir, spill)
    evaluator = ConstantEvaluator(index)
    index.evaluate_constant = evaluator
    kept: list[tuple[Scope, AffineOp, str]] = []
    for scope, node in list(candidate_nodes(index)):
        if is_standard(node, BN):
            _fold_bn_into_previous(index, scope, node, report, kept)
        else:
            _fold_elementwise_into_previous(index, scope, node, report)
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
    _note_evaluated(evaluator.prune(), report)
    dropped_inputs = index.apply()
    if dropped_inputs and model.ir_version >= 4:
        report.notes.append(f"{len(dropped_inputs)} replaced initializer(s) were also graph inputs "
                            "(keep_initializers_as_inputs) and are no longer inputs: the fused model takes the "
                            "feeds the original needs, and its folded weights cannot be overridden by a feed")
    report.nodes_after, report.bn_after = count_nodes(model)
    report.seconds = time.perf_counter() - start
    return report


def _fold_again_into_previous(index: ModelIndex, kept, report: FoldReport):
    """A BN that found an Add before it may now find the Conv merged in its place."""
    still_kept = []
    for scope, op, reason in kept:
        try:
            producer, pattern = fold_into_previous(index, scope, op)
        except (Skip, FoldOverflow):
            still_kept.append((scope, op, reason))
            continue
        report.folded.append(FoldedBN(op.name, producer, pattern, scope.path))
    return still_kept


def _note_evaluated(dropped, report: FoldReport) -> None:
    if dropped:
        ops = ", ".join(f"{n} {op}" for op, n in sorted(dropped.items()))
        report.notes.append(f"{sum(dropped.values())} node(s) that computed folded parameters from constants "
                            f"were evaluated once and removed ({ops})")


def candidate_nodes(index: ModelIndex) -> Iterator[tuple[Scope, onnx.NodeProto]]:
    for scope in index.scopes:
        for node in scope.nodes:
            if is_standard(node, BN, *ELEMENTWISE):
                yield scope, node


def _fold_bn_into_previous(index: ModelIndex, scope: Scope, bn: onnx.NodeProto, report: FoldReport,
                           kept: list[tuple[Scope, AffineOp, str]]) -> None:
    """Fold into the layer before; a BN that is itself foldable but sits wrong goes to `kept`."""
    name = bn.name or bn.output[0]
    try:
        op = bn_op(index, scope, bn)
    except Skip as why:  # the BN itself cannot fold anywhere
        report.skipped.append(SkippedBN(name, str(why), _producer_name(scope, bn), scope.path))
        return
    except BrokenStatistics as why:
        report.warnings.append(f"BatchNormalization {name!r}: {why}; the model is broken there, BN kept")
        report.skipped.append(SkippedBN(name, f"broken statistics: {why}", _producer_name(scope, bn), scope.path))
        return
    try:
        producer, pattern = fold_into_previous(index, scope, op)
    except (Skip, FoldOverflow) as why:
        kept.append((scope, op, str(why)))
        return
    report.folded.append(FoldedBN(name, producer, pattern, scope.path))


def fold_into_previous(index: ModelIndex, scope: Scope, op: AffineOp) -> tuple[str, str]:
    """Fold a BN into the layer before it, directly or through shape-only ops; returns
    (the layer's name, the pattern). Raises Skip or FoldOverflow and leaves the graph alone."""
    before = scope.producers.get(op.data)
    if before is not None and is_standard(before, *THROUGH_OPS):
        through = find_through_site(index, scope, op.node, op.affine)
        apply_through_rewrite(through, op, through.rule.plan(through.site))
        return _node_name(through.site.producer), through.pattern
    site, rule = find_site(index, scope, op, RULES)
    apply_rewrite(site, op, rule.plan(site))
    return _node_name(site.producer), rule.pattern


def _fold_elementwise_into_previous(index: ModelIndex, scope: Scope, node: onnx.NodeProto,
                                    report: FoldReport) -> None:
    """A per-channel Mul/Add after a Conv/ConvTranspose/Gemm folds like a BN; otherwise it is
    just an ordinary node and nothing is reported."""
    layers = {r.producer for r in ELEMENTWISE_RULES}
    if not any(getattr(scope.producers.get(i), "op_type", None) in layers for i in node.input):
        return  # cheap test first: most Mul/Add nodes are nowhere near a layer
    try:
        op = elementwise_op(index, scope, node)
        site, rule = find_site(index, scope, op, ELEMENTWISE_RULES)
        apply_rewrite(site, op, rule.plan(site))
    except (Skip, FoldOverflow):
        return
    report.folded.append(FoldedBN(op.name, _node_name(site.producer), f"{rule.pattern}+{node.op_type}",
                                  scope.path, op=node.op_type))


def _fold_bn_into_next(index: ModelIndex, scope: Scope, op: AffineOp, reason: str,
                       report: FoldReport) -> SkippedBN | None:
    """Fold into the layer after; returns the skip entry if that fails too."""
    try:
        site, rule = find_next_site(index, scope, op)
        apply_next_rewrite(site, op, rule.plan(site))
    except (Skip, FoldOverflow) as why:
        # The reason about the layer before comes first: it is the one users expect to read.
        skipped = SkippedBN(op.name, f"{reason} (next layer: {why})", _producer_name(scope, op.node), scope.path)
        report.skipped.append(skipped)
        return skipped
    report.folded.append(FoldedBN(op.name, _node_name(site.producer), rule.pattern, scope.path))
    return None


def _node_name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _producer_name(scope: Scope, bn: onnx.NodeProto) -> str | None:
    node = scope.producers.get(bn.input[0])
    return _node_name(node) if node is not None else None


def find_site(index: ModelIndex, scope: Scope, op: AffineOp, rules) -> tuple[FoldSite, FoldRule]:
    x = op.data
    node = scope.producers.get(x)
    if node is None:
        where = "a graph input" if x in scope.inputs or x in scope.initializers else "from an outer graph"
        raise Skip(f"input {x!r} is {where}, not the output of a layer")
    require_sole_use(index, scope, node, x)
    add = None
    if is_standard(node, "Add") and is_standard(op.node, BN):
        add, node = node, producer_behind_add(index, scope, node)
    rule = next((r for r in rules if r.producer == node.op_type and r.via_add == (add is not None)), None)
    if rule is None or node.domain not in ("", "ai.onnx"):
        raise Skip(f"producer {node.op_type} {_node_name(node)!r} is not a foldable layer")
    _require_operands(node)
    return FoldSite(index, scope, op.node, node, op.affine, add), rule


def find_next_site(index: ModelIndex, scope: Scope, op: AffineOp):
    out = op.node.output[0]
    if out in scope.outputs:
        raise Skip("BN output is a graph output")
    consumers = [n for n in scope.nodes if id(n) not in scope.removed and out in n.input]
    if index.uses[out] != 1 or len(consumers) != 1:
        raise Skip(f"BN output has {index.uses[out]} consumers")
    consumer = consumers[0]
    rule = next_rule_for(consumer.op_type) if consumer.domain in ("", "ai.onnx") else None
    if rule is None:
        raise Skip(f"{consumer.op_type} {_node_name(consumer)!r} is not a foldable layer")
    _require_operands(consumer)
    return FoldSite(index, scope, op.node, consumer, op.affine), rule


def _require_operands(layer: onnx.NodeProto) -> None:
    """Conv, ConvTranspose, Gemm and MatMul take data and a weight; a malformed model may not."""
    if len(layer.input) < 2 or not layer.input[0] or not layer.input[1]:
        raise Skip(f"{layer.op_type} {_node_name(layer)!r} lacks its data or weight input")


def apply_rewrite(site: FoldSite, op: AffineOp, rw: Rewrite) -> None:
    """Write the folded weight and bias, wire the layer's last node to the op's output, drop the op."""
    index, scope, layer = site.index, site.scope, site.producer
    _write_weight(site, rw)
    if rw.bias_slot is BiasSlot.NEW_ADD:
        old_out = layer.output[0]
        _add_bias_after(site, rw, op.node.output[0])
    else:
        target = layer if rw.bias_slot is BiasSlot.PRODUCER else site.add
        index.replace_input(scope, target, rw.bias_input, rw.bias, f"{_node_name(layer)}_bias")
        for key, value in rw.add_attributes.items():
            _set_attr(target, key, value)
        old_out = target.output[0]
        target.output[0] = op.node.output[0]
        scope.producers[op.node.output[0]] = target
    scope.dead_names.add(old_out)
    move_meta_readers(index, scope, old_out, op.node.output[0])
    index.remove_node(scope, op.node)


def apply_through_rewrite(through: ThroughSite, op: AffineOp, rw: Rewrite) -> None:
    """The layer gets the folded weight, the shift goes right after it (bias slot, its bias Add
    or a new Add that keeps the layer's output name), and the chain's last op takes the BN's output."""
    site = through.site
    index, scope, layer = site.index, site.scope, site.producer
    _write_weight(site, rw)
    if rw.bias_slot is BiasSlot.NEW_ADD:
        _add_bias_after(site, rw, layer.output[0])
    else:
        target = layer if rw.bias_slot is BiasSlot.PRODUCER else site.add
        index.replace_input(scope, target, rw.bias_input, rw.bias, f"{_node_name(layer)}_bias")
    last = through.chain[-1]
    old_out = last.output[0]
    last.output[0] = op.node.output[0]
    scope.producers[op.node.output[0]] = last
    del scope.producers[old_out]  # else releasing it would retire `last` if it is an Identity
    scope.dead_names.add(old_out)
    move_meta_readers(index, scope, old_out, op.node.output[0])
    index.remove_node(scope, op.node)


def apply_next_rewrite(site: FoldSite, op: AffineOp, rw: Rewrite) -> None:
    """Next-layer fold: the layer reads the BN's input directly, with its weights rescaled."""
    index, scope, layer = site.index, site.scope, site.producer
    _write_weight(site, rw)
    if rw.bias_slot is BiasSlot.NEW_ADD:
        _add_bias_after(site, rw, layer.output[0])
    else:
        index.replace_input(scope, layer, rw.bias_input, rw.bias, f"{_node_name(layer)}_bias")
    for i, name in enumerate(layer.input):
        if name == op.node.output[0]:
            layer.input[i] = op.data
            index.uses[op.data] += 1
            index.uses[name] -= 1
    scope.dead_names.add(op.node.output[0])
    index.remove_node(scope, op.node)


def _write_weight(site: FoldSite, rw: Rewrite) -> None:
    layer = site.producer
    site.index.replace_input(site.scope, layer, rw.weight_input, rw.weight, f"{_node_name(layer)}_weight")
    for key, value in rw.attributes.items():
        _set_attr(layer, key, value)


def _add_bias_after(site: FoldSite, rw: Rewrite, output: str) -> None:
    """layer → Add(bias) → `output`: a MatMul has no bias input of its own."""
    index, scope, layer = site.index, site.scope, site.producer
    base = _node_name(layer)
    mid = index.unique_name(f"{layer.output[0]}_bnfold_matmul")
    layer.output[0] = mid
    scope.producers[mid] = layer
    bias_name = index.add_initializer(scope, f"{base}_bias_bnfold", rw.bias)
    add = onnx.helper.make_node("Add", [mid, bias_name], [output], name=index.unique_name(f"{base}_bnfold_bias_add"),
                                **rw.add_attributes)
    index.insert_after(scope, layer, add)


def _set_attr(node: onnx.NodeProto, key: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == key:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(key, value))
