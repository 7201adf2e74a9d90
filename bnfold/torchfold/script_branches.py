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

import dataclasses
import functools
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..errors import Skip
from ..fold_math import FoldOverflow
from ..report import FoldedBN, FoldReport, MergedBranches, UnmergedBranches
from .branch_terms import Candidate, candidates, join_path, merge_terms, merged_tensors
from .params import attr_at
from .script import BIAS_ATTRIBUTE, forward_graph, other_entry_points, takes_tensor
from .script_branch_terms import ADDS, CONVS, ScriptDialect
from .script_graph import Values, all_nodes, method_runs, reads_of
from .sites import owner
from .vocabulary import BN_OPS, LAYER_OPS, MULS, op_name

REPARAM_ATTRIBUTE = "bnfold_reparam"  # prefix of the tensors a block gets when no branch can hold them


def merge_script_module(root: torch.jit.ScriptModule, report: FoldReport, blocks_only: bool = False) -> bool:
    """Merge the parallel branches of `root` (bnfold's own copy) in place. Nothing may have inlined
    or run `root` since it was loaded: inlining caches each callee's graph, and a cache made before
    a child is rewritten would show the child to its parent as it was.

    Before the fold (`blocks_only`), Convs and their BNs merge from their own weights and
    statistics, but only in a block that is nothing but its sums: merging inlines the block's
    graph, and a layer or BN left inlined there could no longer be cut from its own graph by the
    fold. Returns whether such a block was left for a merge after the fold (reloaded)."""
    reads: dict[str, int] = {}  # counted when a class first needs them
    run: set[str] = set()  # the modules whose forward the model calls, found with the reads
    left = False
    for instances in _classes(root):
        left |= _merge_class(root, instances, reads, run, report, blocks_only) == LEFT
    return left


LEFT = "left"  # a class whose sums merge after the fold


def _model_reads(root, run: set[str]) -> dict[str, int]:
    """How many ops read each tensor, walking each module's graph into the methods it calls (and
    into `run`, the paths of the modules whose forward runs). Not inlined: inlining caches each
    callee's graph, and a cache made before a child is rewritten would show the child to its
    parent as it was. A method's tensor arguments count one read each; what a block's own
    inlined graph reads twice, ScriptDialect counts itself."""
    reads: dict[str, int] = {}
    for entry in ("forward", *other_entry_points(root)):  # an exported method reads tensors too
        for _, prefix, method, values, live in method_runs(root, entry):
            run.update([prefix] if entry == method == "forward" else [])
            for path, count in reads_of(live, values).items():
                reads[join_path(prefix, path)] = reads.get(join_path(prefix, path), 0) + count
    return reads


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
    layers: dict[str, tuple[str, str]]  # a Conv term's BN → (its Conv, the Conv's kind): folded into it
    add: torch._C.Node
    doomed: list[torch._C.Node]
    source: torch._C.Value


@dataclass
class Kept:
    """An add that sums branches in one instance but is not merged there, and why."""

    name: str
    reason: str


def _merge_class(root, instances: list, reads: dict[str, int], run: set[str], report: FoldReport,
                 blocks_only: bool):
    """True where the class merged, LEFT where it would merge but holds more than its sums
    (`blocks_only`), else False."""
    graph = forward_graph(instances[0][1])
    if not any(_own_add(n) for kind in ADDS for n in graph.findAllNodes(kind, True)):
        return False
    view = graph.copy()  # decide on a copy: a class that merges nothing keeps its graph as it was
    torch._C._jit_pass_inline(view)
    if not any(view.findAllNodes(f"aten::{op}", True) for op in CONVS):
        return False  # a residual add of a block without convolutions (attention, MLP)
    if not reads:
        reads.update(_model_reads(root, run))
    uncalled = [path for path, _ in instances if path not in run]
    if uncalled:  # a forward nothing calls computes nothing, but its tensors may be read elsewhere
        report.unmerged += [UnmergedBranches(f"{path}:forward", f"its class's graph is shared with {uncalled[0]}, "
                                             "whose forward the model does not call") for path, _ in instances
                            if path in run]
        return False
    found = [_analyse(view, path, module, reads) for path, module in instances]
    if blocks_only:  # anything but a block merged whole is left to the merge after the fold, and said there
        unmerged = SimpleNamespace(unmerged=[])
        keys = _agreed(found, instances, unmerged)
        if unmerged.unmerged or (keys and _holds_more(view, [found[0][k] for k in keys])):
            return LEFT
    else:
        keys = _agreed(found, instances, report)
    if not keys:
        return False
    torch._C._jit_pass_inline(graph)
    here = _in_graph({k: found[0][k] for k in keys}, view, graph)
    if here is None:  # the graph inlined in place does not mirror the copy node for node: read it again
        here = _analyse(graph, *instances[0], reads)
        if any(not isinstance(here.get(k), Plan) for k in keys):
            raise RuntimeError("a TorchScript graph inlined in place reads differently from its inlined copy")
    for (path, module), plans in zip(instances, found):
        for key in keys:
            _write(module, path, plans[key], reads, report)
    for key in sorted(keys, reverse=True):  # later adds first: an earlier add's value may be a later one's input
        _rewrite(graph, instances[0][1], here[key])
    _drop_training_branches(graph, instances[0][1], {b for k in keys for b in here[k].bns})
    torch._C._jit_pass_dce(graph)
    return True


