"""Time two ONNX files in onnxruntime, per provider × batch size × optimization level.

Both models get sessions with the same options and pinned threads; after warm-up their
runs alternate (check.timing), and the report gives median, p10 and p90 per model, the
speed-up median(A)/median(B) with a bootstrap interval, session-creation times, file sizes
and node counts.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..check.inputs import describe_inputs, load_inputs, make_inputs
from ..check.runtime import available_providers, provider_name
from ..check.timing import bootstrap_ratio_ci, time_interleaved, timing_of
from ..errors import UsageError
from ..options import BenchOptions
from ..report import BenchReport, BenchResult, ModelInfo
from .fold_pass import count_nodes
from .io import file_size, read_signature
from .verify import check_same_inputs

Progress = Callable[[int, int], None]


def model_info(path: Path, model=None) -> ModelInfo:
    model = model if model is not None else read_signature(path)
    nodes, bns = count_nodes(model)
    return ModelInfo(str(path), file_size(path, model), nodes, bns)


def resolve_providers(providers) -> list[str]:
    if any(p.lower() == "all" for p in providers):
        return available_providers()
    for p in providers:
        provider_name(p)  # raises MissingProvider naming what to install
    return [p.lower() for p in providers]


def bench_onnx(original: Path, fused: Path, options: BenchOptions, threads: int,
               progress: Progress | None = None) -> BenchReport:
    """Time `original` (A) against `fused` (B)."""
    providers = resolve_providers(options.providers)
    seconds = 2.0 if options.runs is None and options.seconds is None else options.seconds
    signature, fused_signature = read_signature(original), read_signature(fused)
    check_same_inputs(signature, fused_signature, fused)
    report = BenchReport(model_info(original, signature), model_info(fused, fused_signature), threads,
                         options.warmup, options.seed)
    configs = [(p, lvl, n) for p in providers for n in options.batch_sizes for lvl in options.levels]
    for k, (provider, level, batch) in enumerate(configs):
        if options.data:
            feeds = load_inputs(options.data, signature)
        else:
            feeds = make_inputs(signature, shapes=options.shapes, batch_size=batch, seed=options.seed)
        _check_batch(feeds, batch, bool(options.data or options.shapes))
        if k == 0:
            report.inputs = describe_inputs(feeds)
        times, created = time_interleaved([original, fused], feeds, provider, level, threads, options.warmup,
                                          options.runs, seconds, _offset(progress, k, len(configs)))
        lo, hi = bootstrap_ratio_ci(times[0], times[1], seed=options.seed)
        a, b = timing_of(times[0], created[0]), timing_of(times[1], created[1])
        report.results.append(BenchResult(provider, level, batch, a, b, a.median_ms / b.median_ms, [lo, hi]))
    if options.data:
        report.notes.append("inputs from --data: batch sizes come from the data")
    return report


def _check_batch(feeds: dict[str, np.ndarray], batch: int, given: bool) -> None:
    """A model with a fixed batch dimension cannot be timed at another batch size."""
    first = next(iter(feeds.values()), None)
    if given or first is None or first.ndim == 0 or first.shape[0] == batch:
        return
    raise UsageError(f"the model's first input has a fixed batch size {first.shape[0]}; "
                     f"--batch-size {batch} cannot be used (pass --batch-size {first.shape[0]})")


def _offset(progress: Progress | None, k: int, n: int) -> Progress | None:
    if progress is None:
        return None
    return ConfigProgress(progress, k, n)


class ConfigProgress:
    """Maps one configuration's fraction done onto the whole benchmark's bar."""

    def __init__(self, progress: Progress, k: int, n: int):
        self.progress, self.k, self.n = progress, k, n

    def __call__(self, done: int, total: int) -> None:
        self.progress(self.k * 1000 + int(1000 * done / max(1, total)), self.n * 1000)
