"""`bnfold` command line: each command parses, calls the library, renders, picks the exit code."""
from __future__ import annotations

import gc
import sys

# Each module registers its command; imported in the order of the data flow, which --help shows.
from . import fuse, verify, bench, calibrate  # noqa: F401,I001
from .app import app, run


def main() -> None:
    code = run(sys.argv[1:])
    # The process ends here, its outputs written and closed. Python's collections at exit would
    # walk every object torch made to free memory the OS takes back anyway: 0.3-0.4 s of a 2-core
    # machine's exit. Frozen, they are skipped (objects still go when their last reference does).
    gc.freeze()
    sys.exit(code)


__all__ = ["app", "main", "run"]
