"""Structural re-parameterization of TorchScript modules, traced or scripted: the sums of parallel
branches of one input (RepVGG, MobileOne, ACNet, a CPE's `x + dwconv(x)`) become one convolution,
after the BN fold, as branches.py does for eager modules and `.pt2` programs.

The terms and the rule are branch_terms.py's, read on TorchScript graphs by script_branch_terms.py.

A block's forward calls its branches as submodules (prim::CallMethod), so the graph read is its
forward inlined, and only the adds of its own code count (an add of a child is the child's). Where
an add merges, the block's graph is inlined in place and rewritten: the merged kernel is written
into the weight of a branch's convolution that has the merged shape (else into a new attribute
of the block), the bias into that convolution's bias (or bnfold_bias) or a new attribute of the
block, a new aten::conv*d reads them and the add's input, the add's users read it, and the terms'
nodes go. Classes are rewritten children first, so a merged child is a Conv term of its parent.

All instances of a scripted class share one graph: an add merges only when it merges in every
instance, into the same convolution (stride, padding, dilation, groups and where the kernel is
kept are constants of the graph); otherwise it is kept in each instance, with the reason. Whether
every tensor of a term is read by that term alone is counted on the whole model.

What stays: the branches' own modules and tensors (a TorchScript class cannot drop an attribute),
no longer read by the graph; the merged kernel is written over one of them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..errors import Skip
from ..fold_math import FoldOverflow
from ..report import FoldedBN, FoldReport, MergedBranches, UnmergedBranches
from .branch_terms import Candidate, candidates, join_path, merge_terms, merged_tensors
from .params import attr_at
from .script import BIAS_ATTRIBUTE, forward_graph, takes_tensor
from .script_branch_terms import ADDS, CONVS, ScriptDialect
from .script_graph import Values, all_nodes, live_nodes, reads_of, reload
from .sites import owner

REPARAM_ATTRIBUTE = "bnfold_reparam"  # prefix of the tensors a block gets when no branch can hold them


def sums_branches(root: torch.jit.ScriptModule, graph) -> bool:
    """Whether the model's inlined forward `graph` has an add of parallel branches anywhere (read
    before the fold: folding adds no sum and takes none away)."""
    dialect = ScriptDialect(graph, root, "", {})
    dialect.shallow = True
    return bool(candidates(dialect))


def merge_script_module(root: torch.jit.ScriptModule, report: FoldReport,
                        runnable: bool = True) -> torch.jit.ScriptModule:
    """Merge the parallel branches of `root` (folded and reloaded, bnfold's own copy); returns it,
    reloaded when a graph changed and it must run (`runnable`; saving writes the edited graphs)."""
    reads: dict[str, int] = {}  # counted when a class first needs them
    merged_any = False
    for instances in _classes(root):
        merged_any |= _merge_class(root, instances, reads, report)
    return reload(root) if merged_any and runnable else root


def _model_reads(root) -> dict[str, int]:
    """How many ops read each tensor, walking each module's graph into the methods it calls. Not
    inlined: inlining caches each callee's graph, and a cache made before a child is rewritten
    would show the child to its parent as it was. A method's tensor arguments count one read each;
    what a block's own inlined graph reads twice, ScriptDialect counts itself."""
    reads: dict[str, int] = {}
    _count_reads(root, "", "forward", reads)
    return reads


def _count_reads(module, prefix: str, method: str, reads: dict[str, int]) -> None:
    graph = module._c._get_method(method).graph
    values = Values(module, graph)
    live = list(live_nodes(graph, values))
    for path, count in reads_of(live, values).items():
        reads[join_path(prefix, path)] = reads.get(join_path(prefix, path), 0) + count
    for node in live:
        if node.kind() != "prim::CallMethod":
            continue
        callee = node.inputsAt(0)
        path = "" if callee.unique() == values.self_id else values.path(callee)
        if path is not None:
            _count_reads(attr_at(module, path), join_path(prefix, path), node.s("name"), reads)


def _classes(root) -> list[list[tuple[str, torch.jit.ScriptModule]]]:
    """Modules with a forward graph, grouped by class (one graph each), children's classes first:
    a child's class is always deeper than any instance of its parent's."""
    groups: dict[str, list] = {}
    for path, module in root.named_modules():
        if forward_graph(module) is not None:
            groups.setdefault(module._c._type().qualified_name(), []).append((path, module))
    return sorted(groups.values(), key=lambda group: max(p.count(".") + 1 if p else 0 for p, _ in group),
                  reverse=True)


@dataclass
class Plan:
    """One add's merge in one instance: the tensors to write and the graph change (its nodes are
    those of the graph analysed)."""

    name: str  # the add's value, for the report
    labels: list[str]
    kernel: list[int]
    weight: torch.Tensor
    bias: torch.Tensor
    weight_path: str  # relative to the block; REPARAM_ATTRIBUTE… where no branch can hold the kernel
    bias_path: str
    conv: tuple  # stride, padding, dilation, groups: constants of the shared graph
    bns: list[str]
    add: torch._C.Node
    doomed: list[torch._C.Node]
    source: torch._C.Value


@dataclass
class Kept:
    """An add that sums branches in one instance but is not merged there, and why."""

    name: str
    reason: str


def _merge_class(root, instances: list, reads: dict[str, int], report: FoldReport) -> bool:
    graph = forward_graph(instances[0][1])
    if not any(_own_add(n) for n in all_nodes(graph)):
        return False
    view = graph.copy()  # decide on a copy: a class that merges nothing keeps its graph as it was
    torch._C._jit_pass_inline(view)
    if not any(view.findAllNodes(f"aten::{op}", True) for op in CONVS):
        return False  # a residual add of a block without convolutions (attention, MLP)
    if not reads:
        reads.update(_model_reads(root))
    keys = _agreed([_analyse(view, path, module, reads) for path, module in instances], instances, report)
    if not keys:
        return False
    torch._C._jit_pass_inline(graph)
    found = [_analyse(graph, path, module, reads) for path, module in instances]
    if any(not isinstance(f.get(k), Plan) for f in found for k in keys):
        raise RuntimeError("a TorchScript graph inlined in place reads differently from its inlined copy")
    for (path, module), plans in zip(instances, found):
        for key in keys:
            _write(module, path, plans[key], reads, report)
    for key in sorted(keys, reverse=True):  # later adds first: an earlier add's value may be a later one's input
        _rewrite(graph, instances[0][1], found[0][key])
    _drop_training_branches(graph, instances[0][1], {b for k in keys for b in found[0][k].bns})
    torch._C._jit_pass_dce(graph)
    return True


def _own_add(node) -> bool:
    """A sum of two tensors in the block's own code (an inlined child's nodes say which module they came from)."""
    return node.kind() in ADDS and node.getModuleHierarchy() == "" and node.inputsSize() == 3 \
        and all(isinstance(v.type(), torch._C.TensorType) for v in (node.inputsAt(0), node.inputsAt(1)))


def _agreed(found: list[dict], instances: list, report: FoldReport) -> list[int]:
    """The adds that merge alike in every instance; the others are reported kept, per instance."""
    keys = []
    for key in sorted(set().union(*found)):
        outcomes = [f.get(key) for f in found]
        reasons = _disagreement(outcomes, instances)
        if reasons is None:
            keys.append(key)
            continue
        for (path, _), outcome, reason in zip(instances, outcomes, reasons):
            if outcome is not None:
                report.unmerged.append(UnmergedBranches(_add_name(path, outcome.name), reason))
    return keys


def _disagreement(outcomes: list, instances: list) -> list[str] | None:
    """None when every instance merges the add into one convolution; else each one's reason."""
    plans = [o for o in outcomes if isinstance(o, Plan)]
    if len(plans) == len(outcomes) and len({_signature(p) for p in plans}) == 1:
        return None
    cls = getattr(instances[0][1], "original_name", "") or "its class"
    reasons = []
    for outcome in outcomes:
        if isinstance(outcome, Kept):
            reasons.append(outcome.reason)
            continue
        other, why = next((path, o) for (path, _), o in zip(instances, outcomes)
                          if not isinstance(o, Plan) or _signature(o) != _signature(outcome))
        what = (f"where they are kept ({why.reason})" if isinstance(why, Kept)
                else "where this add is not a sum of branches" if why is None
                else f"which needs another convolution there ({_describe(why)} instead of {_describe(outcome)})")
        reasons.append(f"the graph of {cls} is shared with {other or 'the root'}, {what}")
    return reasons


def _signature(plan: Plan) -> tuple:
    return (plan.weight_path, plan.bias_path, len(plan.kernel)) + tuple(map(tuple, plan.conv[:3])) + plan.conv[3:]


def _describe(plan: Plan) -> str:
    stride, padding, dilation, groups = plan.conv
    return (f"stride {list(stride)}, padding {list(padding)}, dilation {list(dilation)}, groups {groups}, "
            f"kernel in {plan.weight_path}")


def _add_name(path: str, name: str) -> str:
    return f"{path}:{name}" if path else name


# -- reading one instance ------------------------------------------------------------------------


def _analyse(graph, path: str, module, reads: dict[str, int]) -> dict[int, Plan | Kept]:
    """Each add of the block's own code that sums branches → its Plan, or why it is kept; keyed by
    the add's place among the block's own adds (the same in the copy and the graph inlined in place)."""
    own = {n.output().unique(): i for i, n in enumerate(n for n in all_nodes(graph) if _own_add(n))}
    dialect = ScriptDialect(graph, module, path, reads)
    found: dict[int, Plan | Kept] = {}
    for cand in candidates(dialect):
        add = dialect.value(cand.add)
        key = own.get(add.unique())
        if key is None:
            continue
        try:
            found[key] = _plan(dialect, cand, key)
        except (Skip, FoldOverflow) as why:
            found[key] = Kept(add.debugName(), str(why))
    return found


def _plan(dialect: ScriptDialect, cand: Candidate, key: int) -> Plan:
    merged = merge_terms(cand.terms)
    convs = [t for t in cand.terms if t.weight is not None]
    weight, bias = merged_tensors(merged, convs[0].like)
    doomed = [dialect.value(n).node() for n in [cand.add, *cand.inner, *(n for t in cand.terms for n in t.nodes)]]
    block = doomed[0].owningBlock()
    if any(n.owningBlock() is not block for n in doomed):
        raise Skip("the terms are computed in different blocks of the graph (inside an if or a loop)")
    holder = next((t for t in convs if t.weight.shape == merged.weight.shape), None)
    weight_path = dialect.weight_path(holder) if holder else f"{REPARAM_ATTRIBUTE}_weight_{key}"
    first = convs[0]  # stride and groups are every term's; merge_terms set the dilation
    return Plan(dialect.value(cand.add).debugName(), [t.label for t in cand.terms], merged.kernel, weight, bias,
                weight_path, _bias_path(dialect.probe, owner(weight_path) if holder else None, key),
                (first.stride, merged.padding, first.dilation, first.groups), [b for t in cand.terms for b in t.bns],
                doomed[0], doomed, dialect.value(cand.source))


def _bias_path(block, holder: str | None, key: int) -> str:
    """Where the merged bias goes: the holding convolution's bias slot, or a new attribute of the block."""
    if holder is not None:
        layer = attr_at(block, holder)
        if layer._c.hasattr(BIAS_ATTRIBUTE):
            return join_path(holder, BIAS_ATTRIBUTE)
        if takes_tensor(layer, "bias"):
            return join_path(holder, "bias")
    return f"{REPARAM_ATTRIBUTE}_bias_{key}"


# -- writing -------------------------------------------------------------------------------------


def _write(block, path: str, plan: Plan, reads: dict[str, int], report: FoldReport) -> None:
    """The merged kernel and bias into this instance's tensors (the graph reads them by path)."""
    for where, tensor in ((plan.weight_path, plan.weight), (plan.bias_path, plan.bias)):
        parent, _, name = where.rpartition(".")
        holder = attr_at(block, parent)
        if name.startswith(REPARAM_ATTRIBUTE):  # the class's new attribute (the sibling before may have added it)
            holder._c._register_attribute(name, torch._C.TensorType.get(), tensor)
        elif name == "bias" and getattr(holder, name) is None:  # an Optional bias slot
            holder.bias = torch.nn.Parameter(tensor)
        else:  # the branch's weight, its bias or bnfold_bias: same shape
            with torch.no_grad():
                getattr(holder, name).copy_(tensor)
        reads[join_path(path, where)] = 1  # the new convolution's: a parent's merge counts it
    held = not plan.weight_path.startswith(REPARAM_ATTRIBUTE)  # by a branch's convolution
    kept_in = join_path(path, owner(plan.weight_path) if held else plan.weight_path)
    report.merged.append(MergedBranches(_add_name(path, plan.name), kept_in, plan.labels, list(plan.kernel)))
    _count_merged_bns(report, [join_path(path, b) for b in plan.bns], kept_in)


def _count_merged_bns(report: FoldReport, bns: list[str], conv: str) -> None:
    """A merged BN has left the graph: one kept before (a BN of the input) is folded now, and one
    the fold left in a shared graph as an identity is gone."""
    for bn in bns:
        identity = [n for n in report.notes if n.startswith(f"{bn} kept in the graph as an identity")]
        report.notes = [n for n in report.notes if n not in identity]
        report.identity_bns -= len(identity)
        if any(s.bn == bn for s in report.skipped):
            report.skipped = [s for s in report.skipped if s.bn != bn]
            report.folded.append(FoldedBN(bn, conv, "merged branches"))


def _rewrite(graph, block, plan: Plan) -> None:
    """A convolution of the add's input replaces the add; the terms' nodes go. Nodes that read only
    the shape of a term (a batch-size check) read the new convolution's: it has the sum's shape."""
    order = sorted(plan.doomed, key=functools.cmp_to_key(lambda a, b: -1 if a.isBefore(b) else int(a is not b)))
    stride, padding, dilation, groups = plan.conv
    with graph.insert_point_guard(order[0]):
        inputs = [plan.source, _get_attr(graph, block, plan.weight_path), _get_attr(graph, block, plan.bias_path)]
        inputs += [graph.insertConstant([int(v) for v in s]) for s in (stride, padding, dilation)]
        out = graph.insert(f"aten::conv{len(plan.kernel)}d", inputs + [graph.insertConstant(int(groups))])
    plan.add.output().replaceAllUsesWith(out)
    for node in plan.doomed:
        for value in node.outputs():
            for user in {id(u.user): u.user for u in value.uses()}.values():
                if not any(user is d for d in plan.doomed):
                    user.replaceInputWith(value, out)
    for node in reversed(order):
        node.destroy()


def _get_attr(graph, block, path: str):
    """prim::GetAttr from self along `path`, at the graph's insertion point."""
    value, module = next(graph.inputs()), block
    for name in path.split("."):
        node = graph.create("prim::GetAttr", [value])
        node.s_("name", name)
        module = getattr(module, name)
        node.output().setType(module._c._type() if isinstance(module, torch.jit.ScriptModule)
                              else torch._C.TensorType.get())
        value = graph.insertNode(node).output()
    return value


def _drop_training_branches(graph, block, bns: set[str]) -> None:
    """A scripted BN's forward, inlined, keeps `if self.training:` branches (its batch counter, a
    batch-size check) that outlive its batch_norm call: they serve a BN the graph no longer runs."""
    values = Values(block, graph)
    found = [n for n in all_nodes(graph) if n.kind() == "prim::If" and not any(o.uses() for o in n.outputs())
             and (values.path(n.input()) or "").rpartition(".")[::2] in {(bn, "training") for bn in bns}]
    for node in reversed(found):  # inner branches before the ones holding them
        node.destroy()
