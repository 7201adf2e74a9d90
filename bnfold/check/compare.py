"""Compare the outputs of two models, element by element, in float64.

An element of the fused output b fails against the original a only when it is over BOTH
tolerances (polygraphy's rule):

    |a − b| > atol   and   |a − b| > rtol · |a|

or when one of the two is NaN/±Inf and the other is not the same non-finite value. For
each output the report also gives the smallest atol (at the given rtol) and the smallest
rtol (at the given atol) that would have passed, so a failure says how far off it was.

Default tolerances depend on the dtype, and the default atol is relative to the scale of
the output: atol = k · RMS(original). Rounding noise of an honest fold grows with the size
of the values a network computes, so a fixed atol is either too tight for a network with
large outputs or too loose for one with small outputs; scaled by the RMS, one k separates
honest folds from broken ones across networks (benchmarks/measure_tolerances.py).

Outputs may be nested (a detector's `[{"boxes": …, "scores": …}]`, a namedtuple, a dataclass,
an ONNX sequence): both sides are flattened to their leaves, each named by its path
(`[0]['boxes']`, `.logits`, `seq[1]`), and compared leaf by leaf. A tensor leaf is compared
element by element as above; any other leaf (int, str, None, …) must be equal; a path only one
side has, or a container of another kind, is a mismatch. A comparison that compared no tensor
element is never a pass: the caller says why (`nothing_compared`).
"""
from __future__ import annotations

import dataclasses
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import BadInput
from ..report import OutputComparison, VerifyReport

# dtype → (k, rtol) with the default atol = k · RMS(original output). Measured in
# BENCHMARKS.md: fp32 honest folds of resnet50/mobilenet_v2/efficientnet_b0/resnet18 need
# k ≤ 4.5e-5; a 0.5 % error in one channel of one layer, or a 0.01 bias shift, needs k ≥ 3.2e-4.
# fp16 honest folds need k ≤ 8.1e-2: in fp16 the network's own rounding noise hides such
# small errors. bfloat16 (no ORT CPU kernels to measure) is scaled from fp16 by its 8× coarser
# mantissa; float64 by its precision.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-10, 1e-10),
    "float32": (1e-4, 1e-4),
    "float16": (1.5e-1, 1e-2),
    "bfloat16": (1.0, 8e-2),
}


def default_tolerance(dtype: np.dtype) -> tuple[float, float]:
    """(k, rtol) for an output dtype, atol being k · RMS; integers and bools must match exactly."""
    return DEFAULT_TOLERANCES.get(np.dtype(dtype).name, (0.0, 0.0))


def resolve_tolerance(original: np.ndarray, atol: float | None, rtol: float | None) -> tuple[float, float]:
    """The absolute (atol, rtol) used for one output: the user's, or the dtype's default."""
    k, default_rtol = default_tolerance(original.dtype)
    if atol is None:
        values = original[np.isfinite(original)].astype(np.float64) if original.size else original
        rms = float(np.sqrt(np.mean(values * values))) if values.size else 0.0
        atol = k * (rms if rms > 0 else 1.0)
    return atol, (default_rtol if rtol is None else rtol)


