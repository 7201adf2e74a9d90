"""The `fuse` stage: which format package folds the file, and where the result goes.

The output is written into a staging folder beside its destination; with --verify it is
verified there (against the input, or against the input with corrected statistics when
--calibrate or --variance biased changed them on purpose) and moved into place only if it
passes.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import detect
from ..errors import UsageError
from ..options import FuseOptions
from ..report import FoldReport
from .staging import (Staging, data_name, move_folder_into_place, move_into_place, names_folder, remove_replaced,
                      resolve_folder_output, resolve_output)
from .verify import verify

TORCH_SUFFIX = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}
SUFFIX_FORMAT = {".onnx": "onnx", ".pt2": "pt2"}  # -o NAME.onnx means --to onnx


def fuse_file(src: str | Path, output: str | Path | None = None, in_place: bool = False,
              options: FuseOptions | None = None) -> FoldReport:
    """Fuse the model in `src` and write it (atomically) to `output` or NAME.fused.EXT."""
    options = options or FuseOptions()
    src = Path(src)
    kind = detect.detect_format(src)
    options = _format_of_output(output, options)
    if kind == detect.ONNX and options.to not in ("same", "onnx"):
        raise UsageError(f"an ONNX model can only be written as ONNX, not --to {options.to}", src)
    suffix = ".onnx" if kind == detect.ONNX else TORCH_SUFFIX.get(options.to)
    used = _input_files(kind, src)
    folder_out = detect.is_hf_folder(src) and options.to == "same"  # a Hugging Face folder, written as one
    if folder_out:
        dst = resolve_folder_output(src, Path(output) if output else None, in_place)
        data, why = None, None
    else:
        dst = resolve_output(src, output, in_place, suffix, protected=used)
        onnx_out = kind == detect.ONNX or options.to == "onnx"  # only an ONNX output has external data
        data, why = data_name(dst, used) if onnx_out else (None, None)
    with Staging(dst) as stage:
        staged = stage.output()
        reference = None
        if options.verify is not None and options.changes_statistics:
            reference = stage.path("reference.onnx" if kind == detect.ONNX else "reference.pt")
        report = _fuse(kind, src, staged, options, reference, data)
        if options.verify is not None and not _verified(src, reference, staged, options, report):
            return report
        written = move_folder_into_place(staged, dst, stage) if folder_out else move_into_place(staged, dst)
    if why is not None and any(p.name == data for p in written):
        report.notes.append(why)
    if in_place:
        report.notes += [f"removed {p.name}: the input's data, replaced" for p in remove_replaced(used, written, dst)]
    report.output = str(dst)
    report.size_after = _output_size(dst, kind, options)
    return report


def _format_of_output(output: str | Path | None, options: FuseOptions) -> FuseOptions:
    """An output never claims a format it is not in: -o NAME.onnx is --to onnx, NAME.pt2 --to pt2,
    and a --to that contradicts the name is a usage error."""
    if output is None or names_folder(output):
        return options
    implied = SUFFIX_FORMAT.get(Path(output).suffix.lower())
    if implied is None and options.to in SUFFIX_FORMAT.values():
        raise UsageError(f"--to {options.to} writes {options.to.upper()}, but -o {output} does not end in "
                         f"{TORCH_SUFFIX[options.to]}")
    if implied is None or options.to == implied:
        return options
    if options.to != "same":
        raise UsageError(f"--to {options.to} contradicts -o {output} (a {Path(output).suffix} file is {implied})")
    return dataclasses.replace(options, to=implied)


def _input_files(kind: str, src: Path) -> set[Path]:
    if kind == detect.ONNX:
        from ..onnxfold.io import input_files

        return input_files(src)
    if src.is_dir():  # a Hugging Face folder: no output replaces any file in it
        return {src.resolve(), *(p.resolve() for p in src.iterdir())}
    return {src.resolve()}


def _fuse(kind: str, src: Path, staged: Path, options: FuseOptions, reference: Path | None,
          data_name: str) -> FoldReport:
    if kind == detect.ONNX:
        from ..onnxfold.fuse import fuse_onnx_file

        return fuse_onnx_file(src, staged, options, reference, data_name)
    from ..torchfold.fuse import fuse_torch_file  # torch is imported only on the torch path

    return fuse_torch_file(src, staged, options, reference)


def _verified(src: Path, reference: Path | None, staged: Path, options: FuseOptions, report: FoldReport) -> bool:
    """Verify the staged output against the input, or against the reference (the input with
    corrected statistics) staged beside it; that reference is our own file, so a pickle of it
    may be loaded."""
    baseline = reference or src
    ours = reference is not None
    load = dataclasses.replace(options.load, trust_pickle=True) if ours else options.load
    report.verify = verify(baseline, staged, options.verify, load)
    if ours:
        report.verify.original = f"{report.input} with its corrected statistics, before folding"
    return report.verify.passed


def _output_size(dst: Path, kind: str, options: FuseOptions) -> int:
    if kind == detect.ONNX or options.to == "onnx":
        from ..onnxfold.io import file_size

        return file_size(dst)
    return detect.stored_size(dst)
