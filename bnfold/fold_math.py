"""The BatchNormalization fold, in float64, for any weight layout.

At inference BN computes, per channel c (Ioffe & Szegedy 2015, Alg. 2)::

    y_c = γ_c (x_c − μ_c) / sqrt(σ²_c + ε) + β_c = s_c · x_c + t_c,
    s = γ / sqrt(σ² + ε),   t = β − s · μ.

If x = W ⋆ a + b is linear in W along an output-channel axis, then
BN(x) = (s · W) ⋆ a + (s · b + t), i.e. ``W' = s · W`` along that axis and
``b' = s · (b − μ) + β``. Everything is computed in float64 and cast once to the
storage dtype; a value that would not fit (overflow to ±inf) is reported, not written.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import Skip


@dataclass(frozen=True)
class Affine:
    """The per-channel affine map s·x + t that an inference-mode BN computes (float64)."""

    scale: np.ndarray
    shift: np.ndarray


class FoldOverflow(Skip, ValueError):
    """A folded value does not fit in the storage dtype: a fold declined, with its reason."""


class BrokenStatistics(ValueError):
    """The BN parameters give a non-finite scale or shift (negative or NaN variance, ...)."""


def bn_affine(gamma, beta, mean, var, epsilon: float) -> Affine:
    """s = γ / sqrt(σ² + ε), t = β − s·μ, in float64; raises BrokenStatistics if not finite."""
    gamma, beta, mean, var = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (gamma, beta, mean, var))
    # ε is stored as float32 in ONNX; use exactly the value the runtime will use.
    denom = var + np.float64(np.float32(epsilon))
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = gamma / np.sqrt(denom)
        shift = beta - scale * mean
    bad = ~(np.isfinite(scale) & np.isfinite(shift))
    if bad.any():
        channels = np.flatnonzero(bad)[:5].tolist()
        detail = "negative" if (denom[bad] < 0).any() else "non-finite"
        raise BrokenStatistics(f"{detail} variance or parameters in channel(s) {channels}")
    return Affine(scale, shift)


def channel_view(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """Reshape a per-channel vector so that it broadcasts along `axis` of an ndim-array."""
    shape = [1] * ndim
    shape[axis] = values.shape[0]
    return values.reshape(shape)


def scale_weight(weight: np.ndarray, scale: np.ndarray, axis: int, groups: int = 1) -> np.ndarray:
    """W'[.., c, ..] = s_c · W[.., c, ..] in float64.

    `axis` holds the output channel. With groups > 1 (ConvTranspose, weight
    [C_in, C_out/g, k…]) output channel g·(C_out/g)+j lives at row block g, column j,
    so the scale is applied per group: channel index = group · axis_len + j.
    """
    w = np.array(weight, dtype=np.float64)  # a fresh float64 copy, scaled in place below
    if groups == 1 or axis == 0:
        w *= channel_view(scale, axis, w.ndim)
        return w
    if axis != 1:
        raise ValueError("grouped scaling is defined for axis 1 only")
    per_group = w.shape[1]
    rows = w.shape[0] // groups
    grouped = w.reshape((groups, rows) + w.shape[1:])
    s = scale.reshape(groups, 1, per_group, *([1] * (w.ndim - 2)))
    return (grouped * s).reshape(w.shape)


def fold_bias(bias, affine: Affine) -> np.ndarray:
    """b' = s·b + t, which equals s·(b − μ) + β. `bias` None means b = 0."""
    if bias is None:
        return affine.shift.copy()
    return affine.scale * np.asarray(bias, dtype=np.float64).reshape(-1) + affine.shift


def cast_exact(values: np.ndarray, dtype, what: str) -> np.ndarray:
    """Cast float64 values to `dtype` once; FoldOverflow if a finite value becomes ±inf."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.asarray(values).astype(dtype)
    if np.isfinite(out).all():
        return out
    overflow = np.isfinite(values) & ~np.isfinite(out)
    if overflow.any():
        worst = float(np.max(np.abs(values[overflow])))
        raise FoldOverflow(f"folded {what} overflows {np.dtype(dtype).name} (|value| up to {worst:.3g})")
    return out
