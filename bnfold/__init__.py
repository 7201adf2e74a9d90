"""bnfold: fold BatchNormalization into the layer before it, provably without changing the network."""
from __future__ import annotations

from .bench import BenchReport, bench
from .calibrate import CalibrationReport, calibrate
from .errors import BadInput, BnfoldError, UsageError
from .fuse import FuseOptions, fuse_file, fuse_onnx
from .onnx_io import load_onnx, save_onnx
from .report import FoldReport
from .verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "BadInput", "BenchReport", "BnfoldError", "CalibrationReport", "FoldReport", "FuseOptions", "UsageError",
    "VerifyReport", "bench", "calibrate", "fuse_file", "fuse_module", "fuse_onnx", "load_onnx", "save_onnx", "verify",
]


def __getattr__(name: str):
    # torch costs a second and ~200 MB to import: only the torch path pays for it.
    if name == "fuse_module":
        from .torch_fuse import fuse_module

        return fuse_module
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
