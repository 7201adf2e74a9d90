"""torch.fx graphs — a symbolic trace, or torch.export's ATen graph — as the fold rule reads them.

Both are fx graphs; they differ in vocabulary only (a `call_module` of a Conv2d or
`F.conv2d(x, self.weight)` there, `aten.conv2d.default` or `aten.conv2d.padding` here), and
`vocabulary.op_name` takes that away. A BN is a batch_norm op of any overload, a BN module with
torch's own forward, or `x·S + T` with S and T per channel and computed from constants only
(torchvision's FrozenBatchNorm2d): recognised by what it computes, not by class.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Callable

import torch
import torch.fx
from torch import nn

from ..errors import Skip
from .constants import affine_of_constants, is_constant
from .params import alias_reads, attr_at
from ..report import SkippedBN
from .site_rule import AffineStats, BnCall, BnStats, LayerCall, fold_site
from .sites import owner
from .vocabulary import (QAT_REASON, ADDS, BN_OPS, LAYER_OPS, MULS, RESHAPES, SHAPE_OF_SECOND, SHAPE_READS, TUPLE_BN_OPS,
                         changed_call, layer_kind, op_name, plain_bn, plain_layer, qat_module,
                         qat_scope)

CHECKS = ("_assert", "_assert_async", "_assert_tensor_metadata")  # ops that check their input and compute nothing


class FxGraph:
    """An fx GraphModule read through the fold rule's questions (site_rule.Dialect)."""

    def __init__(self, gm: torch.fx.GraphModule, calls: Counter | None = None,
                 shapes: Callable[[], dict] | None = None, opaque: dict[str, LayerCall | None] | None = None,
                 types: nn.Module | None = None):
        self.gm = gm
        self.types = types if types is not None else gm  # the modules as the user's classes (an export has none)
        self._calls = calls
        self.opaque = opaque or {}  # submodules fx could not trace → the layer each computes, if one
        self._shape_source, self._shapes = shapes, None
        self._by_scope: dict[str, list] | None = None
        self._reads = self._count_reads()
        self._aliased = alias_reads(self._reads, gm)

    # -- what the nodes are ------------------------------------------------------------------

    def bn_calls(self) -> list[BnCall]:
        found = []
        for node in self.gm.graph.nodes:
            found += self._module_bns(node) if node.op == "call_module" else self._op_bns(node)
        return found

    def _module_bns(self, node) -> list[BnCall]:
        module = self.gm.get_submodule(node.target)
        if qat_module(module):
            return [BnCall(f"{node.target}.{name}", node, node.args[0] if node.args else None,
                           BnStats({}, 0.0), node.target, reason=QAT_REASON.format(module=node.target))
                    for name, child in module.named_modules() if isinstance(child, nn.modules.batchnorm._BatchNorm)]
        if not plain_bn(module):
            why = changed_call(module) if isinstance(module, nn.modules.batchnorm._BatchNorm) else None
            return [BnCall(node.target, node, node.args[0] if node.args else None, BnStats({}, 0.0), node.target,
                           reason=f"{node.target} has {why}, which its graph node does not show")] if why else []
        tensors = {k: (f"{node.target}.{k}" if getattr(module, k, None) is not None else None)
                   for k in ("weight", "bias", "running_mean", "running_var")}
        reason = None
        if not module.track_running_stats or module.running_mean is None:
            reason = "track_running_stats=False: BN always uses batch statistics"
        return [BnCall(node.target, node, node.args[0], BnStats(tensors, float(module.eps)), node.target, plain=True,
                       reason=reason)]

    def _op_bns(self, node) -> list[BnCall]:
        if node.op not in ("call_function", "call_method"):
            return []
        name = op_name(node.target)
        if name in BN_OPS:
            return [self._batch_norm(node, name)]
        if name in ADDS:
            call = self._affine(node)
            return [call] if call is not None else []
        return []

    def _batch_norm(self, node, name: str) -> BnCall:
        bound = BN_OPS[name].bind(node.args, node.kwargs)
        tensors, reason = {}, None
        for role in ("weight", "bias", "running_mean", "running_var"):
            value = bound.get(role)
            if isinstance(value, torch.fx.Node) and value.op == "get_attr":
                tensors[role] = value.target
            elif value is None:
                tensors[role] = None
            else:
                tensors[role], reason = None, f"its {role} is computed in the graph, not a module tensor"
        if tensors["running_mean"] is None or tensors["running_var"] is None:
            reason = reason or "no running statistics: BN uses batch statistics"
        if bound.get("training") not in (False, None):
            reason = "batch_norm called with training=True"
        if name in TUPLE_BN_OPS and any(op_name(u.target) != "getitem" or (u.args[1] != 0 and u.users)
                                        for u in node.users):
            reason = "BN's saved statistics are used"
        label = owner(tensors["running_mean"]) or node.name
        scope = self.scope(node, tensors["running_mean"])
        qat = qat_scope(self.types, tensors["running_mean"])
        reason = QAT_REASON.format(module=qat) if qat is not None else reason
        return BnCall(label, node, bound["input"], BnStats(tensors, float(bound.get("eps", 1e-5))), scope,
                      plain=self._bn_module(scope, tensors) or self._only_op_of(scope, {node}), reason=reason)

    def _bn_module(self, scope: str | None, tensors: dict) -> bool:
        """Whether a batch_norm op is a BN module's own forward (torch.export's graph of one)."""
        try:
            module = self.types.get_submodule(scope) if scope else None
        except AttributeError:
            return False
        return module is not None and plain_bn(module) and tensors["running_mean"] == f"{scope}.running_mean"

    def _only_op_of(self, scope: str | None, bn: set) -> bool:
        """Whether the BN is all its module computes in this graph (detectron2's
        FrozenBatchNorm2d, exported): folded, the module is the identity. Constants it computes
        its statistics from and checks of its input's metadata do not count."""
        if not scope:
            return False
        own = [n for path, nodes in self._ops_by_scope().items() if _within(path, scope) for n in nodes]
        return bool(own) and all(n in bn or (op_name(n.target) == "getitem" and n.args[0] in bn)
                                 or op_name(n.target) in CHECKS or is_constant(n) for n in own)

    def _ops_by_scope(self) -> dict[str, list]:
        """The graph's computing nodes by the module holding them, in graph order (indexed once:
        every BN asks)."""
        if self._by_scope is None:
            self._by_scope = {}
            for n in self.gm.graph.nodes:
                if n.op in ("call_function", "call_method", "call_module"):
                    self._by_scope.setdefault(self.scope(n), []).append(n)
        return self._by_scope

    def _affine(self, add) -> BnCall | None:
        """add(mul(x, S), T) with S and T constants that vary along one axis."""
        if len(add.args) != 2 or add.kwargs:
            return None
        for mul, shift in (add.args, add.args[::-1]):
            if not (isinstance(mul, torch.fx.Node) and op_name(mul.target) in MULS and len(mul.args) == 2
                    and not mul.kwargs and len(mul.users) == 1):
                continue
            for x, scale in (mul.args, mul.args[::-1]):
                found = affine_of_constants(self.gm, x, scale, shift)
                if found is None:
                    continue
                (value, axis_from_end, rank), paths = found
                scopes = {self.scope(n) for n in (mul, add)}
                scope = scopes.pop() if len(scopes) == 1 else None
                stats = AffineStats(value, tuple(paths))
                return BnCall(scope or add.name, add, x, stats, scope, plain=self._only_op_of(scope, {mul, add}),
                              nodes=[mul, add], axis_from_end=axis_from_end, rank=rank,
                              reason=None if scope is not None else "its Mul and Add are in different modules")
        return None

    def scope(self, node, tensor: str | None = None) -> str:
        """The innermost module whose forward holds `node` (fx and torch.export record it; "" for
        the graph's own module)."""
        stack = node.meta.get("nn_module_stack")
        if stack:
            path = list(stack.values())[-1]
            return path[0] if isinstance(path, tuple) else str(path)
        return owner(tensor) if tensor else ""

    def layer(self, node) -> LayerCall | None:
        if not isinstance(node, torch.fx.Node):
            return None
        if node.op == "call_module" and self.opaque.get(node.target) is not None:
            return replace(self.opaque[node.target], node=node)
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            kind = plain_layer(module)
            if kind is None:
                return None
            transposed = kind.startswith("ConvTranspose")
            return LayerCall(node, kind, 1 if transposed else 0, module.groups if transposed else 1,
                             f"{node.target}.weight", f"{node.target}.bias" if module.bias is not None else None,
                             node.target, True, module.weight.dim() - 2 if kind != "Linear" else 0)
        name = op_name(node.target) if node.op == "call_function" else None
        if name not in LAYER_OPS:
            return None
        spec = LAYER_OPS[name]
        bound = spec.signature.bind(node.args, node.kwargs)
        weight, bias = bound.get("weight"), bound.get("bias")
        if not _is_attr(weight) or not (bias is None or _is_attr(bias)):
            return None
        transposed = spec.transposed if spec.transposed is not None else bound.get("transposed")
        groups = bound.get("groups", 1)
        if not isinstance(transposed, bool) or not isinstance(groups, int):
            return None
        tensor = attr_at(self.gm, weight.target)
        kind = layer_kind(name, transposed, tensor)
        return LayerCall(node, kind, 1 if transposed else 0, groups if transposed else 1, weight.target,
                         bias.target if bias is not None else None, owner(weight.target),
                         self._plain_owner(weight.target, node), 0 if spec.linear else tensor.dim() - 2)

    def _plain_owner(self, weight: str, node) -> bool:
        """Whether the op's weight is the `weight` of a module with torch's own forward (a bias
        given to that module is used): torch.export's graph of an nn.Conv2d. The op must be that
        module's own call: `F.conv2d(x, self.conv.weight)` in a parent does not read conv.bias."""
        if self.scope(node) != owner(weight):
            return False
        try:
            module = self.types.get_submodule(owner(weight))
        except AttributeError:
            return False
        return weight.rpartition(".")[2] == "weight" and plain_layer(module) is not None

    def reshaped(self, node):
        if not isinstance(node, torch.fx.Node):
            return None
        if node.op == "call_module":
            return node.args[0] if isinstance(self.gm.get_submodule(node.target), nn.Flatten) else None
        if node.op in ("call_method", "call_function") and op_name(node.target) in RESHAPES:
            return node.args[0]
        return None

    # -- who reads what --------------------------------------------------------------------

    def value_uses(self, node) -> int:
        return sum(1 for u in node.users if not reads_shape_only(u, node))

    def _count_reads(self) -> Counter:
        reads: Counter = Counter()
        self._read_here: set[str] = set()  # read by this graph's own ops, not by an opaque module's call
        for node in self.gm.graph.nodes:
            if node.op == "get_attr":
                reads[node.target] += self.value_uses(node)
                self._read_here.add(node.target)
            elif node.op == "call_module":
                module = self.gm.get_submodule(node.target)
                inside = node.target not in self.opaque  # an opaque module's insides are read on their own
                for name, _ in (*module.named_parameters(recurse=inside), *module.named_buffers(recurse=inside)):
                    reads[f"{node.target}.{name}"] += 1
                    if inside:
                        self._read_here.add(f"{node.target}.{name}")
        return reads

    def reads(self, path: str) -> int:
        return self._aliased(path)

    def read_paths(self) -> set[str]:
        """Tensors this graph reads itself (an opaque module's own call does not count)."""
        return self._read_here

    def calls(self, scope: str) -> int:
        # torch.export records no call counts: there the tensors' reads say it
        return self._calls.get(scope, 0) if self._calls is not None else 1

    def shape(self, node) -> tuple | None:
        for key in ("val", "tensor_meta"):
            shape = getattr(node.meta.get(key), "shape", None)
            if shape is not None:
                return tuple(shape)
        if self._shapes is None:
            self._shapes = self._shape_source() if self._shape_source is not None else {}
        return self._shapes.get(node.name)

    def describe(self, node) -> str:
        if not isinstance(node, torch.fx.Node):
            return type(node).__name__
        if node.op == "call_module":
            return f"module {node.target} ({type(self.gm.get_submodule(node.target)).__name__})"
        return f"{node.op} {getattr(node.target, '__name__', node.target)}"


def _within(path: str | None, scope: str) -> bool:
    return path is not None and (path == scope or path.startswith(scope + "."))


def _is_attr(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "get_attr"


def reads_shape_only(user: torch.fx.Node, node: torch.fx.Node) -> bool:
    name = op_name(user.target) if user.op in ("call_method", "call_function") else None
    if name == "getattr":
        return len(user.args) > 1 and user.args[1] in SHAPE_READS
    if name in SHAPE_READS:
        return True
    return name in SHAPE_OF_SECOND and len(user.args) > 1 and user.args[1] is node and user.args[0] is not node


def sites_and_kept(graph: FxGraph):
    """Every BN of the graph as a fold site or a kept BN with its reason."""
    sites, kept = [], []
    for call in graph.bn_calls():
        try:
            sites.append(fold_site(graph, call))
        except Skip as why:
            kept.append(SkippedBN(call.name, str(why), _producer_name(call.input)))
    return sites, kept


def _producer_name(node) -> str | None:
    return str(node.target) if isinstance(node, torch.fx.Node) else None
