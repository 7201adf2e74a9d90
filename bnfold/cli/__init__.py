"""`bnfold` command line: each command parses, calls the library, renders, picks the exit code."""
from __future__ import annotations

import sys

# Each module registers its command; imported in the order of the data flow, which --help shows.
from . import fuse, verify, bench, calibrate  # noqa: F401,I001
from .app import app, run


def main() -> None:
    sys.exit(run(sys.argv[1:]))


__all__ = ["app", "main", "run"]
