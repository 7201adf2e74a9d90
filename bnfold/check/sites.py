"""Is each fold site within one rounding of the original? The bound, computed, per element.

A fold site is a layer the fold changed: the original computes y_o = BN(layer(x)) (or the layer
after a BN, or branches summed), the fused model y_f = layer'(x) from stored weights W', b'. Both
are computed here in float64 on the same x, the original's own activation at the layer's input,
so nothing but the stored weights can make them differ. An honest fold stores the exact folded
values rounded once to the model's dtype: each stored float T is off by at most

    e_T = u·|T|/(1 − u) + η        u: the dtype's unit roundoff, η: half its smallest subnormal

and that error reaches the output through the layer's magnitudes, e_f = e_W ⋆ |x| + e_b for a
Conv (Gemm, MatMul alike): the bound |ΔW'| ≤ u·|W'|, |Δb'| ≤ u·|b'| propagated through |x|. Two
small terms widen it: the fold's own arithmetic, in float32 or wider, may add KAPPA roundings
(of float32, or of the model's dtype where it is wider) of the magnitudes the original computes
with, |y_o|; and float64 itself rounds each sum of n terms by at most n·2⁻⁵³ of its magnitudes.
|y_o| is the folded weights' magnitudes on |x| (the original's weights, scaled: at most
(1 + 2r)·|W'|⋆|x|) plus the original evaluated on magnitudes at x = 0 (|s|·(|b| + |μ|) + |β| for
a BN: what a fold's bias is computed from, cancellations included).

Three tests, each a bound that an honest fold meets on any data:

    elementwise  |y_f(x) − y_o(x)| ≤ e_f(x) + KAPPA·u_a·|y_o| + float64's, at every element;
    bias         the same at x = 0, where only the bias's rounding is left;
    channel      for a single fused layer, per output channel, with a_p the layer's output centred
                 over the positions p:  |Σ_p a_p·(y_f − y_o)_p| ≤ Σ_i (e_W,i + KAPPA·u_a·|W'_i|)·|G_i|
                 + …, where G = Σ_p a_p·x_patch(p) is the gradient of Σ_p a_p·y_p by the weight.

The elementwise bound must allow every rounding to line up with the signs of x, which they do
not: a wrong scale on one channel's weights (every weight off by the same factor) can hide under
it in a layer with thousands of inputs. Summed against the layer's own output, that error adds up
coherently while independent roundings cancel, and the channel test sees it as the factor over
one rounding; a wrong bias is the bias test's whole difference.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..report import SiteComparison

KAPPA = 8  # roundings an honest fold's arithmetic may add (a fold in float32: ≤ 5.5 in s = γ/√(σ²+ε), W·s, β − μ·s)
EPS64 = 2.0 ** -53
UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float32": 2.0 ** -24, "float64": 2.0 ** -53}
HALF_SUBNORMAL = {"float16": 2.0 ** -25, "bfloat16": 2.0 ** -134, "float32": 2.0 ** -150, "float64": 0.0}
TESTS = ("elementwise", "bias", "channel")


def unit_roundoff(dtype) -> float | None:
    """u of a float dtype; None for anything else (exact)."""
    return UNIT_ROUNDOFF.get(np.dtype(dtype).name)


def stored_rounding(dtype) -> tuple[float, float] | None:
    """(r, η): one rounding to `dtype` moved each stored value T by at most r·|T| + η, with
    r = u/(1 − u) relative to the stored value; None for integers and bools, which are exact."""
    u = unit_roundoff(dtype)
    if u is None:
        return None
    return u / (1 - u), HALF_SUBNORMAL[np.dtype(dtype).name]


def stored_error(array: np.ndarray) -> np.ndarray | None:
    """How far one rounding to the array's own dtype can have moved each stored value."""
    rounding = stored_rounding(array.dtype)
    return None if rounding is None else np.abs(array.astype(np.float64)) * rounding[0] + rounding[1]


def rounding_error(values: np.ndarray, magnitude: np.ndarray, dtype) -> np.ndarray | None:
    """The error of rounding float64 `values` (of at most `magnitude`) to `dtype` once (a Cast)."""
    u = unit_roundoff(dtype)
    if u is None or u <= EPS64:
        return None
    return magnitude * u + HALF_SUBNORMAL[np.dtype(dtype).name]


def arithmetic_roundoff(dtype) -> float:
    """KAPPA roundings of the arithmetic an honest fold uses: float32 or wider."""
    u = unit_roundoff(dtype) or UNIT_ROUNDOFF["float64"]
    return KAPPA * min(u, UNIT_ROUNDOFF["float32"])


def float64_error(terms: int) -> float:
    """Relative error of float64 sums of at most `terms` terms (γ_n, with room for the few other operations)."""
    return (terms + 16) * 2 * EPS64


@dataclass
class Evaluated:
    """One side's float64 results at one input: the values, their magnitudes' bound, and (fused
    side) the bound on what the stored weights' rounding changed (None: nothing rounded)."""

    value: np.ndarray
    magnitude: np.ndarray
    error: np.ndarray | None = None


