"""Timing A against B, and the statistics that say how sure the answer is.

Two sessions of the *same* model do not run at the same speed, and each keeps its speed for
life: its worker thread sits where the scheduler put it, its buffers where the allocator put
them (BENCHMARKS.md, "Benchmark noise"). So the time is cut into blocks. Each block makes
new runners for A and B (sessions, module copies), in an order that alternates between
blocks (the one made first tends to be slower), warms them up, then times rounds in which A
and B run once each, in a random order drawn from a generator seeded with --seed. Runners
are dropped at the end of the block.

Per block b the speed-up is r_b = median(A_b) / median(B_b). The estimate is
exp(median_b log r_b); its 95 % interval is the distribution-free interval for that median
from order statistics of the log r_b: [x(k), x(B+1−k)], with k the largest rank such that
P(Bin(B, ½) ≤ k−1) ≤ 2.5 % (B = 20 blocks: x(6)…x(15), coverage 95.9 %). The interval
counts blocks, not runs: thousands of runs of one session pair say much about that pair
and nothing about the next.

With one thread on a CPU the clock is the calling thread's CPU time (time.thread_time): the
model then runs on that thread alone, and time it spends preempted by other work is not
counted. Otherwise it is the wall clock.

The core times callables ("runners", made afresh by "makers"), so onnxruntime sessions and
torch modules share the interleaving and the statistics.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from math import comb

import numpy as np

from ..options import DEFAULT_SECONDS
from ..report import BenchResult, Timing

Progress = Callable[[int, int], None]
Runner = Callable[[], object]  # runs the model once
Maker = Callable[[], Runner]  # makes a fresh runner: a new session, a new copy of a module

CONFIDENCE = 0.95
MIN_BLOCKS = 6  # fewer blocks cannot give a 95 % order-statistic interval
SAME_WITHIN = 0.01  # a speed-up inside 1 ± 1 % is "the same"
TOO_NOISY = 0.05  # an undecided interval wider than ±5 % is called too noisy: run longer or quieter

B_FASTER, B_SLOWER, SAME, CANNOT_TELL = "B faster", "B slower", "same within ±1 %", "cannot tell"
AA_PASSED, AA_BIASED = "passed", "biased"


# -- the plan and the core ---------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How long and how often to time. `seconds` is the timed time of one configuration, cut
    evenly into `blocks`; `runs`, when given, replaces it: at least that many runs of each
    model, spread evenly over the blocks."""

    blocks: int = 20
    seconds: float = DEFAULT_SECONDS
    runs: int | None = None
    warmup: int = 3  # per block and model
    min_rounds: int = 5  # per block, when timed by seconds
    cpu_clock: bool = False  # time.thread_time instead of the wall clock

    def rounds_fixed(self) -> int | None:
        return None if self.runs is None else math.ceil(self.runs / self.blocks)


@dataclass
class BlockTimes:
    """What the core measured: seconds per run, per model and block, and how long making each
    block's runner took."""

    runs: list[list[list[float]]]  # [model][block] → run times
    made: list[list[float]] = field(default_factory=list)  # [model][block] → seconds to make the runner


def time_blocks(makers: Sequence[Maker], plan: Plan, seed: int = 0,
                progress: Progress | None = None) -> BlockTimes:
    """Time every maker's runners in interleaved rounds, block by block (see the module)."""
    rng = np.random.default_rng(seed)
    clock = time.thread_time if plan.cpu_clock else time.perf_counter
    n = len(makers)
    result = BlockTimes([[] for _ in makers], [[] for _ in makers])
    for block in range(plan.blocks):
        runners = _make_runners(makers, block, result.made)
        for _ in range(plan.warmup):
            for i in rng.permutation(n):
                runners[i]()
        times = _time_rounds(runners, plan, rng, clock)
        for i in range(n):
            result.runs[i].append(times[i])
        del runners  # the next block gets new ones
        if progress is not None:
            progress(block + 1, plan.blocks)
    return result


def ab_makers(a: Maker, b: Maker, aa_check: bool) -> list[Maker]:
    """A and B, and for the A/A check A′: A's maker once more, so every block makes a second,
    fresh runner of A (bench_result reads a third model as A′)."""
    return [a, b, a] if aa_check else [a, b]


