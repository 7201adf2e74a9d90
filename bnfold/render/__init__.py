"""All rendering: rich for people, one JSON document for programs.

Data goes to stdout; warnings, progress and errors go to stderr. Progress bars are shown
only when stderr is a terminal and --json is off.
"""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.markup import escape
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..report import to_plain
from .terminal import own_stderr, printable


class Output:
    def __init__(self, as_json: bool = False):
        self.as_json = as_json
        # emoji off: a node named ":fire:" is shown as written
        self.out = Console(highlight=False, soft_wrap=False, emoji=False)
        self.err = Console(file=own_stderr(), highlight=False, emoji=False)

    def json(self, report: Any) -> None:
        data = report.to_dict() if hasattr(report, "to_dict") else to_plain(report)
        sys.stdout.write(json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")
        sys.stdout.flush()

    def handled_as_json(self, report: Any) -> bool:
        """The start of every renderer: the report's warnings to stderr, then with --json the
        whole report as one document (True: nothing more to render)."""
        for message in getattr(report, "warnings", []):
            self.warn(message)
        if self.as_json:
            self.json(report)
        return self.as_json

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/] {plain(message)}", highlight=False)

    @contextmanager
    def status(self, message: str) -> Iterator[None]:
        """A spinner on stderr for work without countable steps; silent off a terminal or with --json."""
        if self.err.is_terminal and not self.as_json:
            with self.err.status(plain(message)):
                yield
        else:
            yield

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator["ProgressTick"]:
        """A progress bar on stderr; a no-op when stderr is not a terminal or with --json."""
        enabled = self.err.is_terminal and not self.as_json
        bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.err, transient=True, disable=not enabled,
        )
        with bar:
            task = bar.add_task(description, total=total)
            yield ProgressTick(bar, task)


class ProgressTick:
    """Callable handed to library functions: tick(done, total) updates the bar."""

    def __init__(self, bar: Progress, task):
        self.bar, self.task = bar, task

    def __call__(self, done: int, total: int | None = None) -> None:
        self.bar.update(self.task, completed=done, total=total)


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def plain(value) -> str:
    """Text from a model or the user (names, paths, reasons), safe to print in rich markup:
    control characters are shown as escapes (terminal.printable) and rich markup is escaped,
    so a node named "[/]" or "\x1b[2J" is shown, not interpreted."""
    return escape(printable(value))


def table(title: str, columns: tuple[str, ...], rows) -> Table:
    """A table whose string cells are plain text; styled cells are passed as rich Text."""
    t = Table(title=plain(title), title_justify="left")
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*(cell if isinstance(cell, Text) else plain(cell) for cell in row))
    return t


def variance_table(corrections) -> Table:
    return table("stored variance corrected by m/(m−1)", ("BN", "m", "factor"),
                 ((v.bn, str(v.values_per_channel), f"{v.factor:.6g}") for v in corrections))
