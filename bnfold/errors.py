"""Errors a user can cause and fix, and the one exception a fold rule raises to decline.

Each BnfoldError maps to one line on stderr and exit code 2. Anything else that escapes
a command is a bug in bnfold: the CLI prints one line that says so and exits 3.
"""
from __future__ import annotations

from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1  # verification mismatch, benchmark below --fail-below
EXIT_BAD_INPUT = 2  # unreadable or unsupported input, bad usage, missing provider, "cannot tell"
EXIT_INTERNAL = 3  # a bug in bnfold


class Skip(Exception):
    """This BN cannot be folded exactly here; str() is the reason shown to the user.

    `warning`, where given, is also shown as a warning: the BN is not just unfoldable but
    broken (its statistics give a non-finite map)."""

    def __init__(self, reason: str, warning: str | None = None):
        super().__init__(reason)
        self.warning = warning


class BnfoldError(Exception):
    """A problem with what the user gave us; `str()` is the one line we print."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, problem: str, path: str | Path | None = None):
        self.problem = problem
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class BadInput(BnfoldError):
    """The file is missing, unreadable, or not a model we can handle."""


class UsageError(BnfoldError):
    """The options do not make sense together."""


class MissingProvider(BnfoldError):
    """An onnxruntime execution provider was asked for but is not installed."""


class OutputExists(BnfoldError):
    """Writing would overwrite the input (or another protected file)."""


class CannotTell(BnfoldError):
    """A benchmark whose interval straddles the --fail-below threshold: too noisy (or, after the
    A/A check widened it, too biased) to decide."""
