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

import torch

from ..errors import BadInput, Skip
from ..fold_math import BrokenStatistics, FoldOverflow
from ..report import FoldedBN, FoldReport, SkippedBN
from .apply import set_identity
from .params import attr_at, fold_tensors, write_params
from .script_graph import ScriptGraph, Shapes, Values, all_nodes, live_nodes, reads_of, run_forwards
from .site_rule import AffineStats, fold_site
from .site_rule import FoldSite
from .vocabulary import LAYER_OPS

BN_NAMES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm")
LAYER_KINDS = tuple(f"aten::{name}" for name in LAYER_OPS)



def inlined_forward(root: torch.jit.ScriptModule):
    """The root's forward with every method it calls inlined (a copy)."""
    try:
        return root.inlined_graph
    except (RuntimeError, AttributeError) as exc:
        raise BadInput(f"TorchScript module without a forward to fold ({str(exc).splitlines()[0][:100]})") from None


def fold_script_module(root: torch.jit.ScriptModule, report: FoldReport, example: tuple | None = None,
                       graph=None) -> None:
    """Fold `root` (a private copy) by editing its class graphs in place; `graph` is its
    inlined_forward, if at hand. Saving it writes the edited graphs; to run them, or to inline
    them again, reload it first (script_graph.reload): inlining caches each method's graph as
    it was."""
    graph = graph if graph is not None else inlined_forward(root)
    values = Values(root, graph)
    live = list(live_nodes(graph, values))
    reads = reads_of(live, values)
    for path, n in _reads_by_other_methods(root).items():
        reads[path] = reads.get(path, 0) + n
    dialect = ScriptGraph(values, reads, Shapes(root, graph, example))
    plans, kept = [], {}
    for bn in dialect.bn_calls(live):
        try:
            plans.append(Plan(root, fold_site(dialect, bn)))
        except (Skip, BrokenStatistics, FoldOverflow) as why:
            kept.setdefault(bn.name, str(why))  # one BN inlined in two branches: said once
    report.skipped += [SkippedBN(name, why) for name, why in kept.items()]
    run = run_forwards(root)  # a call is cut where it runs, not in a forward nothing calls
    while True:  # an affine dropped may leave a sibling layer's class graph without a bias to read: again
        _bias_slots(root, values, plans, run)
        cut = _cuts(root, plans, run)
        dropped = [p for p in plans if isinstance(p.site.stats, AffineStats)
                   and (p.site.bn not in cut or p.bias_slot is None)]
        if not dropped:
            break
        for plan in dropped:
            plans.remove(plan)  # an affine has no identity to be set to: it folds only where its call is cut
            report.skipped.append(SkippedBN(plan.site.bn, "its per-channel affine cannot be cut from its graph "
                                            "(shared with instances that do not fold, or its layer takes no bias)",
                                            plan.site.producer))
    _rewire_biases(root, plans)
    for plan in plans:
        note = plan.apply(root, cut.get(plan.site.bn))
        if note:
            report.notes.append(note)
            report.identity_bns += 1
        report.folded.append(FoldedBN(plan.site.bn, plan.site.producer, plan.site.kind))


# -- reading the graph -------------------------------------------------------------------------


def _reads_by_other_methods(root) -> dict[str, int]:
    """Tensor reads in the root's methods `forward` does not call (`@torch.jit.export`): they run
    the same layers, and a fold would change them too."""
    reads: dict[str, int] = {}
    for name in other_entry_points(root):
        try:
            graph = root._c._get_method(name).inlined_graph
        except (RuntimeError, AttributeError):
            continue
        values = Values(root, graph)
        for path, n in reads_of(list(live_nodes(graph, values)), values).items():
            reads[path] = reads.get(path, 0) + n
    return reads


def other_entry_points(root) -> list[str]:
    """The root's methods other than forward and those forward calls (`_forward_impl`)."""
    called, todo = {"forward"}, ["forward"]
    while todo:
        try:
            graph = root._c._get_method(todo.pop()).graph
        except RuntimeError:
            continue
        own = next(graph.inputs()).unique()
        for node in all_nodes(graph):
            if node.kind() == "prim::CallMethod" and node.inputsAt(0).unique() == own and node.s("name") not in called:
                called.add(node.s("name"))
                todo.append(node.s("name"))
    return [name for name in root._c._method_names() if name not in called]


