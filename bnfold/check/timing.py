"""Timing A against B in onnxruntime, and the statistics of the result.

Runs of A and B are taken in interleaved rounds (AB, BA, AB, …), so drift on a busy
machine hits both. The speed-up is median(A) / median(B); its interval resamples the
*pairs* (keeping each A run with the B run beside it) and takes the 2.5th and 97.5th
percentiles of the resampled ratio.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..report import Timing
from .runtime import run_session, session

Progress = Callable[[int, int], None]


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median(values) -> float:
    return percentile(values, 50)


def ratio_of_medians(a, b) -> float:
    return median(a) / median(b)


def bootstrap_ratio_ci(a, b, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Interval for median(a)/median(b) over paired runs (a[i], b[i])."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("paired samples of equal, non-zero length are needed")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(resamples, a.size))
    ratios = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(ratios, tail)), float(np.percentile(ratios, 100 - tail))


def rotation(n_models: int, round_index: int) -> list[int]:
    """The order models run in, in round r: rotated each round (AB, BA, … or ABC, BCA, CAB, …)
    so that no model always runs first, or always right after the same neighbour."""
    shift = round_index % n_models
    return list(range(shift, n_models)) + list(range(shift))


def timing_of(seconds: Sequence[float], session_s: float) -> Timing:
    ms = np.asarray(seconds) * 1e3
    return Timing(percentile(ms, 50), percentile(ms, 10), percentile(ms, 90), float(ms.mean()), len(ms),
                  session_s * 1e3)


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
    for s, path in zip(sessions, paths):  # one checked run: inputs the graph cannot take are bad input
        run_session(s, feeds, path)
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
