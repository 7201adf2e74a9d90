"""Where an output goes: resolved beside the input, written into a staging folder beside the
output, verified there if asked, and only then moved into place."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import OutputExists, UsageError
from ..interrupts import held


def default_output_path(src: Path, suffix: str | None = None, tag: str = "fused") -> Path:
    """NAME.fused.EXT (or NAME.<tag>.EXT) beside the input."""
    ext = suffix if suffix is not None else src.suffix
    return src.with_name(f"{src.stem}.{tag}{ext}")


def names_folder(output: str | Path | None) -> bool:
    """-o names a folder: it ends in a path separator, or is an existing folder."""
    if output is None:
        return False
    text = os.fspath(output)
    return text.endswith(("/", os.sep)) or Path(text).is_dir()


def resolve_output(src: Path, output: str | Path | None, in_place: bool, suffix: str | None = None,
                   tag: str = "fused", protected: set[Path] = frozenset()) -> Path:
    """Where to write. `protected`: resolved files the input uses (its external data), which
    no output may replace; only --in-place may replace the input itself. An `output` that
    names a folder (names_folder) gets NAME.<tag>.EXT inside it; a folder that does not exist
    is refused rather than made (a mistyped folder is not one to create)."""
    _refuse_folder_in_place(src, in_place)
    if in_place:
        if output is not None and Path(output).resolve() != Path(src).resolve():
            raise UsageError("--in-place and -o name different files; give one of them", output)
        return Path(src)
    if names_folder(output):
        if not Path(output).is_dir():
            raise UsageError("output folder does not exist (a path ending in / names a folder)", output)
        output = Path(output) / default_output_path(Path(src), suffix, tag).name
    dst = Path(output) if output is not None else default_output_path(Path(src), suffix, tag)
    if Path(src).is_dir() and Path(src).resolve() in dst.resolve().parents:
        raise OutputExists("output would be written inside the input folder; write it beside the folder", dst)
    if dst.exists() and dst.resolve() == Path(src).resolve():
        raise OutputExists("output would overwrite the input; pass --in-place to allow it", dst)
    if dst.exists() and dst.resolve() in protected:
        raise OutputExists("output would overwrite a data file the input reads", dst)
    if dst.is_dir():
        raise UsageError("output path is a directory", dst)
    if dst.exists() and not dst.is_file():
        raise UsageError("output path exists and is not a regular file (a device, FIFO or socket); refused", dst)
    if not dst.parent.is_dir():
        raise UsageError("output directory does not exist", dst.parent)
    return dst


def _refuse_folder_in_place(src: Path, in_place: bool) -> None:
    if in_place and Path(src).is_dir():
        raise UsageError("a model folder is never rewritten in place; write the result to -o OUT/", src)


def resolve_folder_output(src: Path, output: Path | None, in_place: bool, tag: str = "fused") -> Path:
    """Where a folder (a Hugging Face model) goes: `output`, or NAME.fused/ beside the input.
    Never the input folder, inside it, or a folder that holds it."""
    _refuse_folder_in_place(src, in_place)
    dst = Path(output) if output is not None else src.with_name(f"{src.name}.{tag}")
    source, target = src.resolve(), dst.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise OutputExists("output folder would be the input folder, inside it, or hold it", dst)
    if dst.exists() and not dst.is_dir():
        raise UsageError("output path exists and is not a folder (a model folder is written as a folder)", dst)
    if not dst.parent.is_dir():
        raise UsageError("output directory does not exist", dst.parent)
    return dst


class Staging:
    """A private folder beside `dst`, removed on exit whatever happens."""

    def __init__(self, dst: Path):
        self.dst = Path(dst)
        self.dir: Path | None = None

    def __enter__(self) -> "Staging":
        try:
            with held():  # a signal between mkdtemp and the assignment would leave the folder behind
                self.dir = Path(tempfile.mkdtemp(prefix=".bnfold-stage-", dir=self.dst.parent))
        except BaseException:
            self.__exit__()  # __exit__ is not called when __enter__ raises
            raise
        return self

    def __exit__(self, *exc) -> None:
        with held():
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None

    def path(self, name: str) -> Path:
        """A private file (a reference model, …), in a subfolder so it can never be taken for
        part of the output."""
        (self.dir / "private").mkdir(exist_ok=True)
        return self.dir / "private" / name

    def output(self) -> Path:
        return self.dir / self.dst.name


def move_into_place(staged: Path, dst: Path) -> list[Path]:
    """The staged file and its data files (named after it) renamed beside `dst`, data first so
    the model never points at a missing file; returns the paths written."""
    written = []
    with held():  # the model and its data move together
        for part in sorted(staged.parent.iterdir()):
            if part.is_file() and part.name.startswith(staged.name + "."):
                written.append(dst.with_name(part.name))
                os.replace(part, written[-1])
        os.replace(staged, dst)
    return [*written, dst]


def move_folder_into_place(staged: Path, dst: Path, stage: Staging) -> list[Path]:
    """The staged folder renamed to `dst`. An existing `dst` is replaced only when it holds
    nothing but files the new folder writes (an earlier run's output); it is moved into the
    staging folder first, and removed with it."""
    with held():  # the old folder goes and the new one comes together
        return _swap_folder(staged, dst, stage)


def _swap_folder(staged: Path, dst: Path, stage: "Staging") -> list[Path]:
    if dst.exists():
        ours = {p.name for p in staged.iterdir()}
        foreign = sorted(p.name for p in dst.iterdir() if p.is_symlink() or not p.is_file() or p.name not in ours)
        if foreign:
            raise OutputExists(f"output folder exists and holds {', '.join(foreign[:3])}"
                               f"{', …' if len(foreign) > 3 else ''}, which this output would not write; "
                               "choose another -o or remove them", dst)
        os.replace(dst, stage.path("replaced"))
    os.replace(staged, dst)
    return [dst / p.name for p in dst.iterdir()]


def data_name(dst: Path, protected: set[Path]) -> tuple[str, str | None]:
    """The name of the output's external data file beside `dst` (onnxfold.io.free_data_name:
    never a file the output does not own), and why it is not the usual NAME.data, if not."""
    from ..onnxfold.io import free_data_name

    name, usual = free_data_name(dst, protected), f"{Path(dst).name}.data"
    if name == usual:
        return name, None
    why = "is read by the input" if Path(dst).parent.resolve() / usual in protected else \
        "exists and is not this output's (another model may read it)"
    return name, f"external data went to {name}: {usual} {why}"


def remove_replaced(used: set[Path], written: list[Path], keep: Path) -> list[Path]:
    """After --in-place: the input's data files the new model no longer uses."""
    now = {p.resolve() for p in written}
    stale = sorted(p for p in used if p not in now and p != keep.resolve() and p.is_file())
    for path in stale:
        path.unlink()
    return stale
