"""Population statistics of a BN from batches, and the m/(m−1) correction: format-free math.

Algorithm 2 of the BN paper (Ioffe & Szegedy 2015) sets, for inference,

    E[x] = E_B[μ_B],    Var[x] = m/(m−1) · E_B[σ²_B],

m being the number of values each channel's statistics are taken over in one batch: N for
a BN over [N, C], N·p·q for feature maps [N, C, p, q] (the paper's effective mini-batch,
§3.2). A last batch of another size n_b is weighted by its size, which reduces to Alg. 2
for equal batches:

    E[x] = Σ n_b μ_b / Σ n_b,    Var[x] = Σ n_b · n_b/(n_b−1) · σ²_b / Σ n_b.

PyTorch's running_var already holds the unbiased estimate; a source that stored the biased
σ²_B is corrected by m/(m−1) once (VarianceOptions "biased").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import BadInput, UsageError
from .report import BNStatistics, CalibrationReport


def correction_factor(m: int) -> float:
    """m / (m − 1): Bessel's correction for a variance taken over m values."""
    if m < 2:
        raise UsageError(f"the variance correction needs at least 2 values per channel, got m={m}")
    return m / (m - 1)


def spatial_size(shape) -> int | None:
    """Product of the dims after N and C, or None if unknown or symbolic."""
    if shape is None or len(shape) < 2:
        return None
    dims = list(shape)[2:]
    if not all(isinstance(d, int) and d > 0 for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64)) if dims else 1


def values_per_channel(train_batch_size: int | None, given: int | None, spatial: int | None, bn: str,
                       path: str | None = None) -> int:
    """m for one BN: the m given, else N × the spatial size of its input."""
    if given is not None:
        return given
    if train_batch_size is None:
        raise UsageError("--variance biased needs the training batch size (--train-batch-size N) "
                         "or --values-per-channel m")
    if spatial is None:
        raise BadInput(f"BN {bn!r}: the spatial size of its input is not static; give --values-per-channel m",
                       path)
    return train_batch_size * spatial


def batch_moments(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(n_b, μ_b, biased σ²_b) per channel (axis 1) of one batch, in float64."""
    x64 = np.asarray(x, dtype=np.float64)
    axes = (0, *range(2, x64.ndim))
    return x64.size // x64.shape[1], x64.mean(axis=axes), x64.var(axis=axes)


@dataclass
class PopulationStats:
    """Running sums of Alg. 2 for one BN, fed one batch at a time."""

    count: int = 0  # Σ n_b
    weighted_mean: np.ndarray | float = 0.0  # Σ n_b μ_b
    weighted_var: np.ndarray | float = 0.0  # Σ n_b · n_b/(n_b−1) · σ²_b
    first_batch_values: int = 0  # n_b of the first (full) batch, shown as m

    def add(self, n_b: int, mean: np.ndarray, var: np.ndarray) -> None:
        self.count += n_b
        self.weighted_mean = self.weighted_mean + n_b * mean
        self.weighted_var = self.weighted_var + n_b * (n_b / (n_b - 1)) * var
        self.first_batch_values = self.first_batch_values or n_b

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.weighted_mean) / self.count

    @property
    def var(self) -> np.ndarray:
        return np.asarray(self.weighted_var) / self.count


@dataclass
class BatchAccumulator:
    """Alg. 2 over every BN of a network; a batch with one value per channel is dropped
    whole (a single value has no variance), so all BNs see the same batches."""

    stats: list[PopulationStats] = field(default_factory=list)
    batches: int = 0
    dropped: int = 0

    @classmethod
    def for_sites(cls, n: int) -> "BatchAccumulator":
        return cls([PopulationStats() for _ in range(n)])

    def add(self, activations: list[np.ndarray]) -> bool:
        moments = [batch_moments(x) for x in activations]
        if any(n_b < 2 for n_b, _, _ in moments):
            self.dropped += 1
            return False
        for stat, (n_b, mean, var) in zip(self.stats, moments):
            stat.add(n_b, mean, var)
        self.batches += 1
        return True


def finish_report(report: CalibrationReport, totals: BatchAccumulator, data) -> None:
    report.batches, report.dropped_batches = totals.batches, totals.dropped
    if totals.dropped:
        report.warnings.append(f"{totals.dropped} batch(es) of one value per channel dropped: "
                               "a single value has no variance")
    if totals.batches == 0:
        raise BadInput("no batch with at least 2 values per channel", data)


def require_storable(name: str, stat: PopulationStats, dtype, path=None) -> None:
    """The new statistics must be finite and fit the BN's dtype, or they are not written."""
    for what, values in (("mean", stat.mean), ("variance", stat.var)):
        if not np.isfinite(values).all():
            raise BadInput(f"BN {name!r}: the data gives a non-finite {what} (activations overflow or are NaN)",
                           path)
        limit = float(np.finfo(dtype).max) if np.issubdtype(dtype, np.floating) else None
        if limit is not None and np.abs(values).max() > limit:
            raise BadInput(f"BN {name!r}: the {what} from the data ({np.abs(values).max():.3g}) overflows "
                           f"{np.dtype(dtype).name}", path)


def max_relative_change(old: np.ndarray, new: np.ndarray) -> float:
    old64 = np.asarray(old, dtype=np.float64)
    return float(np.max(np.abs(new - old64) / np.maximum(np.abs(old64), 1e-12)))


def statistics_row(name: str, stat: PopulationStats, old_mean, old_var) -> BNStatistics:
    shift = np.abs(stat.mean - np.asarray(old_mean, dtype=np.float64))
    std = np.sqrt(np.maximum(np.asarray(old_var, dtype=np.float64), 1e-12))
    return BNStatistics(name, stat.first_batch_values, float(old_mean.mean()), float(stat.mean.mean()),
                        float(old_var.mean()), float(stat.var.mean()), float(shift.max()), float((shift / std).max()),
                        max_relative_change(old_var, stat.var))
