"""A torch.fx trace for finding fold sites: modules whose forward is torch's own (Conv, Linear, BN)
are single nodes, everything else is traced through — so a Conv subclass, a FrozenBatchNorm2d or
timm's BatchNormAct2d shows what it computes — and a submodule fx cannot trace becomes an opaque
node of its own, handled on its own (find.py), instead of failing the whole model."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from .vocabulary import plain_bn, plain_layer, qat_module


class Untraceable(Exception):
    """The module's own forward cannot be traced by torch.fx."""


class GraphView:
    """What reading a graph needs of its GraphModule — the graph, the traced module's submodules
    and attributes — without generating and compiling the GraphModule's code (most graphs are
    only read)."""

    def __init__(self, root: nn.Module, graph: torch.fx.Graph):
        self.root, self.graph = root, graph

    def get_submodule(self, target: str) -> nn.Module:
        return self.root.get_submodule(target)

    def __getattr__(self, name: str):
        return getattr(self.root, name)


@dataclass
class Traced:
    root: nn.Module
    graph: torch.fx.Graph
    opaque: list[str] = field(default_factory=list)  # submodules left as nodes because fx cannot trace them
    calls: Counter = field(default_factory=Counter)  # module path → calls in the graph
    _gm: torch.fx.GraphModule | None = None

    @property
    def view(self) -> GraphView:
        return GraphView(self.root, self.graph)

    @property
    def gm(self) -> torch.fx.GraphModule:
        """The graph as a GraphModule (made on first use): to run or rewrite it."""
        if self._gm is None:
            self._gm = torch.fx.GraphModule(self.root, self.graph)
        return self._gm


class SiteTracer(torch.fx.Tracer):
    # a buffer a forward reads (FrozenBatchNorm2d's statistics, a BN's running_var read by its
    # parent) must be a get_attr of its path: computed from at trace time it would be a nameless
    # constant, and who reads the buffer could not be counted
    proxy_buffer_attributes = True

    def __init__(self, opaque: set[str] | None = None):
        super().__init__()
        self.opaque = opaque or set()
        self.calls: Counter = Counter()
        self.failed_in: str | None = None
        self._paths: tuple[dict, dict] | None = None

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        """torch.fx's own rule (a parameter, else a buffer, becomes a get_attr of its first path)
        from an index built once per trace: fx searches every named parameter on each read, which
        makes tracing a deep model quadratic."""
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        if self._paths is None:
            self._paths = (_first_paths(self.root.named_parameters()), _first_paths(self.root.named_buffers()))
        params, buffers = self._paths
        name = params.get(id(attr_val)) if isinstance(attr_val, nn.Parameter) else None
        if name is None and self.proxy_buffer_attributes:
            name = buffers.get(id(attr_val))
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.opaque or plain_bn(m) or plain_layer(m) or qat_module(m):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self.calls[path] += 1
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module the failure passed through
                self.failed_in = path
            raise


def trace(module: nn.Module) -> Traced:
    """The module's graph, with every submodule fx cannot trace left opaque; Untraceable when the
    module's own forward fails."""
    opaque: set[str] = set()
    limit = sum(1 for _ in module.modules())
    while True:
        tracer = SiteTracer(opaque)
        try:
            graph = tracer.trace(module)
        except Exception as exc:  # noqa: BLE001 — any tracing failure
            if tracer.failed_in in (None, "") or tracer.failed_in in opaque or len(opaque) >= limit:
                raise Untraceable(first_line(exc)) from None
            opaque.add(tracer.failed_in)
            continue
        graph._tracer_cls = None  # a GraphModule written into a model must load where bnfold is not installed
        # fx asks the graph's owner for a called module's purity (dead-code elimination) and checks
        # attributes (lint) there: the traced module answers as its GraphModule would
        graph.owning_module = tracer.root
        called = {n.target for n in graph.nodes if n.op == "call_module"}
        return Traced(tracer.root, graph, sorted(p for p in opaque if p in called), tracer.calls)


def _first_paths(named) -> dict[int, str]:
    paths: dict[int, str] = {}
    for name, tensor in named:
        paths.setdefault(id(tensor), name)
    return paths


def first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:100] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
