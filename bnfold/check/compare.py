"""Compare the outputs of two models, element by element, in float64.

An element of the fused output b fails against the original a only when it is over BOTH
tolerances (polygraphy's rule):

    |a − b| > atol   and   |a − b| > rtol · |a|

or when one of the two is NaN/±Inf and the other is not the same non-finite value. For
each output the report also gives the smallest atol (at the given rtol) and the smallest
rtol (at the given atol) that would have passed, so a failure says how far off it was.

Default tolerances depend on the dtype, and the default atol is relative to the scale of
the output: atol = k · RMS(original). Rounding noise of an honest fold grows with the size
of the values a network computes, so a fixed atol is either too tight for a network with
large outputs or too loose for one with small outputs; scaled by the RMS, one k separates
honest folds from broken ones across networks (benchmarks/measure_tolerances.py).
"""
from __future__ import annotations

import numpy as np

from ..report import OutputComparison

# dtype → (k, rtol) with the default atol = k · RMS(original output). Measured in
# BENCHMARKS.md: fp32 honest folds of resnet50/mobilenet_v2/efficientnet_b0/resnet18 need
# k ≤ 4.5e-5; a 0.5 % error in one channel of one layer, or a 0.01 bias shift, needs k ≥ 3.2e-4.
# fp16 honest folds need k ≤ 8.1e-2: in fp16 the network's own rounding noise hides such
# small errors. bfloat16 (no ORT CPU kernels to measure) is scaled from fp16 by its 8× coarser
# mantissa; float64 by its precision.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-10, 1e-10),
    "float32": (1e-4, 1e-4),
    "float16": (1.5e-1, 1e-2),
    "bfloat16": (1.0, 8e-2),
}


def default_tolerance(dtype: np.dtype) -> tuple[float, float]:
    """(k, rtol) for an output dtype, atol being k · RMS; integers and bools must match exactly."""
    return DEFAULT_TOLERANCES.get(np.dtype(dtype).name, (0.0, 0.0))


def resolve_tolerance(original: np.ndarray, atol: float | None, rtol: float | None) -> tuple[float, float]:
    """The absolute (atol, rtol) used for one output: the user's, or the dtype's default."""
    k, default_rtol = default_tolerance(original.dtype)
    if atol is None:
        values = original[np.isfinite(original)].astype(np.float64) if original.size else original
        rms = float(np.sqrt(np.mean(values * values))) if values.size else 0.0
        atol = k * (rms if rms > 0 else 1.0)
    return atol, (default_rtol if rtol is None else rtol)


