"""The Typer app and the one place that turns errors into exit codes."""
from __future__ import annotations

import os

import typer
from rich.console import Console

from ..errors import BnfoldError

app = typer.Typer(
    name="bnfold",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEBUG_ENV = "BNFOLD_DEBUG"


@app.callback()
def _root() -> None:
    """Fold BatchNormalization into the layer before it, and prove nothing changed.

    Exit codes: 0 success, 1 verification or benchmark failure, 2 bad input or usage.
    Errors are one line on stderr; BNFOLD_DEBUG=1 shows the traceback.
    """


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code. Usage errors are click's (exit 2)."""
    try:
        app(args=argv, prog_name="bnfold")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except BnfoldError as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        err = Console(stderr=True, highlight=False, soft_wrap=True)
        # One line: scripts grep it, people read it; the traceback is one variable away.
        err.print(f"bnfold: error: {exc} (set {DEBUG_ENV}=1 for the traceback)", markup=False)
        return exc.exit_code
    return 0
