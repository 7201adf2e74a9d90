"""What modules receive when a model runs: forward pre-hooks that keep something of each
module's input, removed however the run ends."""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager

from torch import nn


class InputHook:
    """Keeps `keep(args)` of a module's positional inputs under `key` (only the first call's
    with `first_only`). A class, not a closure, so a module can be deep-copied while hooked."""

    def __init__(self, store: dict, key: Hashable, keep: Callable[[tuple], object], first_only: bool):
        self.store, self.key, self.keep, self.first_only = store, key, keep, first_only

    def __call__(self, _module, args) -> None:
        if not (self.first_only and self.key in self.store):
            self.store[self.key] = self.keep(args)


@contextmanager
def recording_inputs(modules: Iterable[tuple[Hashable, nn.Module]], keep: Callable[[tuple], object],
                     first_only: bool = False) -> Iterator[dict]:
    """A dict filled, while the block runs, with keep(inputs) of each (key, module)."""
    store: dict = {}
    handles = [m.register_forward_pre_hook(InputHook(store, key, keep, first_only)) for key, m in modules]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()
