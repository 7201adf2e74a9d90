"""Folding in TorchScript modules, traced or scripted, with every BN parameter read from the graph.

The root's inlined forward graph shows each aten::batch_norm call with its inputs: the BN's
tensors as prim::GetAttr chains from self (their module paths), eps and the training flag as
constants (traced) or module attributes behind prim::If (scripted), and the input as the output
of aten::_convolution / conv*d / conv_transpose*d / linear. A traced module has no eps attribute
at all: the graph is the only place it is. Linear → BatchNorm1d folds where the rank is known:
from the sizes a trace records, else from running the graph once on an example input
(--shape / --example-input, or a guess from the first layer).

Then the BN goes where its call can be cut: a plain BN module's prim::CallMethod in its parent's
graph, or the batch_norm call inside its own module's graph (timm's BatchNormAct2d). All
instances of a scripted class share one graph, so a call is cut only when every instance folds
there; otherwise, and where a traced layer without bias cannot be given one, the BN stays in the
graph as the identity (γ=1, β=0, μ=0 or the shift, σ²=1−ε).
"""
from __future__ import annotations

import io
import itertools

import torch

from ..errors import BadInput, Skip
from ..fold_math import BrokenStatistics, FoldOverflow
from ..report import FoldedBN, FoldReport, SkippedBN
from .params import attr_at, fold_tensors, write_params
from .sites import FoldSite, check_linear_axis, owner, retire

BN_NAMES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm")
# op → (transposed: a constant, or the position of the flag; position of groups)
LAYER_OPS = {"aten::_convolution": (6, 8), "aten::convolution": (6, 8),
             "aten::conv1d": (False, 6), "aten::conv2d": (False, 6), "aten::conv3d": (False, 6),
             "aten::conv_transpose1d": (True, 6), "aten::conv_transpose2d": (True, 6),
             "aten::conv_transpose3d": (True, 6), "aten::linear": (False, None)}
RESHAPES = ("aten::flatten", "aten::view", "aten::reshape")
SHAPE_READS = ("aten::size", "aten::dim", "aten::numel", "prim::shape", "prim::device", "prim::dtype", "aten::len",
               "aten::__is__", "aten::__isnot__", "prim::isinstance", "prim::GetAttr", "prim::unchecked_cast")
SHAPE_OF_SECOND = ("aten::reshape_as", "aten::view_as", "aten::expand_as")


def fold_script_module(root: torch.jit.ScriptModule, report: FoldReport,
                       example: tuple | None = None) -> torch.jit.ScriptModule:
    """Fold `root` (a private copy: its class graphs are edited) and return it reloaded, so that
    the edited graphs are what runs."""
    try:
        graph = root.inlined_graph
    except (RuntimeError, AttributeError) as exc:
        raise BadInput(f"TorchScript module without a forward to fold ({str(exc).splitlines()[0][:100]})") from None
    values = Values(root, graph)
    live = list(_live_nodes(graph, values))
    reads = _reads(live, values)
    shapes = Shapes(root, graph, example)
    plans, kept = [], {}
    for bn in (n for n in live if n.kind() == "aten::batch_norm"):
        try:
            site = _site(root, bn, values, reads, shapes)
            plans.append(Plan(root, site))
        except (Skip, BrokenStatistics, FoldOverflow) as why:
            kept.setdefault(_name(values, bn), str(why))  # one BN inlined in two branches: said once
    report.skipped += [SkippedBN(name, why) for name, why in kept.items()]
    _bias_slots(root, plans)
    cut = _cuts(root, plans)
    for plan in plans:
        note = plan.apply(root, cut.get(plan.site.bn))
        if note:
            report.notes.append(note)
            report.identity_bns += 1
        report.folded.append(FoldedBN(plan.site.bn, plan.site.producer, plan.site.kind))
    return reload(root)


def reload(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """A save/load round trip: types of its own (scripted classes share one graph per type across a
    process) and graphs compiled afresh."""
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer, map_location="cpu")


def count_batch_norms(module: torch.jit.ScriptModule) -> int:
    return len(module.inlined_graph.findAllNodes("aten::batch_norm", True))


# -- reading the graph -------------------------------------------------------------------------


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


def _live_nodes(block, values: Values):
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
            yield from _live_nodes(inner, values)


def _reads(nodes, values: Values) -> dict[str, int]:
    """How many ops read each tensor attribute (its values, not its shape or whether it is None)."""
    reads: dict[str, int] = {}
    for node in nodes:
        if node.kind() in SHAPE_READS or node.kind() == "prim::If":
            continue
        for value in node.inputs():
            path = values.path(value)
            if path is not None:
                reads[path] = reads.get(path, 0) + 1
    return reads


def _all_nodes(graph):
    for node in graph.nodes():
        yield node
        for block in node.blocks():
            yield from _all_nodes(block)


def _value_uses(value) -> int:
    return sum(1 for use in value.uses() if use.user.kind() not in SHAPE_READS
               and not (use.user.kind() in SHAPE_OF_SECOND and use.offset == 1))


def _name(values: Values, bn) -> str:
    return owner(values.path(bn.inputsAt(3))) or bn.output().debugName()


