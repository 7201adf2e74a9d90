"""Plain results of every stage (fuse, verify, bench, calibrate). Rendering lives in bnfold.render."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


def to_plain(obj: Any) -> Any:
    """dataclasses → dicts, tuples → lists, numpy scalars → Python numbers, for JSON.

    JSON has no NaN or ±Infinity: a non-finite number becomes null (e.g. "no rtol would pass").
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


@dataclass
class FoldedBN:
    bn: str
    producer: str
    pattern: str  # e.g. "Conv", "ConvTranspose", "Gemm", "MatMul+Add", "next Gemm", "Conv+Mul"
    graph: str = ""  # "" for the main graph, else the path of the subgraph
    op: str = "BatchNormalization"  # or "Mul"/"Add": a BN an exporter had already split
    site: str = ""  # a Mul and the Add after it share "mul+add": one BN-like site; "" for a site of its own


@dataclass
class SkippedBN:
    bn: str
    reason: str
    producer: str | None = None
    graph: str = ""
    op: str = "BatchNormalization"  # or "Mul"/"Add" right after a layer, that did not fold


@dataclass
class RewrittenBN:
    """A BN that could not be folded, rewritten as Mul+Add (--standalone affine)."""

    bn: str
    reason: str  # why it was not folded
    graph: str = ""


@dataclass
class MergedBranches:
    """Parallel branches of one input, summed by an Add (tree), merged into one Conv (RepVGG-style)."""

    add: str  # the Add whose output the merged Conv now computes
    conv: str  # the new Conv
    branches: list[str]  # e.g. "Conv 'c3' 3×3", "BN 'bn_id' (identity)", "identity"
    kernel: list[int]
    graph: str = ""


@dataclass
class UnmergedBranches:
    """Branches of one input summed by an Add that could not be merged, and why."""

    add: str
    reason: str
    graph: str = ""


@dataclass
class VarianceCorrection:
    """A stored biased variance multiplied by m/(m−1) before folding (README, "The m/(m−1) correction")."""

    bn: str
    values_per_channel: int  # m
    factor: float  # m / (m − 1)


@dataclass
class WeightSetReport:
    """One set of weights of a torch checkpoint: a module, or a state_dict (under a key)."""

    name: str  # its key in the checkpoint dict ("" for the file itself)
    kind: str  # "module", "state_dict", "torchscript", "torch-export"
    dtype: str
    prefix: str = ""  # the state_dict keys' prefix ("model.", "_orig_mod."), kept in the output
    folded: int = 0
    kept: int = 0


@dataclass
class SiteCounts:
    """BN-like sites as a user counts them: a BatchNormalization is one, a Mul and the Add after it
    (a BN an exporter split in two, e.g. FrozenBatchNorm2d) are one, a lone Mul or Add is one.
    Kinds: "BatchNormalization", "Mul+Add", "Mul", "Add"."""

    folded: int = 0
    kept: int = 0
    folded_kinds: dict[str, int] = field(default_factory=dict)
    kept_kinds: dict[str, int] = field(default_factory=dict)


def folded_sites(folded: list[FoldedBN]) -> list[list[FoldedBN]]:
    """The folded nodes grouped by BN-like site, in the order the sites were first folded."""
    groups: dict[tuple, list[FoldedBN]] = {}
    for k, entry in enumerate(folded):
        groups.setdefault((entry.graph, entry.site) if entry.site else (entry.graph, k), []).append(entry)
    return list(groups.values())


def site_kind(entries: list) -> str:
    return "+".join(e.op for e in entries) if entries[0].op != "BatchNormalization" else "BatchNormalization"


def count_sites(folded: list[FoldedBN], skipped: list["SkippedBN"]) -> SiteCounts:
    counts = SiteCounts()
    for group in folded_sites(folded):
        kind = site_kind(group)
        counts.folded_kinds[kind] = counts.folded_kinds.get(kind, 0) + 1
        counts.folded += 1
    for entry in skipped:
        counts.kept_kinds[entry.op] = counts.kept_kinds.get(entry.op, 0) + 1
        counts.kept += 1
    return counts


