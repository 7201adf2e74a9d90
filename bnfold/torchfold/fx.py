"""The torch folding pass: the same float64 fold as the ONNX path, applied to nn.Modules.

Producer → BN edges come from the dataflow graph (torch.fx symbolic trace), never from
module order or names: a conv used twice, a BN applied to a sum or a residual between them
all show up as what they are. The fold changes the producer's parameters in place and then
either removes the BN (replaced by nn.Identity) or, where the module's layout must stay
(a state_dict that loads into the original architecture), sets it to the identity
γ=1, β=0, μ=0, σ²=1−ε.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx
from torch import nn

from ..errors import Skip
from ..fold_math import Affine, BrokenStatistics, FoldOverflow
from ..report import FoldedBN, FoldReport, SkippedBN
from .params import affine_of, attr_at, folded_params, write_params

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class BnSource:
    """Where a BN's parameters live: a module, or the buffers a functional call reads."""

    name: str
    node: torch.fx.Node
    input: torch.fx.Node
    module: nn.Module | None
    tensors: dict[str, str | None]  # "weight", "bias", "running_mean", "running_var" → attribute path
    eps: float
    training: bool = False  # functional batch_norm called with training=True


def fold_module(module: nn.Module, report: FoldReport, mode: str = "remove",
                example: tuple[torch.Tensor, ...] | None = None) -> nn.Module:
    """Fold every BN of `module` that can be folded exactly, in place; returns the module."""
    if module.training:
        report.notes.append("the module was in training mode; its inference (eval) behaviour was folded")
        module.eval()
    try:
        gm = torch.fx.symbolic_trace(module)
    except Exception as exc:  # noqa: BLE001 — any tracing failure: fall back to traceable parts
        report.notes.append(f"{type(module).__name__} cannot be traced ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:100] if str(exc) else ''}); folding its traceable submodules")
        report.untraced.append(type(module).__name__)
        for name, child in module.named_children():
            sub = FoldReport(input=name, output=None, format="torch")
            fold_module(child, sub, mode, None)
            _merge(report, sub, prefix=name)
        return module
    shapes = _shapes(gm, example or guess_example(module))
    calls = _call_counts(gm)
    for node in list(gm.graph.nodes):
        source = _bn_source(gm, node)
        if source is None:
            continue
        try:
            producer, pattern, shift_left = _fold(gm, source, calls, shapes, keep_layout=mode == "identity")
        except Skip as why:
            report.skipped.append(SkippedBN(source.name, str(why), _node_name(source.input)))
            continue
        except BrokenStatistics as why:
            report.warnings.append(f"BatchNorm {source.name!r}: {why}; the model is broken there, BN kept")
            report.skipped.append(SkippedBN(source.name, f"broken statistics: {why}", _node_name(source.input)))
            continue
        except FoldOverflow as why:
            report.skipped.append(SkippedBN(source.name, str(why), _node_name(source.input)))
            continue
        _retire(module, source, mode, report, shift_left)
        report.folded.append(FoldedBN(source.name, producer, pattern))
    return module


def _merge(report: FoldReport, sub: FoldReport, prefix: str) -> None:
    for f in sub.folded:
        report.folded.append(FoldedBN(f"{prefix}.{f.bn}", f"{prefix}.{f.producer}", f.pattern))
    for s in sub.skipped:
        report.skipped.append(SkippedBN(f"{prefix}.{s.bn}", s.reason, s.producer and f"{prefix}.{s.producer}"))
    report.warnings += sub.warnings
    report.notes += [f"{prefix}: {n}" for n in sub.notes]
    report.untraced += [f"{prefix}.{u}" for u in sub.untraced]


def _node_name(node) -> str | None:
    return str(node.target) if isinstance(node, torch.fx.Node) else None


def _call_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def guess_example(module: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """An input shaped for the first layer, to learn the ranks the graph sees (Linear+BN1d)."""
    first = next((m for m in module.modules() if isinstance(m, (nn.Linear, *CONV_TYPES, *CONV_T_TYPES))), None)
    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    if isinstance(first, nn.Linear):
        return (torch.randn(2, first.in_features, dtype=dtype),)
    if isinstance(first, (*CONV_TYPES, *CONV_T_TYPES)):
        size = 1 if isinstance(first, CONV_T_TYPES) else 32  # generators start from 1×1 noise
        return (torch.randn(2, first.in_channels, *([size] * len(first.kernel_size)), dtype=dtype),)
    return None


def _shapes(gm: torch.fx.GraphModule, example) -> dict[str, tuple[int, ...]]:
    if example is None:
        return {}
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example)
    except Exception:  # noqa: BLE001 — a wrong guess only means ranks stay unknown
        return {}
    return {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
            if isinstance(n.meta.get("tensor_meta"), object) and hasattr(n.meta.get("tensor_meta"), "shape")}


