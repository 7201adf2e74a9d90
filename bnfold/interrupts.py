"""Ctrl-C, SIGTERM and SIGHUP as exceptions raised where the program is, so every staging
folder and scratch file is removed on the way out (SIGTERM's default action would kill the
process on the spot), and the few steps a signal must not cut in half.

A signal that arrives inside `held()` is raised when the block ends: between creating a
staging folder and remembering it (the folder would be left behind), while removing it, or
while the data file and the model are renamed into place one after the other.
"""
from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_held = 0
_pending: int | None = None


class Interrupted(BaseException):
    """SIGTERM or SIGHUP (Ctrl-C stays KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def handle(signum: int, _frame) -> None:
    """The handler the CLI installs for HANDLED."""
    global _pending
    if _held:
        _pending = signum
        return
    _raise(signum)


@contextmanager
def held() -> Iterator[None]:
    """Signals that arrive inside are raised when the block ends."""
    global _held, _pending
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held and _pending is not None:
            signum, _pending = _pending, None
            _raise(signum)


def _raise(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(signum)
