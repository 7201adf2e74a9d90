"""The `bench` stage: time the original (A) against the fused model (B).

Without B the original is fused on the fly. ONNX runs in onnxruntime. A torch checkpoint runs
in torch (where torch users deploy) and, as its ONNX export, in onnxruntime; `--runtime`
picks. The thread count is chosen once, from the load before any work starts.
"""
from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

from .. import detect
from ..check.timing import (AA_BIASED, CANNOT_TELL, FAIL, PASS, choose_threads, half_width, offset_progress,
                            threshold_outcome)
from ..errors import UsageError
from ..options import BenchOptions, FuseOptions, LoadOptions
from ..report import BenchReport, ModelInfo
from .fuse import fuse_file

ONNXRUNTIME, TORCH = "onnxruntime", "torch"


def bench(original: str | Path, fused: str | Path | None = None, options: BenchOptions | None = None,
          load: LoadOptions | None = None, progress: Callable[[int, int], None] | None = None) -> BenchReport:
    original, fused = Path(original), Path(fused) if fused is not None else None
    options, load = options or BenchOptions(), load or LoadOptions()
    # A torch model's fold and ONNX export see the inputs bench times: --shape, and --data as example input
    load = dataclasses.replace(load, shapes=options.shapes or load.shapes,
                               example_input=options.data or load.example_input)
    is_torch = detect.detect_format(original) == detect.TORCH
    if options.batch_sizes is None:
        options = dataclasses.replace(options, batch_sizes=(default_batch(original, is_torch, load),))
    if (options.data or options.shapes) and len(options.batch_sizes) > 1:  # their batch is the only one
        options = dataclasses.replace(options, batch_sizes=options.batch_sizes[:1])
    if options.torch_forms and not is_torch:
        raise UsageError(f"--torch-form is for torch checkpoints; {original} is ONNX")
    runtimes, notes = choose_runtimes(options.runtimes, original, fused, is_torch)
    _check_providers(runtimes, options.providers)
    threads, reason, busy = choose_threads(options.threads)
    report = BenchReport(ModelInfo(str(original), 0, None, None), ModelInfo("", 0, None, None), threads,
                         options.warmup, options.seed, reason, options.blocks,
                         None if options.runs else options.timed_seconds, options.runs, runtimes, notes=notes,
                         aa_checked=options.checks_aa)
    with tempfile.TemporaryDirectory(prefix="bnfold-bench-") as tmp:
        for j, runtime in enumerate(runtimes):
            step = offset_progress(progress, j, len(runtimes))
            if runtime == TORCH:
                _run_torch(report, original, fused, options, load, Path(tmp), busy, step)
            else:
                _run_onnxruntime(report, original, fused, options, load, Path(tmp), is_torch, busy, step)
    if fused is None:
        report.fused.path = "(fused on the fly)"
    if options.data or options.shapes:
        report.notes.append(f"inputs from {'--data' if options.data else '--shape'}: batch sizes come from there")
    if options.fail_below is not None:
        apply_fail_below(report, options.fail_below)
    return report


def default_batch(original: Path, is_torch: bool, load: LoadOptions) -> int:
    """Without --batch-size: the batch size the model fixes (an ONNX input's first dimension, an
    exported program's), which is the only one it runs at; else 1."""
    if is_torch:
        from ..torchfold.inputs import program_batch

        return program_batch(original, load) or 1
    from ..onnxfold.io import fixed_batch, read_signature

    return fixed_batch(read_signature(original)) or 1


def choose_runtimes(asked: tuple[str, ...], original: Path, fused: Path | None, is_torch: bool
                    ) -> tuple[list[str], list[str]]:
    """The runtimes to time, and notes. "auto": onnxruntime for ONNX; torch and onnxruntime
    for a torch checkpoint (torch needs B in torch too)."""
    fused_onnx = fused is not None and detect.detect_format(fused) == detect.ONNX
    if "auto" in asked:
        if not is_torch:
            return [ONNXRUNTIME], []
        if fused_onnx:
            return [ONNXRUNTIME], ["torch runtime not timed: B is an ONNX file"]
        return [TORCH, ONNXRUNTIME], []
    if TORCH in asked and not is_torch:
        raise UsageError(f"--runtime torch needs a torch checkpoint; {original} is ONNX (use --runtime onnxruntime)")
    if TORCH in asked and fused_onnx:
        raise UsageError(f"--runtime torch needs B in torch too; {fused} is ONNX")
    return [r for r in (TORCH, ONNXRUNTIME) if r in asked], []


def _check_providers(runtimes: list[str], providers: tuple[str, ...]) -> None:
    """Before any work: a provider neither runtime has is exit 2, naming what to install."""
    if ONNXRUNTIME in runtimes:
        from ..onnxfold.bench import resolve_providers

        resolve_providers(providers)
    if TORCH in runtimes:
        from ..torchfold.bench import torch_devices

        torch_devices(providers)


