"""The per-site tests' arithmetic on small arrays: rounding bounds, non-finite values, the verdict."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bnfold.check import sites
from bnfold.report import SiteComparison, VerifyReport


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_one_rounding_stays_within_the_stored_bound(dtype):
    """Every value rounded to the dtype (subnormals included) is within r·|stored| + η of itself."""
    rng = np.random.default_rng(0)
    tiny = np.finfo(dtype).tiny
    exact = np.concatenate([rng.normal(0, 1, 20000), rng.normal(0, 1, 20000) * tiny * 4,
                            rng.uniform(-1, 1, 2000) * tiny])
    stored = exact.astype(dtype)
    error = np.abs(stored.astype(np.float64) - exact)
    assert (error <= sites.stored_error(stored)).all()
    # and the bound is tight: some value uses at least 90 % of it
    assert (error / sites.stored_error(stored)).max() > 0.9
    assert sites.stored_rounding(np.int64) is None


def test_elementwise_ratio_and_non_finite_values():
    original = sites.Evaluated(np.array([1.0, np.nan, np.inf, 2.0]), np.array([1.0, 1.0, 1.0, 2.0]))
    fused = sites.Evaluated(np.array([1.0 + 1e-3, np.nan, np.inf, 2.0]), np.array([1.0, 1.0, 1.0, 2.0]),
                            np.full(4, 1e-3))
    result = sites.elementwise(original, fused, 0.0, 0)
    assert result.ratio == pytest.approx(1.0, rel=1e-9) and result.index == (0,)
    one_sided = sites.Evaluated(np.array([1.0, 1.0, np.inf, 2.0]), fused.magnitude, fused.error)
    assert math.isinf(sites.elementwise(original, one_sided, 0.0, 0).ratio)


def _report(outputs_passed: bool, sites_passed: list[bool]) -> VerifyReport:
    report = VerifyReport("a", "b", outputs_passed, "onnxruntime", "cpu", None, None, 0, 1)
    report.sites = [SiteComparison(f"s{i}", f"l{i}", "Conv", [], "x", "y", "float16", ok)
                    for i, ok in enumerate(sites_passed)]
    sites.conclude_sites(report)
    return report


@pytest.mark.parametrize("outputs, checked, passed, decided", [
    (True, [True, True], True, "outputs and fold sites"),
    (True, [], True, "outputs"),
    (True, [True, False], False, "fold sites"),
    (False, [False], False, "outputs and fold sites"),
    (False, [True], False, "outputs"),
])
def test_verdict_needs_both_and_says_which_decided(outputs, checked, passed, decided):
    report = _report(outputs, checked)
    assert report.passed is passed and report.decided_by == decided
