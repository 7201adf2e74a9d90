"""The `verify` stage: compare an original and a fused model, in the runtime their format has."""
from __future__ import annotations

from pathlib import Path

from .. import detect
from ..check.compare import nothing_compared
from ..errors import BadInput
from ..options import LoadOptions, VerifyOptions
from ..report import VerifyReport


def verify(original: str | Path, fused: str | Path, options: VerifyOptions | None = None,
           load: LoadOptions | None = None) -> VerifyReport:
    """Compare every output of `fused` against `original` on seeded random (or given) inputs.

    A comparison that compared no tensor element (no outputs, only non-tensor values, only
    empty tensors) and found no mismatch proves nothing: it is bad input, not a pass."""
    original, fused = Path(original), Path(fused)
    report = _compare(original, fused, options or VerifyOptions(), load or LoadOptions())
    why = nothing_compared(report)
    if why is not None:
        raise BadInput(f"nothing was verified: {why}", original)
    return report


def _compare(original: Path, fused: Path, options: VerifyOptions, load: LoadOptions) -> VerifyReport:
    if detect.detect_format(original) == detect.TORCH:
        from ..torchfold.run import verify_torch

        return verify_torch(original, fused, options, load)
    if detect.detect_format(fused) != detect.ONNX:
        raise BadInput("the original is ONNX but this is not an ONNX model", fused)
    from ..onnxfold.verify import verify_onnx

    return verify_onnx(original, fused, options)