@dataclass
class TestResult:
    ratio: float  # the worst |difference| / bound; ≤ 1 passes
    index: tuple[int, ...] | None  # where, in the output
    max_abs_error: float = 0.0
    elements: int = 0


def elementwise(original: Evaluated, fused: Evaluated, u_arith: float, terms: int) -> TestResult:
    """|y_f − y_o| against e_f + KAPPA·u_a·|y_o| + float64's, element by element. An element
    NaN or infinite on one side only fails; the same non-finite value on both is no difference."""
    a, b = original.value, fused.value
    if a.shape != b.shape:
        raise ValueError(f"the original computes {list(a.shape)}, the fused layer {list(b.shape)}")
    if not a.size:
        return TestResult(0.0, None)
    c = float64_error(terms)
    bound = original.magnitude * (u_arith + c)
    bound += fused.magnitude * c
    if fused.error is not None:
        bound += fused.error
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(b - a)
    finite = bool(np.isfinite(diff).all())
    if not finite:
        same = (np.isnan(a) & np.isnan(b)) | (np.isinf(a) & (a == b))
        diff = np.where(same, 0.0, np.where(np.isfinite(diff), diff, np.inf))
    ratio = np.divide(diff, bound, out=np.zeros_like(diff), where=bound > 0)
    ratio[(bound <= 0) & (diff > 0)] = np.inf
    worst = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    shown = diff if finite else diff[np.isfinite(diff)]
    return TestResult(float(ratio[worst]), tuple(int(i) for i in worst),
                      float(shown.max()) if shown.size else 0.0, int(a.size))


def channel(delta: np.ndarray, centred: np.ndarray, axis: int, weight_bound: np.ndarray, bias_bound: np.ndarray,
            magnitudes: np.ndarray, terms: int) -> TestResult:
    """Per output channel o: |Σ_p a_p·Δ_p| against the bound its weights' rounding allows.

    `centred` (a) is the fused layer's output less its mean over the positions, `delta` (Δ) the
    fused output less the original's; `weight_bound[o]` = Σ_i (e_W + KAPPA·u_a·|W'|)_i·|G_i|,
    `bias_bound[o]` what the bias may be off by (it meets Σ_p a_p, 0 up to float64's rounding),
    `magnitudes` = |y_o| + |y_f| per element, for float64's own error."""
    if not np.isfinite(delta).all():
        return TestResult(0.0, None)  # the elementwise test already fails it, with a place
    positions = tuple(i for i in range(delta.ndim) if i != axis % delta.ndim)
    product = centred * delta
    statistic = np.abs(product.sum(axis=positions))
    count = delta.size // max(delta.shape[axis], 1)
    c = float64_error(terms + count)
    abs_a = np.abs(centred)
    bound = weight_bound + bias_bound * np.abs(centred.sum(axis=positions)) \
        + c * (abs_a * magnitudes).sum(axis=positions) + c * np.abs(product).sum(axis=positions)
    ratio = np.divide(statistic, bound, out=np.zeros_like(statistic), where=bound > 0)
    ratio[(bound <= 0) & (statistic > 0)] = np.inf
    if not ratio.size:
        return TestResult(0.0, None)
    worst = int(np.argmax(ratio))
    return TestResult(float(ratio[worst]), (worst,))


def judge(site: SiteComparison, results: dict[str, TestResult], channel_axis: int) -> SiteComparison:
    """Fold one batch's test results into the site's running worst."""
    for test, result in results.items():
        site.ratios[test] = max(site.ratios.get(test, 0.0), result.ratio)
        if result.ratio > site.ratio or not site.test:
            site.ratio, site.test = result.ratio, test
            if result.index is None:
                site.channel = None
            else:
                site.channel = result.index[0] if test == "channel" else result.index[channel_axis]
    main = results.get("elementwise")
    if main is not None:
        site.max_abs_error = max(site.max_abs_error, main.max_abs_error)
        site.elements += main.elements
    site.passed = site.ratio <= 1.0
    site.message = "" if site.passed else describe_failure(site)
    return site


def describe_failure(site: SiteComparison) -> str:
    where = f" in output channel {site.channel}" if site.channel is not None else ""
    lead = {"elementwise": f"its output differs from the original's{where}",
            "bias": f"its bias (its output at zero input) differs{where}",
            "channel": f"its weights{where} differ by a common factor (the output summed against itself)",
            }.get(site.test, site.test)
    times = "∞" if not np.isfinite(site.ratio) else f"{site.ratio:.3g}"
    return f"{lead}, {times}× what one rounding of its {site.dtype} weights allows: not an exact fold of the original"


def conclude_sites(report) -> None:
    """The verdict of outputs and fold sites together, and which decided it: on a failure the
    checks that failed, on a pass the checks that passed (the outputs alone where no site was
    checked)."""
    report.outputs_passed = report.passed
    report.sites_passed = all(s.passed for s in report.sites) if report.sites else None
    report.passed = report.outputs_passed and report.sites_passed is not False
    checks = [("outputs", report.outputs_passed), ("fold sites", report.sites_passed)]
    wanted = report.passed
    report.decided_by = " and ".join(name for name, ok in checks if ok is wanted)