def creation_order(n_models: int, block: int) -> list[int]:
    """The order block b makes its runners in. The one made first tends to run slower for its
    whole life, so the orders are the rotations, each followed by its reverse (AB, BA; ABC,
    CBA, BCA, ACB, CAB, BAC): over any even number of blocks each model is made before each
    other one equally often, and A′ (--aa-check) stands to A as B does."""
    orders: list[list[int]] = []
    for shift in range(n_models):
        rotation = list(range(shift, n_models)) + list(range(shift))
        orders += [o for o in (rotation, rotation[::-1]) if o not in orders]
    return orders[block % len(orders)]


def use_thread_clock(threads: int, on_cpu: bool) -> bool:
    """The calling thread's CPU time is the whole run only on one CPU thread, and is worth
    reading only where it is fine-grained (Windows counts it in 15.6 ms ticks)."""
    return on_cpu and threads == 1 and time.get_clock_info("thread_time").resolution <= 1e-6


def _make_runners(makers: Sequence[Maker], block: int, made: list[list[float]]) -> list[Runner]:
    runners: list[Runner | None] = [None] * len(makers)
    for i in creation_order(len(makers), block):
        start = time.perf_counter()
        runners[i] = makers[i]()
        made[i].append(time.perf_counter() - start)
    return runners  # type: ignore[return-value]


def _time_rounds(runners: Sequence[Runner], plan: Plan, rng: np.random.Generator,
                 clock: Callable[[], float]) -> list[list[float]]:
    times: list[list[float]] = [[] for _ in runners]
    budget = plan.seconds / plan.blocks * len(runners) / 2  # A′ (--aa-check) takes no time from A and B
    fixed = plan.rounds_fixed()
    began, done = time.perf_counter(), 0
    while _more_rounds(done, fixed, plan.min_rounds, budget, time.perf_counter() - began):
        for i in rng.permutation(len(runners)):
            start = clock()
            runners[i]()
            times[i].append(clock() - start)
        done += 1
    return times


def _more_rounds(done: int, fixed: int | None, min_rounds: int, budget: float, elapsed: float) -> bool:
    if fixed is not None:
        return done < fixed
    return done < min_rounds or elapsed < budget


# -- statistics --------------------------------------------------------------------------------


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median(values) -> float:
    return percentile(values, 50)


def order_statistic_rank(n: int, confidence: float = CONFIDENCE) -> int:
    """k, the largest rank with P(Bin(n, ½) ≤ k−1) ≤ (1 − confidence)/2; 0 when n is too
    small for any interval at this confidence."""
    tail, cdf, k = (1 - confidence) / 2, 0.0, 0
    while k < n and cdf + comb(n, k) / 2**n <= tail:
        cdf += comb(n, k) / 2**n
        k += 1
    return k


def coverage(n: int, k: int) -> float:
    """The exact coverage of [x(k), x(n+1−k)] as an interval for the median."""
    return 1 - 2 * sum(comb(n, j) for j in range(k)) / 2**n


def median_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The order-statistic interval [x(k), x(n+1−k)] for the median of `values`."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    k = order_statistic_rank(len(x), confidence)
    if k == 0:
        raise ValueError(f"{len(x)} values are too few for a {confidence:.0%} interval (need {MIN_BLOCKS})")
    return float(x[k - 1]), float(x[len(x) - k])


def block_ratios(a_blocks: Sequence[Sequence[float]], b_blocks: Sequence[Sequence[float]]) -> list[float]:
    """r_b = median(A_b) / median(B_b), one per block."""
    return [median(a) / median(b) for a, b in zip(a_blocks, b_blocks)]


@dataclass
class Speedup:
    """A / B over blocks: estimate, interval, spread, and what they let one say."""

    estimate: float
    low: float
    high: float
    spread_pct: float  # block-to-block spread of the ratio: robust sd of log r_b, in %
    half_width_pct: float  # half the interval's width, relative to the estimate, in %
    verdict: str
    why: str


def speedup_of(ratios: Sequence[float], busy: float | None = None) -> Speedup:
    """Estimate exp(median log r_b), its order-statistic interval, and the verdict."""
    logs = np.log(np.asarray(ratios, dtype=np.float64))
    estimate = math.exp(float(np.median(logs)))
    low, high = (math.exp(v) for v in median_interval(logs))
    spread = 100 * 1.4826 * float(np.median(np.abs(logs - np.median(logs))))
    half = half_width(low, high, estimate)
    verdict, why = judge(low, high, half, busy)
    return Speedup(estimate, low, high, spread, 100 * half, verdict, why)


