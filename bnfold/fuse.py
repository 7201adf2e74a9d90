"""The `fuse` stage: load → fold → save, for any supported format. Returns a FoldReport."""
from __future__ import annotations

import copy
import os
import tempfile
import time
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from . import formats
from .errors import UsageError
from .onnx_graph import TensorSpill
from .onnx_io import OnnxSource, file_size, load_onnx, resolve_output, save_onnx
from .onnx_pass import fold_model
from .report import FoldReport


@dataclass
class FuseOptions:
    """Everything `bnfold fuse` can be told; the defaults are what a user gets with no flags."""

    # What to do with a BN that cannot be folded: "keep" it, or rewrite it as Mul+Add ("affine").
    standalone: str = "keep"
    # Stored variance: "unbiased" (use as is) or "biased" (× m/(m−1), SPEC §3).
    variance: str = "unbiased"
    batch_size: int | None = None
    values_per_channel: int | None = None
    # Torch inputs (SPEC §1).
    to: str = "same"  # "same", "onnx", "pt2", "torchscript"
    trust_pickle: bool = False
    arch: str | None = None
    arch_kwargs: dict = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    example_input: Path | None = None
    # Recompute BN statistics from this data first (`fuse --calibrate D --batch-size N`).
    calibrate: Path | None = None
    upstream: str = "batch"
    # Verify before the output is put in place (`fuse --verify`); nothing is written on a mismatch.
    verify: bool = False


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
    if isinstance(model_or_path, onnx.ModelProto):
        model, name = model_or_path, "<memory>"
        base = Path(base_dir or ".")
    else:
        source = load_onnx(model_or_path, lazy=False)
        model, name, base = source.model, str(source.path), source.base_dir
    report = FoldReport(input=name, output=None, format=formats.ONNX)
    _correct_variance(model, base, options, report, name)
    if reference is not None:
        save_onnx(copy.deepcopy(model), reference, base_dir=base)
    if options.standalone not in ("keep", "affine"):
        raise UsageError(f"--standalone must be 'keep' or 'affine', not {options.standalone!r}")
    fold_model(model, base, report, spill, standalone=options.standalone)
    return model, report


def _correct_variance(model: onnx.ModelProto, base: Path, options: FuseOptions, report: FoldReport,
                      name: str) -> None:
    if options.variance == "unbiased":
        return
    if options.variance != "biased":
        raise UsageError(f"--variance must be 'unbiased' or 'biased', not {options.variance!r}")
    from .variance import correct_biased_variance

    report.variance = correct_biased_variance(
        model, base, batch_size=options.batch_size, values_per_channel=options.values_per_channel, path=name)


def fuse_file(src: str | Path, output: str | Path | None = None, in_place: bool = False,
              options: FuseOptions | None = None) -> FoldReport:
    """Fuse the model in `src` and write it (atomically) to `output` or NAME.fused.EXT."""
    options = options or FuseOptions()
    start = time.perf_counter()
    src = Path(src)
    kind = formats.detect_format(src)
    if kind == formats.TORCH:
        from .torch_fuse import fuse_torch_file

        return fuse_torch_file(src, output, in_place, options)
    dst = resolve_output(src, Path(output) if output else None, in_place, suffix=".onnx")
    if options.to not in ("same", "onnx"):
        raise UsageError(f"an ONNX model can only be written as ONNX, not --to {options.to}", src)
    source: OnnxSource = load_onnx(src, lazy=options.calibrate is None)
    size_before = file_size(src, source.model)
    calibration = _calibrate_first(source, options)
    with tempfile.TemporaryDirectory(prefix=".bnfold-scratch-", dir=dst.parent) as scratch:
        spill = TensorSpill(scratch)
        try:
            reference = Path(scratch) / "reference.onnx" if options.verify and changes_statistics(options) else None
            model, report = fuse_onnx(source.model, options, base_dir=source.base_dir, spill=spill,
                                      reference=reference)
            report.input, report.calibration = str(src), calibration
            staged = Path(scratch) / dst.name if options.verify else dst
            save_onnx(model, staged, base_dir=source.base_dir, external=source.has_external_data or None,
                      accept_invalid=partial(_input_also_invalid, src, report))
        finally:
            spill.close()
        if options.verify and not verify_staged(reference or src, staged, dst, options, report):
            report.seconds = time.perf_counter() - start
            return report
    report.output = str(dst)
    report.size_before = size_before
    report.size_after = file_size(dst)
    report.seconds = time.perf_counter() - start
    return report


def _calibrate_first(source: OnnxSource, options: FuseOptions):
    if options.calibrate is None:
        return None
    if options.batch_size is None:
        raise UsageError("--calibrate needs --batch-size N")
    from .calibrate import calibrate

    model, report = calibrate(source.model, options.calibrate, options.batch_size, upstream=options.upstream)
    report.input = str(source.path)
    return report


def changes_statistics(options: FuseOptions) -> bool:
    """--calibrate and --variance biased change what the model computes, on purpose: the
    fused model is then verified against the corrected model, not against the input."""
    return options.calibrate is not None or options.variance != "unbiased"


def verify_staged(baseline: Path, staged: Path, dst: Path, options, report: FoldReport) -> bool:
    """Verify the staged output against `baseline` (the input, or the input with corrected
    statistics; torch in torch, or in onnxruntime for --to onnx); move it, and its data file,
    into place only if it passes."""
    from .verify import verify

    report.verify = verify(baseline, staged, shapes=options.shapes or None, torch_options=options)
    if baseline.parent == staged.parent:  # a reference the fuse staged beside its output
        report.verify.original = f"{report.input} with its corrected statistics, before folding"
    if not report.verify.passed:
        report.output = None
        return False
    data = staged.with_name(staged.name + ".data")
    if data.exists():
        os.replace(data, dst.with_name(dst.name + ".data"))
    os.replace(staged, dst)
    return True


def _input_also_invalid(src: Path, report: FoldReport, error: Exception) -> bool:
    """A checker failure is ours only if the input passes the same check."""
    try:
        onnx.checker.check_model(str(src), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as src_error:
        first = str(src_error).strip().splitlines()[0][:160] if str(src_error).strip() else type(src_error).__name__
        report.warnings.append(f"the input already fails onnx.checker ({first}); the output was not held to it")
        return True
    return False
