"""The torch folding pass for eager modules: the same float64 fold as the ONNX path.

Producer → BN edges come from a dataflow graph, never from module order or names: a conv used
twice, a BN applied to a sum or a residual between them all show up as what they are. The graph
is torch.fx's symbolic trace; where fx cannot trace the module (Python control flow on shapes,
iterating a tensor's size), torch.export's ATen graph of it, whose parameters carry their module
paths; where neither can be had, each child on its own, with the input it received. Graphs are
made from a throwaway copy (sites.py); the fold changes the producer's parameters by name and
then removes the BN (nn.Identity) or, where the module's layout must stay (a state_dict that
loads into the original architecture), sets it to the identity γ=1, β=0, μ=0, σ²=1−ε.
"""
from __future__ import annotations

import contextlib
import io

import operator
import warnings
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_map

from ..errors import Skip
from ..fold_math import BrokenStatistics, FoldOverflow
from ..report import FoldedBN, FoldReport, SkippedBN
from .export import aten_found
from .hooks import recording_inputs
from .sites import FoldSite, Found, analysis_copy, apply_site, bn_name, check_linear_axis

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
RESHAPE_METHODS = ("flatten", "view", "reshape")
RESHAPE_FUNCTIONS = (torch.flatten, torch.reshape)
SHAPE_METHODS = ("size", "dim", "numel")
SHAPE_OF_SECOND = ("reshape_as", "view_as", "expand_as")
SHAPE_ATTRIBUTES = ("shape", "ndim", "dtype", "device")


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
                example: tuple | None = None) -> nn.Module:
    """Fold every BN of `module` that can be folded exactly, in place; returns the module."""
    if module.training:
        report.notes.append("the module was in training mode; its inference (eval) behaviour was folded")
        module.eval()
    found = find_sites(module, example)
    report.skipped += found.skipped
    report.notes += found.notes
    report.untraced += found.untraced
    for site in found.sites:
        try:
            note = apply_site(module, site, mode)
        except Skip as why:
            report.skipped.append(SkippedBN(site.bn, str(why), site.producer))
            continue
        except BrokenStatistics as why:
            report.warnings.append(f"BatchNorm {site.bn!r}: {why}; the model is broken there, BN kept")
            report.skipped.append(SkippedBN(site.bn, f"broken statistics: {why}", site.producer))
            continue
        except FoldOverflow as why:
            report.skipped.append(SkippedBN(site.bn, str(why), site.producer))
            continue
        if note:
            report.notes.append(note)
        if note or mode == "identity":
            report.identity_bns += 1
        report.folded.append(FoldedBN(site.bn, site.producer, site.kind))
    return module


def find_sites(module: nn.Module, example: tuple | None) -> Found:
    """Fold sites of `module`, from the best graph that can be had of it."""
    probe = analysis_copy(module)
    try:
        gm = torch.fx.symbolic_trace(probe)
    except Exception as exc:  # noqa: BLE001 — any tracing failure: try torch.export, then the children
        why = f"{type(module).__name__} cannot be traced by torch.fx ({_first_line(exc)})"
    else:
        return fx_sites(gm, probe, _shapes(gm, example or guess_example(module)))
    example = example or metadata_example(module) or guess_example(module)
    exported = _export(module, example) if example is not None and _may_hold_bn(module) else None
    if exported is not None:
        found = aten_found(exported, analysis_copy(module))
        found.notes.insert(0, f"{why}; its BNs were found in its torch.export graph")
        return found
    found = Found(notes=[f"{why}; torch.export could not export it either; folding its submodules one by one"],
                  untraced=[type(module).__name__])
    inputs = child_inputs(module, example)
    for name, child in module.named_children():
        found.add(find_sites(child, inputs.get(name)), name)
    return found


