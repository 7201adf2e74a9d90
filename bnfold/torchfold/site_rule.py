"""One definition of a fold site, for every torch graph.

BN(layer(x)) folds exactly when: the BN runs on its running statistics (or is a per-channel affine
of constants); its input is the output of a convolution or linear op — for a Linear, optionally
through one reshape that keeps the feature axis on BN's axis 1; nothing else reads that output's
values; and the layer's weight and bias and the BN's tensors are each read by this one op (a
module called twice, or a tensor shared, would change every use). Each graph kind (fx and ATen in
`fx_graph.py`, TorchScript in `script_graph.py`) only says what its nodes are, as `BnCall` and
`LayerCall`; the rule below decides, and its reasons read the same in every kind.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol

import numpy as np
import torch

from ..errors import Skip
from ..fold_math import Affine
from .params import affine_of, attr_at


@dataclass(frozen=True)
class BnStats:
    """A batch_norm's tensors by role ("weight", "bias", "running_mean", "running_var" → path)."""

    tensors: dict[str, str | None]
    eps: float

    def paths(self) -> list[str]:
        return [p for p in self.tensors.values() if p]

    def affine(self, root) -> Affine:
        try:
            t = {k: (attr_at(root, p) if p else None) for k, p in self.tensors.items()}
        except AttributeError as exc:
            raise Skip(f"the graph's BN reads {exc.args[0] if exc.args else 'an attribute'} the module does not have")
        return affine_of(t["weight"], t["bias"], t["running_mean"], t["running_var"], self.eps)

    def prefixed(self, join: Callable[[str], str]) -> "BnStats":
        return BnStats({k: (join(v) if v else None) for k, v in self.tensors.items()}, self.eps)


@dataclass(frozen=True)
class AffineStats:
    """x·S + T with S, T per channel, computed from constants only (FrozenBatchNorm2d's forward);
    `value` is S, T evaluated in float64, `paths` the module tensors they were computed from."""

    value: Affine
    paths_read: tuple[str, ...] = ()

    def paths(self) -> list[str]:
        return list(self.paths_read)

    def affine(self, root) -> Affine:
        return self.value

    def prefixed(self, join: Callable[[str], str]) -> "AffineStats":
        return AffineStats(self.value, tuple(join(p) for p in self.paths_read))


@dataclass
class BnCall:
    """A BN computation in a graph."""

    name: str  # for the report: the BN module's path, or the op's node
    node: Any  # the node whose output is the BN's output
    input: Any  # the value it normalizes
    stats: BnStats | AffineStats
    scope: str | None  # the module whose forward computes it (a plain BN module: that module)
    plain: bool = False  # a BN module with torch's own forward: it can become nn.Identity
    reason: str | None = None  # why it cannot fold, whatever its input
    nodes: list = field(default_factory=list)  # every node it consists of (an affine's mul and add)
    axis_from_end: int | None = None  # an affine: the axis, counted from the last, its constants vary on
    rank: int | None = None  # an affine: the rank of its constants broadcast together


@dataclass
class LayerCall:
    """A convolution or linear op whose weight (and bias) are module tensors."""

    node: Any
    kind: str  # Conv2d, ConvTranspose1d, Linear, …
    axis: int  # output-channel axis of the weight
    groups: int  # ConvTranspose groups (its axis-1 fold is per group); 1 otherwise
    weight: str | None  # path of the weight tensor
    bias: str | None  # path of the bias tensor, None when it has none
    module: str  # the module the op belongs to
    plain: bool  # a module with torch's own forward: a bias given to it is used
    spatial: int = 0  # spatial dims of its output (0 for Linear)


@dataclass
class FoldSite:
    """BN(layer(x)) that folds exactly: the layer's weight scaled along `axis` (per group)."""

    bn: str  # the BN's name in the report: its module's path, or the op's node
    producer: str  # the layer's module path
    kind: str  # the layer's type: Conv2d, ConvTranspose1d, Linear, …
    axis: int  # output-channel axis of the layer's weight
    groups: int  # ConvTranspose groups (the axis-1 fold is per group); 1 otherwise
    stats: BnStats | AffineStats  # what the BN computes
    scope: str | None = None  # the module whose forward computes the BN
    plain_bn: bool = False  # that module is a BN with torch's own forward
    nodes: dict = field(default_factory=dict)  # graph nodes, for passes that rewrite the graph itself
    weight: str | None = None  # the tensor paths the layer op reads
    bias: str | None = None
    plain_layer: bool = True  # the layer is a module with torch's own forward (a new bias is used)

    def affine(self, root, like=None) -> Affine:
        """The BN's map; `like`, the layer's weight: an affine of constants of a wider float type
        than the layer's promotes its output (float32 x · float64 S is float64), which a folded
        layer would not, so it is kept."""
        if like is not None and isinstance(self.stats, AffineStats):
            for path in self.stats.paths():
                try:
                    value = attr_at(root, path)
                except (AttributeError, RuntimeError):
                    continue
                if getattr(value, "is_floating_point", lambda: False)() and value.dtype != like.dtype \
                        and torch.promote_types(value.dtype, like.dtype) != like.dtype:
                    raise Skip(f"{path} is {str(value.dtype).replace('torch.', '')}: the affine's output is "
                               f"{str(torch.promote_types(value.dtype, like.dtype)).replace('torch.', '')}, a folded "
                               f"{str(like.dtype).replace('torch.', '')} layer's would not be")
        return self.stats.affine(root)

    def prefixed(self, prefix: str) -> "FoldSite":
        join = lambda p: f"{prefix}.{p}" if p else prefix  # noqa: E731
        return replace(self, bn=join(self.bn), producer=join(self.producer), stats=self.stats.prefixed(join),
                       scope=None if self.scope is None else join(self.scope), nodes={},
                       weight=self.weight and join(self.weight), bias=self.bias and join(self.bias))