def _bn_source(gm: torch.fx.GraphModule, node: torch.fx.Node) -> BnSource | None:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, BN_TYPES):
            return None
        names = {k: (f"{node.target}.{k}" if getattr(mod, k, None) is not None else None)
                 for k in ("weight", "bias", "running_mean", "running_var")}
        return BnSource(node.target, node, node.args[0], mod, names, mod.eps)
    if node.op == "call_function" and node.target is torch.nn.functional.batch_norm:
        args = dict(zip(("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
                        node.args))
        args.update(node.kwargs)
        names = {k: (args[k].target if isinstance(args.get(k), torch.fx.Node) and args[k].op == "get_attr" else None)
                 for k in ("weight", "bias", "running_mean", "running_var")}
        return BnSource(node.name, node, args["input"], None, names, float(args.get("eps", 1e-5)),
                        bool(args.get("training", False)))
    return None


def _fold(gm: torch.fx.GraphModule, bn: BnSource, calls: dict[str, int], shapes,
          keep_layout: bool = False) -> tuple[str, str, np.ndarray | None]:
    """Check what must hold, fold the producer's parameters; returns (producer, pattern, shift
    left for the BN to add: with keep_layout a layer without bias cannot take one)."""
    affine = _bn_affine(gm, bn, calls)
    producer = bn.input
    if not isinstance(producer, torch.fx.Node) or producer.op != "call_module":
        kind = producer.op if isinstance(producer, torch.fx.Node) else type(producer).__name__
        what = producer.target if isinstance(producer, torch.fx.Node) else producer
        raise Skip(f"input comes from {kind} {what}, not a Conv/ConvTranspose/Linear module")
    layer = gm.get_submodule(producer.target)
    if len(producer.users) != 1:
        raise Skip(f"output of {producer.target} is also used by {len(producer.users) - 1} other node(s)")
    if calls.get(producer.target, 0) != 1:
        raise Skip(f"{producer.target} is called {calls[producer.target]} times; folding would change every call")
    if isinstance(layer, CONV_TYPES):
        axis, groups = 0, 1
    elif isinstance(layer, CONV_T_TYPES):
        axis, groups = 1, layer.groups
    elif isinstance(layer, nn.Linear):
        shape = shapes.get(producer.name)
        if shape is None:
            raise Skip("rank of the Linear output is unknown (pass --shape), so BN's channel axis cannot be matched")
        if len(shape) != 2:
            raise Skip(f"Linear output has rank {len(shape)}; BN normalizes axis 1, not the Linear's feature axis")
        axis, groups = 0, 1
    else:
        raise Skip(f"{producer.target} ({type(layer).__name__}) is not a foldable layer")
    new_w, new_b = folded_params(layer, affine, axis, groups)
    if keep_layout and layer.bias is None:
        write_params(layer, new_w, None)
        return producer.target, type(layer).__name__, affine.shift
    write_params(layer, new_w, new_b)
    return producer.target, type(layer).__name__, None


def _bn_affine(gm: torch.fx.GraphModule, bn: BnSource, calls: dict[str, int]) -> Affine:
    if bn.module is not None:
        if not bn.module.track_running_stats or bn.module.running_mean is None:
            raise Skip("track_running_stats=False: BN always uses batch statistics")
        if calls.get(bn.name, 0) != 1:
            raise Skip(f"BN module {bn.name} is called {calls[bn.name]} times")
    elif bn.training:
        raise Skip("functional batch_norm called with training=True")
    if bn.tensors["running_mean"] is None or bn.tensors["running_var"] is None:
        raise Skip("running statistics are not constant attributes of the module")
    for key, path in bn.tensors.items():
        if path is not None and bn.module is None and calls.get(path, 0) != 1:
            raise Skip(f"{path} is read in {calls[path]} places")
    t = {k: (attr_at(gm, p) if p else None) for k, p in bn.tensors.items()}
    return affine_of(t["weight"], t["bias"], t["running_mean"], t["running_var"], bn.eps)


def _retire(root: nn.Module, bn: BnSource, mode: str, report: FoldReport, shift: np.ndarray | None = None) -> None:
    """Remove the BN module, or turn it (or a functional BN's buffers) into the identity:
    γ=1, β=0, μ=0, σ²=1−ε. A shift the layer had no bias for stays in the BN as μ = −t,
    so that BN(x) = (x + t) / sqrt(1 − ε + ε) = x + t."""
    if bn.module is not None and mode == "remove":
        parent_name, _, child = bn.name.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, child, nn.Identity())
        return
    with torch.no_grad():
        for key, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0 - bn.eps)):
            path = bn.tensors.get(key)
            if path is None:
                continue
            tensor = attr_at(root, path)
            if key == "running_mean" and shift is not None:
                tensor.copy_(torch.from_numpy(-shift).to(tensor.device, tensor.dtype))
            else:
                tensor.fill_(value)
    if bn.module is None and mode == "remove":
        report.notes.append(f"functional batch_norm {bn.name} kept as an identity (γ=1, β=0, μ=0, σ²=1−ε); "
                            "--to onnx removes its cost")

