"""Checkpoints as people have them: which values of a file are weight sets, how a state_dict's keys
fit --arch, and how the folded sets go back into the file with everything else as it came.

| file                                   | weight sets                                   | written back                 |
|----------------------------------------|-----------------------------------------------|------------------------------|
| torch.save(model)                      | the module                                    | the folded module            |
| ultralytics best.pt {model, ema, …}    | every nn.Module at the top level              | the same dict, other keys as they were |
| state_dict (plain, `module.`, …)       | the dict, with --arch                         | same keys, prefix, _metadata |
| timm {state_dict, state_dict_ema, …}   | every state_dict value that fits --arch       | the same dict                |
| Lightning {state_dict: {model.…}, …}   | the state_dict, `model.` found and kept       | the same dict                |
| model.safetensors                      | the tensors, with --arch                      | safetensors, metadata kept   |
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import BadInput

MODULE, STATE = "module", "state_dict"


@dataclass
class StateLayout:
    """How a state_dict sat in the file: its keys in order (with their prefix), each tensor's
    dtype, its `_metadata` (module versions) and the mapping type it was."""

    keys: list[str]
    dtypes: dict[str, torch.dtype]
    prefix: str = ""
    metadata: Any = None
    mapping: type = OrderedDict


@dataclass
class WeightSet:
    """One set of weights to fold: a module, or a state_dict loaded into the --arch module."""

    key: str | None  # its key in the checkpoint dict; None: the file itself
    module: Any  # nn.Module, ScriptModule or ExportedProgram
    kind: str = MODULE
    layout: StateLayout | None = None

    @property
    def name(self) -> str:
        return self.key or ""


@dataclass
class FitError:
    """Why no prefix makes a state_dict's keys the --arch module's keys."""

    prefixes: list[str]
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def describe(self) -> str:
        tried = ", ".join(repr(p) for p in self.prefixes)
        return f"tried prefixes {tried}: missing {self.missing[:5]}, unexpected {self.unexpected[:5]}"


def is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def common_prefixes(keys: list[str]) -> list[str]:
    """"", then every longer run of dotted segments all keys start with: "model.", "model._orig_mod.", …"""
    split = [k.split(".") for k in keys]
    shortest = min(len(s) for s in split) - 1  # a prefix never takes the whole key
    prefixes = [""]
    for depth in range(1, shortest + 1):
        heads = {tuple(s[:depth]) for s in split}
        if len(heads) != 1:
            break
        prefixes.append(".".join(next(iter(heads))) + ".")
    return prefixes


def fit_prefix(keys: list[str], expected: set[str]) -> str | FitError:
    """The one common prefix whose removal makes `keys` exactly the module's keys."""
    prefixes = common_prefixes(keys)
    for prefix in prefixes:
        if {k[len(prefix):] for k in keys} == expected:
            return prefix
    best = max(prefixes, key=lambda p: len({k[len(p):] for k in keys} & expected))
    stripped = {k[len(best):] for k in keys}
    return FitError(prefixes, sorted(expected - stripped), sorted(stripped - expected))


def strip_metadata(metadata, prefix: str):
    """`_metadata` keys are module paths ("model", "model.layer1"): the same prefix removed."""
    if metadata is None or not prefix:
        return metadata
    stripped = OrderedDict()
    for key, value in metadata.items():
        if key == prefix[:-1]:
            stripped[""] = value
        elif key.startswith(prefix):
            stripped[key[len(prefix):]] = value
    return stripped


def load_into(arch: nn.Module, state: dict, prefix: str, path) -> tuple[nn.Module, StateLayout]:
    """`arch` (a fresh module) filled with `state`, strictly, in the state's own float dtype."""
    floats = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(floats) == 1:
        arch = arch.to(next(iter(floats)))
    metadata = getattr(state, "_metadata", None)
    stripped = OrderedDict((k[len(prefix):], v) for k, v in state.items())
    if metadata is not None:
        stripped._metadata = strip_metadata(metadata, prefix)
    try:
        arch.load_state_dict(stripped, strict=True)
    except RuntimeError as exc:  # shapes that differ
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise BadInput(f"does not fit --arch: {detail[:240]}", path) from None
    layout = StateLayout(list(state), {k: v.dtype for k, v in state.items()}, prefix, metadata,
                         type(state) if type(state) in (dict, OrderedDict) else OrderedDict)
    return arch.eval(), layout


def state_out(layout: StateLayout, module: nn.Module) -> dict:
    """The folded module's state_dict as the file had it: same keys in the same order, prefix,
    dtypes and `_metadata`."""
    folded = module.state_dict()
    out = layout.mapping()
    for key in layout.keys:
        tensor = folded[key[len(layout.prefix):]].detach()
        out[key] = tensor if tensor.dtype == layout.dtypes[key] else tensor.to(layout.dtypes[key])
    if layout.metadata is not None:
        out._metadata = layout.metadata
    return out


def container_out(container: dict, sets: list[WeightSet], folded: list[Any]) -> dict:
    """The checkpoint dict with each weight set replaced by its folded form, every other key and
    value as it came (same objects, same order)."""
    out = copy.copy(container)
    for ws, module in zip(sets, folded):
        out[ws.key] = state_out(ws.layout, module) if ws.kind == STATE else module
    return out