def _run_torch(report: BenchReport, original: Path, fused: Path | None, options: BenchOptions, load: LoadOptions,
               tmp: Path, busy: float | None, progress) -> None:
    from ..torchfold.bench import bench_torch

    results, a, b, inputs, notes = bench_torch(original, fused, options, load, report.threads, tmp, busy, progress)
    report.results += results
    report.original, report.fused, report.inputs = a, b, inputs
    report.notes += notes


def _run_onnxruntime(report: BenchReport, original: Path, fused: Path | None, options: BenchOptions,
                     load: LoadOptions, tmp: Path, is_torch: bool, busy: float | None, progress) -> None:
    from ..onnxfold.bench import bench_onnx, cpu_fallback

    if is_torch:
        onnx_a, onnx_b = _torch_as_onnx(original, fused, tmp, load, options)
        options = _batches_the_export_takes(onnx_a, original, options, load, report.notes)
        if options is None:
            return
        if options.shapes or options.data:  # one input, two names: the forward's (x) or the export's (input)
            from ..torchfold.inputs import for_the_export

            shapes, data = for_the_export(original, load, options.data, tmp)
            options = dataclasses.replace(options, shapes=shapes, data=data)
    else:
        onnx_a = original
        onnx_b = fused if fused is not None else Path(fuse_file(original, tmp / original.name).output)
    results, a, b, inputs = bench_onnx(onnx_a, onnx_b, options, report.threads, busy, progress)
    report.results += results
    report.warnings += [w for w in map(cpu_fallback, results) if w]
    if TORCH in report.runtimes:
        return  # the models and inputs are described as torch runs them
    if is_torch:
        a.path, a.format = f"{original} (ONNX export)", "torch"
        b.path, b.format = f"{fused} (ONNX export)" if fused else "", "torch"
        report.notes.append("onnxruntime timed the ONNX exports (node counts are theirs)")
    report.original, report.fused, report.inputs = a, b, inputs


def _batches_the_export_takes(onnx_a: Path, original: Path, options: BenchOptions, load: LoadOptions,
                              notes: list[str]) -> BenchOptions | None:
    """A torch model whose ONNX export came out with a fixed batch (the exporter baked a
    dynamic size in) runs in onnxruntime at that batch only. Asked for by --runtime, the others
    are bad input; under "auto" they are timed in torch only, and the report says so."""
    from ..onnxfold.io import fixed_batch, read_signature

    if options.data or load.shapes:
        return options
    fixed = fixed_batch(read_signature(onnx_a))
    other = [n for n in options.batch_sizes if fixed is not None and n != fixed]
    if not other:
        return options
    if ONNXRUNTIME in options.runtimes:
        raise UsageError(f"its ONNX export has a fixed batch size {fixed}, so onnxruntime cannot time --batch-size "
                         f"{other[0]} (time it with --runtime torch, or pass --batch-size {fixed})", original)
    keep = tuple(n for n in options.batch_sizes if n == fixed)
    notes.append(f"onnxruntime: batch size(s) {', '.join(map(str, other))} timed in torch only: the ONNX export "
                 f"has a fixed batch size {fixed}")
    return dataclasses.replace(options, batch_sizes=keep) if keep else None


def _torch_as_onnx(original: Path, fused: Path | None, tmp: Path, load: LoadOptions,
                   options: BenchOptions) -> tuple[Path, Path]:
    from ..torchfold.onnx_export import export_unfused_onnx

    given = bool(options.data or load.shapes)  # then the inputs' shapes are the user's, not batch sizes
    batches = () if given else options.batch_sizes
    a = export_unfused_onnx(original, tmp / "original.onnx", load, batches)
    if fused is None:
        return a, Path(fuse_file(original, tmp / "fused.onnx", options=FuseOptions(to="onnx", load=load)).output)
    if detect.detect_format(fused) == detect.TORCH:
        return a, export_unfused_onnx(fused, tmp / "fused.onnx", load, batches)
    return a, fused


def apply_fail_below(report: BenchReport, threshold: float) -> None:
    """--fail-below X on every result; the report's outcome is "fail" if any result's whole
    interval is below X, else "cannot tell" if any straddles X, else "pass". The interval is the
    one the verdict reads (widened by the A/A check's bias, if any)."""
    whys = {PASS: [], FAIL: [], CANNOT_TELL: []}
    for r in report.results:
        lo, hi = r.decision_ci or r.speedup_ci
        r.fail_below, why = threshold_outcome(lo, hi, half_width(lo, hi, r.speedup), threshold)
        if r.aa_check == AA_BIASED:
            why += f" (widened by the A/A check's {r.aa_bias_pct:.1f} % bias)"
        whys[r.fail_below].append(f"{r.runtime} {r.provider} {r.level} ×{r.batch_size}: {why}")
    outcome = FAIL if whys[FAIL] else CANNOT_TELL if whys[CANNOT_TELL] else PASS
    report.fail_below, report.fail_below_outcome = threshold, outcome
    report.fail_below_why = "; ".join(whys[outcome])
