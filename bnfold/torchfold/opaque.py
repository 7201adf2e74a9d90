"""What a submodule fx cannot trace computes, when that is one conv or linear of its own weight.

timm's Conv2dSame pads by the input's size in Python before `F.conv2d(x, self.weight, self.bias)`:
fx cannot trace it, yet a BN after it folds exactly. The module is traced alone by torch.jit on
the input it received (milliseconds for one layer); its graph must end in a conv/linear op that
reads the module's own weight (and bias) once. Where it has no bias, one set on a copy must show
in the output, or the shift stays in the BN.
"""
from __future__ import annotations

import contextlib
import copy
import io
import warnings

import torch
from torch import nn

from .script_graph import ScriptGraph, Shapes, Values, live_nodes, reads_of
from .site_rule import LayerCall
from .vocabulary import LAYER_OPS, op_name


def module_layer(module: nn.Module, received, path: str) -> LayerCall | None:
    """The layer `module` computes, as the enclosing graph sees it (paths under `path`), or None.
    `received.example()` is the input it received (asked for only when it may be a layer)."""
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        return None
    traced, inputs = None, None
    for make in (lambda: _made_input(module), received.example):  # running the whole model is the dear way
        inputs = make()
        traced = _traced(module, inputs) if inputs is not None else None
        if traced is not None:
            break
    if traced is None:
        return None
    graph = traced.inlined_graph
    values = Values(traced, graph)
    outputs = list(graph.outputs())
    script = ScriptGraph(values, reads_of(list(live_nodes(graph, values)), values), Shapes(traced, graph, None))
    layer = script.layer(outputs[0]) if len(outputs) == 1 else None
    if layer is None or layer.weight != "weight" or script.reads("weight") != 1 \
            or (layer.bias is not None and script.reads(layer.bias) != 1):
        return None
    uses_bias = layer.bias is not None or _reads_new_bias(module, inputs, layer)
    return LayerCall(None, layer.kind, layer.axis, layer.groups, f"{path}.weight",
                     f"{path}.bias" if layer.bias is not None else None, path, uses_bias, layer.spatial)


def _traced(module: nn.Module, inputs: tuple):
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return torch.jit.trace(copy.deepcopy(module), inputs, check_trace=False)
    except Exception:  # noqa: BLE001 — not traceable alone on this input
        return None


def _made_input(module: nn.Module) -> tuple | None:
    """An input a conv or linear of this weight takes (16 positions a side): the layer's graph
    does not depend on the values, only on the rank and channels."""
    weight = module.weight
    groups = int(getattr(module, "groups", 1))
    if weight.dim() == 2:
        return (torch.randn(2, weight.shape[1], dtype=weight.dtype),)
    if weight.dim() < 3:
        return None
    transposed = bool(getattr(module, "transposed", False))
    channels = weight.shape[0] if transposed else weight.shape[1] * groups
    return (torch.randn(1, channels, *([16] * (weight.dim() - 2)), dtype=weight.dtype),)


def _reads_new_bias(module: nn.Module, inputs: tuple, layer: LayerCall) -> bool:
    """Whether a bias given to the module is added to its output."""
    weight = module.weight
    channels = weight.shape[layer.axis] * (layer.groups if layer.axis == 1 else 1)
    twin = copy.deepcopy(module)
    try:
        with torch.no_grad():
            before = twin(*inputs)
            twin.bias = nn.Parameter(torch.full((channels,), 0.5, dtype=weight.dtype, device=weight.device))
            after = twin(*inputs)
    except Exception:  # noqa: BLE001 — a module that refuses a bias does not read one
        return False
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor) or before.shape != after.shape:
        return False
    return torch.allclose((after - before).double(), torch.full(before.shape, 0.5, dtype=torch.float64),
                          atol=1e-2, rtol=0)


def forward_reads_bias(module: nn.Module, inputs: tuple, site) -> bool:
    """Whether the module's own forward passes `self.bias` to its conv/linear op once it has one
    (detectron2's Conv2d, a Conv subclass with a forward of its own): a trace of a copy given a
    bias shows it read by that op."""
    if "bias" not in getattr(module, "_parameters", {}) or module.bias is not None:
        return False
    weight = module.weight
    channels = weight.shape[site.axis] * (site.groups if site.axis == 1 else 1)
    twin = copy.deepcopy(module)
    twin.bias = nn.Parameter(torch.zeros(channels, dtype=weight.dtype, device=weight.device))
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(twin, inputs, check_trace=False)
            graph = traced.inlined_graph
    except Exception:  # noqa: BLE001 — not traceable: not known to read a bias
        return False
    values = Values(traced, graph)
    return any(op_name(n.kind()) in LAYER_OPS and n.kind().startswith("aten::") and
               values.path(n.inputsAt(1)) == "weight" and values.path(n.inputsAt(2)) == "bias" for n in graph.nodes())
