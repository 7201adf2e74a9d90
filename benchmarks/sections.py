"""The part of a markdown file a benchmark script owns: between `<!-- NAME:begin -->` and
`<!-- NAME:end -->`, replaced on every run so the prose around it stays the author's."""
from __future__ import annotations

from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(path: Path, text: str, name: str) -> None:
    """`text` between NAME's markers in `path` (appended, with them, the first time)."""
    begin, end = markers(name)
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)
