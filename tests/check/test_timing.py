"""Timing statistics against values worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest

from bnfold.check.timing import bootstrap_ratio_ci, median, percentile, ratio_of_medians, rotation


def test_percentiles_by_hand():
    v = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert median(v) == 3.0
    assert percentile(v, 10) == pytest.approx(1.4)  # 1 + 0.4 · (2 − 1)
    assert percentile(v, 90) == pytest.approx(4.6)
    assert median([1.0, 2.0, 3.0, 10.0]) == 2.5


def test_ratio_of_medians_by_hand():
    assert ratio_of_medians([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx(2.0)


def test_bootstrap_interval_brackets_a_known_ratio():
    rng = np.random.default_rng(0)
    b = rng.lognormal(0, 0.1, 400)
    a = 1.5 * b * rng.lognormal(0, 0.02, 400)
    lo, hi = bootstrap_ratio_ci(a, b, seed=1)
    assert lo < 1.5 < hi and hi - lo < 0.1


def test_same_distribution_reads_one_within_its_interval():
    """What a model benched against itself must show: ≈ 1.00, inside its own interval."""
    rng = np.random.default_rng(3)
    drift = np.linspace(1.0, 1.3, 300)  # the machine slows down during the run; both sides feel it
    a = drift * rng.lognormal(0, 0.05, 300)
    b = drift * rng.lognormal(0, 0.05, 300)
    lo, hi = bootstrap_ratio_ci(a, b)
    ratio = ratio_of_medians(a, b)
    assert lo <= 1.0 <= hi and abs(ratio - 1) < 0.05


def test_bootstrap_is_deterministic_and_checks_pairs():
    a, b = [1.0, 2.0, 3.0], [1.0, 1.0, 1.0]
    assert bootstrap_ratio_ci(a, b, seed=4) == bootstrap_ratio_ci(a, b, seed=4)
    with pytest.raises(ValueError):
        bootstrap_ratio_ci([1.0], [1.0, 2.0])


def test_rotation_interleaves_every_model_in_every_position():
    assert [rotation(2, r) for r in range(4)] == [[0, 1], [1, 0], [0, 1], [1, 0]]
    assert [rotation(3, r) for r in range(3)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
