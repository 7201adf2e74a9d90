"""A fold site found on a graph (fx, ATen or TorchScript), named by attribute paths, and how it
is applied to an eager module: the graph says *where* a BN can fold; the module is changed by name.

Finding sites on a throwaway copy and applying them by name keeps the module the user gave
clean: tracing or exporting runs its forward, which may cache things on it (timm's LeViT keeps
attention biases in a dict: an fx Proxy there makes the module unpicklable).
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import BadInput, Skip
from ..fold_math import Affine
from ..report import SkippedBN
from .params import affine_of, attr_at, fold_tensors, write_params

BN_TENSORS = ("weight", "bias", "running_mean", "running_var")
# a BN module with one of these forwards does nothing but normalize: it can be replaced by Identity
PLAIN_BN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)
# layers whose forward reads self.bias: one given a bias here is known to use it
PLAIN_LAYER_FORWARDS = tuple(c.forward for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                                  nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear))


@dataclass
class FoldSite:
    """BN(layer(x)) that folds exactly: the layer's weight scaled along `axis` (per group)."""

    bn: str  # the BN's name in the report: its module's path, or the functional call's node
    producer: str  # the layer's module path
    kind: str  # the layer's type: Conv2d, ConvTranspose1d, Linear, …
    axis: int  # output-channel axis of the layer's weight
    groups: int  # ConvTranspose groups (the axis-1 fold is per group); 1 otherwise
    tensors: dict[str, str | None]  # the BN's weight, bias, running_mean, running_var → attribute path
    eps: float
    nodes: dict = field(default_factory=dict)  # graph nodes, for passes that rewrite the graph itself
    weight: str | None = None  # the attribute paths the graph's layer op reads, where it said
    bias: str | None = None

    def affine(self, root) -> Affine:
        try:
            t = {k: (attr_at(root, p) if p else None) for k, p in self.tensors.items()}
        except AttributeError as exc:
            raise Skip(f"the graph's BN reads {exc.args[0] if exc.args else 'an attribute'} the module does not have")
        return affine_of(t["weight"], t["bias"], t["running_mean"], t["running_var"], self.eps)


def owner(path: str | None) -> str:
    return path.rpartition(".")[0] if path else ""


def bn_owner(root: nn.Module, tensors: dict[str, str | None]) -> nn.Module | None:
    """The BN module whose running statistics these are, if they belong to one."""
    try:
        module = attr_at(root, owner(tensors.get("running_mean")))
    except AttributeError:
        return None
    return module if isinstance(module, nn.modules.batchnorm._BatchNorm) else None


def bn_name(root: nn.Module, tensors: dict[str, str | None], fallback: str) -> str:
    return owner(tensors["running_mean"]) if bn_owner(root, tensors) is not None else fallback


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


def analysis_copy(module: nn.Module) -> nn.Module:
    """A copy to trace or export: its own module objects, the original's tensors (nothing is
    written to them; sharing spares the memory)."""
    return copy_module(module, {id(t): t for t in itertools.chain(module.parameters(), module.buffers())})


def copy_module(module: nn.Module, memo: dict | None = None) -> nn.Module:
    try:
        return copy.deepcopy(module, memo=memo)
    except Exception as exc:  # noqa: BLE001 — whatever a module holds that cannot be copied
        raise BadInput(f"{type(module).__name__} cannot be copied, which folding needs "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''})") from None


def apply_site(root: nn.Module, site: FoldSite, mode: str) -> str | None:
    """Fold `site` into `root` (an eager module), then retire the BN: removed ("remove", a plain
    BN module) or set to the identity. Returns a note when a BN could only be made an identity."""
    try:
        layer = attr_at(root, site.producer)
    except AttributeError:
        layer = None
    if not isinstance(layer, nn.Module) or not isinstance(getattr(layer, "weight", None), torch.Tensor) \
            or site.weight not in (None, f"{site.producer}.weight") or site.bias not in (None, f"{site.producer}.bias"):
        raise Skip(f"the layer op reads {site.weight or 'a weight'}, not the weight and bias of module {site.producer}")
    affine = site.affine(root)
    new_w, new_b = fold_tensors(layer.weight, layer.bias, affine, site.axis, site.groups, site.kind)
    shift = None
    # the state_dict layout has no bias to take the shift, nor a layer whose own forward may ignore one
    if layer.bias is None and (mode == "identity" or type(layer).forward not in PLAIN_LAYER_FORWARDS):
        new_b, shift = None, affine.shift
    write_params(layer, new_w, new_b)
    return retire(root, site, mode, shift)


def retire(root: nn.Module, site: FoldSite, mode: str, shift: np.ndarray | None = None) -> str | None:
    """Remove the BN module, or turn its tensors into the identity γ=1, β=0, μ=0, σ²=1−ε. A shift
    the layer has no bias for stays in the BN as μ = −t, so that BN(x) = x + t."""
    module = bn_owner(root, site.tensors)
    if mode == "remove" and shift is None and module is not None and type(module).forward in PLAIN_BN_FORWARDS:
        parent, _, child = owner(site.tensors["running_mean"]).rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, nn.Identity())
        return None
    with torch.no_grad():
        for key, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0 - site.eps)):
            path = site.tensors.get(key)
            if path is None:
                continue
            tensor = attr_at(root, path)
            if key == "running_mean" and shift is not None:
                tensor.copy_(torch.from_numpy(-shift).to(tensor.device, tensor.dtype))
            else:
                tensor.fill_(value)
    if mode != "remove":
        return None
    if shift is not None:
        return (f"{site.bn} kept as an identity holding the shift (γ=1, β=0, μ=−t, σ²=1−ε): {site.producer} has no "
                "bias and a forward of its own that might not read one")
    if module is None:
        return f"functional batch_norm {site.bn} kept as an identity (γ=1, β=0, μ=0, σ²=1−ε); --to onnx removes its cost"
    return (f"{type(module).__name__} {site.bn} runs more than the normalization in its forward: kept, as an identity "
            "(γ=1, β=0, μ=0, σ²=1−ε)")


@dataclass
class Found:
    """What a graph of one module says: fold sites and kept BNs (paths relative to the module)."""

    sites: list[FoldSite] = field(default_factory=list)
    skipped: list[SkippedBN] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    untraced: list[str] = field(default_factory=list)

    def add(self, other: "Found", prefix: str) -> None:
        join = lambda p: f"{prefix}.{p}" if p else prefix  # noqa: E731
        for s in other.sites:
            self.sites.append(FoldSite(join(s.bn), join(s.producer), s.kind, s.axis, s.groups,
                                       {k: (join(v) if v else None) for k, v in s.tensors.items()}, s.eps,
                                       weight=s.weight and join(s.weight), bias=s.bias and join(s.bias)))
        self.skipped += [SkippedBN(join(s.bn), s.reason, s.producer and join(s.producer)) for s in other.skipped]
        self.notes += [f"{prefix}: {n}" for n in other.notes]
        self.untraced += [f"{prefix}.{u}" for u in other.untraced]
