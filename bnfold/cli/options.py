"""Options several commands share, declared once, and how they become typed option objects."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..check.inputs import parse_shapes
from ..errors import UsageError
from ..json_reader import read_json
from ..options import LoadOptions, VarianceOptions, VerifyOptions

Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
TrustPickle = Annotated[bool, typer.Option("--trust-pickle", help="Torch: allow unpickling a full-module checkpoint "
                                                                  "(runs its code).")]
Arch = Annotated[Optional[str], typer.Option(help="Torch state_dict: package.module:factory that builds the module.")]
ArchKwargs = Annotated[Optional[str], typer.Option(help="JSON keyword arguments for --arch.")]
Shape = Annotated[Optional[list[str]], typer.Option(metavar="NAME=D0,D1,…", help="Input shape (repeatable).")]
ExampleInput = Annotated[Optional[Path], typer.Option(help="Torch: .npz/.npy example input for tracing and export.")]
Variance = Annotated[str, typer.Option(help="Stored variance is 'unbiased' (PyTorch) or 'biased' (× m/(m−1)).")]
TrainBatchSize = Annotated[Optional[int], typer.Option(help="Training batch size N the stored biased variance was "
                                                            "taken over (--variance biased).")]
ValuesPerChannel = Annotated[Optional[int], typer.Option(help="m for --variance biased, instead of N × spatial size.")]
Data = Annotated[Optional[Path], typer.Option(help="Inputs to compare on: .npz (one array per input) or .npy.")]
Seed = Annotated[int, typer.Option(help="Seed of the random inputs.")]
Batches = Annotated[int, typer.Option(help="Number of random input batches (seeds seed, seed+1, …).")]
Atol = Annotated[Optional[float], typer.Option(help="Absolute tolerance (default: by output dtype).")]
Rtol = Annotated[Optional[float], typer.Option(help="Relative tolerance (default: by output dtype).")]


ARCH_KWARGS_LIMIT = 2**20  # bytes: keyword arguments, not data


def json_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    value = read_json(text, "--arch-kwargs", max_bytes=ARCH_KWARGS_LIMIT, error=UsageError)
    if not isinstance(value, dict):
        raise UsageError("--arch-kwargs must be a JSON object")
    return value


def load_options(trust_pickle: bool, arch: str | None, arch_kwargs: str | None, shape: list[str] | None = None,
                 example_input: Path | None = None) -> LoadOptions:
    return LoadOptions(trust_pickle, arch, json_kwargs(arch_kwargs), parse_shapes(shape), example_input)


def variance_options(variance: str, train_batch_size: int | None, values_per_channel: int | None,
                     batch_size: int | None = None) -> VarianceOptions:
    if variance == "biased" and train_batch_size is None and values_per_channel is None and batch_size is not None:
        raise UsageError("--batch-size is how many samples are fed per run; the training batch size of a biased "
                         "variance is --train-batch-size N")
    return VarianceOptions(variance, train_batch_size, values_per_channel)


def verify_options(data: Path | None, shape: list[str] | None, batch_size: int | None, seed: int, batches: int,
                   atol: float | None, rtol: float | None, provider: str = "cpu") -> VerifyOptions:
    return VerifyOptions(data, parse_shapes(shape), batch_size, seed, batches, atol, rtol, provider)
