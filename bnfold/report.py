"""Plain results of the fold stage. Rendering lives in bnfold.render."""
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


@dataclass
class SkippedBN:
    bn: str
    reason: str
    producer: str | None = None
    graph: str = ""


@dataclass
class RewrittenBN:
    """A BN that could not be folded, rewritten as Mul+Add (--standalone affine)."""

    bn: str
    reason: str  # why it was not folded
    graph: str = ""


@dataclass
class VarianceCorrection:
    """A stored biased variance multiplied by m/(m−1) before folding (SPEC §3)."""

    bn: str
    values_per_channel: int  # m
    factor: float  # m / (m − 1)


@dataclass
class FoldReport:
    input: str
    output: str | None
    format: str  # "onnx", "torch-pickle", "torchscript", "torch-export", "state_dict"
    folded: list[FoldedBN] = field(default_factory=list)
    skipped: list[SkippedBN] = field(default_factory=list)
    rewritten: list[RewrittenBN] = field(default_factory=list)
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
    untraced: list[str] = field(default_factory=list)  # torch modules fx could not trace
    verify: Any = None  # a VerifyReport when fused with --verify
    calibration: Any = None  # a CalibrationReport when fused with --calibrate

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)
