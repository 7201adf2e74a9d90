"""The timing core and its statistics, against values worked out by hand. No timing is
asserted: the "runners" here are counters, and the timings are synthetic."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bnfold.check import timing
from bnfold.check.timing import (AA_BIASED, AA_PASSED, B_FASTER, B_SLOWER, CANNOT_TELL, FAIL, PASS, SAME, BlockTimes,
                                 Plan, aa_check, bench_result, block_ratios, choose_threads, coverage,
                                 creation_order, median, median_interval, order_statistic_rank, percentile,
                                 speedup_of, threshold_outcome, time_blocks)


def test_percentiles_by_hand():
    v = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert median(v) == 3.0
    assert percentile(v, 10) == pytest.approx(1.4)  # 1 + 0.4 · (2 − 1)
    assert percentile(v, 90) == pytest.approx(4.6)
    assert median([1.0, 2.0, 3.0, 10.0]) == 2.5


@pytest.mark.parametrize("n, k", [
    (20, 6),  # P(Bin(20,½) ≤ 5) = 21700/2^20 = 0.0207 ≤ 0.025 < P(≤ 6) = 60460/2^20 = 0.0577
    (10, 2),  # P(≤ 1) = 11/1024 = 0.0107; P(≤ 2) = 56/1024 = 0.0547
    (6, 1),  # P(≤ 0) = 1/64 = 0.0156; P(≤ 1) = 7/64 = 0.109
    (5, 0),  # P(≤ 0) = 1/32 = 0.031 > 0.025: no 95 % interval from 5 values
])
def test_order_statistic_rank_by_hand(n, k):
    assert order_statistic_rank(n) == k


def test_coverage_by_hand():
    assert coverage(20, 6) == pytest.approx(1 - 2 * 21700 / 2**20)  # 0.9586
    assert coverage(6, 1) == pytest.approx(1 - 2 / 64)


def test_median_interval_is_the_kth_order_statistics():
    values = [float(v) for v in np.random.default_rng(1).permutation(np.arange(1, 21))]  # 1 … 20, shuffled
    assert median_interval(values) == (6.0, 15.0)  # x(6) and x(15) of 20
    assert median_interval([3.0, 1.0, 2.0, 6.0, 5.0, 4.0]) == (1.0, 6.0)  # n = 6: the extremes
    with pytest.raises(ValueError):
        median_interval([1.0, 2.0, 3.0, 4.0, 5.0])


def test_speedup_is_the_median_block_ratio_with_its_order_statistics():
    ratios = [1.00, 1.20, 1.05, 1.10, 1.15, 1.08, 1.12, 1.02, 1.30, 1.11]
    s = speedup_of(ratios)
    x = sorted(ratios)
    assert s.estimate == pytest.approx(math.sqrt(x[4] * x[5]))  # exp of the mean of the middle two logs
    assert (s.low, s.high) == (pytest.approx(x[1]), pytest.approx(x[8]))  # n = 10: x(2) … x(9)
    assert s.half_width_pct == pytest.approx(100 * (x[8] - x[1]) / 2 / s.estimate)


def test_block_ratio_is_a_ratio_of_medians():
    assert block_ratios([[2.0, 4.0, 6.0], [9.0, 1.0, 5.0]], [[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]) == [2.0, 1.0]


def _synthetic(speedup: float, session_sd: float, run_sd: float, blocks: int = 20, runs: int = 50, seed: int = 0):
    """Block times as a busy machine makes them: every block's sessions get their own speed
    (session_sd), every run its own noise (run_sd); A is `speedup` × B."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for _ in range(blocks):
        a.append(speedup * rng.lognormal(0, session_sd) * rng.lognormal(0, run_sd, runs))
        b.append(rng.lognormal(0, session_sd) * rng.lognormal(0, run_sd, runs))
    return block_ratios(a, b)


def test_noise_rule_clean_series_get_a_verdict():
    assert speedup_of(_synthetic(1.10, 0.002, 0.01)).verdict == B_FASTER
    assert speedup_of(_synthetic(0.90, 0.002, 0.01)).verdict == B_SLOWER
    same = speedup_of(_synthetic(1.00, 0.002, 0.01))
    assert same.verdict == SAME and same.low >= 0.99 and same.high <= 1.01


