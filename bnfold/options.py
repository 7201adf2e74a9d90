"""What each command can be told, as typed dataclasses; the defaults are what a user gets
with no flags. Every value is checked when the object is made, so a bad option fails
before any work starts (and before any file is written)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

STANDALONE = ("keep", "affine")
VARIANCE = ("unbiased", "biased")
UPSTREAM = ("batch", "population")
TO = ("same", "onnx", "pt2", "torchscript")
# The most elements bnfold feeds one input: 2^40 (4 TiB of float32) is more than any machine
# holds, and keeps every size, and its product with an item size, inside int64, which numpy,
# torch and onnxruntime can represent. Below it, a request too big for this machine's memory
# is "out of memory"; above it, the numbers themselves break (numpy: "maximum allowed
# dimension exceeded", torch: "overflow when unpacking long").
MAX_ELEMENTS = 2**40
MAX_SEED = 2**63 - 1  # torch's generators take 64-bit seeds
MAX_THREADS = 4096  # more threads than any machine has cores is a typo, not a request


def _one_of(value: str, allowed: tuple[str, ...], flag: str) -> None:
    if value not in allowed:
        raise UsageError(f"{flag} must be one of {', '.join(allowed)}, not {value!r}")


def _at_least(value: int | None, low: int, flag: str, high: int = MAX_ELEMENTS) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
        raise UsageError(f"{flag} must be an integer from {low} to {high}, not {value!r}")


def check_shapes(shapes: dict[str, list[int]]) -> None:
    """--shape NAME=D0,D1,…: positive dims whose product is at most MAX_ELEMENTS."""
    for name, dims in shapes.items():
        if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
            raise UsageError(f"--shape {name}={','.join(map(str, dims))}: dimensions must be positive integers")
        check_elements(f"--shape {name}", dims)


def check_elements(what: str, dims: list[int]) -> None:
    """An input of shape `dims` is one bnfold can make: at most MAX_ELEMENTS elements."""
    elements = math.prod(dims)
    if elements > MAX_ELEMENTS:
        raise UsageError(f"{what} {list(dims)} would hold {elements:.3g} elements; bnfold makes inputs of at most "
                         f"2^40 ({MAX_ELEMENTS}) elements")


def _finite(value: float | None, flag: str, *, positive: bool = False) -> None:
    if value is None:
        return
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise UsageError(f"{flag} must be a finite number {'> 0' if positive else '≥ 0'}, not {value!r}")


@dataclass(frozen=True)
class LoadOptions:
    """How to load a PyTorch checkpoint, and what input to trace or export it with."""

    trust_pickle: bool = False
    arch: str | None = None
    arch_kwargs: dict = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    example_input: Path | None = None

    def __post_init__(self):
        check_shapes(self.shapes)


@dataclass(frozen=True)
class VarianceOptions:
    """What the stored running variance is (README, "The m/(m−1) correction"). "biased": × m/(m−1) before use, with
    m = train_batch_size × the BN input's spatial size, or values_per_channel."""

    variance: str = "unbiased"
    train_batch_size: int | None = None
    values_per_channel: int | None = None

    def __post_init__(self):
        _one_of(self.variance, VARIANCE, "--variance")
        _at_least(self.train_batch_size, 1, "--train-batch-size")
        _at_least(self.values_per_channel, 2, "--values-per-channel")
        if self.biased and self.train_batch_size is None and self.values_per_channel is None:
            raise UsageError("--variance biased needs the training batch size (--train-batch-size N) "
                             "or --values-per-channel m")

    @property
    def biased(self) -> bool:
        return self.variance == "biased"


@dataclass(frozen=True)
class CalibrateOptions:
    """Recompute E[x] and Var[x] from `data` in batches of `batch_size` (Algorithm 2)."""

    data: Path
    batch_size: int
    upstream: str = "batch"

    def __post_init__(self):
        _one_of(self.upstream, UPSTREAM, "--upstream")
        _at_least(self.batch_size, 2, "--batch-size (a batch of one sample has no variance)")


@dataclass(frozen=True)
class VerifyOptions:
    """Inputs and tolerances of a comparison. `batch_size` fills a dynamic first dimension."""

    data: Path | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)
    batch_size: int | None = None
    seed: int = 0
    batches: int = 1
    atol: float | None = None
    rtol: float | None = None
    provider: str = "cpu"

    def __post_init__(self):
        check_shapes(self.shapes)
        _at_least(self.batch_size, 1, "--batch-size")
        _at_least(self.seed, 0, "--seed", MAX_SEED)
        _at_least(self.batches, 1, "--batches", MAX_SEED)
        _finite(self.atol, "--atol")
        _finite(self.rtol, "--rtol")


