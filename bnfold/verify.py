"""The `verify` stage: run the original and the fused model on the same inputs, compare.

Both run in onnxruntime with graph optimizations disabled: ORT's own optimizer would fold
the original's BNs too and could hide a wrong fold. Torch checkpoints are compared in torch
(bnfold.torch_verify) with the same comparison.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from . import formats
from .compare import OutputComparison, compare_outputs, merge
from .errors import BadInput, UsageError
from .inputs import InputInfo, describe_inputs, graph_inputs, load_inputs, make_inputs
from .onnx_io import EXTERNAL_THRESHOLD, check_readable
from .onnx_wire import load_lazy
from .report import to_plain
from .runtime import session


@dataclass
class VerifyReport:
    original: str
    fused: str
    passed: bool
    runtime: str  # "onnxruntime" or "torch"
    provider: str
    atol: float | None  # None: per-dtype defaults (each output says what it used)
    rtol: float | None
    seed: int
    batches: int
    inputs: list[InputInfo] = field(default_factory=list)
    outputs: list[OutputComparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[OutputComparison]:
        return [o for o in self.outputs if not o.passed]

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


def read_signature(path: Path) -> onnx.ModelProto:
    """The graph without weights: enough to know the inputs and outputs."""
    check_readable(path)
    try:
        return load_lazy(path, EXTERNAL_THRESHOLD)
    except (ValueError, IndexError, OSError) as exc:
        raise BadInput(f"not a valid ONNX model ({exc})", path) from None


def verify(original: str | Path, fused: str | Path, *, data: str | Path | None = None,
           shapes: dict[str, list[int]] | None = None, batch_size: int | None = None, seed: int = 0,
           batches: int = 1, atol: float | None = None, rtol: float | None = None, provider: str = "cpu",
           torch_options: Any = None) -> VerifyReport:
    """Compare every output of `fused` against `original` on seeded random (or given) inputs."""
    original, fused = Path(original), Path(fused)
    if batches < 1:
        raise UsageError("--batches must be at least 1")
    if formats.detect_format(original) == formats.TORCH:
        from .torch_verify import verify_torch

        return verify_torch(original, fused, data=data, shapes=shapes, batch_size=batch_size, seed=seed,
                            batches=batches, atol=atol, rtol=rtol, options=torch_options)
    if formats.detect_format(fused) != formats.ONNX:
        raise BadInput("the original is ONNX but this is not an ONNX model", fused)
    signature = read_signature(original)
    _check_same_inputs(signature, read_signature(fused), fused)
    sess_a, sess_b = session(original, provider), session(fused, provider)
    report = VerifyReport(str(original), str(fused), False, "onnxruntime", provider, atol, rtol, seed, batches)
    runs = []
    for k in range(batches):
        if data is not None:
            feeds = load_inputs(data, signature)
        else:
            feeds = make_inputs(signature, shapes=shapes, batch_size=batch_size, seed=seed + k)
        if k == 0:
            report.inputs = describe_inputs(feeds)
        runs.append(compare_outputs(run_session(sess_a, feeds, original), run_session(sess_b, feeds, fused),
                                    atol, rtol))
        if data is not None:
            break  # the user's data is one fixed set
    report.outputs = merge(runs)
    report.passed = all(o.passed for o in report.outputs)
    return report


def run_session(sess, feeds: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(names, feeds)
    except Exception as exc:  # inputs the graph cannot take (shapes that do not line up, ...)
        text = str(exc).strip().splitlines()
        raise BadInput(f"onnxruntime cannot run the model on these inputs: {(text[0] if text else exc)}"[:400],
                       path) from None
    return dict(zip(names, values))


def _check_same_inputs(a: onnx.ModelProto, b: onnx.ModelProto, path: Path) -> None:
    sig = lambda m: {v.name: v.type.tensor_type.elem_type for v in graph_inputs(m)}  # noqa: E731
    if sig(a) != sig(b):
        raise BadInput(f"inputs differ from the original's: {sorted(sig(b))} vs {sorted(sig(a))}", path)
