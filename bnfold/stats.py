"""Statistics for timings: percentiles, and a bootstrap interval for a ratio of medians.

Runs of A and B are taken in interleaved pairs, so drift on a busy machine hits both. The
speed-up is median(A) / median(B); its interval resamples the *pairs* (keeping each A run
with the B run beside it) and takes the 2.5th and 97.5th percentiles of the resampled ratio.
"""
from __future__ import annotations

import numpy as np


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
