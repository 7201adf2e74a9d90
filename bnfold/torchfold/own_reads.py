"""Tensors a module's own forward reads outside its children's calls, seen by running it once.

A module fx cannot trace whose children are folded one by one may still read a child's tensor
itself (`F.conv2d(x, self.block[0].weight)` beside `self.block(x)`): folding that child would
change this use too. No graph shows it, so one run of a copy on the module's input records every
tensor passed to a torch function while none of its children is running.
"""
from __future__ import annotations

import contextlib
import io

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .params import tensor_key
from .sites import analysis_copy


class _Depth:
    """Counts the submodules running: forward hooks that survive a deepcopy (no closures)."""

    def __init__(self):
        self.running = 0

    def enter(self, _module, _args) -> None:
        self.running += 1

    def leave(self, _module, _args, _output) -> None:
        self.running -= 1


class _Reads(TorchFunctionMode):
    def __init__(self, depth: _Depth):
        super().__init__()
        self.depth, self.seen = depth, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth.running == 0:
            self.seen.update(tensor_key(a) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor))
        return func(*args, **kwargs)


def read_by_own_forward(module: nn.Module, example: tuple) -> set | None:
    """Keys (params.tensor_key) of the tensors the module's forward passes to torch functions
    outside its children's calls; None when it could not run."""
    probe = analysis_copy(module)
    depth = _Depth()
    # every submodule, not only the children: a forward may call a grandchild directly (a ModuleList's)
    inner = [m for m in probe.modules() if m is not probe]
    handles = [h for child in inner for h in (child.register_forward_pre_hook(depth.enter),
                                              child.register_forward_hook(depth.leave, always_call=True))]
    mode = _Reads(depth)
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()), mode:
            probe(*example)
    except Exception:  # noqa: BLE001 — a module that cannot run on its input is not known to read nothing
        return None
    finally:
        for handle in handles:
            handle.remove()
    mode.seen.discard(None)
    return mode.seen
