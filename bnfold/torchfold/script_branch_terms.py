"""A TorchScript graph read as branch_terms.py reads graphs: which adds sum parallel branches of one
input, and what each term is (a Conv of the input, a Conv and its BN, a BN of the input, the input).

branch_terms' finder is written over torch.fx nodes, so the graph is read through a mirror: one fx
node per value of its live nodes, with the node's inputs as args (constants as Python values), and
ScriptDialect answers each question on the TorchScript node behind the fx node: an add is aten::add
or add_ with alpha 1, a copy is aten::dropout in eval (or contiguous, clone), a BN is what
ScriptGraph recognises, a Conv an aten convolution whose weight and bias are module tensors and
whose stride, padding, dilation and groups are constants. A tensor read by more than the term
(counted on the whole model) keeps its term out of a merge, as does a pad op before the convolution.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.fx

from ..errors import Skip
from .branch_terms import GraphDialect, Term, bn_term, conv_term, join_path, kernel_label
from .params import attr_at
from .script_graph import ScriptGraph, Shapes, Values, live_nodes, reads_of, value_readers
from .sites import owner
from .vocabulary import LAYER_OPS, op_name

ADDS = ("aten::add", "aten::add_")
DROPOUTS = ("aten::dropout", "aten::feature_dropout", "aten::alpha_dropout", "aten::feature_alpha_dropout")
COPIES = ("aten::contiguous", "aten::clone")
CONVS = ("conv1d", "conv2d", "conv3d", "convolution", "_convolution", "_convolution_mode")
PADS = ("pad", "constant_pad_nd", "reflection_pad", "replication_pad", "circular_pad", "_pad_circular")


class Mirror:
    """An fx graph standing for a TorchScript graph's live nodes: one node per value, its args the
    node's inputs (constants as Python values, so `sum`'s starting 0 reads as 0)."""

    def __init__(self, graph, live):
        self.fx = torch.fx.Graph()
        self.nodes: dict[int, torch.fx.Node] = {}  # value.unique() → its fx node
        self.values: dict[torch.fx.Node, torch._C.Value] = {}
        for value in graph.inputs():
            self._add(value, "placeholder", ())
        for node in live:
            args = tuple(self.arg(v) for v in node.inputs())
            for value in node.outputs():
                self._add(value, "call_function", args)

    def arg(self, value):
        if value.node().kind() == "prim::Constant":
            try:
                return value.toIValue()
            except RuntimeError:  # a constant Python cannot hold (a function)
                pass
        if value.unique() not in self.nodes:  # a block's parameter, or a value of a branch not taken
            self._add(value, "placeholder", ())
        return self.nodes[value.unique()]

    def _add(self, value, op: str, args: tuple) -> None:
        name = value.debugName()
        node = self.fx.create_node(op, name if op == "placeholder" else script_op, args, name=name)
        self.nodes[value.unique()], self.values[node] = node, value


def script_op(*args):
    """The target of every mirrored node: the TorchScript node behind it is what it computes."""
    raise RuntimeError("a mirror of a TorchScript graph is read, never run")


class ScriptDialect(GraphDialect):
    """branch_terms' questions, answered on the TorchScript node behind each mirrored node.
    Paths are relative to the block; `reads` counts reads on the whole model by full path, the
    block's own inlined graph counts those within it."""

    def __init__(self, graph, block, prefix: str, reads: dict[str, int]):
        self.values = Values(block, graph)
        live = list(live_nodes(graph, self.values))
        self.mirror = Mirror(graph, live)
        super().__init__(SimpleNamespace(graph=self.mirror.fx), block, prefix)
        start = len(prefix) + 1 if prefix else 0
        self.reads = {p[start:]: n for p, n in reads.items() if not prefix or p.startswith(prefix + ".")}
        for path, count in reads_of(live, self.values).items():  # exact within the block
            self.reads[path] = max(count, self.reads.get(path, 0))
        script = ScriptGraph(self.values, self.reads, Shapes(block, graph, None))
        self.bn_calls = {call.node.output().unique(): call for call in script.bn_calls(live)}
        self.params: dict[torch.fx.Node, str] = {}  # a Conv term's node → its weight's path

    def value(self, node):
        return self.mirror.values.get(node) if isinstance(node, torch.fx.Node) else None

    def _constant(self, value):
        try:
            return self.values.constant(value) if isinstance(value, torch._C.Value) else value
        except Skip:
            return None

    def is_add(self, node) -> bool:
        value = self.value(node)
        if value is None or value.node().kind() not in ADDS or value.unique() in self.bn_calls:
            return False
        add = value.node()
        return add.inputsSize() == 3 and self._constant(add.inputsAt(2)) == 1 \
            and all(isinstance(v.type(), torch._C.TensorType) for v in (value, add.inputsAt(0)))

    def transparent(self, node) -> bool:
        value = self.value(node)
        if value is None:
            return False
        kind = value.node().kind()
        return kind in COPIES or (kind in DROPOUTS and self._constant(value.node().inputsAt(2)) is False)

    def value_users(self, node) -> list:
        users = []
        for user in value_readers(self.value(node)):
            fx = self.mirror.nodes.get(user.outputsAt(0).unique()) if user.outputsSize() else None
            users.append(fx if fx is not None else "another node")  # the graph's return, a branch not taken
        return users

    def bn(self, node):
        value = self.value(node)
        call = self.bn_calls.get(value.unique()) if value is not None else None
        if call is None or call.input.unique() not in self.mirror.nodes:
            return None
        term = bn_term(call, self.prefix, lambda p: self.reads.get(p, 0), self.probe)
        nodes = [self.mirror.nodes[n.output().unique()] for n in (call.nodes or [call.node])]
        return self.mirror.nodes[call.input.unique()], nodes, term

    def conv(self, node):
        value = self.value(node)
        name = op_name(value.node().kind()) if value is not None else None
        if name not in CONVS or not value.node().kind().startswith("aten::"):
            return None
        op = value.node()
        bound = LAYER_OPS[name].signature.bind(tuple(op.inputs()), {})
        if LAYER_OPS[name].transposed is None and self._constant(bound["transposed"]) is not False:
            return None
        settings = [self._ints(bound[k]) for k in ("stride", "padding", "dilation")] + [self._constant(bound["groups"])]
        weight_path = self.values.path(bound["weight"])
        bias = bound["bias"]
        bias_path = self.values.path(bias) if isinstance(bias, torch._C.Value) else None
        computed = weight_path is None or (bias_path is None and self._constant(bias) is not None)
        weight = None if computed else attr_at(self.probe, weight_path)
        label = f"Conv '{join_path(self.prefix, owner(weight_path) or value.debugName())}'"
        if computed or not isinstance(weight, torch.Tensor) or None in settings:
            return Term(label, self.mirror.nodes.get(op.inputsAt(0).unique()), [node],
                        problem=f"{label}'s weight, bias or settings are computed, not module tensors and constants")
        problem = next((f"{join_path(self.prefix, p)} is read by {self.reads.get(p, 0)} ops"
                        for p in (weight_path, bias_path) if p and self.reads.get(p, 0) != 1), None)
        source, nodes = op.inputsAt(0), [node]
        if _is_pad(source.node().kind()):  # padding_mode other than zeros, or an explicit pad
            mode = self._constant(source.node().inputsAt(2)) if source.node().inputsSize() > 2 else None
            problem = problem or f"{label} reads its input through {source.node().kind()}" \
                + (f" (mode {mode!r})" if isinstance(mode, str) else "") + ": only zero padding of its own merges"
            nodes.append(self.mirror.nodes[source.unique()])
            source = source.node().inputsAt(0)
        if self.shallow:
            return Term(label, self.mirror.arg(source), nodes, module=owner(weight_path), problem=problem)
        self.params[node] = weight_path
        return conv_term(f"{label} {kernel_label(weight)}", self.mirror.arg(source), nodes, weight,
                         attr_at(self.probe, bias_path) if bias_path else None, *settings, owner(weight_path),
                         problem=problem)

    def _ints(self, value):
        if isinstance(value, torch._C.Value) and value.node().kind() == "prim::ListConstruct":
            items = [self._constant(v) for v in value.node().inputs()]
            return None if None in items else items
        return self._constant(value)

    def weight_path(self, term: Term) -> str:
        return next(self.params[n] for n in term.nodes if n in self.params)


def _is_pad(kind: str) -> bool:
    name = op_name(kind) or ""
    return kind.startswith("aten::") and name.startswith(PADS)