def half_width(low: float, high: float, estimate: float) -> float:
    return (high - low) / 2 / estimate


def judge(low: float, high: float, half: float, busy: float | None = None) -> tuple[str, str]:
    """The noise rule: the whole interval above 1.01 → B faster; below 0.99 → B slower; inside
    [0.99, 1.01] → the same; else cannot tell, called too noisy when the interval is over ±5 %.

    The interval's width is the noise: a wide interval that still clears 1.01 has resolved the
    question (a 30 % speed-up measured ±8 % is a speed-up), so width alone never overrules it."""
    interval = f"95 % interval {low:.3f}–{high:.3f}"
    if low > 1 + SAME_WITHIN:
        return B_FASTER, f"the whole {interval} is above {1 + SAME_WITHIN:.2f}"
    if high < 1 - SAME_WITHIN:
        return B_SLOWER, f"the whole {interval} is below {1 - SAME_WITHIN:.2f}"
    if low >= 1 - SAME_WITHIN and high <= 1 + SAME_WITHIN:
        return SAME, f"the whole {interval} is inside {1 - SAME_WITHIN:.2f}–{1 + SAME_WITHIN:.2f}"
    if half > TOO_NOISY:
        return CANNOT_TELL, f"too noisy: {_wide(interval, half, busy)}, holding both no difference and one over " \
                            f"{100 * SAME_WITHIN:.0f} %; run longer (--seconds) or on a quieter machine"
    return CANNOT_TELL, (f"the {interval} holds both no difference and one over {100 * SAME_WITHIN:.0f} %; "
                         "run longer (--seconds) to narrow it")


def _wide(interval: str, half: float, busy: float | None) -> str:
    load = "" if busy is None else f", {busy:.1f} other runnable task(s) when it started"
    return f"the {interval} is ±{100 * half:.1f} % wide{load}"


PASS, FAIL = "pass", "fail"


def threshold_outcome(low: float, high: float, half: float, threshold: float) -> tuple[str, str]:
    """--fail-below X: fail only when the whole interval is below X; pass when it is at or above
    X; cannot tell when it straddles X (too noisy when it is also over ±5 % wide)."""
    interval = f"95 % interval {low:.3f}–{high:.3f}"
    if high < threshold:
        return FAIL, f"the whole {interval} is below {threshold:g}"
    if low >= threshold:
        return PASS, f"the whole {interval} is at or above {threshold:g}"
    if half > TOO_NOISY:
        return CANNOT_TELL, f"too noisy: {_wide(interval, half, None)} and straddles {threshold:g}"
    return CANNOT_TELL, f"the {interval} straddles {threshold:g}"


def timing_of(seconds_per_block: Sequence[Sequence[float]], made: Sequence[float]) -> Timing:
    """Pooled run times of one model (p10/p50/p90/mean in ms) and its median making time."""
    ms = np.concatenate([np.asarray(b, dtype=np.float64) for b in seconds_per_block]) * 1e3
    return Timing(percentile(ms, 50), percentile(ms, 10), percentile(ms, 90), float(ms.mean()), int(ms.size),
                  median(made) * 1e3 if len(made) else 0.0)


# -- threads from the current load -------------------------------------------------------------


def other_runnable_tasks(samples: int = 10, interval: float = 0.02) -> tuple[float, str]:
    """Tasks besides us that want a CPU now: the median of /proc/stat's procs_running − 1 over
    ~0.2 s (the 1-minute load average lags a job that just started or stopped; it is the
    fallback where /proc/stat is missing). Returns the count and where it came from."""
    values = []
    try:
        for k in range(samples):
            with open("/proc/stat") as fh:
                values += [int(line.split()[1]) - 1 for line in fh if line.startswith("procs_running")]
            if k + 1 < samples:
                time.sleep(interval)
    except (OSError, ValueError, IndexError):
        values = []
    if values:
        return max(0.0, float(np.median(values))), "/proc/stat"
    try:
        return max(0.0, os.getloadavg()[0]), "load average"
    except OSError:
        return 0.0, "unknown"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def choose_threads(given: int | None) -> tuple[int, str, float | None]:
    """The intra-op thread count, why, and the other runnable tasks seen (None if given).

    On a shared machine a second thread only helps when a core is free: with one other
    CPU-bound job on 2 cores, 2 threads were no faster and two sessions of one model differed
    by up to 1.6× (the worker's wake-up waits on the busy core). So: the free cores, at least 1."""
    cores = usable_cores()
    if given is not None:
        return given, f"--threads {given}", None
    busy, source = other_runnable_tasks()
    threads = max(1, cores - int(round(busy)))
    return threads, f"{cores} core(s), {busy:.1f} other runnable task(s) ({source}): {threads} free", busy


