"""TorchScript graphs as the fold rule reads them (site_rule.Dialect).

The root's inlined forward graph shows each batch_norm call with its inputs: the BN's tensors as
prim::GetAttr chains from self (their module paths), eps and the training flag as constants
(traced) or module attributes behind prim::If (scripted), and the input as the output of
aten::_convolution / conv*d / conv_transpose*d / linear. A traced module has no eps attribute at
all: the graph is the only place it is. Linear → BatchNorm1d folds where the rank is known: from
the sizes a trace records, else from running the graph once on an example input.
"""
from __future__ import annotations

import io
import itertools

import torch

from ..errors import Skip
from .params import alias_reads, attr_at
from .constants import script_affine
from .site_rule import AffineStats, BnCall, BnStats, LayerCall
from .sites import owner
from .vocabulary import QAT_REASON, BN_OPS, LAYER_OPS, RESHAPES, SHAPE_OF_SECOND, SHAPE_READS, layer_kind, op_name, qat_scope

# TorchScript ops that read whether a value is None, its type or an attribute: never its values
NOT_VALUE_READS = ("aten::__is__", "aten::__isnot__", "prim::isinstance", "prim::GetAttr", "prim::unchecked_cast")


class ScriptGraph:
    """The inlined graph of a ScriptModule, read through the fold rule's questions."""

    def __init__(self, values: "Values", reads: dict[str, int], shapes: "Shapes"):
        self.values, self._reads, self.shapes = values, reads, shapes
        self._aliased = alias_reads(reads, values.module)

    def bn_calls(self, live) -> list[BnCall]:
        calls = [self._bn(n, op_name(n.kind())) for n in live if op_name(n.kind()) in BN_OPS and n.kind().startswith("aten::")]
        return calls + [c for c in (self._affine(n) for n in live if n.kind() == "aten::add") if c is not None]

    def _affine(self, add) -> BnCall | None:
        """aten::add(aten::mul(x, S), T, 1) with S and T constants that vary along one axis."""
        inputs = list(add.inputs())
        try:
            if len(inputs) != 3 or self.values.constant(inputs[2]) != 1:
                return None
        except Skip:
            return None
        for mul, shift in ((inputs[0], inputs[1]), (inputs[1], inputs[0])):
            if mul.node().kind() != "aten::mul" or value_uses(mul) != 1:
                continue
            for x, scale in (tuple(mul.node().inputs()), tuple(mul.node().inputs())[::-1]):
                found = script_affine(self.values, x, scale, shift)
                if found is None:
                    continue
                (value, axis_from_end, rank), paths = found
                scope = _common_owner(paths)
                return BnCall(scope or add.output().debugName(), add, x, AffineStats(value, tuple(paths)), scope,
                              nodes=[mul.node(), add], axis_from_end=axis_from_end, rank=rank)
        return None

    def _bn(self, node, name: str) -> BnCall:
        bound = BN_OPS[name].bind(tuple(node.inputs()), {})
        tensors, reason = {}, None
        for role in ("weight", "bias", "running_mean", "running_var"):
            try:
                tensors[role] = self._tensor(bound[role]) if role in bound else None
            except Skip as why:
                tensors[role], reason = None, str(why)
        label = owner(tensors["running_mean"]) or node.output().debugName()
        eps = 1e-5
        try:
            if self.values.constant(bound["training"]) is not False:
                reason = "batch_norm runs in training mode (batch statistics)"
            eps = float(self.values.constant(bound["eps"]))
        except Skip as why:
            reason = reason or str(why)
        if reason is None and (tensors["running_mean"] is None or tensors["running_var"] is None):
            reason = "no running statistics: BN uses batch statistics"
        qat = qat_scope(self.values.module, tensors["running_mean"])
        reason = QAT_REASON.format(module=qat) if qat is not None else reason
        return BnCall(label, node, bound["input"], BnStats(tensors, eps), owner(tensors["running_mean"]) or None,
                      reason=reason)

    def _tensor(self, value) -> str | None:
        """The attribute path a tensor input reads, None for None; Skip for a computed value."""
        path = self.values.path(value)
        if path is None:
            if value.node().kind() == "prim::Constant" and value.toIValue() is None:
                return None
            raise Skip(f"%{value.debugName()} is computed, not a module attribute")
        return path if attr_at(self.values.module, path) is not None else None

    def layer(self, value) -> LayerCall | None:
        node = value.node()
        name = op_name(node.kind())
        if name not in LAYER_OPS or not node.kind().startswith("aten::"):
            return None
        spec = LAYER_OPS[name]
        bound = spec.signature.bind(tuple(node.inputs()), {})
        try:
            weight = self._tensor(bound["weight"])
            bias = self._tensor(bound["bias"]) if "bias" in bound else None
            transposed = spec.transposed if spec.transposed is not None else bool(self.values.constant(bound["transposed"]))
            groups = int(self.values.constant(bound["groups"])) if transposed else 1
        except Skip:
            return None
        # the fold writes the layer module's own weight and bias
        if weight is None or weight.rpartition(".")[2] != "weight" or bias not in (None, f"{owner(weight)}.bias"):
            return None
        tensor = attr_at(self.values.module, weight)
        kind = layer_kind(name, transposed, tensor)
        return LayerCall(node, kind, 1 if transposed else 0, groups, weight, bias, owner(weight), False,
                         0 if spec.linear else tensor.dim() - 2)

    def reshaped(self, value):
        node = value.node()
        return node.inputsAt(0) if op_name(node.kind()) in RESHAPES and node.kind().startswith("aten::") else None

    def value_uses(self, value) -> int:
        return value_uses(value)

    def reads(self, path: str) -> int:
        return self._aliased(path)

    def calls(self, scope: str) -> int:
        return 1  # a module's calls show as reads of its tensors

    def shape(self, value) -> tuple | None:
        return self.shapes.of(value)

    def describe(self, value) -> str:
        return value.node().kind()


