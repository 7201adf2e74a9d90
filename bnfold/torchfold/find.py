"""Where the BNs of an eager module fold, from the cheapest graph that shows it.

torch.fx first, with every submodule fx cannot trace left as an opaque node (tracer.py); each
opaque submodule is then read on its own, with the input it received. Only a module whose own
forward fx cannot trace *and* that applies a BN itself (a BN child, or buffers a functional
batch_norm reads) is exported with torch.export — the smallest piece that needs it; one without is
read child by child. Graphs are taken from a throwaway copy: tracing runs `forward`, which may
cache things on the module (timm's LeViT caches attention biases).
"""
from __future__ import annotations

import contextlib
import io
import warnings

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_map

from ..report import SkippedBN
from .fx_graph import FxGraph, sites_and_kept
from .guess import guess_example, metadata_example
from .hooks import recording_inputs
from .opaque import module_layer
from .sites import Found, analysis_copy
from .tracer import Untraceable, trace


def find_sites(module: nn.Module, example: tuple | None) -> Found:
    """Fold sites of `module` (paths relative to it) and the BNs kept, with reasons."""
    probe = analysis_copy(module)
    try:
        traced = trace(probe)
    except Untraceable as why:
        return _untraceable(module, example, f"{type(module).__name__} cannot be traced by torch.fx ({why})")
    guessed = example or guess_example(module)
    inputs = _inputs_of(module, guessed, traced.opaque)
    layers = {p: module_layer(module.get_submodule(p), inputs.get(p), p) for p in traced.opaque}
    graph = FxGraph(traced.gm, traced.calls, lambda: _shapes(traced.gm, guessed), layers)
    sites, kept = sites_and_kept(graph)
    found = Found(sites, kept)
    if traced.opaque:
        for path in traced.opaque:
            inner = find_sites(module.get_submodule(path), inputs.get(path))
            _drop_read_outside(inner, graph.read_paths(), path)
            found.add(inner, path)
    return found


def _drop_read_outside(inner: Found, outside: set[str], prefix: str) -> None:
    """A site whose tensors the enclosing graph also reads would change that use too."""
    for site in list(inner.sites):
        paths = [site.weight, site.bias, *site.stats.paths()]
        shared = next((p for p in paths if p and f"{prefix}.{p}" in outside), None)
        if shared is not None:
            inner.sites.remove(site)
            inner.skipped.append(SkippedBN(site.bn, f"{shared} is also read outside {prefix}", site.producer))


def _untraceable(module: nn.Module, example: tuple | None, why: str) -> Found:
    if _applies_bn(module):
        example = example or metadata_example(module) or guess_example(module)
        exported = _export(module, example) if example is not None else None
        if exported is not None:
            sites, kept = sites_and_kept(FxGraph(exported, types=module))
            return Found(sites, kept, [f"{why}; its BNs were found in its torch.export graph"])
        found = Found(notes=[f"{why}; torch.export could not export it either; folding its submodules one by one"],
                      untraced=[type(module).__name__])
    else:  # every BN is in a child: the children, each on its own, show them all
        found = Found(notes=[f"{why}; it applies no BN itself, so its submodules were read one by one"],
                      untraced=[type(module).__name__])
    inputs = _inputs_of(module, example, [name for name, _ in module.named_children()])
    for name, child in module.named_children():
        found.add(find_sites(child, inputs.get(name)), name)
    return found


def _applies_bn(module: nn.Module) -> bool:
    """Whether the module's own forward may join a layer to a BN: it, or a direct child, holds
    tensors of its own (a layer's weight, a BN's statistics). Otherwise its children are
    containers whose layers and BNs meet inside them, each read on its own."""
    return any(_holds_tensors(m) for m in (module, *module.children()))


def _holds_tensors(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None \
        or next(module.buffers(recurse=False), None) is not None


def _export(module: nn.Module, example: tuple):
    """The ATen graph of `module` on `example` (unlifted: parameters are get_attr nodes named by
    their module paths), or None."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return torch.export.export(analysis_copy(module), tuple(example), strict=False).module()
    except Exception:  # noqa: BLE001 — export failures are many and varied
        return None


def _inputs_of(module: nn.Module, example: tuple | None, paths: list[str]) -> dict[str, tuple]:
    """The positional inputs the submodules at `paths` receive when `module` runs on `example`."""
    if example is None or not paths:
        return {}
    probe = analysis_copy(module)
    with recording_inputs(((p, probe.get_submodule(p)) for p in paths), _detached_copy, first_only=True) as seen:
        try:
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                probe(*example)
        except Exception:  # noqa: BLE001 — what ran before the failure is still known
            pass
    return seen


def _detached_copy(args: tuple) -> tuple:
    return tree_map(lambda a: a.detach().clone() if isinstance(a, torch.Tensor) else a, args)


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
