"""The Typer app and the one place that turns errors into exit codes."""
from __future__ import annotations

import errno
import os
import signal
import traceback

import typer
from typer._click.exceptions import UsageError as ClickUsageError
from rich.console import Console

from .. import interrupts
from ..errors import EXIT_BAD_INPUT, EXIT_INTERNAL, BnfoldError
from ..render.terminal import libraries_silenced, own_stderr, printable

app = typer.Typer(
    name="bnfold",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's plain help: full option names at any width, no "<bool>" after flags, and
    # readable when piped into a file or a pager.
    rich_markup_mode=None,
)

DEBUG_ENV = "BNFOLD_DEBUG"


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"bnfold {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Fold BatchNormalization into the layer before it, and prove nothing changed.

    Exit codes: 0 success; 1 verification mismatch or benchmark below --fail-below;
    2 bad input or usage (or a benchmark too noisy to tell); 3 internal error (a bug).
    Errors are one line on stderr; BNFOLD_DEBUG=1 shows the traceback.
    """


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code. Usage errors are click's (exit 2)."""
    previous = {sig: signal.signal(sig, interrupts.handle) for sig in interrupts.HANDLED}
    try:
        with libraries_silenced(debug=bool(os.environ.get(DEBUG_ENV))):
            return _run(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(argv: list[str] | None) -> int:
    try:
        code = app(args=argv, prog_name="bnfold", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except (KeyboardInterrupt, interrupts.Interrupted) as exc:
        signum = exc.signum if isinstance(exc, interrupts.Interrupted) else signal.SIGINT
        _say(f"bnfold: interrupted by {signal.Signals(signum).name}; nothing was written")
        return 128 + signum
    except ClickUsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `bnfold` alone: the help, as click shows it
            exc.show(file=own_stderr())
            return exc.exit_code
        # One line, like every other error (click's own form is four: usage, hint, blank, error).
        where = exc.ctx.command_path if exc.ctx is not None else "bnfold"
        _say(f"bnfold: error: {exc.format_message()} (see {where} --help)")
        return EXIT_BAD_INPUT
    except OSError as exc:  # the disk is full, a folder is not writable, …: the machine, not the model
        _debug()
        where = f"{exc.filename}: " if exc.filename else ""
        full = "; the disk is full or a file-size limit was reached, nothing was written" \
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else ""
        _say(f"bnfold: error: {where}{exc.strerror or exc}{full} (set {DEBUG_ENV}=1 for the traceback)")
        return EXIT_BAD_INPUT
    except BnfoldError as exc:
        _debug()
        # One line: scripts grep it, people read it; the traceback is one variable away.
        _say(f"bnfold: error: {exc} (set {DEBUG_ENV}=1 for the traceback)")
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 — anything else is a bug in bnfold: one line, exit 3
        _debug()
        if _out_of_memory(exc):  # inputs or a model too big for this machine: the request, not a bug
            _say("bnfold: error: out of memory (the model or the inputs asked for are too big for this machine; "
                 f"try smaller --shape / --batch-size) (set {DEBUG_ENV}=1 for the traceback)")
            return EXIT_BAD_INPUT
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        _say(f"bnfold: internal error (a bug in bnfold, please report it): {type(exc).__name__}"
             f"{': ' + detail if detail else ''} (set {DEBUG_ENV}=1 for the traceback)")
        return EXIT_INTERNAL


def _out_of_memory(exc: Exception) -> bool:
    """numpy says a failed allocation with MemoryError, torch with a RuntimeError (on a GPU
    its OutOfMemoryError)."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def _debug() -> None:
    """With BNFOLD_DEBUG set, the traceback goes to stderr too; the exit code stays the one the
    error means (a CI job with debugging on must not read bad input as a failed gate)."""
    if os.environ.get(DEBUG_ENV):
        traceback.print_exc(file=own_stderr())


def _say(line: str) -> None:
    """One line on stderr: names from files and options in it are shown with their control
    characters escaped, so a file name with a newline cannot split it, nor ESC sequences
    recolour the terminal."""
    Console(file=own_stderr(), highlight=False, soft_wrap=True, emoji=False).print(printable(line), markup=False)