def _holds_more(view, plans: list[Plan]) -> bool:
    """Whether the inlined graph computes a layer or a BN (or may: a product with a module
    tensor, FrozenBatchNorm2d's affine) that no merge of `plans` takes away."""
    doomed = {n.outputsAt(0).unique() for p in plans for n in p.doomed if n.outputsSize()}
    for node in all_nodes(view):
        kind = node.kind()
        if not kind.startswith("aten::") or not node.outputsSize() or node.outputsAt(0).unique() in doomed:
            continue
        name = op_name(kind)
        if name in LAYER_OPS or name in BN_OPS:
            return True
        if name in MULS and any(v.node().kind() == "prim::GetAttr" for v in node.inputs()):
            return True
    return False


def _in_graph(plans: dict[int, Plan], view, graph) -> dict[int, Plan] | None:
    """The plans made on the inlined copy `view`, their nodes and input taken to `graph` (the same
    forward inlined in place: the same nodes in the same order), or None where they are not."""
    theirs, ours = list(all_nodes(view)), list(all_nodes(graph))
    if len(theirs) != len(ours) or any(a.kind() != b.kind() or a.outputsSize() != b.outputsSize()
                                       for a, b in zip(theirs, ours)):
        return None
    outputs = {v.unique(): (i, k) for i, n in enumerate(theirs) for k, v in enumerate(n.outputs())}
    inputs = {v.unique(): k for k, v in enumerate(view.inputs())}
    graph_inputs = list(graph.inputs())

    def value(v):
        if v.unique() in inputs:
            return graph_inputs[inputs[v.unique()]]
        i, k = outputs[v.unique()]
        return ours[i].outputsAt(k)

    try:
        return {key: dataclasses.replace(plan, add=value(plan.add.output()).node(),
                                         doomed=[value(n.outputsAt(0)).node() for n in plan.doomed],
                                         source=value(plan.source))
                for key, plan in plans.items()}
    except (KeyError, RuntimeError):  # a node without outputs, or a value made inside a block
        return None


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
                {b: (t.module, f"Conv{t.weight.ndim - 2}d") for t in convs for b in t.bns},
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
    _count_merged_bns(report, plan, path, kept_in)


def _count_merged_bns(report: FoldReport, plan: Plan, path: str, kept_in: str) -> None:
    """A merged BN is folded: into its Conv where it followed one (merged before the fold read
    it), else into the merged Conv; one the fold kept (a BN of the input) or left in a shared
    graph as an identity is neither any more."""
    for bn in (join_path(path, b) for b in plan.bns):
        identity = [n for n in report.notes if n.startswith(f"{bn} kept in the graph as an identity")]
        report.notes = [n for n in report.notes if n not in identity]
        report.identity_bns -= len(identity)
        report.skipped = [s for s in report.skipped if s.bn != bn]
        if not any(f.bn == bn for f in report.folded):
            layer, kind = plan.layers.get(bn[len(path) + 1:] if path else bn, (None, "merged branches"))
            report.folded.append(FoldedBN(bn, join_path(path, layer) if layer else kept_in, kind))


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
