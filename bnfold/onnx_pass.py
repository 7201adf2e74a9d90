"""The ONNX folding pass: find BN fold sites, apply rules, prune, check. Returns a FoldReport."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import helper

from .fold_math import BrokenStatistics, FoldOverflow, bn_affine
from .onnx_graph import ModelIndex, NotConstant, Scope, TensorSpill
from .report import FoldedBN, FoldReport, SkippedBN
from .rules import FoldSite, Rewrite, Skip, rule_for

BN = "BatchNormalization"


def is_bn(node: onnx.NodeProto) -> bool:
    return node.op_type == BN and node.domain in ("", "ai.onnx")


def count_nodes(model: onnx.ModelProto) -> tuple[int, int]:
    """(all nodes, BatchNormalization nodes), subgraphs included."""
    from .onnx_io import iter_graphs

    total = bns = 0
    for graph in iter_graphs(model.graph):
        total += len(graph.node)
        bns += sum(1 for n in graph.node if is_bn(n))
    return total, bns


def fold_model(model: onnx.ModelProto, base_dir: Path | str = ".", report: FoldReport | None = None,
               spill: TensorSpill | None = None) -> FoldReport:
    """Fold every BN that can be folded exactly, in place on `model`.

    With `spill`, new payloads go to its scratch file instead of memory (see TensorSpill).
    """
    start = time.perf_counter()
    report = report or FoldReport(input="<memory>", output=None, format="onnx")
    report.nodes_before, report.bn_before = count_nodes(model)
    index = ModelIndex(model, base_dir, spill)
    for scope, bn in list(bn_nodes(index)):
        name = bn.name or bn.output[0]
        try:
            site, rule = find_site(index, scope, bn)
            apply_rewrite(site, rule.plan(site))
            report.folded.append(FoldedBN(name, site.producer.name or site.producer.output[0],
                                          rule.pattern, scope.path))
        except Skip as why:
            producer = index_producer_name(scope, bn)
            report.skipped.append(SkippedBN(name, str(why), producer, scope.path))
        except BrokenStatistics as why:
            report.warnings.append(f"BatchNormalization {name!r}: {why}; the model is broken there, BN kept")
            report.skipped.append(SkippedBN(name, f"broken statistics: {why}", None, scope.path))
        except FoldOverflow as why:
            report.skipped.append(SkippedBN(name, str(why), index_producer_name(scope, bn), scope.path))
    index.apply()
    report.nodes_after, report.bn_after = count_nodes(model)
    report.seconds = time.perf_counter() - start
    return report


def bn_nodes(index: ModelIndex) -> Iterator[tuple[Scope, onnx.NodeProto]]:
    for scope in index.scopes:
        for node in scope.nodes:
            if is_bn(node):
                yield scope, node


def index_producer_name(scope: Scope, bn: onnx.NodeProto) -> str | None:
    node = scope.producers.get(bn.input[0])
    return (node.name or node.output[0]) if node is not None else None


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def check_bn(index: ModelIndex, scope: Scope, bn: onnx.NodeProto):
    """The BN's own conditions: inference mode, per-channel constant parameters."""
    if int(_attr(bn, "training_mode", 0)):
        raise Skip("training_mode=1: BN normalizes with batch statistics")
    if index.opset < 7 and not int(_attr(bn, "is_test", 0)):
        raise Skip("is_test=0: BN runs in training mode")
    if not int(_attr(bn, "spatial", 1)):
        raise Skip("spatial=0: per-activation statistics, only the per-channel form is folded")
    if any(out for out in bn.output[1:]):
        raise Skip("BN's running-statistics outputs are used (training graph)")
    if len(bn.input) < 5:
        raise Skip("BN has fewer than 5 inputs")
    params = []
    for name, what in zip(bn.input[1:5], ("scale", "B", "mean", "var")):
        try:
            params.append(index.constant(scope, name))
        except NotConstant as exc:
            raise Skip(f"BN {what} is not constant: {exc}") from None
    if any(p.ndim != 1 for p in params) or len({p.shape for p in params}) != 1:
        raise Skip(f"BN parameters are not per-channel vectors of one length: {[p.shape for p in params]}")
    return bn_affine(*params, float(_attr(bn, "epsilon", 1e-5)))


