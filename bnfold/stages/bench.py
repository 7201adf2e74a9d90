"""The `bench` stage: time the original (A) against the fused model (B) in onnxruntime.

Without B the original is fused on the fly; torch checkpoints are timed as their ONNX
exports (the original with its BNs).
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .. import detect
from ..options import BenchOptions, FuseOptions, LoadOptions
from ..report import BenchReport
from .fuse import fuse_file


def bench(original: str | Path, fused: str | Path | None = None, options: BenchOptions | None = None,
          load: LoadOptions | None = None, progress: Callable[[int, int], None] | None = None) -> BenchReport:
    from ..onnxfold.bench import bench_onnx

    original = Path(original)
    options, load = options or BenchOptions(), load or LoadOptions()
    threads = options.threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bnfold-bench-") as tmp:
        if detect.detect_format(original) == detect.TORCH:
            original, fused = _torch_as_onnx(original, fused, Path(tmp), load, options)
        on_the_fly = fused is None
        if on_the_fly:
            fused = Path(fuse_file(original, Path(tmp) / original.name).output)
        report = bench_onnx(original, Path(fused), options, threads, progress)
    if on_the_fly:
        report.fused.path = "(fused on the fly)"
    return report


def _torch_as_onnx(original: Path, fused: Path | None, tmp: Path, load: LoadOptions,
                   options: BenchOptions) -> tuple[Path, Path]:
    from ..torchfold.convert import export_unfused_onnx

    load = LoadOptions(load.trust_pickle, load.arch, load.arch_kwargs, options.shapes or load.shapes,
                       load.example_input)
    a = export_unfused_onnx(original, tmp / "original.onnx", load)
    if fused is None:
        return a, Path(fuse_file(original, tmp / "fused.onnx", options=FuseOptions(to="onnx", load=load)).output)
    if detect.detect_format(fused) == detect.TORCH:
        return a, export_unfused_onnx(Path(fused), tmp / "fused.onnx", load)
    return a, Path(fused)