def _site(root, bn, values: Values, reads: dict[str, int], shapes: "Shapes") -> FoldSite:
    """Check what must hold for this batch_norm call to fold into the layer before it."""
    if values.constant(bn.inputsAt(5)) is not False:
        raise Skip("batch_norm runs in training mode (batch statistics)")
    tensors = {k: _tensor_path(values, bn.inputsAt(i), reads)
               for k, i in (("weight", 1), ("bias", 2), ("running_mean", 3), ("running_var", 4))}
    if tensors["running_mean"] is None or tensors["running_var"] is None:
        raise Skip("no running statistics: BN uses batch statistics")
    eps = values.constant(bn.inputsAt(7))
    producer, reshape = bn.inputsAt(0).node(), None
    if producer.kind() in RESHAPES and producer.inputsAt(0).node().kind() == "aten::linear":
        producer, reshape = producer.inputsAt(0).node(), producer
    if producer.kind() not in LAYER_OPS:
        raise Skip(f"input comes from {producer.kind()}, not a conv or linear")
    others = _value_uses(producer.output()) - 1 + (_value_uses(reshape.output()) - 1 if reshape is not None else 0)
    if others:
        raise Skip(f"output of {producer.kind()} is also used by {others} other op(s)")
    weight = _tensor_path(values, producer.inputsAt(1), reads)
    bias = _tensor_path(values, producer.inputsAt(2), reads) if producer.inputsAt(2) is not None else None
    if weight is None or weight.rpartition(".")[2] != "weight" or bias not in (None, f"{owner(weight)}.bias"):
        raise Skip(f"{producer.kind()} reads {weight or 'a computed weight'}, not a layer's own weight and bias")
    transposed, groups_at = LAYER_OPS[producer.kind()]
    if not isinstance(transposed, bool):
        transposed = bool(values.constant(producer.inputsAt(transposed)))
    groups = int(values.constant(producer.inputsAt(groups_at))) if transposed else 1
    layer = attr_at(root, owner(weight))
    kind = getattr(layer, "original_name", producer.kind())
    if producer.kind() == "aten::linear":
        check_linear_axis(shapes.of(producer.output()), shapes.of((reshape or producer).output()),
                          reshape is not None)
    return FoldSite(owner(tensors["running_mean"]), owner(weight), kind, 1 if transposed else 0, groups, tensors,
                    float(eps))


def _tensor_path(values: Values, value, reads: dict[str, int]) -> str | None:
    """The attribute path a tensor input reads, None for a None constant; Skip for anything else."""
    path = values.path(value)
    if path is None:
        if value.node().kind() == "prim::Constant" and value.toIValue() is None:
            return None
        raise Skip(f"%{value.debugName()} is computed, not a module attribute")
    if attr_at(values.module, path) is None:
        return None
    if reads.get(path, 0) != 1:
        raise Skip(f"{path} is read by {reads.get(path, 0)} ops (a module called more than once?)")
    return path


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
    mine = [n for n in graph.nodes() if n.kind() in ("aten::linear", *RESHAPES)]
    theirs = [n for n in twin_graph.nodes() if n.kind() in ("aten::linear", *RESHAPES)]
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


# -- applying ----------------------------------------------------------------------------------


class Plan:
    """A site's folded parameters, computed before anything is written."""

    def __init__(self, root, site: FoldSite):
        self.site = site
        layer = attr_at(root, site.producer)
        affine = site.affine(root)
        bias = getattr(layer, "bias", None)  # a layer traced without a bias has no such attribute
        self.new_w, self.new_b = fold_tensors(layer.weight, bias, affine, site.axis, site.groups, site.kind)
        self.shift = affine.shift
        self.bias_slot: str | None = "present" if bias is not None else None

    def apply(self, root, cut: "Cut | None") -> str | None:
        layer = attr_at(root, self.site.producer)
        if self.bias_slot is None:  # the shift stays in the BN: BN(x) = x + t
            write_params(layer, self.new_w, None)
            retire(root, self.site, "identity", self.shift)
            return (f"{self.site.bn} kept in the graph as an identity holding the shift: {self.site.producer} has "
                    "no bias and its class's graph is shared with layers that do not fold")
        write_params(layer, self.new_w, None)
        _set_bias(layer, self.bias_slot, self.new_b)
        if cut is None:
            retire(root, self.site, "identity")
            return (f"{self.site.bn} kept in the graph as an identity (γ=1, β=0, μ=0, σ²=1−ε): its call is in a graph "
                    "shared with instances that do not fold, or not in a graph bnfold can cut")
        cut.apply()
        return None


def _bias_slots(root, plans: list[Plan]) -> None:
    """Where each layer without a bias gets one: its (scripted conv's) Optional bias attribute,
    or a new attribute its class's graph reads instead of a None bias — when every instance of
    the class folds (a traced layer's class is its own). Otherwise the shift stays in the BN."""
    modules = dict(root.named_modules())
    planned = {p.site.producer: p for p in plans}
    for plan in plans:
        if plan.bias_slot is not None:
            continue
        layer = modules[plan.site.producer]
        if _takes_tensor(layer, "bias"):
            plan.bias_slot = "bias"
            continue
        siblings = [p for p, m in modules.items() if _class(m) == _class(layer)]
        if all(p in planned and planned[p].bias_slot in (None, "graph") for p in siblings) and _bias_input(layer):
            plan.bias_slot = "graph"
    for path, plan in planned.items():  # a graph is rewired once, for the whole class
        if plan.bias_slot == "graph":
            _rewire_bias(modules[path])


