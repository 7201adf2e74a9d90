"""The `bench` stage: time the original and the fused model in onnxruntime, interleaved.

For every provider × batch size × optimization level, both models get sessions with the
same options and pinned threads; after warm-up their runs alternate (AB, BA, AB, …) so
that drift on a busy machine hits both alike. The report gives median, p10 and p90 per
model, the speed-up median(A)/median(B) with a bootstrap interval, session-creation
times, file sizes and node counts.
"""
from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import formats
from .errors import UsageError
from .inputs import InputInfo, describe_inputs, load_inputs, make_inputs
from .onnx_io import file_size
from .onnx_pass import count_nodes
from .report import to_plain
from .runtime import available_providers, provider_name, session
from .stats import bootstrap_ratio_ci, percentile, rotation
from .verify import read_signature

Progress = Callable[[int, int], None]


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    runs: int
    session_ms: float  # time to create the session

    @classmethod
    def of(cls, seconds: Sequence[float], session_s: float) -> "Timing":
        ms = np.asarray(seconds) * 1e3
        return cls(percentile(ms, 50), percentile(ms, 10), percentile(ms, 90), float(ms.mean()), len(ms),
                   session_s * 1e3)


@dataclass
class BenchResult:
    provider: str
    level: str
    batch_size: int
    a: Timing
    b: Timing
    speedup: float  # median(A) / median(B): > 1 means B (fused) is faster
    speedup_ci: list[float]


@dataclass
class ModelInfo:
    path: str
    file_size: int
    nodes: int
    bn_nodes: int