# -- results -----------------------------------------------------------------------------------


def bench_result(times: BlockTimes, plan: Plan, provider: str, level: str, batch: int, busy: float | None,
                 runtime: str = "onnxruntime") -> BenchResult:
    """A against B (models 0 and 1 of `times`) as a BenchResult, with its verdict; a model 2 is
    A′, a second copy of A, and A against A′ is the A/A check."""
    ratios = block_ratios(times.runs[0], times.runs[1])
    s = speedup_of(ratios, busy)
    a, b = timing_of(times.runs[0], times.made[0]), timing_of(times.runs[1], times.made[1])
    result = BenchResult(provider, level, batch, a, b, s.estimate, [s.low, s.high], runtime, s.verdict, s.why,
                         s.spread_pct, s.half_width_pct, plan.blocks, ratios,
                         "thread cpu" if plan.cpu_clock else "wall")
    result.decision_ci = [s.low, s.high]
    if len(times.runs) > 2:
        aa = speedup_of(block_ratios(times.runs[0], times.runs[2]), busy)
        check = aa_check(s, aa, busy)
        result.aa_speedup, result.aa_ci, result.aa_check, result.aa_bias_pct = aa.estimate, [aa.low, aa.high], \
            check.outcome, check.bias_pct
        result.decision_ci, result.verdict, result.why = [check.low, check.high], check.verdict, check.why
    return result


@dataclass
class AACheck:
    outcome: str  # AA_PASSED or AA_BIASED
    bias_pct: float  # how far A/A's interval stays from 1.00, in % (0 when it holds 1.00)
    low: float  # the A/B interval the verdict and --fail-below then use
    high: float
    verdict: str
    why: str


def aa_check(ab: Speedup, aa: Speedup, busy: float | None = None) -> AACheck:
    """The A/A check. A′ is a second copy of A timed in the same blocks, so A/A′ is 1 but for
    what the machine makes up. When A/A′'s interval holds 1.00 nothing changes; when it stays
    a distance d (in log) from 1.00, the machine made up at least that much, and the A/B
    interval is widened by d on both sides before the verdict rule (and --fail-below) reads it:
    a 1 % bias cannot undo a 30 % speed-up, but it can a 1.5 % one."""
    read = f"A against A′, a second copy of A, read {aa.estimate:.3f} ({aa.low:.3f}–{aa.high:.3f})"
    bias = max(0.0, math.log(aa.low), -math.log(aa.high))
    if bias == 0:
        return AACheck(AA_PASSED, 0.0, ab.low, ab.high, ab.verdict, f"{ab.why}; A/A check passed: {read}")
    low, high = ab.low * math.exp(-bias), ab.high * math.exp(bias)
    verdict, why = judge(low, high, half_width(low, high, ab.estimate), busy)
    return AACheck(AA_BIASED, 100 * math.expm1(bias), low, high, verdict,
                   f"A/A check: {read}, {100 * math.expm1(bias):.1f} % away from 1.00, so the A/B interval "
                   f"{ab.low:.3f}–{ab.high:.3f} is widened by that: {why}")


def batch_of(inputs, asked: int) -> int:
    """The batch size a configuration really ran: the first input's leading dimension (a
    --shape or --data input sets its own), else the one asked for."""
    first = next(iter(inputs), None)
    shape = getattr(first, "shape", ())
    return int(shape[0]) if len(shape) else asked


def offset_progress(progress: Progress | None, k: int, n: int) -> Progress | None:
    """Configuration k of n as its share of the whole benchmark's bar."""
    return None if progress is None else ConfigProgress(progress, k, n)


class ConfigProgress:
    def __init__(self, progress: Progress, k: int, n: int):
        self.progress, self.k, self.n = progress, k, n

    def __call__(self, done: int, total: int) -> None:
        self.progress(self.k * 1000 + int(1000 * done / max(1, total)), self.n * 1000)