def _takes_tensor(layer, name: str) -> bool:
    if not layer._c.hasattr(name):
        return False
    value = layer._c.getattr(name)
    try:
        layer._c.setattr(name, torch.zeros(0))
    except RuntimeError:  # an attribute typed NoneType (a scripted Linear without bias)
        return False
    layer._c.setattr(name, value)
    return True


BIAS_ATTRIBUTE = "bnfold_bias"


def _bias_input(layer):
    """The one conv/linear op of the layer's own graph, if its bias input is None."""
    nodes = [n for n in layer.graph.nodes() if n.kind() in LAYER_OPS]
    if len(nodes) != 1:
        return None
    bias = nodes[0].inputsAt(2)
    none = bias.node().kind() == "prim::Constant" and bias.toIValue() is None
    unset = bias.node().kind() == "prim::GetAttr" and Values(layer, layer.graph).path(bias) == "bias" \
        and layer._c.getattr("bias") is None
    return nodes[0] if none or unset else None


def _rewire_bias(layer) -> None:
    node = _bias_input(layer)
    if node is None:  # already rewired by a sibling of the same class
        return
    graph = layer.graph
    get = graph.create("prim::GetAttr", [next(graph.inputs())])
    get.s_("name", BIAS_ATTRIBUTE)
    get.output().setType(torch._C.TensorType.get())
    get.insertBefore(node)
    node.replaceInput(2, get.output())


def _set_bias(layer, slot: str, bias) -> None:
    value = torch.from_numpy(bias).to(layer.weight.device, layer.weight.dtype)
    if slot == "present":
        with torch.no_grad():
            layer.bias.copy_(value)
    elif slot == "bias":
        layer.bias = torch.nn.Parameter(value)
    else:
        layer._c._register_attribute(BIAS_ATTRIBUTE, torch._C.TensorType.get(), value)


class Cut:
    """Removing one BN call from one class's graph: every instance of the class loses it."""

    def __init__(self, graph, node, source_index: int):
        self.graph, self.node, self.source_index, self.done = graph, node, source_index, False

    def apply(self) -> None:
        if self.done:
            return
        self.node.output().replaceAllUsesWith(self.node.inputsAt(self.source_index))
        self.node.destroy()
        torch._C._jit_pass_dce(self.graph)
        self.done = True


def _cuts(root, plans: list[Plan]) -> dict[str, Cut]:
    """BN path → the cut that removes it, for BNs whose every sibling (same class, same call) folds."""
    folding = {p.site.bn for p in plans if p.bias_slot is not None}
    modules = dict(root.named_modules())
    cuts: dict[str, Cut] = {}
    for bn in sorted(folding):
        if bn in cuts:
            continue
        found = _call_site(modules, bn)
        if found is None:
            continue
        host, local, cut = found
        siblings = [".".join(filter(None, (p, local))) for p, m in modules.items() if _class(m) == _class(host)]
        if all(s in folding for s in siblings):
            cuts.update({s: cut for s in siblings})
    return cuts


def _class(module) -> str:
    return module._c._type().qualified_name()


def _call_site(modules: dict, bn: str):
    """(module whose graph calls the BN, the BN's path from it, the cut), or None."""
    module = modules.get(bn)
    parent_path, _, child = bn.rpartition(".")
    if getattr(module, "original_name", "") in BN_NAMES and parent_path in modules:
        parent = modules[parent_path]
        graph = parent.graph
        this = next(graph.inputs()).unique()
        calls = [n for n in _all_nodes(graph) if n.kind() == "prim::CallMethod" and n.s("name") == "forward"
                 and n.inputsAt(0).node().kind() == "prim::GetAttr" and n.inputsAt(0).node().s("name") == child
                 and n.inputsAt(0).node().input().unique() == this]
        return (parent, child, Cut(graph, calls[0], 1)) if len(calls) == 1 else None
    if module is None or not hasattr(module, "graph"):
        return None
    graph = module.graph
    values = Values(module, graph)
    calls = [(n, i) for n in _all_nodes(graph) for i in _batch_norm_input(n)
             if values.path(n.inputsAt(i[1])) == "running_mean"]
    if len(calls) != 1:
        return None
    node, (source, _) = calls[0]
    return module, "", Cut(graph, node, source)


def _batch_norm_input(node) -> list[tuple[int, int]]:
    """(position of the input, position of running_mean) of a batch_norm call, as the op or as a
    call of torch.nn.functional.batch_norm in a scripted graph."""
    if node.kind() == "aten::batch_norm":
        return [(0, 3)]
    if node.kind() == "prim::CallFunction" and str(node.inputsAt(0).type()).endswith("torch.nn.functional.batch_norm"):
        return [(1, 2)]
    return []
