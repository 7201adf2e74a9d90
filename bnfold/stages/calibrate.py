"""The `calibrate` stage: recompute every BN's statistics from data (Algorithm 2) and write the
model in its own format (NAME.calibrated.EXT)."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .. import detect
from ..options import CalibrateOptions, LoadOptions, VarianceOptions
from ..report import CalibrationReport
from .staging import (Staging, data_name, move_folder_into_place, move_into_place, remove_replaced,
                      resolve_folder_output, resolve_output)


def calibrate_file(src: str | Path, options: CalibrateOptions, output: str | Path | None = None,
                   in_place: bool = False, variance: VarianceOptions | None = None, load: LoadOptions | None = None,
                   progress: Callable[[int, int], None] | None = None) -> CalibrationReport:
    start = time.perf_counter()
    src = Path(src)
    variance, load = variance or VarianceOptions(), load or LoadOptions()
    onnx_input = detect.detect_format(src) == detect.ONNX
    used = _input_files(src) if onnx_input else {src.resolve()}
    folder = detect.is_hf_folder(src)  # a Hugging Face folder is written as a folder
    if folder:
        dst = resolve_folder_output(src, Path(output) if output else None, in_place, tag="calibrated")
        data, why = None, None
    else:
        dst = resolve_output(src, output, in_place, tag="calibrated", protected=used)
        data, why = data_name(dst, used)
    with Staging(dst) as stage:
        staged = stage.output()
        if onnx_input:
            from ..onnxfold.calibrate import calibrate_onnx_file

            report = calibrate_onnx_file(src, staged, options, variance, progress, data)
        else:
            from ..torchfold.calibrate import calibrate_torch_file  # torch only on the torch path

            report = calibrate_torch_file(src, staged, options, variance, load, progress)
        written = move_folder_into_place(staged, dst, stage) if folder else move_into_place(staged, dst)
    if why is not None and any(p.name == data for p in written):
        report.notes.append(why)
    if in_place:
        remove_replaced(used, written, dst)
    report.input, report.output = str(src), str(dst)
    report.seconds = time.perf_counter() - start
    return report


def _input_files(src: Path) -> set[Path]:
    from ..onnxfold.io import input_files

    return input_files(src)
