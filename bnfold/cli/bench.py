"""`bnfold bench`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..bench import bench as run_bench
from ..errors import EXIT_FAILED, UsageError
from ..inputs import parse_shapes
from ..render import Output
from ..render.bench import render_bench
from .app import app
from .options import Arch, ArchKwargs, Json, TrustPickle, torch_options


def _csv(text: str, what: str, cast=str) -> list:
    try:
        values = [cast(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} expects a comma-separated list, got {text!r}") from None
    if not values:
        raise UsageError(f"{what} is empty")
    return values


@app.command()
def bench(
    original: Path = typer.Argument(..., help="The model before fusing (A).", show_default=False),
    fused: Optional[Path] = typer.Argument(None, help="The fused model (B); fused on the fly if omitted."),
    provider: str = typer.Option("cpu", help="cpu, cuda, … or all installed ones, comma-separated."),
    batch_size: str = typer.Option("1", help="Batch sizes for a dynamic first dimension, e.g. 1,8."),
    level: str = typer.Option("disabled,default", help="ORT optimization levels: disabled, basic, extended, default."),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads (default: all cores), pinned for A and B."),
    warmup: int = typer.Option(5, help="Warm-up runs per model."),
    runs: Optional[int] = typer.Option(None, help="Timed runs per model (default: --seconds 2)."),
    seconds: Optional[float] = typer.Option(None, help="Time budget per configuration."),
    shape: Optional[list[str]] = typer.Option(None, help="NAME=D0,D1,… for dynamic dims (repeatable)."),
    data: Optional[Path] = typer.Option(None, help=".npz/.npy inputs instead of random ones."),
    seed: int = typer.Option(0, help="Seed for the random inputs and the bootstrap."),
    trust_pickle: TrustPickle = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    fail_below: Optional[float] = typer.Option(None, help="Exit 1 if a speed-up's CI upper bound is below this."),
    as_json: Json = False,
) -> None:
    """Measure what folding buys: A (original) vs B (fused), interleaved, per provider × batch × level."""
    out = Output(as_json)
    with out.progress("benchmarking", total=None) as tick:
        report = run_bench(original, fused, providers=_csv(provider, "--provider"),
                           batch_sizes=_csv(batch_size, "--batch-size", int), levels=_csv(level, "--level"),
                           threads=threads, warmup=warmup, runs=runs, seconds=seconds, shapes=parse_shapes(shape),
                           data=data, seed=seed, progress=tick,
                           torch_options=torch_options(trust_pickle, arch, arch_kwargs))
    render_bench(report, out)
    if fail_below is not None and any(r.speedup_ci[1] < fail_below for r in report.results):
        out.err.print(f"speed-up below {fail_below} in at least one configuration")
        raise typer.Exit(EXIT_FAILED)
