"""`bnfold bench`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..check.inputs import parse_shapes
from ..errors import EXIT_FAILED, CannotTell, UsageError
from ..options import BenchOptions
from ..render import Output
from ..render.bench import render_bench
from ..render.terminal import printable
from ..stages.bench import bench as run_bench
from .app import app
from .options import Arch, ArchKwargs, Json, Shape, TrustPickle, load_options

RUNTIME_ALIASES = {"ort": "onnxruntime"}


def _csv(text: str, what: str, cast=str) -> tuple:
    """A comma-separated list, each value once (twice would time one configuration twice)."""
    items = [v.strip() for v in text.split(",")]
    if not any(items):
        raise UsageError(f"{what} is empty")
    if not all(items):
        raise UsageError(f"{what} has an empty item: {text!r}")
    try:
        return tuple(dict.fromkeys(cast(v) for v in items))
    except ValueError:
        raise UsageError(f"{what} expects a comma-separated list, got {text!r}") from None


@app.command(short_help="Time the original against the fused model.")
def bench(
    original: Path = typer.Argument(..., help="The model before fusing (A).", show_default=False),
    fused: Optional[Path] = typer.Argument(None, help="The fused model (B); fused on the fly if omitted."),
    provider: str = typer.Option("cpu", help="cpu, cuda, tensorrt, openvino, coreml, dml, rocm, … (short or "
                                             "onnxruntime's names), or all installed ones; comma-separated."),
    batch_size: Optional[str] = typer.Option(None, help="Samples per run, comma-separated for several (e.g. 1,8). "
                                                        "Default: 1, or the batch size the model fixes.",
                                             show_default=False),
    level: str = typer.Option("disabled,default", help="ORT optimization levels: disabled, basic, extended, default."),
    runtime: str = typer.Option("auto", help="onnxruntime, torch, or both (comma-separated); auto: onnxruntime "
                                             "for ONNX, torch and onnxruntime (of the ONNX export) for a torch "
                                             "checkpoint."),
    torch_form: Optional[str] = typer.Option(None, help="Torch runtime: eager, torchscript, export (comma-separated; "
                                                        "default: the checkpoint's own form)."),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads for A and B (default: the cores other "
                                                     "running work leaves free, at least 1; shown in the report)."),
    seconds: Optional[float] = typer.Option(None, help="Timed seconds per configuration (default 4), cut into "
                                                       "--blocks."),
    runs: Optional[int] = typer.Option(None, help="Instead of --seconds: at least this many timed runs of each "
                                                  "model, spread over the blocks."),
    blocks: int = typer.Option(20, help="Blocks per configuration, each with fresh sessions (at least 6)."),
    warmup: int = typer.Option(3, help="Warm-up runs of each model in every block."),
    shape: Shape = None,
    data: Optional[Path] = typer.Option(None, help=".npz/.npy inputs instead of random ones."),
    seed: int = typer.Option(0, help="Seed of the random inputs and of the run order."),
    trust_pickle: TrustPickle = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    fail_below: Optional[float] = typer.Option(None, help="CI gate on the speed-up A/B: exit 1 if its whole 95 % "
                                                          "interval is below this, 0 if at or above, 2 (cannot tell) "
                                                          "if it straddles it."),
    aa_check: Optional[bool] = typer.Option(None, "--aa-check/--no-aa-check",
                                            help="Also time A′, a second copy of A, in every block (1.5× the time); "
                                                 "if A/A′'s interval misses 1.00, the A/B interval is widened by that "
                                                 "bias. Default: on with --fail-below, else off.", show_default=False),
    as_json: Json = False,
) -> None:
    """Measure what folding buys: A (original) vs B (fused), per runtime × provider × batch × level.

    Time is cut into blocks; each block makes fresh sessions (or module copies) for A and B and
    runs them in rounds, A and B once each in a random order. The speed-up is the median over
    blocks of median(A)/median(B), with a 95 % interval from the blocks. Each result gets a
    verdict: B faster / B slower (the whole interval above 1.01 / below 0.99), same within ±1 %
    (the interval inside 0.99-1.01), or cannot tell (anything else; "too noisy" when the
    interval is wider than ±5 %). --aa-check times a second copy of A too: when A against its
    copy stays off 1.00, the A/B interval is widened by that bias before it is read; it is on by
    default with --fail-below. --fail-below X: exit 1 only if some result's whole interval is
    below X; else exit 2 if some result straddles X; else 0.
    """
    out = Output(as_json)
    runtimes = tuple(RUNTIME_ALIASES.get(r.lower(), r.lower()) for r in _csv(runtime, "--runtime"))
    forms = tuple(f.lower() for f in _csv(torch_form, "--torch-form")) if torch_form is not None else None
    options = BenchOptions(_csv(provider, "--provider"), _csv(batch_size, "--batch-size", int) if batch_size is not None else None, _csv(level, "--level"),
                           threads, warmup, runs, seconds, parse_shapes(shape), data, seed, blocks, runtimes, forms,
                           fail_below, aa_check)
    with out.progress("benchmarking", total=None) as tick:
        report = run_bench(original, fused, options, load_options(trust_pickle, arch, arch_kwargs, shape),
                           progress=tick)
    render_bench(report, out)
    if report.fail_below_outcome == "fail":
        out.err.print(printable(f"bnfold: below --fail-below {fail_below:g}: {report.fail_below_why}"),
                      highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(EXIT_FAILED)
    if report.fail_below_outcome == "cannot tell":
        raise CannotTell(f"cannot tell whether the speed-up is at least {fail_below:g}: {report.fail_below_why}")