@dataclass
class FoldReport:
    input: str
    output: str | None
    format: str  # "onnx", "torch-pickle", "torchscript", "torch-export", "state_dict"
    folded: list[FoldedBN] = field(default_factory=list)
    skipped: list[SkippedBN] = field(default_factory=list)
    rewritten: list[RewrittenBN] = field(default_factory=list)
    merged: list[MergedBranches] = field(default_factory=list)
    unmerged: list[UnmergedBranches] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    variance: list[VarianceCorrection] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    bn_before: int = 0
    bn_after: int = 0
    size_before: int | None = None
    size_after: int | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    untraced: list[str] = field(default_factory=list)  # torch modules neither fx nor torch.export could trace
    weight_sets: list[WeightSetReport] = field(default_factory=list)  # torch: what was folded in the file
    identity_bns: int = 0  # torch: folded BNs left in place as identities (state_dict layout, shared graphs)
    unchanged_keys: list[str] = field(default_factory=list)  # torch checkpoint dicts: written back as they came
    verify: "VerifyReport | None" = None  # with --verify
    calibration: "CalibrationReport | None" = None  # with --calibrate

    @property
    def sites(self) -> SiteCounts:
        return count_sites(self.folded, self.skipped)

    def to_dict(self) -> dict[str, Any]:
        data = to_plain(self)
        data["sites"] = to_plain(self.sites)  # derived from "folded" and "skipped", which stay one entry per node
        return data


# -- verify -----------------------------------------------------------------------------------


@dataclass
class InputInfo:
    name: str
    shape: list[int]
    dtype: str


@dataclass
class OutputComparison:
    """One leaf of the outputs, by its path: `output` (a bare tensor), an ONNX output's name,
    or a path into nested outputs such as `[0]['boxes']` or `.logits`."""

    name: str
    passed: bool
    shape: list[int] = field(default_factory=list)
    dtype: str = ""
    atol: float = 0.0
    rtol: float = 0.0
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    mean_abs_error: float = 0.0
    cosine_similarity: float = 1.0
    mismatched: int = 0
    elements: int = 0
    mismatch_fraction: float = 0.0
    nonfinite_mismatches: int = 0
    min_atol_to_pass: float = 0.0  # at the given rtol
    min_rtol_to_pass: float = 0.0  # at the given atol
    argmax_agreement: float | None = None  # classifier-shaped [N, K] outputs
    worst_index: list[int] | None = None
    message: str = ""
    # "tensor": compared element by element; "value": a non-tensor leaf (int, str, None, …) that
    # must be equal; "structure": a container that differs in kind, or a leaf only one side has
    kind: str = "tensor"


@dataclass
class SiteComparison:
    """One fold site: the original's layer(s) and BN against the fused layer, both computed in
    float64 on the original's activation at the layer's input, each difference against the bound
    that rounding the fused layer's stored weights to the model's dtype once allows."""

    name: str  # "Conv 'conv1' ← BatchNormalization 'bn1'"
    layer: str  # the fused layer's node name
    op: str  # its op type: Conv, ConvTranspose, Gemm, MatMul
    folded: list[str]  # the original's BN (or per-channel Mul/Add) nodes this site covers
    input: str  # the activation both sides are fed: the layer's input in both graphs
    output: str  # the tensor both sides compute from it
    dtype: str  # of the fused layer's weight: its unit roundoff sets the bound
    passed: bool
    ratio: float = 0.0  # the worst |fused − original| / bound over the tests; ≤ 1 is within one rounding
    test: str = ""  # which test gave `ratio`: "elementwise", "bias" (zero input), "channel"
    ratios: dict[str, float] = field(default_factory=dict)  # the worst ratio of each test
    max_abs_error: float = 0.0  # on the activations, in the output's units
    elements: int = 0  # output elements compared, over all batches
    channel: int | None = None  # the output channel where `ratio` was found
    message: str = ""


@dataclass
class SkippedSite:
    """A folded BN the per-site check could not isolate or compute, and why."""

    name: str
    reason: str


