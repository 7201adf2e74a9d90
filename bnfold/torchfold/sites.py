"""A fold site found on a graph (fx, ATen or TorchScript), named by attribute paths: the graph
says *where* a BN can fold; the module is changed by name (apply.py).

Finding sites on a throwaway copy and applying them by name keeps the module the user gave
clean: tracing or exporting runs its forward, which may cache things on it (timm's LeViT keeps
attention biases in a dict: an fx Proxy there makes the module unpicklable).
"""
from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import BadInput
from ..report import SkippedBN, UnmergedBranches
from .site_rule import FoldSite


def owner(path: str | None) -> str:
    return path.rpartition(".")[0] if path else ""


def analysis_copy(module: nn.Module) -> nn.Module:
    """A copy to trace or export: its own module objects, the original's tensors (nothing is
    written to them; sharing spares the memory)."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    try:
        return _module_copy(module, memo)
    except Exception:  # noqa: BLE001 — copy.deepcopy says what cannot be copied
        return copy_module(module, memo)


def _module_copy(module: nn.Module, memo: dict) -> nn.Module:
    """copy.deepcopy of a module, the way it copies one (the class's new object, the state
    nn.Module.__getstate__ gives copied, then the class's __setstate__), without walking the
    parameter and buffer dicts item by item (their tensors are in `memo`). A module that
    pickles itself another way is left to copy.deepcopy."""
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if cls.__getstate__ is not nn.Module.__getstate__ or getattr(cls, "__deepcopy__", None) is not None \
            or cls.__reduce_ex__ is not object.__reduce_ex__ or cls.__reduce__ is not object.__reduce__:
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state = {}
    for key, value in module.__getstate__().items():
        if key in ("_parameters", "_buffers") and type(value) is dict:
            state[key] = {k: memo.get(id(t), t) if t is not None else None for k, t in value.items()}
        elif key == "_modules" and type(value) is dict:
            state[key] = {k: _module_copy(m, memo) if m is not None else None for k, m in value.items()}
        else:
            state[key] = _copy_value(value, memo)
    new.__setstate__(state)
    return new


def copy_module(module: nn.Module, memo: dict | None = None) -> nn.Module:
    try:
        return copy.deepcopy(module, memo=memo)
    except Exception as exc:  # noqa: BLE001 — whatever a module holds that cannot be copied
        raise BadInput(f"{type(module).__name__} cannot be copied, which folding needs "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''})") from None


ATOMIC = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device)


def _copy_value(value, memo: dict):
    """copy.deepcopy(value, memo), with the values every module holds (flags, sizes, its empty hook
    dicts) made at once."""
    if type(value) in ATOMIC:
        return value  # immutable: deepcopy returns it as is
    if type(value) in (dict, OrderedDict) and not value:
        return type(value)()
    if type(value) is tuple and all(type(v) in ATOMIC for v in value):
        return value
    return copy.deepcopy(value, memo)


@dataclass
class Found:
    """What a graph of one module says: fold sites and kept BNs (paths relative to the module)."""

    sites: list[FoldSite] = field(default_factory=list)
    skipped: list[SkippedBN] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    untraced: list[str] = field(default_factory=list)
    branch_owners: set[str] = field(default_factory=set)  # modules whose forward sums parallel branches
    unseen: set[str] = field(default_factory=set)  # modules no fx graph showed whole (branches unknown)
    unmerged: list[UnmergedBranches] = field(default_factory=list)  # sums the graphs show cannot merge
    refused: set = field(default_factory=set)  # those sums, as their terms' module paths

    def add(self, other: "Found", prefix: str) -> None:
        join = lambda p: f"{prefix}.{p}" if p else prefix  # noqa: E731
        self.branch_owners |= {join(p) for p in other.branch_owners}
        self.unseen |= {join(p) for p in other.unseen}
        self.unmerged += [UnmergedBranches(f"{prefix}:{u.add}", u.reason) for u in other.unmerged]
        self.refused |= {frozenset(join(p) for p in terms) for terms in other.refused}
        self.sites += [s.prefixed(prefix) for s in other.sites]
        self.skipped += [SkippedBN(join(s.bn), s.reason, s.producer and join(s.producer)) for s in other.skipped]
        self.notes += [f"{prefix}: {n}" for n in other.notes]
        self.untraced += [f"{prefix}.{u}" for u in other.untraced]