@dataclass
class BenchReport:
    original: ModelInfo
    fused: ModelInfo
    threads: int
    warmup: int
    seed: int
    inputs: list[InputInfo] = field(default_factory=list)
    results: list[BenchResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


def model_info(path: Path, model=None) -> ModelInfo:
    model = model if model is not None else read_signature(path)
    nodes, bns = count_nodes(model)
    return ModelInfo(str(path), file_size(path, model), nodes, bns)


def resolve_providers(providers: Sequence[str]) -> list[str]:
    if any(p.lower() == "all" for p in providers):
        return available_providers()
    for p in providers:
        provider_name(p)  # raises MissingProvider naming what to install
    return [p.lower() for p in providers]


def bench(original: str | Path, fused: str | Path | None = None, *, providers: Sequence[str] = ("cpu",),
          batch_sizes: Sequence[int] = (1,), levels: Sequence[str] = ("disabled", "default"),
          threads: int | None = None, warmup: int = 5, runs: int | None = None, seconds: float | None = None,
          shapes: dict[str, list[int]] | None = None, data: str | Path | None = None, seed: int = 0,
          progress: Progress | None = None, torch_options: Any = None) -> BenchReport:
    """Time `original` (A) against `fused` (B); without `fused`, fuse `original` first."""
    original = Path(original)
    providers = resolve_providers(providers)
    if runs is not None and runs < 2:
        raise UsageError("--runs must be at least 2")
    if runs is None and seconds is None:
        seconds = 2.0
    threads = threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bnfold-bench-") as tmp:
        if formats.detect_format(original) == formats.TORCH:
            original, fused = _torch_as_onnx(original, fused, Path(tmp), shapes, torch_options)
        if fused is None:
            from .fuse import fuse_file

            fused = Path(fuse_file(original, Path(tmp) / original.name).output)
            fused_on_the_fly = True
        else:
            fused, fused_on_the_fly = Path(fused), False
        signature = read_signature(original)
        report = BenchReport(model_info(original, signature), model_info(fused), threads, warmup, seed)
        if fused_on_the_fly:
            report.fused.path = "(fused on the fly)"
        configs = [(p, lvl, n) for p in providers for n in batch_sizes for lvl in levels]
        for k, (provider, level, batch) in enumerate(configs):
            feeds = load_inputs(data, signature) if data else make_inputs(signature, shapes=shapes,
                                                                          batch_size=batch, seed=seed)
            _check_batch(feeds, batch, bool(data or shapes))
            if k == 0:
                report.inputs = describe_inputs(feeds)
            times, created = time_interleaved([original, fused], feeds, provider, level, threads, warmup, runs,
                                              seconds, _offset(progress, k, len(configs)))
            lo, hi = bootstrap_ratio_ci(times[0], times[1], seed=seed)
            a, b = Timing.of(times[0], created[0]), Timing.of(times[1], created[1])
            report.results.append(BenchResult(provider, level, batch, a, b, a.median_ms / b.median_ms, [lo, hi]))
    if data:
        report.notes.append("inputs from --data: batch sizes come from the data")
    return report


def _check_batch(feeds: dict[str, np.ndarray], batch: int, given: bool) -> None:
    """A model with a fixed batch dimension cannot be timed at another batch size."""
    first = next(iter(feeds.values()), None)
    if given or first is None or first.ndim == 0 or first.shape[0] == batch:
        return
    raise UsageError(f"the model's first input has a fixed batch size {first.shape[0]}; "
                     f"--batch-size {batch} cannot be used (pass --batch-size {first.shape[0]})")


def _torch_as_onnx(original: Path, fused, tmp: Path, shapes, torch_options) -> tuple[Path, Path]:
    """Torch checkpoints are timed in onnxruntime: both exported to ONNX (the original with its BNs)."""
    from types import SimpleNamespace

    from .fuse import FuseOptions, fuse_file
    from .torch_fuse import export_unfused_onnx

    opts = torch_options or SimpleNamespace(trust_pickle=False, arch=None, arch_kwargs={})
    fuse_opts = FuseOptions(to="onnx", trust_pickle=opts.trust_pickle, arch=opts.arch, arch_kwargs=opts.arch_kwargs,
                            shapes=shapes or {})
    a = export_unfused_onnx(original, tmp / "original.onnx", fuse_opts)
    if fused is None:
        return a, Path(fuse_file(original, tmp / "fused.onnx", options=fuse_opts).output)
    if formats.detect_format(fused) == formats.TORCH:
        return a, export_unfused_onnx(Path(fused), tmp / "fused.onnx", fuse_opts)
    return a, Path(fused)


def _offset(progress: Progress | None, k: int, n: int) -> Progress | None:
    if progress is None:
        return None
    return _ConfigProgress(progress, k, n)


class _ConfigProgress:
    """Maps one configuration's fraction done onto the whole benchmark's bar."""

    def __init__(self, progress: Progress, k: int, n: int):
        self.progress, self.k, self.n = progress, k, n

    def __call__(self, done: int, total: int) -> None:
        self.progress(self.k * 1000 + int(1000 * done / max(1, total)), self.n * 1000)


def time_interleaved(paths: Sequence[Path], feeds: dict[str, np.ndarray], provider: str, level: str, threads: int,
                     warmup: int, runs: int | None, seconds: float | None,
                     progress: Progress | None = None) -> tuple[list[list[float]], list[float]]:
    """Per-model run times (seconds) in rotated interleaved rounds, and session-creation times."""
    sessions, created = [], []
    for path in paths:
        start = time.perf_counter()
        sessions.append(session(path, provider, level, threads, spinning=False))
        created.append(time.perf_counter() - start)
    names = [[o.name for o in s.get_outputs()] for s in sessions]
    for _ in range(warmup):
        for s, n in zip(sessions, names):
            s.run(n, feeds)
    times: list[list[float]] = [[] for _ in paths]
    began = time.perf_counter()
    r = 0
    while _more_rounds(r, runs, seconds, time.perf_counter() - began):
        for i in rotation(len(paths), r):
            start = time.perf_counter()
            sessions[i].run(names[i], feeds)
            times[i].append(time.perf_counter() - start)
        r += 1
        if progress is not None:
            if runs is not None:
                progress(r, runs)
            else:
                progress(min(1000, int(1000 * (time.perf_counter() - began) / seconds)), 1000)
    return times, created


def _more_rounds(done: int, runs: int | None, seconds: float | None, elapsed: float) -> bool:
    if runs is not None:
        return done < runs
    return done < 5 or elapsed < seconds  # at least 5 pairs for the interval
