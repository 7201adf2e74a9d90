"""bnfold: fold BatchNormalization into the layer before it, provably without changing the network."""
from __future__ import annotations

import importlib

from .errors import BadInput, BnfoldError, UsageError

__version__ = "0.1.0"

# Imported on first use, so a command pays only for the path it takes (torch costs seconds to
# import, onnx and onnxruntime a fraction of one).
_LAZY = {
    "calibrate": "onnxfold.calibrate", "fuse_onnx": "onnxfold.fuse", "load_onnx": "onnxfold.io",
    "save_onnx": "onnxfold.io", "BenchOptions": "options", "CalibrateOptions": "options", "FuseOptions": "options",
    "LoadOptions": "options", "VarianceOptions": "options", "VerifyOptions": "options", "BenchReport": "report",
    "CalibrationReport": "report", "FoldReport": "report", "VerifyReport": "report", "bench": "stages.bench",
    "calibrate_file": "stages.calibrate", "fuse_file": "stages.fuse", "verify": "stages.verify",
    "fuse_module": "torchfold.fuse",
}

__all__ = ["BadInput", "BnfoldError", "UsageError", *sorted(_LAZY)]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