@dataclass(frozen=True)
class FuseOptions:
    """Everything `bnfold fuse` can be told."""

    standalone: str = "keep"  # BNs that cannot fold: "keep", or "affine" (Mul+Add)
    variance: VarianceOptions = field(default_factory=VarianceOptions)
    to: str = "same"  # torch inputs: same, onnx, pt2, torchscript
    load: LoadOptions = field(default_factory=LoadOptions)
    calibrate: CalibrateOptions | None = None  # recompute statistics first
    verify: VerifyOptions | None = None  # verify before the output is put in place

    def __post_init__(self):
        _one_of(self.standalone, STANDALONE, "--standalone")
        _one_of(self.to, TO, "--to")

    @property
    def changes_statistics(self) -> bool:
        """--calibrate and --variance biased change what the model computes, on purpose: the
        fused model is then verified against the corrected model, not against the input."""
        return self.calibrate is not None or self.variance.biased


RUNTIMES = ("auto", "onnxruntime", "torch")
DEFAULT_SECONDS = 4.0
TORCH_FORMS = ("eager", "torchscript", "export")


@dataclass(frozen=True)
class BenchOptions:
    """How `bnfold bench` times A against B. Time is cut into `blocks` with fresh sessions
    each; `seconds` is the timed time per configuration (default 4 s), or `runs` the least
    number of timed runs per model, spread over the blocks. `threads` None: the cores other
    work leaves free. `runtimes` ("auto": onnxruntime for ONNX, torch and onnxruntime for a
    torch checkpoint); `torch_forms` None: the form the checkpoint is in."""

    providers: tuple[str, ...] = ("cpu",)
    batch_sizes: tuple[int, ...] | None = None  # None: 1, or the batch size the model fixes
    levels: tuple[str, ...] = ("disabled", "default")
    threads: int | None = None
    warmup: int = 3
    runs: int | None = None
    seconds: float | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)
    data: Path | None = None
    seed: int = 0
    blocks: int = 20
    runtimes: tuple[str, ...] = ("auto",)
    torch_forms: tuple[str, ...] | None = None
    fail_below: float | None = None
    aa_check: bool | None = None  # time A′ (a second copy of A) in every block too; None: with --fail-below

    @property
    def checks_aa(self) -> bool:
        """The A/A check runs when asked for, and by default under --fail-below, where a run
        that makes differences up would fail a CI job."""
        return self.aa_check if self.aa_check is not None else self.fail_below is not None

    def __post_init__(self):
        check_shapes(self.shapes)
        for n in self.batch_sizes or ():
            _at_least(n, 1, "--batch-size")
        _at_least(self.threads, 1, "--threads", MAX_THREADS)
        _at_least(self.seed, 0, "--seed", MAX_SEED)
        _at_least(self.warmup, 0, "--warmup", MAX_SEED)
        _at_least(self.runs, 1, "--runs", MAX_SEED)
        _at_least(self.blocks, 6, "--blocks (fewer cannot give a 95 % interval)", MAX_SEED)
        _finite(self.seconds, "--seconds", positive=True)
        if self.fail_below is not None and not (math.isfinite(self.fail_below) and self.fail_below > 0):
            raise UsageError(f"--fail-below must be a finite number > 0, not {self.fail_below}")
        if self.runs is not None and self.seconds is not None:
            raise UsageError("--runs and --seconds both say how long to time: give one")
        if not self.providers or self.batch_sizes == () or not self.levels or not self.runtimes:
            raise UsageError("--provider, --batch-size, --level and --runtime each need at least one value")
        for runtime in self.runtimes:
            _one_of(runtime, RUNTIMES, "--runtime")
        for form in self.torch_forms or ():
            _one_of(form, TORCH_FORMS, "--torch-form")

    @property
    def timed_seconds(self) -> float:
        # 4 s: a small CNN against itself (2 cores, under load) gave a 95 % interval of ±1.3 %
        # (at most ±2.1 % in 20 runs) at 4 s, ±1.9 % (up to ±3.3 %) at 2 s (BENCHMARKS.md).
        return DEFAULT_SECONDS if self.seconds is None else self.seconds