def compare_arrays(name: str, original: np.ndarray, fused: np.ndarray, atol: float | None = None,
                   rtol: float | None = None) -> OutputComparison:
    original, fused = np.asarray(original), np.asarray(fused)
    atol, rtol = resolve_tolerance(original, atol, rtol)
    result = OutputComparison(name, False, list(original.shape), str(original.dtype), atol, rtol)
    if original.shape != fused.shape:
        result.message = f"shape differs: original {list(original.shape)}, fused {list(fused.shape)}"
        return result
    if original.dtype != fused.dtype:
        result.message = f"dtype differs: original {original.dtype}, fused {fused.dtype}"
        return result
    a, b = original.astype(np.float64), fused.astype(np.float64)
    result.elements = int(a.size)
    finite = np.isfinite(a) & np.isfinite(b)
    same_nonfinite = (np.isnan(a) & np.isnan(b)) | (~np.isfinite(a) & (a == b))
    nonfinite_bad = ~finite & ~same_nonfinite
    with np.errstate(invalid="ignore"):  # inf − inf where both are inf: masked out below
        diff = np.where(finite, np.abs(a - b), 0.0)
    abs_a = np.where(finite, np.abs(a), 0.0)
    over = (diff > atol) & (diff > rtol * abs_a)
    failed = over | nonfinite_bad
    result.mismatched = int(failed.sum())
    result.nonfinite_mismatches = int(nonfinite_bad.sum())
    result.mismatch_fraction = result.mismatched / max(1, a.size)
    if a.size:
        result.max_abs_error = float(diff.max())
        result.mean_abs_error = float(diff[finite].mean()) if finite.any() else 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(abs_a > 0, diff / abs_a, np.where(diff > 0, np.inf, 0.0))
        result.max_rel_error = float(rel.max())
        # An element passes once either tolerance covers it: the smallest atol that passes all
        # (at the given rtol) is the largest error the rtol does not cover, and vice versa.
        result.min_atol_to_pass = float(np.where(diff > rtol * abs_a, diff, 0.0).max())
        with np.errstate(divide="ignore", invalid="ignore"):
            need = np.where(diff > atol, np.where(abs_a > 0, diff / abs_a, np.inf), 0.0)
        result.min_rtol_to_pass = float(need.max())
        result.cosine_similarity = cosine(a[finite], b[finite])
        worst = failed if failed.any() else np.ones_like(failed)
        score = np.where(worst, np.where(finite, diff, np.inf), -1.0)
        result.worst_index = [int(i) for i in np.unravel_index(int(np.argmax(score)), a.shape)]
    if a.ndim == 2 and a.shape[1] > 1 and a.shape[0] > 0:
        result.argmax_agreement = float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
    result.passed = result.mismatched == 0
    if not result.passed:
        result.message = (f"{result.mismatched} of {result.elements} elements differ "
                          f"(max abs {result.max_abs_error:.3g}, needs atol ≥ {result.min_atol_to_pass:.3g} "
                          f"or rtol ≥ {result.min_rtol_to_pass:.3g})")
        if result.nonfinite_mismatches:
            result.message += f", {result.nonfinite_mismatches} NaN/Inf only on one side"
    return result


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a.ravel(), b.ravel()) / (na * nb))


def compare_outputs(original: dict[str, Any], fused: dict[str, Any], atol: float | None = None,
                    rtol: float | None = None) -> list[OutputComparison]:
    """Every output by name, nested values (ONNX sequences, maps) leaf by leaf; a missing or
    extra output is a failure."""
    return compare_trees(flatten_named(original), flatten_named(fused), atol, rtol)


# -- nested outputs ---------------------------------------------------------------------------

MAX_DEPTH = 100  # an output nested deeper than this (or one that contains itself) is refused
SEQUENCE, MAPPING, RECORD = "sequence", "mapping", "record"
_MISSING = object()
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60

KeyPath = tuple[str, ...]  # path components: an output's name, "[0]", "['boxes']", ".logits"
ArrayOf = Callable[[Any], "np.ndarray | None"]  # a leaf as an array, or None: not a tensor
Expand = Callable[[Any], "list[tuple[str, Any]] | None"]  # a runtime's own containers: children by key


@dataclass(frozen=True)
class Node:
    """A container inside an output. Containers of one kind are the same structure whatever
    their class (a list and a tuple, two namedtuples); their children are compared by key."""

    kind: str  # SEQUENCE, MAPPING, RECORD, or the class of a runtime's own container
    type_name: str
    size: int


@dataclass
class Flat:
    """Outputs flattened: every container (a Node) and every leaf, by path, in the outputs' order."""

    entries: dict[KeyPath, Any] = field(default_factory=dict)

    def leaves(self) -> list[tuple[KeyPath, Any]]:
        return [(p, v) for p, v in self.entries.items() if not isinstance(v, Node)]


def path_name(path: KeyPath) -> str:
    """`[0]['boxes']`; a bare (unnested) output is `output`. Dict keys are shown by repr, so a
    key with control characters is printed escaped."""
    return "".join(path) or "output"