class Dialect(Protocol):
    """What the rule asks of a graph."""

    def layer(self, value) -> LayerCall | None: ...
    def reshaped(self, value) -> Any | None: ...  # the value a reshape op reads, if `value` is one's output
    def value_uses(self, value) -> int: ...  # ops reading the values (not only the shape) of `value`
    def reads(self, path: str) -> int: ...  # ops reading this tensor's values
    def calls(self, scope: str) -> int: ...  # calls of this module in the graph
    def shape(self, value) -> tuple | None: ...
    def describe(self, value) -> str: ...


def fold_site(d: Dialect, bn: BnCall) -> FoldSite:
    """The fold site of `bn`, or Skip with the reason it is kept."""
    if bn.reason:
        raise Skip(bn.reason)
    _read_once(d, bn.stats.paths(), "its BN")
    if isinstance(bn.stats, AffineStats) and bn.scope and d.calls(bn.scope) != 1:
        raise Skip(f"{bn.scope} is called {d.calls(bn.scope)} times; its affine cannot leave one call only")
    source, reshape = bn.input, None
    inner = d.reshaped(source)
    if inner is not None and getattr(d.layer(inner), "kind", None) == "Linear":
        source, reshape = inner, bn.input
    layer = d.layer(source)
    if layer is None:
        raise Skip(f"input comes from {d.describe(source)}, not a Conv/ConvTranspose/Linear")
    others = d.value_uses(source) - 1 + (d.value_uses(reshape) - 1 if reshape is not None else 0)
    if others:
        raise Skip(f"output of {layer.module or d.describe(source)} is also used by {others} other op(s)")
    _read_once(d, [p for p in (layer.weight, layer.bias) if p], "its layer")
    if layer.kind == "Linear":
        check_linear_axis(d.shape(source), d.shape(reshape if reshape is not None else source), reshape is not None)
    if bn.axis_from_end is not None and bn.axis_from_end != layer.spatial:
        raise Skip(f"the affine's constants vary along axis −{bn.axis_from_end + 1}, not the channel axis of "
                   f"{layer.module or layer.kind}")
    # constants of a higher rank than the layer's output broadcast it to a larger shape: not a BN
    if bn.rank is not None and bn.rank > layer.spatial + 2:
        raise Skip(f"the affine's constants have rank {bn.rank}: x·S + T has more axes than the output of "
                   f"{layer.module or layer.kind}")
    return FoldSite(bn.name, layer.module, layer.kind, layer.axis, layer.groups, bn.stats, bn.scope, bn.plain,
                    {"bn": bn.node, "input": bn.input, "producer": layer.node, "parts": bn.nodes}, layer.weight,
                    layer.bias, layer.plain)


def _read_once(d: Dialect, paths: list[str], whose: str) -> None:
    for path in paths:
        n = d.reads(path)
        if n != 1:
            raise Skip(f"{path} ({whose}) is read by {n} ops: {path.rpartition('.')[0] or 'its module'} is called "
                       f"{n} times, or the tensor is shared; folding would change every use")


def check_linear_axis(linear_shape, bn_input_shape, reshaped: bool) -> None:
    """BatchNorm1d normalizes axis 1. That is the Linear's feature axis for an [N, C] output, or for
    [..., C] flattened row-major into [M, C] (LeViT's tokens: flatten(0, 1), BN, reshape_as)."""
    if linear_shape is None or bn_input_shape is None:
        raise Skip("rank of the Linear output is unknown (pass --shape or --example-input), so BN's channel axis "
                   "cannot be matched")
    if not reshaped:
        if len(linear_shape) != 2:
            raise Skip(f"Linear output has rank {len(linear_shape)}; BN normalizes axis 1, not the Linear's "
                       "feature axis")
        return
    if len(bn_input_shape) != 2 or bn_input_shape[1] != linear_shape[-1]:
        raise Skip(f"Linear output {list(linear_shape)} is reshaped to {list(bn_input_shape)}; BN's axis 1 is not "
                   "the Linear's feature axis")


def per_channel(scale: np.ndarray, shift: np.ndarray) -> tuple[Affine, int, int] | None:
    """S and T of x·S + T as one per-channel affine, the axis (from the last) they vary on and
    the rank they broadcast to, or None when they are not per-channel along one axis."""
    shape = np.broadcast_shapes(scale.shape, shift.shape)
    varying = [i for i, d in enumerate(shape) if d != 1]
    if len(varying) > 1 or not shape:
        return None
    axis = varying[0] if varying else len(shape) - 1
    s = np.broadcast_to(scale, shape).reshape(-1).astype(np.float64)
    t = np.broadcast_to(shift, shape).reshape(-1).astype(np.float64)
    if not (np.isfinite(s).all() and np.isfinite(t).all()):
        return None
    return Affine(s, t), len(shape) - 1 - axis, len(shape)

