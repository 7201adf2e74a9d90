"""`bnfold calibrate`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..calibrate import calibrate_file
from ..render import Output
from ..render.calibrate import render_calibrate
from .app import app
from .options import Arch, ArchKwargs, Json, TrustPickle, torch_options


@app.command()
def calibrate(
    src: Path = typer.Argument(..., help="Model whose BN statistics to recompute (.onnx, torch pickle/state_dict).",
                               show_default=False),
    data: Path = typer.Option(..., help=".npz (arrays by input name, samples on axis 0), .npy, or a folder."),
    batch_size: int = typer.Option(..., help="Training batch size N (≥ 2): statistics are taken per batch."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Where to write (default NAME.calibrated.EXT)."),
    in_place: bool = typer.Option(False, "--in-place", help="Allow overwriting the input."),
    upstream: str = typer.Option("batch", help="'batch': every BN normalizes with its batch statistics (Alg. 2); "
                                               "'population': BNs keep their stored statistics while measured."),
    variance: str = typer.Option("unbiased", help="Stored variance is 'unbiased' or 'biased' (corrected first; "
                                                   "matters for --upstream population)."),
    train_batch_size: Optional[int] = typer.Option(None, help="Training batch size N, for --variance biased."),
    values_per_channel: Optional[int] = typer.Option(None, help="m for --variance biased."),
    trust_pickle: TrustPickle = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    as_json: Json = False,
) -> None:
    """Recompute every BN's E\\[x] and Var\\[x] from data, exactly as the BN paper's Algorithm 2."""
    out = Output(as_json)
    options = torch_options(trust_pickle, arch, arch_kwargs, variance=variance, train_batch_size=train_batch_size,
                            values_per_channel=values_per_channel)
    with out.progress("calibrating (batches)", total=None) as tick:
        report = calibrate_file(src, data, batch_size, output, in_place, upstream, options, progress=tick)
    render_calibrate(report, out)