def numpy_array(value: Any) -> np.ndarray | None:
    return value if isinstance(value, np.ndarray) else None


def flatten(value: Any, as_array: ArrayOf = numpy_array, expand: Expand | None = None, root: KeyPath = (),
            where: Path | None = None) -> Flat:
    """Every container and leaf of `value`: lists, tuples, dicts (any Mapping), namedtuples and
    dataclasses are walked; `expand` walks a runtime's own containers; anything else is a leaf."""
    flat = Flat()
    _walk(value, root, flat, as_array, expand, where, 0)
    return flat


def flatten_named(outputs: dict[str, Any], where: Path | None = None) -> Flat:
    """A model's outputs by name (onnxruntime's), each flattened under its name."""
    flat = Flat({(): Node(MAPPING, "outputs", len(outputs))})
    for name, value in outputs.items():
        _walk(value, (str(name),), flat, numpy_array, None, where, 1)
    return flat


def _walk(value: Any, path: KeyPath, flat: Flat, as_array: ArrayOf, expand: Expand | None, where: Path | None,
          depth: int) -> None:
    if depth > MAX_DEPTH:
        raise BadInput(f"an output is nested deeper than {MAX_DEPTH} levels (at {path_name(path[:4])}…)", where)
    array = as_array(value)
    if array is not None:
        flat.entries[path] = array
        return
    children = _children(value, expand)
    if children is None:
        flat.entries[path] = value
        return
    flat.entries[path] = children[0]
    for component, child in children[1]:
        _walk(child, path + (component,), flat, as_array, expand, where, depth + 1)