@pytest.mark.parametrize("seed", range(3))
def test_noise_rule_noisy_series_cannot_tell_and_says_why(seed):
    noisy = speedup_of(_synthetic(1.00, 0.15, 0.05, seed=seed), busy=3.0)  # no difference, measured very noisily
    assert noisy.verdict == CANNOT_TELL and noisy.low < 1.01 and noisy.high > 0.99
    assert "too noisy" in noisy.why and "3.0 other runnable" in noisy.why and noisy.half_width_pct > 5
    assert noisy.spread_pct > 5


@pytest.mark.parametrize("seed", range(3))
def test_noise_rule_a_large_difference_is_resolved_through_the_noise(seed):
    """Width alone never overrules an interval that clears the ±1 % band: 1.5× measured ±8–16 %."""
    s = speedup_of(_synthetic(1.50, 0.15, 0.05, seed=seed))
    assert s.verdict == B_FASTER and s.half_width_pct > 5 and s.low > 1.01
    assert speedup_of([1 / r for r in _synthetic(1.50, 0.15, 0.05, seed=seed)]).verdict == B_SLOWER


def test_noise_rule_straddling_interval_cannot_tell_without_being_too_noisy():
    s = speedup_of([0.995, 1.0, 1.005, 1.01, 1.015, 1.02, 1.012, 1.008, 1.003, 0.998])
    assert s.verdict == CANNOT_TELL and "too noisy" not in s.why and s.half_width_pct < 5


@pytest.mark.parametrize("low, high, outcome", [
    (1.05, 1.10, PASS), (1.00, 1.02, PASS),  # at or above the threshold
    (0.90, 0.98, FAIL),  # the whole interval below
    (0.98, 1.02, CANNOT_TELL),  # straddles
    (1.20, 1.40, PASS),  # ±7.7 % wide, but wholly above: the width has not hidden the answer
    (0.60, 0.80, FAIL),  # wide, wholly below
    (0.90, 1.15, CANNOT_TELL),  # straddles, and too noisy
])
def test_fail_below_rule(low, high, outcome):
    estimate = math.sqrt(low * high)
    got, why = threshold_outcome(low, high, (high - low) / 2 / estimate, 1.0)
    assert got == outcome, why
    assert ("too noisy" in why) == (outcome == CANNOT_TELL and (high - low) / 2 / estimate > 0.05)


def _blocks(a_over_b, a_over_a2):
    """Block times, one run each: B = 1, A = r_b, A′ = A / q_b (so A/A′ = q_b)."""
    a = [[r] for r in a_over_b]
    return BlockTimes([a, [[1.0]] * len(a), [[r / q] for (r,), q in zip(a, a_over_a2)]], [[0.001] * len(a)] * 3)


def test_aa_check_passes_and_keeps_the_verdict():
    r = bench_result(_blocks([1.2 + 0.001 * i for i in range(20)], [0.998 + 0.0002 * i for i in range(20)]),
                     Plan(), "cpu", "disabled", 1, None)
    assert r.verdict == B_FASTER and r.aa_check == AA_PASSED and r.aa_bias_pct == 0 and "A/A check passed" in r.why
    assert r.aa_speedup == pytest.approx(np.median([0.998 + 0.0002 * i for i in range(20)]))
    assert r.aa_ci == pytest.approx([0.998 + 0.0002 * 5, 0.998 + 0.0002 * 14])  # x(6), x(15)
    assert r.decision_ci == r.speedup_ci


@pytest.mark.parametrize("aa", [1.03, 0.97])
@pytest.mark.parametrize("ab, verdict", [(1.02, CANNOT_TELL), (1.20, B_FASTER), (0.80, B_SLOWER)])
def test_aa_bias_widens_the_interval_the_verdict_reads(aa, ab, verdict):
    """A machine that reads 3 % between A and a copy of A could make up 3 % between A and B: a
    2 % speed-up is then undecided, a 20 % one still stands."""
    ratios, aa_ratios = [ab + 0.0005 * i for i in range(20)], [aa + 0.0002 * i for i in range(20)]
    r = bench_result(_blocks(ratios, aa_ratios), Plan(), "cpu", "disabled", 1, None)
    d = max(math.log(aa_ratios[5]), -math.log(aa_ratios[14]))  # how far x(6)…x(15) stays from 1.00
    assert r.aa_check == AA_BIASED and r.aa_bias_pct == pytest.approx(100 * math.expm1(d))
    assert r.speedup_ci == pytest.approx([ratios[5], ratios[14]])  # the A/B interval as measured …
    assert r.decision_ci == pytest.approx([ratios[5] * math.exp(-d), ratios[14] * math.exp(d)])  # … and as read
    assert r.verdict == verdict and "A/A check" in r.why and "widened" in r.why


