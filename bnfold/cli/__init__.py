"""`bnfold` command line: each command parses, calls the library, renders, picks the exit code."""
from __future__ import annotations

import sys

from .app import app, run
from . import fuse as _fuse  # noqa: F401  (registers the command)

for _name in ("verify", "bench", "calibrate"):
    try:  # each command lives in its own module
        __import__(f"{__name__}.{_name}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"{__name__}.{_name}":
            raise


def main() -> None:
    sys.exit(run(sys.argv[1:]))


__all__ = ["app", "main", "run"]
