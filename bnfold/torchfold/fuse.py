"""Fuse a PyTorch checkpoint: load, fold (fx / TorchScript / ATen pass), write in the same
format or convert with --to."""
from __future__ import annotations

import copy
import io
import time
from pathlib import Path

import torch
from torch import nn

from ..errors import BadInput
from ..onnxfold.io import file_size
from ..options import FuseOptions
from ..report import CalibrationReport, FoldReport, VarianceCorrection
from .calibrate import calibrate_torch
from .convert import example_inputs, runnable, write_module
from .export import BN_OPS, fold_exported
from .fx import fold_module
from .io import EXPORT, PICKLE, STATE_DICT, TORCHSCRIPT, TorchSource, load_torch
from .variance import correct_torch_variance

STATE_DICT_NOTE = ("state_dict: each folded BN is set to the identity (γ=1, β=0, μ=0, σ²=1−ε) so the file loads "
                   "into the original architecture with strict=True; to remove the BN cost use --to onnx, "
                   "--to pt2, or bnfold.fuse_module at load time")


def fuse_module(module: nn.Module, example: tuple[torch.Tensor, ...] | None = None,
                keep_layout: bool = False) -> tuple[nn.Module, FoldReport]:
    """Fold the BNs of an nn.Module, in place, and return it with a report. `keep_layout` sets
    folded BNs to the identity instead of removing them, so the state_dict keeps its keys.
    A ScriptModule is folded on a private copy (its classes' graphs are shared process-wide)."""
    report = FoldReport(input=type(module).__name__, output=None, format="torch")
    if isinstance(module, torch.jit.ScriptModule):
        from .script import fold_script_module

        module = private_copy(module)
        report.format = TORCHSCRIPT
        return fold_script_module(module, report), report
    report.bn_before = count_bn_modules(module)
    fold_module(module, report, "identity" if keep_layout else "remove", example)
    report.bn_after = count_bn_modules(module)
    return module, report


def private_copy(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Scripted classes share one graph per type across a process; a save/load round trip
    gives this module types of its own, so cutting a BN call cannot reach any other module."""
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer, map_location="cpu")


def count_bn_modules(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def fuse_torch_file(src: Path, target: Path, options: FuseOptions, reference: Path | None = None) -> FoldReport:
    """Fuse the checkpoint `src` into `target`; `reference` receives the module with corrected
    statistics, before folding (what the fused model must equal)."""
    start = time.perf_counter()
    source = load_torch(src, options.load)
    corrections = _correct_variance(source, options)
    calibration = _calibrate_first(source, options)
    if reference is not None:
        torch.save(copy.deepcopy(source.module), reference)
    report, folded = _fold_source(source, options.to)
    if report.untraced and not report.folded:
        raise BadInput(f"{report.untraced[0]} cannot be traced and nothing in it could be folded "
                       f"({report.notes[0] if report.notes else ''})", src)
    report.variance, report.calibration = corrections, calibration
    report.input, report.size_before = str(src), src.stat().st_size
    write_module(source, folded, options.to, target, options.load)
    report.seconds = time.perf_counter() - start
    return report


def _correct_variance(source: TorchSource, options: FuseOptions) -> list[VarianceCorrection]:
    if not options.variance.biased or options.calibrate is not None:
        return []  # calibration writes unbiased statistics: correcting them would apply m/(m−1) twice
    _require_eager(source, "--variance biased")
    return correct_torch_variance(source.module, options.variance, example_inputs(options.load, source.module))


def _calibrate_first(source: TorchSource, options: FuseOptions) -> CalibrationReport | None:
    if options.calibrate is None:
        return None
    _require_eager(source, "--calibrate")
    if options.variance.biased and options.calibrate.upstream == "population":
        example = example_inputs(options.load, source.module)
        corrections = correct_torch_variance(source.module, options.variance, example)
    else:
        corrections = []
    report = calibrate_torch(source.module, options.calibrate)
    report.input, report.variance = str(source.path), corrections
    return report


def _require_eager(source: TorchSource, what: str) -> None:
    if source.kind not in (PICKLE, STATE_DICT):
        raise BadInput(f"{what} needs an eager module (a pickle, or a state_dict with --arch), not {source.kind}",
                       source.path)


def _fold_source(source: TorchSource, to: str) -> tuple[FoldReport, nn.Module]:
    """The report and the folded module to write."""
    if source.kind == EXPORT:
        report = FoldReport(input="", output=None, format=EXPORT)
        gm = runnable(source)
        report.bn_before = count_aten_bn(gm)
        folded = fold_exported(gm, report)
        report.bn_after = count_aten_bn(gm)
        return report, folded
    keep_layout = source.kind == STATE_DICT and to == "same"
    folded, report = fuse_module(source.module, keep_layout=keep_layout)
    report.format = source.kind
    if keep_layout and report.folded:
        report.notes.append(STATE_DICT_NOTE)
    return report, folded


def count_aten_bn(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in BN_OPS)


def output_size(path: Path, to: str) -> int:
    return file_size(path) if to == "onnx" else path.stat().st_size