def reload(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """A save/load round trip: types of its own (scripted classes share one graph per type across a
    process) and graphs compiled afresh."""
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer, map_location="cpu")




def _common_owner(paths: list[str]) -> str | None:
    """The module whose tensors these all are (FrozenBatchNorm2d's buffers), if one."""
    owners = {owner(p) for p in paths}
    return owners.pop() if len(owners) == 1 else None


class Values:
    """What a value of a module's graph is: an attribute path from self, or a constant."""

    def __init__(self, module, graph):
        self.module, self.self_id = module, next(graph.inputs()).unique()
        self.paths: dict[int, str | None] = {}

    def path(self, value) -> str | None:
        if value.unique() not in self.paths:
            self.paths[value.unique()] = self._path(value)
        return self.paths[value.unique()]

    def _path(self, value) -> str | None:
        node = value.node()
        kind = node.kind()
        if kind == "prim::GetAttr":
            base = node.input()
            if base.unique() == self.self_id:
                return node.s("name")
            parent = self.path(base)
            return f"{parent}.{node.s('name')}" if parent is not None else None
        if kind == "prim::unchecked_cast":
            return self.path(node.input())
        if kind == "prim::If":
            chosen = self._branch(node, value)
            return self.path(chosen) if chosen is not None else None
        return None

    def constant(self, value):
        """The value's Python value, or raise Skip when the graph does not fix it."""
        node, kind = value.node(), value.node().kind()
        if kind == "prim::Constant":
            return value.toIValue()
        if kind in ("prim::GetAttr", "prim::unchecked_cast"):
            path = self.path(value)
            if path is not None:
                return attr_at(self.module, path)
            if kind == "prim::unchecked_cast":
                return self.constant(node.input())
        if kind == "prim::If":
            chosen = self._branch(node, value)
            if chosen is not None:
                return self.constant(chosen)
        if kind == "aten::__not__":
            return not self.constant(node.input())
        if kind in ("aten::__is__", "aten::__isnot__"):
            a, b = (self._none_or_not(v) for v in node.inputs())
            same = a is None and b is None
            return same if kind == "aten::__is__" else not same
        raise Skip(f"{kind} value %{value.debugName()} is not a constant of the graph")

    def _none_or_not(self, value):
        """None if the value is None; something else (the value, or the graph's value) if not."""
        try:
            return self.constant(value)
        except Skip:
            return value

    def _branch(self, node, value):
        """The output of the If branch taken, when its condition is fixed."""
        try:
            condition = self.constant(node.input())
        except Skip:
            return None
        index = [o.unique() for o in node.outputs()].index(value.unique())
        block = list(node.blocks())[0 if condition else 1]
        return list(block.outputs())[index]


def live_nodes(block, values: Values):
    """Nodes that can run: a branch on a fixed condition (`if self.residual:`) runs one side only."""
    for node in block.nodes():
        yield node
        blocks = list(node.blocks())
        if node.kind() == "prim::If":
            try:
                blocks = [blocks[0 if values.constant(node.input()) else 1]]
            except Skip:
                pass
        for inner in blocks:
            yield from live_nodes(inner, values)


def reads_of(nodes, values: Values) -> dict[str, int]:
    """How many ops read each tensor attribute (its values, not its shape or whether it is None)."""
    reads: dict[str, int] = {}
    for node in nodes:
        if _shape_read(node.kind()) or node.kind() == "prim::If":
            continue
        for value in node.inputs():
            path = values.path(value)
            if path is not None:
                reads[path] = reads.get(path, 0) + 1
    return reads


