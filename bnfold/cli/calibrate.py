"""`bnfold calibrate`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..options import CalibrateOptions
from ..render import Output
from ..render.calibrate import render_calibrate
from ..stages.calibrate import calibrate_file
from .app import app
from .options import (Arch, ArchKwargs, Json, TrainBatchSize, TrustPickle, ValuesPerChannel, Variance, load_options,
                      variance_options)


@app.command(short_help="Recompute BN statistics from data (Algorithm 2).")
def calibrate(
    src: Path = typer.Argument(..., help="Model whose BN statistics to recompute (.onnx, torch pickle/state_dict).",
                               show_default=False),
    data: Path = typer.Option(..., help=".npz (arrays by input name, samples on axis 0), .npy, or a folder."),
    batch_size: int = typer.Option(..., help="Samples per batch N (≥ 2): statistics are taken per batch."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Where to write (default NAME.calibrated.EXT; "
                                                                       "a folder, or a path ending in /: "
                                                                       "NAME.calibrated.EXT in it)."),
    in_place: bool = typer.Option(False, "--in-place", help="Allow overwriting the input."),
    upstream: str = typer.Option("batch", help="'batch': every BN normalizes with its batch statistics (Alg. 2); "
                                               "'population': BNs keep their stored statistics while measured."),
    variance: Variance = "unbiased",
    train_batch_size: TrainBatchSize = None,
    values_per_channel: ValuesPerChannel = None,
    trust_pickle: TrustPickle = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    as_json: Json = False,
) -> None:
    """Recompute every BN's E[x] and Var[x] from data, exactly as the BN paper's Algorithm 2."""
    out = Output(as_json)
    options = CalibrateOptions(data, batch_size, upstream)
    with out.progress("calibrating (batches)", total=None) as tick:
        report = calibrate_file(src, options, output, in_place,
                                variance_options(variance, train_batch_size, values_per_channel),
                                load_options(trust_pickle, arch, arch_kwargs), progress=tick)
    render_calibrate(report, out)