@dataclass
class VerifyReport:
    original: str
    fused: str
    passed: bool
    runtime: str  # "onnxruntime", "torch", "torch vs onnxruntime"
    provider: str
    atol: float | None  # None: per-dtype defaults (each output says what it used)
    rtol: float | None
    seed: int | None  # None when the inputs came from --data
    batches: int
    inputs: list[InputInfo] = field(default_factory=list)
    outputs: list[OutputComparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    compared_elements: int = 0  # tensor elements compared, over all outputs and batches; 0 is never a pass
    # ONNX: every fold site checked on its own against one rounding of the fused weights
    sites: list[SiteComparison] = field(default_factory=list)
    skipped_sites: list[SkippedSite] = field(default_factory=list)
    outputs_passed: bool = False
    sites_passed: bool | None = None  # None: no fold site was checked (the outputs alone decide)
    decided_by: str = ""  # the checks that failed ("outputs", "fold sites", "outputs and fold sites"), or that passed

    @property
    def failures(self) -> list[OutputComparison]:
        return [o for o in self.outputs if not o.passed]

    @property
    def failed_sites(self) -> list[SiteComparison]:
        return [s for s in self.sites if not s.passed]

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


# -- bench ------------------------------------------------------------------------------------


@dataclass
class Timing:
    median_ms: float  # over all timed runs of all blocks, on the result's clock
    p10_ms: float
    p90_ms: float
    mean_ms: float
    runs: int
    session_ms: float  # median time to make a fresh session (or module copy), one per block


@dataclass
class BenchResult:
    provider: str  # onnxruntime: its provider (cpu, cuda, …); torch: the device (cpu, cuda)
    level: str  # onnxruntime: optimization level; torch: the form timed (eager, torchscript, export)
    batch_size: int
    a: Timing
    b: Timing
    speedup: float  # exp(median over blocks of log(median A / median B)): > 1 means B (fused) is faster
    speedup_ci: list[float]  # 95 % order-statistic interval over blocks
    runtime: str = "onnxruntime"  # or "torch"
    verdict: str = ""  # "B faster", "B slower", "same within ±1 %", "cannot tell"
    why: str = ""  # the verdict in words, with the noise when that is the reason
    spread_pct: float = 0.0  # run-to-run spread: robust sd of the per-block ratio, in %
    half_width_pct: float = 0.0  # half the interval's width, relative to the speed-up, in %
    blocks: int = 0
    block_ratios: list[float] = field(default_factory=list)
    clock: str = "wall"  # "thread cpu" (1 thread on a CPU: preemption not counted) or "wall"
    placement: dict[str, dict[str, int]] | None = None  # non-CPU provider: nodes per provider, of A and of B
    fail_below: str | None = None  # with --fail-below: "pass", "fail" or "cannot tell"
    # the interval the verdict and --fail-below read: speedup_ci, widened by aa_bias_pct when the A/A check saw bias
    decision_ci: list[float] = field(default_factory=list)
    # with --aa-check: A against A′ (a second copy of A, timed in the same blocks)
    aa_speedup: float | None = None
    aa_ci: list[float] | None = None
    aa_check: str | None = None  # "passed" (aa_ci holds 1.00) or "biased" (it does not)
    aa_bias_pct: float | None = None  # how far aa_ci stays from 1.00, in %


@dataclass
class ModelInfo:
    path: str
    file_size: int | None  # None: made in memory (B fused on the fly in torch)
    nodes: int | None  # of the ONNX model (or of the torch module's graph; None where unknown)
    bn_nodes: int | None
    format: str = "onnx"  # or the torch checkpoint's kind


@dataclass
class BenchReport:
    original: ModelInfo
    fused: ModelInfo
    threads: int
    warmup: int  # per block and model
    seed: int
    threads_reason: str = ""
    blocks: int = 0
    seconds: float | None = None  # timed seconds per configuration (None with --runs)
    runs: int | None = None
    runtimes: list[str] = field(default_factory=list)  # "onnxruntime", "torch"
    inputs: list[InputInfo] = field(default_factory=list)
    results: list[BenchResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. a GPU provider that ran nodes on the CPU
    aa_checked: bool = False  # every block also timed A′, a second copy of A
    fail_below: float | None = None
    fail_below_outcome: str | None = None  # "pass", "fail", "cannot tell": decides the exit code
    fail_below_why: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


# -- calibrate --------------------------------------------------------------------------------


@dataclass
class BNStatistics:
    bn: str
    values_per_channel: int  # n_b of a full batch
    mean_old: float  # channel average, for the eye; the file holds every channel
    mean_new: float
    var_old: float
    var_new: float
    # Means near 0 make a relative change meaningless: a mean's drift is given absolutely and
    # in units of the channel's standard deviation, the scale BN divides by.
    mean_max_abs_change: float  # max over channels of |new − old|
    mean_max_change_in_std: float  # max over channels of |new − old| / sqrt(old σ²)
    var_max_change: float  # max over channels of |new − old| / old σ²


@dataclass
class CalibrationReport:
    input: str
    output: str | None
    upstream: str
    batch_size: int
    batches: int = 0
    samples: int = 0
    dropped_batches: int = 0
    bns: list[BNStatistics] = field(default_factory=list)
    variance: list[VarianceCorrection] = field(default_factory=list)  # m/(m−1) applied first
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)