def method_runs(root, method: str = "forward"):
    """Each run of a method, from the root's `method` down every method it calls: (module, its
    path, the method's name, Values, live nodes). A method called twice is listed twice."""
    todo = [(root, "", method)]
    while todo:
        module, prefix, name = todo.pop()
        graph = module._c._get_method(name).graph
        values = Values(module, graph)
        live = list(live_nodes(graph, values))
        yield module, prefix, name, values, live
        for node in live:
            if node.kind() != "prim::CallMethod":
                continue
            callee = node.inputsAt(0)
            path = "" if callee.unique() == values.self_id else values.path(callee)
            if path is not None:
                todo.append((attr_at(module, path), ".".join(filter(None, (prefix, path))), node.s("name")))


def run_forwards(root) -> set[str]:
    """The paths of the modules whose forward the model runs (a module whose submodules its parent
    calls directly has a forward nothing runs)."""
    return {prefix for _, prefix, method, _, _ in method_runs(root) if method == "forward"}


def all_nodes(graph):
    """Every node, those of nested blocks right after the node holding them."""
    todo = [iter(graph.nodes())]
    while todo:
        for node in todo[-1]:
            yield node
            blocks = node.blocks()
            if blocks:
                todo.append(itertools.chain.from_iterable(b.nodes() for b in blocks))
                break
        else:
            todo.pop()


def value_uses(value) -> int:
    return len(value_readers(value))


def value_readers(value) -> list:
    """The nodes that read `value`'s values (a node reading it twice is listed twice)."""
    return [use.user for use in value.uses() if not _shape_read(use.user.kind())
            and not (op_name(use.user.kind()) in SHAPE_OF_SECOND and use.offset == 1)]


def _shape_read(kind: str) -> bool:
    return op_name(kind) in SHAPE_READS or kind in NOT_VALUE_READS


class Shapes:
    """Sizes of graph values: from the types a trace records, else from one run on an example."""

    def __init__(self, root, graph, example):
        self.root, self.graph, self.example = root, graph, example
        self.probed: dict[int, tuple] | None = None

    def of(self, value) -> tuple | None:
        sizes = _recorded(value)
        if sizes is not None:
            return sizes
        if self.probed is None:
            self.probed = probe_sizes(self.root, self.graph, self.example or guess_script_example(self.root))
        return self.probed.get(value.unique())


def _recorded(value) -> tuple | None:
    try:
        sizes = value.type().sizes()
    except RuntimeError:
        return None
    return tuple(sizes) if sizes is not None and all(isinstance(d, int) for d in sizes) else None


def probe_sizes(root, graph, example) -> dict[int, tuple]:
    """Run a copy of the graph that also returns the sizes of every linear and reshape output
    (top-level block only: a value inside a branch cannot be returned)."""
    if example is None:
        return {}
    twin = reload(root)  # forward may set attributes (a cached anchor grid): not on the module we write
    twin_graph = twin.inlined_graph
    mine = [n for n in graph.nodes() if op_name(n.kind()) in ("linear", *RESHAPES)]
    theirs = [n for n in twin_graph.nodes() if op_name(n.kind()) in ("linear", *RESHAPES)]
    if len(mine) != len(theirs):
        return {}
    for node in theirs:
        size = twin_graph.create("aten::size", [node.output()])
        size.output().setType(torch._C.ListType.ofInts())
        size.insertAfter(node)
        twin_graph.registerOutput(size.output())
    twin_graph.makeMultiOutputIntoTuple()
    try:
        run = torch._C._create_function_from_graph(f"bnfold_probe_{next(_PROBES)}", twin_graph)
        with torch.no_grad():
            results = run(twin._c, *example)
    except Exception:  # noqa: BLE001 — a wrong guess of the input only leaves ranks unknown
        return {}
    return {n.output().unique(): tuple(s) for n, s in zip(mine, results[-len(mine):])}


_PROBES = itertools.count()




def guess_script_example(root) -> tuple[torch.Tensor, ...] | None:
    """An input for the first conv or linear of a ScriptModule (32 pixels a side)."""
    for _, module in root.named_modules():
        kind = getattr(module, "original_name", "")
        weight = getattr(module, "weight", None) if kind.startswith(("Conv", "Linear")) else None
        if not isinstance(weight, torch.Tensor):
            continue
        if kind == "Linear":
            return (torch.randn(2, weight.shape[1], dtype=weight.dtype),)
        channels = weight.shape[0] if kind.startswith("ConvTranspose") else weight.shape[1] * int(getattr(module, "groups", 1))
        size = 1 if kind.startswith("ConvTranspose") else 32
        return (torch.randn(2, channels, *([size] * (weight.dim() - 2)), dtype=weight.dtype),)
    return None


