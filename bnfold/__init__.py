"""bnfold: fold BatchNormalization into the layer before it, provably without changing the network."""
from __future__ import annotations

from .errors import BadInput, BnfoldError, UsageError
from .onnxfold.calibrate import calibrate
from .onnxfold.fuse import fuse_onnx
from .onnxfold.io import load_onnx, save_onnx
from .options import (BenchOptions, CalibrateOptions, FuseOptions, LoadOptions, VarianceOptions,
                      VerifyOptions)
from .report import BenchReport, CalibrationReport, FoldReport, VerifyReport
from .stages.bench import bench
from .stages.calibrate import calibrate_file
from .stages.fuse import fuse_file
from .stages.verify import verify

__version__ = "0.1.0"

__all__ = [
    "BadInput", "BenchOptions", "BenchReport", "BnfoldError", "CalibrateOptions", "CalibrationReport", "FoldReport",
    "FuseOptions", "LoadOptions", "UsageError", "VarianceOptions", "VerifyOptions", "VerifyReport", "bench",
    "calibrate", "calibrate_file", "fuse_file", "fuse_module", "fuse_onnx", "load_onnx", "save_onnx", "verify",
]


def __getattr__(name: str):
    # torch costs a second and ~200 MB to import: only the torch path pays for it.
    if name == "fuse_module":
        from .torchfold.fuse import fuse_module

        return fuse_module
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