def compare_arrays(name: str, original: np.ndarray, fused: np.ndarray, atol: float | None = None,
                   rtol: float | None = None) -> OutputComparison:
    original, fused = np.asarray(original), np.asarray(fused)
    atol, rtol = resolve_tolerance(original, atol, rtol)
    result = OutputComparison(name, False, list(original.shape), str(original.dtype), atol, rtol)
    if original.shape != fused.shape:
        result.message = f"shape differs: original {list(original.shape)}, fused {list(fused.shape)}"
        return result
    if original.dtype != fused.dtype:
        result.message = f"dtype differs: original {original.dtype}, fused {fused.dtype}"
        return result
    a, b = original.astype(np.float64), fused.astype(np.float64)
    result.elements = int(a.size)
    finite = np.isfinite(a) & np.isfinite(b)
    same_nonfinite = (np.isnan(a) & np.isnan(b)) | (~np.isfinite(a) & (a == b))
    nonfinite_bad = ~finite & ~same_nonfinite
    with np.errstate(invalid="ignore"):  # inf − inf where both are inf: masked out below
        diff = np.where(finite, np.abs(a - b), 0.0)
    abs_a = np.where(finite, np.abs(a), 0.0)
    over = (diff > atol) & (diff > rtol * abs_a)
    failed = over | nonfinite_bad
    result.mismatched = int(failed.sum())
    result.nonfinite_mismatches = int(nonfinite_bad.sum())
    result.mismatch_fraction = result.mismatched / max(1, a.size)
    if a.size:
        result.max_abs_error = float(diff.max())
        result.mean_abs_error = float(diff[finite].mean()) if finite.any() else 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(abs_a > 0, diff / abs_a, np.where(diff > 0, np.inf, 0.0))
        result.max_rel_error = float(rel.max())
        # An element passes once either tolerance covers it: the smallest atol that passes all
        # (at the given rtol) is the largest error the rtol does not cover, and vice versa.
        result.min_atol_to_pass = float(np.where(diff > rtol * abs_a, diff, 0.0).max())
        with np.errstate(divide="ignore", invalid="ignore"):
            need = np.where(diff > atol, np.where(abs_a > 0, diff / abs_a, np.inf), 0.0)
        result.min_rtol_to_pass = float(need.max())
        result.cosine_similarity = cosine(a[finite], b[finite])
        worst = failed if failed.any() else np.ones_like(failed)
        score = np.where(worst, np.where(finite, diff, np.inf), -1.0)
        result.worst_index = [int(i) for i in np.unravel_index(int(np.argmax(score)), a.shape)]
    if a.ndim == 2 and a.shape[1] > 1 and a.shape[0] > 0:
        result.argmax_agreement = float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
    result.passed = result.mismatched == 0
    if not result.passed:
        result.message = (f"{result.mismatched} of {result.elements} elements differ "
                          f"(max abs {result.max_abs_error:.3g}, needs atol ≥ {result.min_atol_to_pass:.3g} "
                          f"or rtol ≥ {result.min_rtol_to_pass:.3g})")
        if result.nonfinite_mismatches:
            result.message += f", {result.nonfinite_mismatches} NaN/Inf only on one side"
    return result


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a.ravel(), b.ravel()) / (na * nb))


def compare_outputs(original: dict[str, np.ndarray], fused: dict[str, np.ndarray], atol: float | None = None,
                    rtol: float | None = None) -> list[OutputComparison]:
    """Every output by name; a missing or extra output is a failure."""
    results = []
    for name, value in original.items():
        if name not in fused:
            results.append(OutputComparison(name, False, list(np.shape(value)), str(np.asarray(value).dtype),
                                            message="output missing from the fused model"))
            continue
        results.append(compare_arrays(name, value, fused[name], atol, rtol))
    for name in fused:
        if name not in original:
            results.append(OutputComparison(name, False, message="output not in the original model"))
    return results


def merge(runs: list[list[OutputComparison]]) -> list[OutputComparison]:
    """The worst figures per output over several input batches."""
    merged: dict[str, OutputComparison] = {}
    for run in runs:
        for c in run:
            m = merged.get(c.name)
            if m is None:
                merged[c.name] = OutputComparison(**{**c.__dict__})
                continue
            total = m.elements + c.elements
            m.mean_abs_error = (m.mean_abs_error * m.elements + c.mean_abs_error * c.elements) / max(1, total)
            if c.max_abs_error > m.max_abs_error:
                m.max_abs_error, m.worst_index = c.max_abs_error, c.worst_index
            for key in ("max_rel_error", "min_atol_to_pass", "min_rtol_to_pass"):
                setattr(m, key, max(getattr(m, key), getattr(c, key)))
            m.cosine_similarity = min(m.cosine_similarity, c.cosine_similarity)
            m.mismatched += c.mismatched
            m.nonfinite_mismatches += c.nonfinite_mismatches
            m.elements = total
            m.mismatch_fraction = m.mismatched / max(1, total)
            if c.argmax_agreement is not None:
                m.argmax_agreement = min(m.argmax_agreement if m.argmax_agreement is not None else 1.0,
                                         c.argmax_agreement)
            m.passed = m.passed and c.passed
            m.message = m.message or c.message
    return list(merged.values())