def _may_hold_bn(module: nn.Module) -> bool:
    """A BN needs running statistics: a BN module, or buffers a functional batch_norm reads.
    Without either, exporting (seconds) cannot find anything."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()) \
        or next(module.buffers(), None) is not None


def _first_line(exc: Exception) -> str:
    text = str(exc).splitlines()[0][:100] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _export(module: nn.Module, example: tuple):
    """The ATen graph of `module` on `example` (unlifted: parameters are get_attr nodes named by
    their module paths), or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(analysis_copy(module), tuple(example), strict=False).module()
    except Exception:  # noqa: BLE001 — export failures are many and varied
        return None


def child_inputs(module: nn.Module, example: tuple | None) -> dict[str, tuple]:
    """The positional inputs each direct child receives when `module` runs on `example`."""
    if example is None:
        return {}
    probe = analysis_copy(module)
    with recording_inputs(probe.named_children(), _detached_copy, first_only=True) as seen:
        try:
            with torch.no_grad():
                probe(*example)
        except Exception:  # noqa: BLE001 — what ran before the failure is still known
            pass
    return seen


def _detached_copy(args: tuple) -> tuple:
    return tree_map(lambda a: a.detach().clone() if isinstance(a, torch.Tensor) else a, args)


def guess_example(module: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """An input shaped for the first layer, to learn the ranks the graph sees (Linear+BN1d)."""
    first = next((m for m in module.modules() if isinstance(m, (nn.Linear, *CONV_TYPES, *CONV_T_TYPES))), None)
    dtype = _dtype(module)
    if isinstance(first, nn.Linear):
        return (torch.randn(2, first.in_features, dtype=dtype),)
    if isinstance(first, (*CONV_TYPES, *CONV_T_TYPES)):
        size = 1 if isinstance(first, CONV_T_TYPES) else 32  # generators start from 1×1 noise
        return (torch.randn(2, first.in_channels, *([size] * len(first.kernel_size)), dtype=dtype),)
    return None


def metadata_example(module: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """An input of the size the model says it takes: timm's pretrained_cfg["input_size"] (C, H, W),
    ultralytics' args["imgsz"]."""
    for attr in ("pretrained_cfg", "default_cfg"):
        size = (getattr(module, attr, None) or {}).get("input_size") if isinstance(getattr(module, attr, None), dict) \
            else None
        if isinstance(size, (tuple, list)) and all(isinstance(d, int) and d > 0 for d in size):
            return (torch.randn(2, *size, dtype=_dtype(module)),)
    args = getattr(module, "args", None)
    imgsz = args.get("imgsz") if isinstance(args, dict) else getattr(args, "imgsz", None)
    if isinstance(imgsz, int) and imgsz > 0:
        return (torch.randn(2, 3, imgsz, imgsz, dtype=_dtype(module)),)
    return None


def _dtype(module: nn.Module) -> torch.dtype:
    param = next(module.parameters(), None)
    return param.dtype if param is not None and param.is_floating_point() else torch.float32


def _shapes(gm: torch.fx.GraphModule, example) -> dict[str, tuple[int, ...]]:
    if example is None:
        return {}
    from torch.fx.passes.shape_prop import ShapeProp

    try:  # ShapeProp prints the traceback of a failed node itself: it is not ours to show
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*example)
    except Exception:  # noqa: BLE001 — a wrong guess only means ranks stay unknown
        return {}
    return {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
            if hasattr(n.meta.get("tensor_meta"), "shape")}


# -- sites on the fx graph ---------------------------------------------------------------------


def fx_sites(gm: torch.fx.GraphModule, probe: nn.Module, shapes: dict) -> Found:
    found = Found()
    calls = _call_counts(gm)
    for node in gm.graph.nodes:
        source = _bn_source(gm, probe, node)
        if source is None:
            continue
        try:
            found.sites.append(_site(gm, source, calls, shapes))
        except Skip as why:
            found.skipped.append(SkippedBN(source.name, str(why), _node_name(source.input)))
    return found


def _node_name(node) -> str | None:
    return str(node.target) if isinstance(node, torch.fx.Node) else None


def _call_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def _bn_source(gm: torch.fx.GraphModule, probe: nn.Module, node: torch.fx.Node) -> BnSource | None:
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
        return BnSource(bn_name(probe, names, node.name), node, args["input"], None, names,
                        float(args.get("eps", 1e-5)), bool(args.get("training", False)))
    return None


def _value_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Users that read the values of `node`, not only its shape (LeViT's reshape_as(x))."""
    return [u for u in node.users if not _reads_shape_only(u, node)]


def _reads_shape_only(user: torch.fx.Node, node: torch.fx.Node) -> bool:
    if user.op == "call_method":
        if user.target in SHAPE_METHODS:
            return True
        return user.target in SHAPE_OF_SECOND and len(user.args) > 1 and user.args[1] is node \
            and user.args[0] is not node
    return user.op == "call_function" and user.target in (getattr, operator.attrgetter) \
        and len(user.args) > 1 and user.args[1] in SHAPE_ATTRIBUTES


def _is_reshape(gm: torch.fx.GraphModule, node) -> bool:
    return isinstance(node, torch.fx.Node) and (
        (node.op == "call_method" and node.target in RESHAPE_METHODS)
        or (node.op == "call_function" and node.target in RESHAPE_FUNCTIONS)
        or (node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Flatten)))


def _site(gm: torch.fx.GraphModule, bn: BnSource, calls: dict[str, int], shapes) -> FoldSite:
    """Check what must hold for BN(layer(x)) to fold; the site, or Skip with the reason."""
    _check_bn(bn, calls)
    producer, reshape = bn.input, None
    if _is_reshape(gm, producer) and isinstance(producer.args[0], torch.fx.Node) \
            and producer.args[0].op == "call_module" \
            and isinstance(gm.get_submodule(producer.args[0].target), nn.Linear):
        producer, reshape = producer.args[0], producer
    if not isinstance(producer, torch.fx.Node) or producer.op != "call_module":
        kind = producer.op if isinstance(producer, torch.fx.Node) else type(producer).__name__
        what = producer.target if isinstance(producer, torch.fx.Node) else producer
        raise Skip(f"input comes from {kind} {what}, not a Conv/ConvTranspose/Linear module")
    layer = gm.get_submodule(producer.target)
    others = len(_value_users(producer)) - 1 + (len(_value_users(reshape)) - 1 if reshape is not None else 0)
    if others:
        raise Skip(f"output of {producer.target} is also used by {others} other node(s)")
    if calls.get(producer.target, 0) != 1:
        raise Skip(f"{producer.target} is called {calls[producer.target]} times; folding would change every call")
    if isinstance(layer, CONV_TYPES):
        axis, groups = 0, 1
    elif isinstance(layer, CONV_T_TYPES):
        axis, groups = 1, layer.groups
    elif isinstance(layer, nn.Linear):
        check_linear_axis(shapes.get(producer.name), shapes.get(reshape.name if reshape else producer.name),
                          reshape is not None)
        axis, groups = 0, 1
    else:
        raise Skip(f"{producer.target} ({type(layer).__name__}) is not a foldable layer")
    return FoldSite(bn.name, producer.target, type(layer).__name__, axis, groups, bn.tensors, bn.eps)


def _check_bn(bn: BnSource, calls: dict[str, int]) -> None:
    if bn.module is not None:
        if not bn.module.track_running_stats or bn.module.running_mean is None:
            raise Skip("track_running_stats=False: BN always uses batch statistics")
        if calls.get(bn.name, 0) != 1:
            raise Skip(f"BN module {bn.name} is called {calls[bn.name]} times")
    elif bn.training:
        raise Skip("functional batch_norm called with training=True")
    if bn.tensors["running_mean"] is None or bn.tensors["running_var"] is None:
        raise Skip("running statistics are not constant attributes of the module")
    for path in bn.tensors.values():
        if path is not None and bn.module is None and calls.get(path, 0) != 1:
            raise Skip(f"{path} is read in {calls[path]} places")
