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
from .branches import branch_owners
from .fx_graph import FxGraph, sites_and_kept
from .guess import guess_example, metadata_example
from .hooks import recording_inputs
from .opaque import forward_reads_bias, module_layer
from .own_reads import read_by_own_forward
from .params import key_at
from .sites import Found, analysis_copy
from .tracer import Untraceable, trace


class Inputs:
    """What a module receives, and what its submodules receive: recorded by one run of the
    module on its example, made only when something needs an input (a first forward on a CPU
    costs more than the rest of a fold)."""

    def __init__(self, own, run: "_Run | None" = None, prefix: str = ""):
        self._own, self._run, self._prefix = own, run, prefix

    @classmethod
    def given(cls, module: nn.Module, example: tuple | None) -> "Inputs":
        return cls(lambda: example or guess_example(module))

    def example(self) -> tuple | None:
        if callable(self._own):
            self._own = self._own()
        return self._own

    def below(self, module: nn.Module, path: str, under: list[str]) -> "Inputs":
        """The inputs of `module`'s submodule at `path` (paths under `under` are recorded)."""
        if self._run is None:  # one run records every level below this one
            self._run = _Run(module, self.example, under)
        run = self._run
        return Inputs(lambda: run.input(self._prefix + path), run, f"{self._prefix}{path}.")


class _Run:
    def __init__(self, module: nn.Module, example, under: list[str]):
        self.module, self.example, self.under, self.seen = module, example, under, None

    def input(self, path: str) -> tuple | None:
        if self.seen is None:
            self.seen = _record(self.module, self.example(), self.under)
        return self.seen.get(path)


def find_sites(module: nn.Module, example: tuple | None = None, inputs: Inputs | None = None) -> Found:
    """Fold sites of `module` (paths relative to it) and the BNs kept, with reasons."""
    inputs = inputs or Inputs.given(module, example)
    probe = analysis_copy(module)
    try:
        traced = trace(probe)
    except Untraceable as why:
        return _untraceable(module, inputs, f"{type(module).__name__} cannot be traced by torch.fx ({why})")
    below = {p: inputs.below(module, p, traced.opaque) for p in traced.opaque}
    layers = {p: module_layer(module.get_submodule(p), below[p], p) for p in traced.opaque}
    graph = FxGraph(traced.view, traced.calls, lambda: _shapes(traced.gm, inputs.example()), layers)
    sites, kept = sites_and_kept(graph)
    owners, unmerged, refused = branch_owners(traced.view, graph)
    found = Found(sites, kept, branch_owners=owners, unmerged=unmerged, refused=refused)
    for path in (p for p in traced.opaque if layers[p] is None):  # a layer is all its module computes
        inner = find_sites(module.get_submodule(path), inputs=below[path])
        _drop_read_outside(inner, graph.read_paths(), path, module, traced.view)
        found.add(inner, path)
    return found


def _drop_read_outside(inner: Found, outside: set[str], prefix: str, module: nn.Module, gm: nn.Module) -> None:
    """A site whose tensors the enclosing graph also reads (by its path, or the same tensor under
    another name) would change that use too."""
    keys = {key_at(gm, p) for p in outside} - {None}
    for site in list(inner.sites):
        paths = [site.weight, site.bias, *site.stats.paths()]
        shared = next((p for p in paths if p and (f"{prefix}.{p}" in outside
                                                  or key_at(module, f"{prefix}.{p}") in keys)), None)
        if shared is not None:
            inner.sites.remove(site)
            inner.skipped.append(SkippedBN(site.bn, f"{shared} is also read outside {prefix}", site.producer))


def _untraceable(module: nn.Module, inputs: Inputs, why: str) -> Found:
    if _applies_bn(module):
        example = inputs.example() or metadata_example(module)
        exported = _export(module, example) if example is not None else None
        if exported is not None:
            sites, kept = sites_and_kept(FxGraph(exported, types=module))
            for site in sites:  # the exported module's own layer: does its forward take a bias?
                if site.bias is None and not site.plain_layer and site.producer == "":
                    site.plain_layer = forward_reads_bias(module, example, site)
            return Found(sites, kept, [f"{why}; its BNs were found in its torch.export graph"], unseen={""})
        found = Found(notes=[f"{why}; torch.export could not export it either; folding its submodules one by one"],
                      untraced=[type(module).__name__])
    else:  # every BN is in a child: the children, each on its own, show them all
        found = Found(notes=[f"{why}; it applies no BN itself, so its submodules were read one by one"],
                      untraced=[type(module).__name__])
    for name, child in module.named_children():
        found.add(find_sites(child, inputs=inputs.below(module, name, [""])), name)
    _drop_read_by_forward(module, inputs, found)
    return found


def _drop_read_by_forward(module: nn.Module, inputs: Inputs, found: Found) -> None:
    """Children folded one by one: a site whose tensors the module's own forward also reads
    (no graph shows it) would change that use too."""
    example = inputs.example() if found.sites else None
    read = read_by_own_forward(module, example) if example is not None else None
    if not read:
        return
    for site in list(found.sites):
        paths = [site.weight or f"{site.producer}.weight", site.bias, *site.stats.paths()]
        shared = next((p for p in paths if p and key_at(module, p) in read), None)
        if shared is not None:
            found.sites.remove(site)
            found.skipped.append(SkippedBN(site.bn, f"{shared} is also read by {type(module).__name__}'s own forward",
                                           site.producer))


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


def _record(module: nn.Module, example: tuple | None, under: list[str]) -> dict[str, tuple]:
    """The positional inputs every submodule at or below the paths `under` ("" for all) receives
    when `module` runs on `example`: one run, of a copy, records what every level below needs."""
    if example is None or not under:
        return {}
    probe = analysis_copy(module)
    wanted = [(p, m) for p, m in probe.named_modules() if p and any(
        not u or p == u or p.startswith(u + ".") for u in under)]
    with recording_inputs(wanted, _detached_copy, first_only=True) as seen:
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
