"""`bnfold` command line: each command parses, calls the library, renders, picks the exit code."""
from __future__ import annotations

import sys

from . import bench, calibrate, fuse, verify  # noqa: F401  (each registers its command)
from .app import app, run


def main() -> None:
    sys.exit(run(sys.argv[1:]))


__all__ = ["app", "main", "run"]