# -- applying ----------------------------------------------------------------------------------


class Plan:
    """A site's folded parameters, computed before anything is written."""

    def __init__(self, root, site: FoldSite):
        self.site = site
        layer = attr_at(root, site.producer)
        affine = site.affine(root, like=layer.weight)
        # the bias the graph's op reads: a layer's `bias` attribute its forward does not pass is no bias
        bias = attr_at(root, site.bias) if site.bias else None
        self.new_w, self.new_b = fold_tensors(layer.weight, bias, affine, site.axis, site.groups, site.kind)
        self.shift = affine.shift
        self.bias_slot: str | None = "present" if bias is not None else None

    def apply(self, root, cut: "Cut | None") -> str | None:
        layer = attr_at(root, self.site.producer)
        if self.bias_slot is None:  # the shift stays in the BN: BN(x) = x + t
            write_params(layer, self.new_w, None)
            set_identity(root, self.site.stats.tensors, self.site.stats.eps, self.shift)
            return (f"{self.site.bn} kept in the graph as an identity holding the shift: {self.site.producer} has "
                    "no bias and its class's graph is shared with layers that do not fold")
        write_params(layer, self.new_w, None)
        _set_bias(layer, self.bias_slot, self.new_b)
        if cut is None:
            set_identity(root, self.site.stats.tensors, self.site.stats.eps, None)
            return (f"{self.site.bn} kept in the graph as an identity (γ=1, β=0, μ=0, σ²=1−ε): its call is in a graph "
                    "shared with instances that do not fold, or not in a graph bnfold can cut")
        cut.apply()
        return None


def _bias_slots(root, values: Values, plans: list[Plan], run: set[str]) -> None:
    """Where each layer without a bias gets one: its (scripted conv's) Optional bias attribute
    where the op reads that attribute, or a new attribute its class's graph reads instead of a
    None bias — when every instance of the class folds (a traced layer's class is its own).
    Otherwise the shift stays in the BN."""
    modules = dict(root.named_modules())
    by_class = _paths_by_class(modules)
    planned = {p.site.producer: p for p in plans}
    for plan in plans:
        if plan.bias_slot != "present":
            plan.bias_slot = None
    for plan in plans:
        if plan.bias_slot is not None:
            continue
        layer = modules[plan.site.producer]
        op = plan.site.nodes.get("producer")
        reads_attribute = op is not None and values.path(op.inputsAt(2)) == f"{plan.site.producer}.bias"
        if reads_attribute and takes_tensor(layer, "bias"):
            plan.bias_slot = "bias"
            continue
        siblings = by_class[_class(layer)]
        # the op is the layer's own only where its forward runs (not `F.linear(x, self.l.weight)` in a parent)
        if all(p in planned and planned[p].bias_slot in (None, "graph") for p in siblings) and _bias_input(layer) \
                and _module_call(modules, plan.site.producer, run) is not None:
            plan.bias_slot = "graph"


def _rewire_biases(root, plans: list[Plan]) -> None:
    modules = dict(root.named_modules())
    for plan in plans:  # a graph is rewired once, for the whole class
        if plan.bias_slot == "graph":
            _rewire_bias(modules[plan.site.producer])


def takes_tensor(layer, name: str) -> bool:
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
    graph = forward_graph(layer)
    nodes = [n for n in graph.nodes() if n.kind() in LAYER_KINDS] if graph is not None else []
    if len(nodes) != 1:
        return None
    bias = nodes[0].inputsAt(2)
    none = bias.node().kind() == "prim::Constant" and bias.toIValue() is None
    unset = bias.node().kind() == "prim::GetAttr" and Values(layer, graph).path(bias) == "bias" \
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


def _cuts(root, plans: list[Plan], run: set[str]) -> dict[str, Cut]:
    """BN path → the cut that removes it, for BNs whose every sibling (same class, same call) folds."""
    folding = {p.site.bn for p in plans if p.bias_slot is not None}
    modules = dict(root.named_modules())
    by_class = _paths_by_class(modules)
    cuts: dict[str, Cut] = {}
    for bn in sorted(folding):
        if bn in cuts:
            continue
        found = _call_site(modules, bn, run)
        if found is None:
            continue
        host, local, cut = found
        hosts = by_class[_class(host)]
        if all(".".join(filter(None, (p, local))) in folding for p in hosts):
            # the cut serves the BNs whose host runs this graph; one whose host's forward never
            # runs is called elsewhere, by a cut of its own
            cuts.update({".".join(filter(None, (p, local))): cut for p in hosts if p in run})
    return cuts


