"""A fold site found on a graph (fx, ATen or TorchScript), named by attribute paths: the graph
says *where* a BN can fold; the module is changed by name (apply.py).

Finding sites on a throwaway copy and applying them by name keeps the module the user gave
clean: tracing or exporting runs its forward, which may cache things on it (timm's LeViT keeps
attention biases in a dict: an fx Proxy there makes the module unpicklable).
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

from torch import nn

from ..errors import BadInput
from ..report import SkippedBN
from .site_rule import FoldSite


def owner(path: str | None) -> str:
    return path.rpartition(".")[0] if path else ""


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


@dataclass
class Found:
    """What a graph of one module says: fold sites and kept BNs (paths relative to the module)."""

    sites: list[FoldSite] = field(default_factory=list)
    skipped: list[SkippedBN] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    untraced: list[str] = field(default_factory=list)
    branch_owners: set[str] = field(default_factory=set)  # modules whose forward sums parallel branches
    unseen: set[str] = field(default_factory=set)  # modules no fx graph showed whole (branches unknown)

    def add(self, other: "Found", prefix: str) -> None:
        join = lambda p: f"{prefix}.{p}" if p else prefix  # noqa: E731
        self.branch_owners |= {join(p) for p in other.branch_owners}
        self.unseen |= {join(p) for p in other.unseen}
        self.sites += [s.prefixed(prefix) for s in other.sites]
        self.skipped += [SkippedBN(join(s.bn), s.reason, s.producer and join(s.producer)) for s in other.skipped]
        self.notes += [f"{prefix}: {n}" for n in other.notes]
        self.untraced += [f"{prefix}.{u}" for u in other.untraced]
