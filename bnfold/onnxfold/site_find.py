"""Fold sites of an original ONNX model and its fused copy, matched by tensor name.

A fold keeps the names around it: the fused layer reads the tensor the original layer read (or,
folded into the next layer, the tensor the BN read), and its output carries the name of the BN's
output (or of the next layer's). So a site is a pair of tensor names (x, y) both graphs have, where
each graph computes y from x and constants alone: the original through its layer(s) and the BN, the
fused model through one linear layer (and a bias Add or shape-only ops). Any tool's output that
keeps those names is checked the same way; a site whose names it changed is reported as skipped.

Candidates are the original's BatchNormalization nodes whose output the fused model no longer
computes with a BN, and per-channel Mul/Add nodes after a layer whose output the fused model
computes with another op (a BN an exporter had split, folded). Only the main graph is searched.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from ..errors import Skip
from ..report import SkippedSite

LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
AFFINE = ("Mul", "Add", "Sub", "Div")
# ops the fused side may have between its layer and the site's output
CHAIN = ("Add", "Sub", "Mul", "Div", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Cast")
MAX_DOWNSTREAM = 3  # a BN folded into the next layer: its output's name is gone, the next layer's is not
MAX_CHAIN = 8
MAX_NODES = 64  # more than this between x and y is not one fold


def _std(node: onnx.NodeProto, *ops: str) -> bool:
    return node.op_type in ops and node.domain in ("", "ai.onnx")


def node_name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


@dataclass
class GraphView:
    """Producers, consumers and constant tensors of one graph."""

    graph: onnx.GraphProto
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    constants: set[str] = field(default_factory=set)
    inputs: set[str] = field(default_factory=set)
    outputs: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> "GraphView":
        view = cls(graph)
        view.inputs = {v.name for v in graph.input}
        view.outputs = {v.name for v in graph.output}
        view.constants = {t.name for t in graph.initializer} | {""}
        for node in graph.node:
            for out in node.output:
                view.producer[out] = node
            for name in node.input:
                view.consumers.setdefault(name, []).append(node)
            if not _has_subgraph(node) and all(i in view.constants for i in node.input) and (
                    node.input or _std(node, "Constant")):
                view.constants.update(node.output)
        return view

    def computes(self, name: str) -> bool:
        return name in self.producer or (name in self.inputs and name not in self.constants)


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


@dataclass
class Site:
    """Two subgraphs, one per model, that compute `output` from `input` and constants."""

    input: str
    output: str
    original: list[onnx.NodeProto]  # in graph order
    fused: list[onnx.NodeProto]
    layer: onnx.NodeProto  # the fused side's linear layer
    folded: list[str]  # the original's BN / affine nodes in the site
    branches: bool = False  # the original sums branches of x (a merge, RepVGG-style)

    @property
    def name(self) -> str:
        return f"{self.layer.op_type} {node_name(self.layer)!r} ← {', '.join(self.folded)}"


def find_sites(original: onnx.GraphProto, fused: onnx.GraphProto) -> tuple[list[Site], list[SkippedSite]]:
    """Every fold site both graphs name alike; the folded BNs that are not, each with why."""
    a, b = GraphView.of(original), GraphView.of(fused)
    sites: dict[tuple[str, str], Site] = {}
    skipped: list[SkippedSite] = []
    for node in original.node:
        label = f"{node.op_type} {node_name(node)!r}"
        try:
            if not _is_candidate(node, a, b):
                continue
            site = _site(node, a, b)
        except Skip as why:
            skipped.append(SkippedSite(label, str(why)))
            continue
        key = (site.input, site.output)
        if key in sites:
            sites[key].folded.append(label)
        else:
            site.folded = [label]
            sites[key] = site
    return list(sites.values()), skipped


def _is_candidate(node: onnx.NodeProto, a: GraphView, b: GraphView) -> bool:
    if not node.output or _has_subgraph(node):
        return False
    out = node.output[0]
    theirs = b.producer.get(out)
    if _std(node, "BatchNormalization"):
        return theirs is None or not _std(theirs, "BatchNormalization")
    if not _std(node, *AFFINE) or theirs is None or _std(theirs, node.op_type):
        return False
    data = [i for i in node.input if i not in a.constants]
    return len(data) == 1 and len(node.input) == 2 and _std(a.producer.get(data[0]) or node, *LAYERS)


def _site(node: onnx.NodeProto, a: GraphView, b: GraphView) -> Site:
    out = _matched_output(node, a, b)
    layer, x = _fused_layer(b, out)
    if not a.computes(x):
        raise Skip(f"the fused layer {node_name(layer)!r} reads {x!r}, which the original does not compute")
    mine, theirs = extract(a, x, out), extract(b, x, out)
    if node not in mine:
        raise Skip(f"the original computes {out!r} from {x!r} without it")
    if any(_std(n, "BatchNormalization") for n in theirs):
        raise Skip(f"the fused model still has a BatchNormalization between {x!r} and {out!r}")
    branches = any(_std(n, "Add", "Sub", "Sum") and sum(i not in a.constants for i in n.input) > 1 for n in mine)
    return Site(x, out, mine, theirs, layer, [], branches)


def _matched_output(node: onnx.NodeProto, a: GraphView, b: GraphView) -> str:
    """The BN's output, or, where the fused model no longer has it, the output of what follows."""
    out = node.output[0]
    for _ in range(MAX_DOWNSTREAM + 1):
        if out in b.producer:
            return out
        users = a.consumers.get(out, [])
        if out in a.outputs or len(users) != 1 or not users[0].output or not _std(users[0], *LAYERS, *CHAIN):
            break  # only a linear op can have taken the fold in: past a Relu the fused model differs
        out = users[0].output[0]
    raise Skip(f"the fused model does not compute {node.output[0]!r} nor a tensor right after it (renamed?)")


def _fused_layer(b: GraphView, out: str) -> tuple[onnx.NodeProto, str]:
    """Walk back from `out` in the fused graph, through ops with one non-constant input, to the
    linear layer that computes it; (that layer, its data input)."""
    name = out
    for _ in range(MAX_CHAIN):
        node = b.producer.get(name)
        if node is None:
            break
        data = [i for i in node.input if i not in b.constants]
        if _std(node, *LAYERS):
            if len(data) != 1 or (node.op_type != "MatMul" and data[0] != node.input[0]):
                raise Skip(f"{node.op_type} {node_name(node)!r} has {len(data)} non-constant inputs")
            return node, data[0]
        if not _std(node, *CHAIN) or len(data) != 1:
            break
        name = data[0]
    raise Skip(f"no linear layer computes {out!r} in the fused model")


def extract(view: GraphView, x: str, y: str) -> list[onnx.NodeProto]:
    """The nodes that compute `y` from `x` and constants, in graph order; Skip if `y` needs
    another activation, or a graph input other than x."""
    needed: dict[int, onnx.NodeProto] = {}
    stack, seen = [y], set()
    while stack:
        name = stack.pop()
        if name in seen or name == x or name == "":
            continue
        seen.add(name)
        node = view.producer.get(name)
        if node is None:
            if name in view.constants:
                continue  # an initializer
            raise Skip(f"{y!r} depends on {name!r} besides {x!r}")
        if _has_subgraph(node):
            raise Skip(f"{y!r} is computed through {node.op_type} {node_name(node)!r}, which holds a subgraph")
        needed[id(node)] = node
        if len(needed) > MAX_NODES:
            raise Skip(f"more than {MAX_NODES} nodes compute {y!r} from {x!r}")
        stack.extend(node.input)
    return [n for n in view.graph.node if id(n) in needed]