def find_site(index: ModelIndex, scope: Scope, bn: onnx.NodeProto):
    affine = check_bn(index, scope, bn)
    x = bn.input[0]
    node = scope.producers.get(x)
    if node is None:
        where = "a graph input" if x in scope.inputs or x in scope.initializers else "from an outer graph"
        raise Skip(f"BN input {x!r} is {where}, not the output of a layer")
    _require_sole_use(index, scope, node, x)
    add = None
    if node.op_type == "Add" and node.domain in ("", "ai.onnx"):
        add, node = node, _producer_behind_add(index, scope, node)
    rule = rule_for(node.op_type, via_add=add is not None) if node.domain in ("", "ai.onnx") else None
    if rule is None:
        raise Skip(f"producer {node.op_type} {node.name or node.output[0]!r} is not a foldable layer")
    return FoldSite(index, scope, bn, node, affine, add), rule


def _require_sole_use(index: ModelIndex, scope: Scope, node: onnx.NodeProto, value: str) -> None:
    if value in scope.outputs:
        raise Skip(f"output {value!r} of {node.op_type} is also a graph output")
    if len([o for o in node.output if o]) > 1:
        raise Skip(f"{node.op_type} {node.name!r} has several outputs")
    others = index.uses[value] - 1
    if others > 0:
        raise Skip(f"output {value!r} of {node.op_type} is also used by {others} other node(s)")


def _producer_behind_add(index: ModelIndex, scope: Scope, add: onnx.NodeProto) -> onnx.NodeProto:
    """MatMul → Add(constant bias) → BN: the MatMul, if the Add's other operand is constant."""
    for mm_out in add.input:
        mm = scope.producers.get(mm_out)
        if mm is None or mm.op_type != "MatMul":
            continue
        other = next((n for n in add.input if n != mm_out), None)
        if other is None:
            continue
        try:
            index.constant(scope, other)
        except NotConstant:
            continue
        _require_sole_use(index, scope, mm, mm_out)
        return mm
    raise Skip("producer Add is not a MatMul plus a constant bias")


def apply_rewrite(site: FoldSite, rw: Rewrite) -> None:
    """Write the folded weight and bias, wire the last layer node to the BN's output, drop BN."""
    index, scope, producer, bn = site.index, site.scope, site.producer, site.bn
    base = producer.name or producer.output[0]
    index.replace_input(scope, producer, rw.weight_input, rw.weight, f"{base}_weight")
    for key, value in rw.attributes.items():
        _set_attr(producer, key, value)
    if rw.bias_node == "new_add":
        mid = index.unique_name(f"{producer.output[0]}_bnfold_matmul")
        old_out = producer.output[0]
        producer.output[0] = mid
        scope.producers[mid] = producer
        bias_name = index.add_initializer(scope, f"{base}_bias_bnfold", rw.bias)
        add = helper.make_node("Add", [mid, bias_name], [bn.output[0]],
                               name=index.unique_name(f"{base}_bnfold_bias_add"), **rw.add_attributes)
        index.insert_after(scope, producer, add)
        scope.dead_names.add(old_out)
        last = add
    else:
        target = producer if rw.bias_node == "producer" else site.add
        index.replace_input(scope, target, rw.bias_input, rw.bias, f"{base}_bias")
        for key, value in rw.add_attributes.items():
            _set_attr(target, key, value)
        last = target
        old_out = last.output[0]
        scope.dead_names.add(old_out)
        last.output[0] = bn.output[0]
        scope.producers[bn.output[0]] = last
    # The BN goes, and with it its last use of the parameters and of the old layer output.
    scope.removed.add(id(bn))
    for name in bn.input[1:]:
        if name:
            index.release(scope, name)
    index.uses[bn.input[0]] -= 1


def _set_attr(node: onnx.NodeProto, key: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == key:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(key, value))
