"""`bnfold fuse`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import EXIT_FAILED, UsageError
from ..options import CalibrateOptions, FuseOptions
from ..render import Output
from ..render.fold import render_fold
from ..stages.fuse import fuse_file
from .app import app
from .options import (Arch, ArchKwargs, Atol, Batches, Data, ExampleInput, Json, Rtol, Seed, Shape, TrainBatchSize,
                      TrustPickle, ValuesPerChannel, Variance, load_options, variance_options, verify_options)


@app.command(short_help="Fold every foldable BN and write the fused model.")
def fuse(
    src: Path = typer.Argument(..., help="Model to fuse: .onnx or a PyTorch checkpoint.", show_default=False),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Where to write (default NAME.fused.EXT; "
                                                                       "a folder, or a path ending in /: "
                                                                       "NAME.fused.EXT in it)."),
    in_place: bool = typer.Option(False, "--in-place", help="Allow overwriting the input."),
    standalone: str = typer.Option("keep", help="BNs that cannot fold: 'keep', or 'affine' to rewrite as Mul+Add."),
    variance: Variance = "unbiased",
    train_batch_size: TrainBatchSize = None,
    values_per_channel: ValuesPerChannel = None,
    to: str = typer.Option("same", help="Output format for torch inputs: same, onnx, pt2, torchscript."),
    trust_pickle: TrustPickle = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    shape: Shape = None,
    example_input: ExampleInput = None,
    calibrate: Optional[Path] = typer.Option(None, help="Recompute BN statistics from this data first."),
    upstream: str = typer.Option("batch", help="With --calibrate: 'batch' (Alg. 2) or 'population'."),
    batch_size: Optional[int] = typer.Option(None, help="Samples per run: the calibration batch (--calibrate) "
                                                        "and a dynamic first dimension (--verify)."),
    verify: bool = typer.Option(False, "--verify", help="Verify and keep the output only if it passes (else exit 1)."),
    data: Data = None,
    seed: Seed = 0,
    batches: Batches = 1,
    atol: Atol = None,
    rtol: Rtol = None,
    as_json: Json = False,
) -> None:
    """Fold every BatchNormalization that can be folded exactly and write the fused model."""
    out = Output(as_json)
    if calibrate is not None and batch_size is None:
        raise UsageError("--calibrate needs --batch-size N (samples per calibration batch)")
    options = FuseOptions(
        standalone=standalone, to=to,
        variance=variance_options(variance, train_batch_size, values_per_channel, batch_size),
        load=load_options(trust_pickle, arch, arch_kwargs, shape, example_input),
        calibrate=CalibrateOptions(calibrate, batch_size, upstream) if calibrate is not None else None,
        verify=verify_options(data, shape, batch_size, seed, batches, atol, rtol) if verify else None,
    )
    with out.status(f"fusing {src}"):
        report = fuse_file(src, output, in_place, options)
    render_fold(report, out)
    if report.verify is not None and not report.verify.passed:
        raise typer.Exit(EXIT_FAILED)
