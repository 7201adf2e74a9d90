"""The comparison rule and its figures, against numbers worked out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bnfold.check.compare import compare_arrays, compare_outputs, cosine, merge, resolve_tolerance


def test_element_fails_only_when_over_both_atol_and_rtol():
    a = np.array([100.0, 1.0, 0.0, -50.0], np.float64)
    # diffs:      0.05   0.05  0.05   0.0
    b = np.array([100.05, 1.05, 0.05, -50.0], np.float64)
    # atol 0.01, rtol 1e-3: the 100 passes (0.05 ≤ rtol·100 = 0.1); 1.0 and 0.0 are over both
    c = compare_arrays("y", a, b, atol=0.01, rtol=1e-3)
    assert not c.passed and c.mismatched == 2 and c.elements == 4
    assert c.mismatch_fraction == pytest.approx(0.5)
    assert c.max_abs_error == pytest.approx(0.05, rel=1e-5)
    assert c.mean_abs_error == pytest.approx(0.15 / 4, rel=1e-4)
    # smallest atol at rtol 1e-3: the largest error rtol does not cover, 0.05
    assert c.min_atol_to_pass == pytest.approx(0.05, rel=1e-4)
    # smallest rtol at atol 0.01: the 0.0 element can never pass on rtol → inf
    assert math.isinf(c.min_rtol_to_pass)
    assert c.worst_index in ([1], [2])


def test_min_rtol_to_pass_by_hand():
    a = np.array([2.0, 4.0], np.float64)
    b = np.array([2.1, 4.1], np.float64)
    c = compare_arrays("y", a, b, atol=0.02, rtol=0.0)
    # both are over atol; rtol must cover each alone: 0.1 / 2 = 0.05 and 0.1 / 4 = 0.025
    assert c.min_rtol_to_pass == pytest.approx(0.05)
    assert c.max_rel_error == pytest.approx(0.05)
    assert compare_arrays("y", a, b, atol=0.02, rtol=0.0501).passed
    assert not compare_arrays("y", a, b, atol=0.02, rtol=0.0499).passed


def test_over_both_is_stricter_than_the_sum_rule():
    """a = 1, b = 1.015, atol = rtol = 0.01: within atol + rtol·|a| = 0.02, but over each alone."""
    c = compare_arrays("y", np.array([1.0]), np.array([1.015]), atol=0.01, rtol=0.01)
    assert not c.passed and c.mismatched == 1
    assert c.min_atol_to_pass == pytest.approx(0.015) and c.min_rtol_to_pass == pytest.approx(0.015)
    assert compare_arrays("y", np.array([1.0]), np.array([1.015]), atol=0.0151, rtol=0.01).passed
    assert compare_arrays("y", np.array([1.0]), np.array([1.015]), atol=0.01, rtol=0.0151).passed


def test_cosine_by_hand():
    assert cosine(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    assert cosine(np.zeros(3), np.zeros(3)) == 1.0
    assert cosine(np.zeros(3), np.ones(3)) == 0.0


@pytest.mark.parametrize("a,b,ok", [
    ([np.nan, 1.0], [np.nan, 1.0], True),
    ([np.inf, 1.0], [np.inf, 1.0], True),
    ([np.nan, 1.0], [0.0, 1.0], False),
    ([1.0, 1.0], [np.nan, 1.0], False),
    ([np.inf, 1.0], [-np.inf, 1.0], False),
    ([1.0, 1.0], [np.inf, 1.0], False),
])
def test_nan_and_inf_must_match(a, b, ok):
    c = compare_arrays("y", np.array(a, np.float32), np.array(b, np.float32), atol=1.0, rtol=1.0)
    assert c.passed is ok
    assert c.nonfinite_mismatches == (0 if ok else 1)


def test_argmax_agreement_for_classifier_outputs():
    a = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], np.float32)
    b = a.copy()
    b[0] = [0.95, 0.05]
    c = compare_arrays("logits", a, b)
    assert c.argmax_agreement == pytest.approx(0.75)
    assert compare_arrays("feat", np.ones((2, 3, 4)), np.ones((2, 3, 4))).argmax_agreement is None


def test_default_atol_scales_with_the_output_rms():
    a = np.full(10, 3.0, np.float32)  # RMS 3
    atol, rtol = resolve_tolerance(a, None, None)
    assert atol == pytest.approx(3e-4) and rtol == pytest.approx(1e-4)
    assert resolve_tolerance(a, 0.5, None) == (0.5, pytest.approx(1e-4))
    assert resolve_tolerance(np.arange(3, dtype=np.int64), None, None) == (0.0, 0.0)


def test_shape_dtype_missing_and_extra_outputs_fail():
    x = np.ones((2, 3), np.float32)
    assert "shape differs" in compare_arrays("y", x, np.ones((3, 2), np.float32)).message
    assert "dtype differs" in compare_arrays("y", x, x.astype(np.float64)).message
    results = {r.name: r for r in compare_outputs({"y": x, "z": x}, {"y": x, "w": x})}
    assert results["y"].passed and not results["z"].passed and not results["w"].passed
    assert "missing" in results["z"].message and "not in the original" in results["w"].message


def test_merge_keeps_the_worst_of_each_figure():
    a = np.array([1.0, 2.0], np.float32)
    run1 = compare_outputs({"y": a}, {"y": a + np.float32(1e-6)}, atol=1e-3, rtol=0)
    run2 = compare_outputs({"y": a}, {"y": a + np.float32(0.5)}, atol=1e-3, rtol=0)
    m = merge([run1, run2])[0]
    assert not m.passed and m.mismatched == 2 and m.elements == 4
    assert m.max_abs_error == pytest.approx(0.5)


def test_report_json_has_no_nan_or_infinity():
    import json

    from bnfold.report import to_plain

    c = compare_arrays("y", np.array([0.0, 1.0]), np.array([0.5, 1.0]), atol=0.1, rtol=0.0)
    assert math.isinf(c.min_rtol_to_pass)
    plain = to_plain(c)
    assert plain["min_rtol_to_pass"] is None
    json.dumps(plain, allow_nan=False)
