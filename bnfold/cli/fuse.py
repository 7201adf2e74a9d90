"""`bnfold fuse`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import EXIT_FAILED
from ..fuse import FuseOptions, fuse_file
from ..inputs import parse_shapes
from ..render import Output
from ..render.fold import render_fold
from .app import app
from .options import Arch, ArchKwargs, Json, TrustPickle, json_kwargs


@app.command()
def fuse(
    src: Path = typer.Argument(..., help="Model to fuse: .onnx or a PyTorch checkpoint.", show_default=False),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Where to write (default NAME.fused.EXT)."),
    in_place: bool = typer.Option(False, "--in-place", help="Allow overwriting the input."),
    standalone: str = typer.Option("keep", help="BNs that cannot fold: 'keep', or 'affine' to rewrite as Mul+Add."),
    variance: str = typer.Option("unbiased", help="Stored variance is 'unbiased' (PyTorch) or 'biased'."),
    batch_size: Optional[int] = typer.Option(None, help="Training batch size N, for --variance biased."),
    values_per_channel: Optional[int] = typer.Option(None, help="m for --variance biased, overriding N × spatial size."),
    to: str = typer.Option("same", help="Output format for torch inputs: same, onnx, pt2, torchscript."),
    trust_pickle: TrustPickle = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    shape: Optional[list[str]] = typer.Option(None, help="NAME=D0,D1,… input shape for export (repeatable)."),
    example_input: Optional[Path] = typer.Option(None, help=".npz/.npy example input for torch export."),
    calibrate: Optional[Path] = typer.Option(None, help="Recompute BN statistics from this data first (needs --batch-size)."),
    upstream: str = typer.Option("batch", help="With --calibrate: 'batch' (Alg. 2) or 'population'."),
    verify: bool = typer.Option(False, "--verify", help="Verify and keep the output only if it passes (else exit 1)."),
    as_json: Json = False,
) -> None:
    """Fold every BatchNormalization that can be folded exactly and write the fused model."""
    out = Output(as_json)
    options = FuseOptions(
        standalone=standalone, variance=variance, batch_size=batch_size, values_per_channel=values_per_channel, to=to,
        trust_pickle=trust_pickle, arch=arch, arch_kwargs=json_kwargs(arch_kwargs),
        shapes=parse_shapes(shape), example_input=example_input, verify=verify, calibrate=calibrate,
        upstream=upstream,
    )
    with out.status(f"fusing {src}"):
        report = fuse_file(src, output, in_place, options)
    render_fold(report, out)
    if report.verify is not None and not report.verify.passed:
        raise typer.Exit(EXIT_FAILED)