def test_aa_check_passes_whenever_its_interval_holds_one():
    ab = speedup_of([1.02 + 0.0005 * i for i in range(20)])
    for aa in ([0.999 + 0.0001 * i for i in range(20)], [0.90 + 0.01 * i for i in range(20)]):  # narrow, and noisy
        check = aa_check(ab, speedup_of(aa))
        assert (check.outcome, check.verdict, check.low, check.high) == (AA_PASSED, B_FASTER, ab.low, ab.high)


class CountingMaker:
    """A maker whose runners record (model, block) in a shared log."""

    def __init__(self, tag: str, log: list, made: list):
        self.tag, self.log, self.made = tag, log, made

    def __call__(self):
        self.made.append(self.tag)
        return CountingRunner(self.tag, len([m for m in self.made if m == self.tag]) - 1, self.log)


class CountingRunner:
    def __init__(self, tag, block, log):
        self.tag, self.block, self.log = tag, block, log

    def __call__(self):
        self.log.append((self.tag, self.block))


def _record(seed: int, plan: Plan):
    log, made = [], []
    times = time_blocks([CountingMaker("A", log, made), CountingMaker("B", log, made)], plan, seed)
    return log, made, times


def test_blocks_make_fresh_runners_in_alternating_order():
    plan = Plan(blocks=6, runs=12, warmup=2)
    log, made, times = _record(0, plan)
    assert made == ["A", "B", "B", "A"] * 3  # one new A and B per block, who goes first alternates
    assert [len(blk) for blk in times.runs[0]] == [2] * 6 and [len(m) for m in times.made] == [6, 6]
    for block in range(6):  # every run in block b is by that block's runners: warm-up 2 + timed 2 each
        assert sorted(tag for tag, blk in log if blk == block) == ["A"] * 4 + ["B"] * 4
    assert [creation_order(3, b) for b in range(6)] == [[0, 1, 2], [2, 1, 0], [1, 2, 0], [0, 2, 1], [2, 0, 1],
                                                        [1, 0, 2]]


@pytest.mark.parametrize("models", [2, 3, 4])
@pytest.mark.parametrize("blocks", [6, 20, 8])
def test_creation_order_makes_each_model_first_as_often_as_each_other(models, blocks):
    """The runner made first runs slower: over an even number of blocks, every pair of models
    (A and B, A and A′) is made in each order equally often."""
    orders = [creation_order(models, b) for b in range(blocks)]
    assert all(sorted(o) == list(range(models)) for o in orders)
    for i in range(models):
        for j in range(i + 1, models):
            assert sum(o.index(i) < o.index(j) for o in orders) == blocks // 2


def test_round_order_is_random_and_reproducible_from_the_seed():
    plan = Plan(blocks=6, runs=60, warmup=0)
    first = _record(7, plan)[0]
    assert first == _record(7, plan)[0]
    assert first != _record(8, plan)[0]
    pairs = [tuple(t for t, _ in first[i:i + 2]) for i in range(0, len(first), 2)]
    assert set(pairs) == {("A", "B"), ("B", "A")}  # each round runs both, in either order
    a_first = sum(p == ("A", "B") for p in pairs) / len(pairs)
    assert 0.3 < a_first < 0.7


def test_timing_by_seconds_runs_at_least_min_rounds_per_block():
    times = time_blocks([CountingMaker("A", [], []), CountingMaker("B", [], [])],
                        Plan(blocks=6, seconds=1e-6, warmup=0, min_rounds=5))
    assert all(len(blk) >= 5 for blk in times.runs[0] + times.runs[1])
    assert isinstance(times, BlockTimes)


def test_threads_given_or_the_free_cores(monkeypatch):
    assert choose_threads(3)[:2] == (3, "--threads 3")
    monkeypatch.setattr(timing, "usable_cores", lambda: 4)
    monkeypatch.setattr(timing, "other_runnable_tasks", lambda: (1.4, "/proc/stat"))
    threads, reason, busy = choose_threads(None)
    assert (threads, busy) == (3, 1.4) and "1.4 other runnable" in reason and "4 core" in reason
    monkeypatch.setattr(timing, "other_runnable_tasks", lambda: (9.0, "/proc/stat"))
    assert choose_threads(None)[0] == 1


def test_other_runnable_tasks_reads_a_count():
    busy, source = timing.other_runnable_tasks(samples=2, interval=0.0)
    assert busy >= 0 and source in ("/proc/stat", "load average", "unknown")