def _children(value: Any, expand: Expand | None) -> tuple[Node, list[tuple[str, Any]]] | None:
    name = type(value).__name__
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [(f".{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value)]
        return Node(RECORD, name, len(items)), items
    if isinstance(value, tuple) and hasattr(type(value), "_fields"):  # a namedtuple
        return Node(RECORD, name, len(value)), [(f".{k}", v) for k, v in zip(type(value)._fields, value)]
    if isinstance(value, Mapping):
        return Node(MAPPING, name, len(value)), [(f"[{k!r}]", v) for k, v in value.items()]
    if isinstance(value, (list, tuple)):
        return Node(SEQUENCE, name, len(value)), [(f"[{i}]", v) for i, v in enumerate(value)]
    items = expand(value) if expand is not None else None
    return None if items is None else (Node(name, name, len(items)), items)


def compare_trees(original: Flat, fused: Flat, atol: float | None = None,
                  rtol: float | None = None) -> list[OutputComparison]:
    """Every leaf by path. A path only one side has, or a container of another kind (or a
    tensor where the other has a value), is a structure mismatch: reported once, at that path,
    and nothing below it is compared."""
    results: list[OutputComparison] = []
    broken: list[KeyPath] = []
    for path in dict.fromkeys([*original.entries, *fused.entries]):
        if any(path[:len(b)] == b for b in broken):
            continue
        result = _compare_entry(path_name(path), original.entries.get(path, _MISSING),
                                fused.entries.get(path, _MISSING), atol, rtol)
        if result is not None:
            results.append(result)
            broken += [path] if result.kind == "structure" else []
    return results


def _compare_entry(name: str, a: Any, b: Any, atol: float | None, rtol: float | None) -> OutputComparison | None:
    """None for two containers of one kind (their children are compared instead)."""
    if a is _MISSING:
        return _structure(name, b, "not in the original model's output")
    if b is _MISSING:
        return _structure(name, a, "missing from the fused model's output")
    if isinstance(a, Node) and isinstance(b, Node) and a.kind == b.kind:
        return None
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return compare_arrays(name, a, b, atol, rtol)
    if isinstance(a, (Node, np.ndarray)) or isinstance(b, (Node, np.ndarray)):
        return _structure(name, a, f"original is {_describe(a)}, fused is {_describe(b)}")
    return compare_values(name, a, b)


def _structure(name: str, value: Any, message: str) -> OutputComparison:
    array = value if isinstance(value, np.ndarray) else None
    return OutputComparison(name, False, [] if array is None else list(array.shape),
                            str(array.dtype) if array is not None else _type_name(value),
                            message=message, kind="structure")


def compare_values(name: str, original: Any, fused: Any) -> OutputComparison:
    """A non-tensor leaf (int, float, str, None, …): equal, and of the same type, or a mismatch."""
    result = OutputComparison(name, _same_value(original, fused), dtype=type(original).__name__, kind="value")
    if not result.passed:
        result.message = f"value differs: original {_show(original)}, fused {_show(fused)}"
    return result


def _same_value(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b) or bool(a != a and b != b)  # NaN, a float that equals nothing, is the same NaN
    except Exception:  # noqa: BLE001 — an == that is no truth value (or raises) cannot show them equal
        return False


def _type_name(value: Any) -> str:
    return value.type_name if isinstance(value, Node) else type(value).__name__


def _show(value: Any) -> str:
    """A leaf for a message: short, with a string's control characters escaped by repr."""
    return "None" if value is None else f"{type(value).__name__} {_SHORT.repr(value)}"


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"a tensor {value.dtype}{list(value.shape)}"
    if isinstance(value, Node):
        what = {SEQUENCE: "items", MAPPING: "keys", RECORD: "fields"}.get(value.kind, "children")
        return f"a {value.type_name} of {value.size} {what}"
    return _show(value)


def conclude(report: VerifyReport, runs: list[list[OutputComparison]]) -> None:
    """The report's outputs (the worst of each over the batches) and verdict: a pass needs every
    leaf to pass and at least one tensor element compared."""
    report.outputs = merge(runs)
    report.compared_elements = sum(o.elements for o in report.outputs if o.kind == "tensor")
    report.passed = not report.failures and report.compared_elements > 0


def nothing_compared(report: VerifyReport) -> str | None:
    """Why a comparison without a mismatch compared no tensor element (so proves nothing), or None."""
    if report.failures or report.compared_elements:
        return None
    tensors = [o for o in report.outputs if o.kind == "tensor"]
    if tensors:
        shown = ", ".join(f"{o.name} {o.dtype}{o.shape}" for o in tensors[:3])
        return f"no tensor elements to compare: every output tensor is empty ({shown})"
    if report.outputs:
        shown = ", ".join(o.name for o in report.outputs[:3]) + (", …" if len(report.outputs) > 3 else "")
        return f"no tensor outputs to compare: the outputs hold only non-tensor values ({shown})"
    return "no tensor outputs to compare: the model's outputs hold nothing"


def merge(runs: list[list[OutputComparison]]) -> list[OutputComparison]:
    """The worst figures per output over several input batches."""
    merged: dict[str, OutputComparison] = {}
    for run in runs:
        for c in run:
            m = merged.get(c.name)
            if m is None:
                merged[c.name] = OutputComparison(**{**c.__dict__})
                continue
            total = m.elements + c.elements
            m.mean_abs_error = (m.mean_abs_error * m.elements + c.mean_abs_error * c.elements) / max(1, total)
            if c.max_abs_error > m.max_abs_error:
                m.max_abs_error, m.worst_index = c.max_abs_error, c.worst_index
            for key in ("max_rel_error", "min_atol_to_pass", "min_rtol_to_pass"):
                setattr(m, key, max(getattr(m, key), getattr(c, key)))
            m.cosine_similarity = min(m.cosine_similarity, c.cosine_similarity)
            m.mismatched += c.mismatched
            m.nonfinite_mismatches += c.nonfinite_mismatches
            m.elements = total
            m.mismatch_fraction = m.mismatched / max(1, total)
            if c.argmax_agreement is not None:
                m.argmax_agreement = min(m.argmax_agreement if m.argmax_agreement is not None else 1.0,
                                         c.argmax_agreement)
            if m.passed and not c.passed:
                m.kind = c.kind  # the worst batch says what kind of failure it was
            m.passed = m.passed and c.passed
            m.message = m.message or c.message
    return list(merged.values())
