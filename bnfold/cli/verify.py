"""`bnfold verify`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import EXIT_FAILED
from ..inputs import parse_shapes
from ..render import Output
from ..render.verify import render_verify
from ..verify import verify as run_verify
from .app import app
from .options import Arch, ArchKwargs, Json, TrustPickle, torch_options


@app.command()
def verify(
    original: Path = typer.Argument(..., help="The model before fusing.", show_default=False),
    fused: Path = typer.Argument(..., help="The fused model.", show_default=False),
    data: Optional[Path] = typer.Option(None, help=".npz (one array per input) or .npy inputs to use."),
    shape: Optional[list[str]] = typer.Option(None, help="NAME=D0,D1,… for dynamic input dims (repeatable)."),
    batch_size: Optional[int] = typer.Option(None, help="Size of a dynamic first dimension (default 2)."),
    seed: int = typer.Option(0, help="Seed of the random inputs."),
    batches: int = typer.Option(1, help="Number of random input batches (seeds seed, seed+1, …)."),
    atol: Optional[float] = typer.Option(None, help="Absolute tolerance (default by output dtype)."),
    rtol: Optional[float] = typer.Option(None, help="Relative tolerance (default by output dtype)."),
    provider: str = typer.Option("cpu", help="onnxruntime execution provider: cpu, cuda, …"),
    trust_pickle: TrustPickle = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    as_json: Json = False,
) -> None:
    """Prove the fused model computes what the original did (exit 1 where it does not)."""
    out = Output(as_json)
    with out.status(f"running {original.name} and {fused.name}"):
        report = run_verify(original, fused, data=data, shapes=parse_shapes(shape), batch_size=batch_size, seed=seed,
                            batches=batches, atol=atol, rtol=rtol, provider=provider,
                            torch_options=torch_options(trust_pickle, arch, arch_kwargs))
    render_verify(report, out)
    if not report.passed:
        raise typer.Exit(EXIT_FAILED)
