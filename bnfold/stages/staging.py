"""Where an output goes: resolved beside the input, written into a staging folder beside the
output, verified there if asked, and only then moved into place."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import OutputExists, UsageError


def default_output_path(src: Path, suffix: str | None = None, tag: str = "fused") -> Path:
    """NAME.fused.EXT (or NAME.<tag>.EXT) beside the input."""
    ext = suffix if suffix is not None else src.suffix
    return src.with_name(f"{src.stem}.{tag}{ext}")


def resolve_output(src: Path, output: Path | None, in_place: bool, suffix: str | None = None,
                   tag: str = "fused") -> Path:
    if in_place:
        if output is not None and Path(output).resolve() != Path(src).resolve():
            raise UsageError("--in-place and -o name different files; give one of them", output)
        return Path(src)
    dst = Path(output) if output is not None else default_output_path(Path(src), suffix, tag)
    if dst.exists() and dst.resolve() == Path(src).resolve():
        raise OutputExists("output would overwrite the input; pass --in-place to allow it", dst)
    if dst.is_dir():
        raise UsageError("output path is a directory", dst)
    if not dst.parent.exists():
        raise UsageError("output directory does not exist", dst.parent)
    return dst


class Staging:
    """A private folder beside `dst`, removed on exit whatever happens."""

    def __init__(self, dst: Path):
        self.dst = Path(dst)
        self.dir: Path | None = None

    def __enter__(self) -> "Staging":
        self.dir = Path(tempfile.mkdtemp(prefix=".bnfold-stage-", dir=self.dst.parent))
        return self

    def __exit__(self, *exc) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def path(self, name: str) -> Path:
        return self.dir / name

    def output(self) -> Path:
        return self.dir / self.dst.name


def move_into_place(staged: Path, dst: Path) -> None:
    """The staged file and its external-data file, if it has one, renamed over `dst`."""
    data = staged.with_name(staged.name + ".data")
    if data.exists():
        os.replace(data, dst.with_name(dst.name + ".data"))
    os.replace(staged, dst)