def forward_graph(module):
    """The graph of a ScriptModule's forward; None for one without (a traced ModuleList, a module
    the trace never called)."""
    try:
        return module.graph
    except (RuntimeError, AttributeError):
        return None


def _class(module) -> str:
    return module._c._type().qualified_name()


def _paths_by_class(modules: dict) -> dict[str, list[str]]:
    """Class name → the paths of its instances (all share one graph), in module order."""
    by_class: dict[str, list[str]] = {}
    for path, module in modules.items():
        by_class.setdefault(_class(module), []).append(path)
    return by_class


def _call_site(modules: dict, bn: str, run: set[str]):
    """(module whose graph calls the BN, the BN's path from it, the cut), or None."""
    module = modules.get(bn)
    if (getattr(module, "original_name", "") in BN_NAMES and _whole_bn(module)) or _whole_affine(module):
        return _module_call(modules, bn, run)
    if module is None or bn not in run:  # its own forward computes the BN only where that forward runs
        return None
    graph = forward_graph(module)
    if graph is None:
        return None
    values = Values(module, graph)
    calls = [(n, i) for n in all_nodes(graph) for i in _batch_norm_input(n)
             if values.path(n.inputsAt(i[1])) == "running_mean"]
    if len(calls) != 1:
        return None
    node, (source, _) = calls[0]
    return module, "", Cut(graph, node, source)


def _module_call(modules: dict, path: str, run: set[str]):
    """The one call of the module at `path`, in the nearest enclosing graph that has it and runs
    (`run`: the paths whose forward runs): its parent's, or further up where a forward is called
    directly (`self.down[i].forward(y)` inlines a Sequential into its caller's graph, and a parent
    may call a child's submodules itself, leaving the child's own forward unused)."""
    parts = path.split(".")
    for end in range(len(parts) - 1, -1, -1):
        host_path, local = ".".join(parts[:end]), ".".join(parts[end:])
        host = modules.get(host_path) if host_path in run else None
        graph = forward_graph(host) if host is not None else None
        if graph is None:
            continue
        values = Values(host, graph)
        calls = [n for n in all_nodes(graph) if n.kind() == "prim::CallMethod" and n.s("name") == "forward"
                 and values.path(n.inputsAt(0)) == local]
        if calls:
            return (host, local, Cut(graph, calls[0], 1)) if len(calls) == 1 else None
    return None


def _whole_bn(module) -> bool:
    """Whether the module's forward returns batch_norm of its input: a traced BN whose instance
    forward or hooks did more records that in its graph, and cutting its call would drop it."""
    graph = forward_graph(module)
    if graph is None or len(list(graph.inputs())) != 2:
        return False
    out, x = next(graph.outputs()).node(), list(graph.inputs())[1]
    return any(out.inputsAt(source).unique() == x.unique() for source, _ in _batch_norm_input(out))


def _whole_affine(module) -> bool:
    """Whether the module's forward returns x·S + T of its input x (FrozenBatchNorm2d, traced)."""
    graph = forward_graph(module)
    if graph is None or len(list(graph.inputs())) != 2:
        return False
    out = next(graph.outputs()).node()
    if out.kind() != "aten::add":
        return False
    x = list(graph.inputs())[1]
    return any(v.node().kind() == "aten::mul" and x in list(v.node().inputs()) for v in list(out.inputs())[:2])


def _batch_norm_input(node) -> list[tuple[int, int]]:
    """(position of the input, position of running_mean) of a batch_norm call, as the op or as a
    call of torch.nn.functional.batch_norm in a scripted graph."""
    if node.kind() == "aten::batch_norm":
        return [(0, 3)]
    if node.kind() == "prim::CallFunction" and str(node.inputsAt(0).type()).endswith("torch.nn.functional.batch_norm"):
        return [(1, 2)]
    return []
