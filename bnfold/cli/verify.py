"""`bnfold verify`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import EXIT_FAILED
from ..render import Output
from ..render.verify import render_verify
from ..stages.verify import verify as run_verify
from .app import app
from .options import (Arch, ArchKwargs, Atol, Batches, Data, Json, Rtol, Seed, Shape, TrustPickle, load_options,
                      verify_options)


@app.command(short_help="Prove the fused model computes what the original did.")
def verify(
    original: Path = typer.Argument(..., help="The model before fusing.", show_default=False),
    fused: Path = typer.Argument(..., help="The fused model.", show_default=False),
    data: Data = None,
    shape: Shape = None,
    batch_size: Optional[int] = typer.Option(None, help="Size of a dynamic first dimension (default 2)."),
    seed: Seed = 0,
    batches: Batches = 1,
    atol: Atol = None,
    rtol: Rtol = None,
    provider: str = typer.Option("cpu", help="onnxruntime execution provider: cpu, cuda, …"),
    trust_pickle: TrustPickle = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    as_json: Json = False,
) -> None:
    """Prove the fused model computes what the original did (exit 1 where it does not)."""
    out = Output(as_json)
    options = verify_options(data, shape, batch_size, seed, batches, atol, rtol, provider)
    load = load_options(trust_pickle, arch, arch_kwargs, shape)
    with out.status(f"running {original.name} and {fused.name}"):
        report = run_verify(original, fused, options, load)
    render_verify(report, out)
    if not report.passed:
        raise typer.Exit(EXIT_FAILED)
