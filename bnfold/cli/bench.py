"""`bnfold bench`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..check.inputs import parse_shapes
from ..errors import EXIT_FAILED, UsageError
from ..options import BenchOptions
from ..render import Output
from ..render.bench import render_bench
from ..stages.bench import bench as run_bench
from .app import app
from .options import Arch, ArchKwargs, Json, Shape, TrustPickle, load_options


def _csv(text: str, what: str, cast=str) -> tuple:
    try:
        values = tuple(cast(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{what} expects a comma-separated list, got {text!r}") from None
    if not values:
        raise UsageError(f"{what} is empty")
    return values


@app.command(short_help="Time the original against the fused model.")
def bench(
    original: Path = typer.Argument(..., help="The model before fusing (A).", show_default=False),
    fused: Optional[Path] = typer.Argument(None, help="The fused model (B); fused on the fly if omitted."),
    provider: str = typer.Option("cpu", help="cpu, cuda, … or all installed ones, comma-separated."),
    batch_size: str = typer.Option("1", help="Samples per run, comma-separated for several (e.g. 1,8)."),
    level: str = typer.Option("disabled,default", help="ORT optimization levels: disabled, basic, extended, default."),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads (default: all cores), pinned for A and B."),
    warmup: int = typer.Option(5, help="Warm-up runs per model."),
    runs: Optional[int] = typer.Option(None, help="Timed runs per model (default: --seconds 2)."),
    seconds: Optional[float] = typer.Option(None, help="Time budget per configuration."),
    shape: Shape = None,
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
    options = BenchOptions(_csv(provider, "--provider"), _csv(batch_size, "--batch-size", int), _csv(level, "--level"),
                           threads, warmup, runs, seconds, parse_shapes(shape), data, seed)
    if fail_below is not None and not (fail_below > 0 and fail_below < float("inf")):
        raise UsageError(f"--fail-below must be a finite number > 0, not {fail_below}")
    with out.progress("benchmarking", total=None) as tick:
        report = run_bench(original, fused, options, load_options(trust_pickle, arch, arch_kwargs, shape),
                           progress=tick)
    render_bench(report, out)
    if fail_below is not None and any(r.speedup_ci[1] < fail_below for r in report.results):
        out.err.print(f"speed-up below {fail_below} in at least one configuration")
        raise typer.Exit(EXIT_FAILED)
