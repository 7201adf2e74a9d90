"""Fuse an ONNX model: correct or recompute the statistics if asked, fold, write."""
from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from functools import partial
from pathlib import Path

import onnx

from ..detect import ONNX
from ..errors import BnfoldError
from ..options import FuseOptions, VarianceOptions
from ..report import CalibrationReport, FoldReport
from .calibrate import calibrate
from .fold_pass import fold_model
from .index import TensorSpill
from .io import OnnxSource, file_size, input_also_invalid, load_onnx, model_from, save_onnx
from .variance import correct_biased_variance


def fuse_onnx(model_or_path: onnx.ModelProto | str | Path, options: FuseOptions | None = None,
              base_dir: str | Path | None = None, spill: TensorSpill | None = None,
              reference: Path | None = None) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every foldable BN of an ONNX model; returns the new model and a report.

    A path is loaded without its external data; tensors that stay external keep pointing
    into `base_dir` (the input's folder), so write the result with `bnfold.save_onnx`.
    An in-memory model is changed in place. `reference` receives the model as it is just
    before folding (statistics corrected, nothing folded): what the fused model must equal.
    """
    options = options or FuseOptions()
    model, name, base = model_from(model_or_path, base_dir)
    report = FoldReport(input=name, output=None, format=ONNX)
    if options.variance.biased:
        report.variance = correct_biased_variance(model, base, options.variance, path=name)
    if reference is not None:
        save_onnx(copy.deepcopy(model), reference, base_dir=base)
    fold_model(model, base, report, spill, standalone=options.standalone)
    return model, report


def fuse_onnx_file(src: Path, target: Path, options: FuseOptions, reference: Path | None = None,
                   data_name: str | None = None) -> FoldReport:
    """Fuse the ONNX file `src` into `target`. New payloads spill to a scratch file beside
    `target`, so a large model never holds more than one folded tensor in memory."""
    start = time.perf_counter()
    source = load_onnx(src, lazy=options.calibrate is None)
    size_before = file_size(src, source.model)
    calibration = _calibrate_first(source, options)
    if calibration is not None:
        # Calibration wrote unbiased population statistics; correcting them again would
        # apply m/(m−1) twice.
        options = dataclasses.replace(options, variance=VarianceOptions())
    with tempfile.TemporaryDirectory(prefix=".bnfold-scratch-", dir=target.parent) as scratch:
        spill = TensorSpill(scratch)
        try:
            model, report = _named(src, fuse_onnx, source.model, options, base_dir=source.base_dir, spill=spill,
                                   reference=reference)
            report.input = str(src)
            if calibration is not None:
                report.calibration, report.variance = calibration, calibration.variance
            save_onnx(model, target, base_dir=source.base_dir, external=source.has_external_data or None,
                      accept_invalid=partial(input_also_invalid, src, report.warnings), data_name=data_name)
        finally:
            spill.close()
    report.size_before = size_before
    report.seconds = time.perf_counter() - start
    return report


def _named(src: Path, fold, *args, **kwargs):
    """fold(*args, **kwargs), its errors naming `src`: the model was handed over in memory."""
    try:
        return fold(*args, **kwargs)
    except BnfoldError as exc:
        if exc.path not in (None, "<memory>"):
            raise
        raise type(exc)(exc.problem, src) from None


def _calibrate_first(source: OnnxSource, options: FuseOptions) -> CalibrationReport | None:
    if options.calibrate is None:
        return None
    _, report = calibrate(source.model, options.calibrate, options.variance, base_dir=source.base_dir)
    report.input = str(source.path)
    return report
