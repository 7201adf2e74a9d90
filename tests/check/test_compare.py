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


# -- nested outputs ---------------------------------------------------------------------------


def test_nested_leaves_are_named_by_path_and_keys_are_escaped():
    from collections import namedtuple
    from dataclasses import dataclass

    from bnfold.check.compare import flatten, path_name

    Pair = namedtuple("Pair", ["a", "b"])

    @dataclass
    class Out:
        logits: np.ndarray
        extra: object

    x = np.zeros(2, np.float32)
    value = [{"boxes": x, "bad\x1b[31mkey": (x, None)}, Out(x, Pair(x, 3))]
    names = [path_name(p) for p, _ in flatten(value).leaves()]
    assert names == ["[0]['boxes']", "[0]['bad\\x1b[31mkey'][0]", "[0]['bad\\x1b[31mkey'][1]", "[1].logits",
                     "[1].extra.a", "[1].extra.b"]
    assert all("\x1b" not in n for n in names)
    assert [path_name(p) for p, _ in flatten(x).leaves()] == ["output"]


def test_values_must_be_equal_and_of_one_type():
    from bnfold.check.compare import compare_values

    assert compare_values("n", 3, 3).passed and compare_values("s", "cat", "cat").passed
    assert compare_values("none", None, None).passed and compare_values("nan", float("nan"), float("nan")).passed
    for a, b in [(3, 4), (3, 3.0), (1, True), ("cat", "dog"), (None, 0), (float("nan"), 1.0)]:
        result = compare_values("v", a, b)
        assert not result.passed and result.kind == "value" and "value differs" in result.message


def test_an_output_that_contains_itself_is_bad_input():
    from bnfold.check.compare import flatten
    from bnfold.errors import BadInput

    loop: list = [np.zeros(1)]
    loop.append(loop)
    with pytest.raises(BadInput, match="nested deeper than"):
        flatten(loop)


def test_onnx_style_outputs_flatten_sequences_under_their_name():
    x = np.ones(3, np.float32)
    results = compare_outputs({"seq": [x, x], "opt": None}, {"seq": [x, x + np.float32(1)], "opt": None})
    assert [(r.name, r.passed, r.kind) for r in results] == [("seq[0]", True, "tensor"), ("seq[1]", False, "tensor"),
                                                             ("opt", True, "value")]
    short = compare_outputs({"seq": [x, x]}, {"seq": [x]})
    assert [(r.name, r.kind) for r in short if not r.passed] == [("seq[1]", "structure")]


def test_nothing_compared_says_why_and_is_never_a_pass():
    from bnfold.check.compare import conclude, nothing_compared
    from bnfold.report import VerifyReport

    def verdict(original, fused):
        report = VerifyReport("a", "b", True, "onnxruntime", "cpu", None, None, 0, 1)
        conclude(report, [compare_outputs(original, fused)])
        return report.passed, nothing_compared(report)

    empty = np.zeros((0, 4), np.float32)
    assert verdict({}, {}) == (False, "no tensor outputs to compare: the model's outputs hold nothing")
    passed, why = verdict({"n": None, "s": []}, {"n": None, "s": []})
    assert not passed and why.startswith("no tensor outputs to compare") and why.endswith("(n)")
    passed, why = verdict({"y": empty}, {"y": empty})
    assert not passed and why.startswith("no tensor elements to compare") and "y float32[0, 4]" in why
    assert verdict({"y": empty}, {"y": np.zeros((1, 4), np.float32)}) == (False, None)  # a mismatch: exit 1
    assert verdict({"y": np.ones(2)}, {"y": np.ones(2)}) == (True, None)
