"""The `fuse` stage for PyTorch checkpoints: load → fold (torch_pass) → save in the same
format, or export as ONNX / TorchScript / torch.export with --to."""
from __future__ import annotations

import copy
import dataclasses
import io
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import BadInput, UsageError
from .onnx_io import file_size, resolve_output
from .report import FoldReport
from .torch_io import (EXPORT, PICKLE, STATE_DICT, TORCHSCRIPT, TorchSource, atomic_write, load_arrays, load_torch,
                       save_state_dict)
from .torch_pass import fold_module, guess_example

SUFFIX = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}


def fuse_module(module: nn.Module, example: tuple[torch.Tensor, ...] | None = None,
                keep_layout: bool = False) -> tuple[nn.Module, FoldReport]:
    """Fold the BNs of an nn.Module (in place). `keep_layout` sets folded BNs to the identity
    instead of removing them, so the state_dict keeps its keys."""
    report = FoldReport(input=type(module).__name__, output=None, format="torch")
    if isinstance(module, torch.jit.ScriptModule):
        from .torch_script_pass import fold_script_module

        module = private_copy(module)
        report.format = TORCHSCRIPT
        return fold_script_module(module, report), report
    _count_bn(module, report, "bn_before")
    fold_module(module, report, "identity" if keep_layout else "remove", example)
    _count_bn(module, report, "bn_after")
    return module, report


def private_copy(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Scripted classes share one graph per type across a process; a save/load round trip
    gives this module types of its own, so cutting a BN call cannot reach any other module."""
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer, map_location="cpu")


def _count_bn(module, report: FoldReport, key: str) -> None:
    n = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
    setattr(report, key, n)


def example_inputs(options, module: Any) -> tuple[torch.Tensor, ...] | None:
    """--example-input, else --shape (one per input, in order), else a guess from the first layer."""
    if options.example_input:
        return load_arrays(options.example_input)
    if options.shapes:
        dtype = next((p.dtype for p in module.parameters()), torch.float32) if isinstance(module, nn.Module) \
            else torch.float32
        g = torch.Generator().manual_seed(0)
        return tuple(torch.randn(*dims, generator=g, dtype=dtype) for dims in options.shapes.values())
    return guess_example(module) if isinstance(module, nn.Module) else None


def fuse_torch_file(src: Path, output: Path | None, in_place: bool, options) -> FoldReport:
    start = time.perf_counter()
    src = Path(src)
    source = load_torch(src, trust_pickle=options.trust_pickle, arch=options.arch, arch_kwargs=options.arch_kwargs)
    to = options.to
    if to not in ("same", "onnx", "pt2", "torchscript"):
        raise UsageError(f"--to must be same, onnx, pt2 or torchscript, not {to!r}")
    dst = resolve_output(src, Path(output) if output else None, in_place, None if to == "same" else SUFFIX[to])
    if options.variance != "unbiased":
        from .variance import correct_torch_variance

        if source.kind not in (PICKLE, STATE_DICT):
            raise BadInput(f"--variance biased needs an eager module (a pickle, or a state_dict with --arch), "
                           f"not {source.kind}", src)
        corrections = correct_torch_variance(source.module, options, example_inputs(options, source.module))
    else:
        corrections = []
    calibration = _calibrate_first(source, options)
    with tempfile.TemporaryDirectory(prefix=".bnfold-verify-", dir=dst.parent) as staging:
        baseline = _baseline(source, options, Path(staging))
        report = _fold_source(source, to)
        if report.untraced and not report.folded:
            raise BadInput(f"{report.untraced[0]} cannot be traced and nothing in it could be folded "
                           f"({report.notes[0] if report.notes else ''})", src)
        report.variance, report.calibration = corrections, calibration
        report.input, report.size_before = str(src), src.stat().st_size
        if getattr(options, "verify", False):
            from .fuse import verify_staged

            staged = Path(staging) / dst.name
            _write(source, report, to, staged, options)
            verify_options = dataclasses.replace(options, trust_pickle=True) if baseline != src else options
            if not verify_staged(baseline, staged, dst, verify_options, report):
                report.seconds = time.perf_counter() - start
                return report
        else:
            _write(source, report, to, dst, options)
    report.output, report.size_after = str(dst), file_size(dst) if to == "onnx" else dst.stat().st_size
    report.seconds = time.perf_counter() - start
    return report


def _baseline(source: TorchSource, options, staging: Path) -> Path:
    """What the fused model must equal: the input, or (after --calibrate / --variance biased)
    the module with its corrected statistics, pickled into the staging folder. That pickle is
    ours, so verify may load it (and our own output) with trust_pickle."""
    from .fuse import changes_statistics

    if not getattr(options, "verify", False) or not changes_statistics(options):
        return source.path
    path = staging / "reference.pt"
    torch.save(copy.deepcopy(source.module), path)
    return path


def _calibrate_first(source: TorchSource, options):
    if getattr(options, "calibrate", None) is None:
        return None
    if options.batch_size is None:
        raise UsageError("--calibrate needs --batch-size N")
    if source.kind not in (PICKLE, STATE_DICT):
        raise BadInput(f"--calibrate needs an eager module (a pickle, or a state_dict with --arch), "
                       f"not {source.kind}", source.path)
    from .calibrate import calibrate_torch

    report = calibrate_torch(source.module, options.calibrate, options.batch_size, upstream=options.upstream)
    report.input = str(source.path)
    return report


def _as_module(source: TorchSource):
    """The runnable module; for a program, one unlifted copy that later steps share."""
    if source.kind != EXPORT:
        return source.module
    if getattr(source, "unlifted", None) is None:
        source.unlifted = source.module.module()
    return source.unlifted


def _fold_source(source: TorchSource, to: str) -> FoldReport:
    if source.kind == EXPORT:
        from .torch_export_pass import fold_exported

        report = FoldReport(input="", output=None, format=EXPORT)
        gm = _as_module(source)
        report.bn_before = _count_aten_bn(gm)
        source.folded = fold_exported(gm, report)
        report.bn_after = _count_aten_bn(gm)
        return report
    keep_layout = source.kind == STATE_DICT and to == "same"
    module, report = fuse_module(source.module, keep_layout=keep_layout)
    source.folded = module
    report.format = source.kind
    if keep_layout and report.folded:
        report.notes.append("state_dict: each folded BN is set to the identity (γ=1, β=0, μ=0, σ²=1−ε) so the "
                            "file loads into the original architecture with strict=True; to remove the BN cost "
                            "use --to onnx, --to pt2, or bnfold.fuse_module at load time")
    return report


def _count_aten_bn(gm) -> int:
    from .torch_export_pass import BN_OPS

    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in BN_OPS)


def _write(source: TorchSource, report: FoldReport, to: str, dst: Path, options) -> None:
    module = source.folded
    if to == "same":
        if source.kind == STATE_DICT:
            save_state_dict(source, module.state_dict(), dst)
        elif source.kind == TORCHSCRIPT:
            atomic_write(dst, lambda p: torch.jit.save(module, str(p)))
        elif source.kind == EXPORT:
            args, kwargs = source.module.example_inputs or ((), {})
            program = _export(module, args, kwargs, dynamic_dims(source.module))
            atomic_write(dst, lambda p: torch.export.save(program, str(p)))
        else:
            atomic_write(dst, lambda p: torch.save(module, str(p)))
        return
    example = _example_for(source, options, module)
    if to == "onnx":
        from .onnx_io import save_onnx
        import onnx

        buffer = io.BytesIO()
        _to_onnx(module, example, buffer)
        save_onnx(onnx.load_from_string(buffer.getvalue()), dst)
    elif to == "torchscript":
        traced = torch.jit.trace(module, example) if not isinstance(module, torch.jit.ScriptModule) else module
        atomic_write(dst, lambda p: torch.jit.save(traced, str(p)))
    else:
        program = _export(module, example, {})
        atomic_write(dst, lambda p: torch.export.save(program, str(p)))


def _example_for(source: TorchSource, options, module) -> tuple[torch.Tensor, ...]:
    if source.kind == EXPORT and not options.shapes and not options.example_input:
        return tuple(source.module.example_inputs[0])
    example = example_inputs(options, module)
    if example is None:
        raise UsageError("cannot tell the model's input shape: pass --shape NAME=D0,D1,… or --example-input")
    return example


def dynamic_dims(program) -> tuple | None:
    """The original program's dynamic dimensions, so that the re-export keeps them."""
    user_inputs = [s.arg.name for s in program.graph_signature.input_specs
                   if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    shapes = []
    for name in user_inputs:
        val = nodes[name].meta.get("val")
        dims = {i: torch.export.Dim.AUTO for i, d in enumerate(getattr(val, "shape", ())) if not isinstance(d, int)}
        shapes.append(dims or None)
    return tuple(shapes) if any(shapes) else None


def _export(module, args, kwargs, dynamic_shapes=None):
    try:
        return torch.export.export(module, tuple(args), kwargs or {}, dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # noqa: BLE001 — export failures are many and varied
        raise BadInput(f"torch.export cannot export the fused model ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:160]})") from None


def export_unfused_onnx(src: Path, dst: Path, options) -> Path:
    """The torch model as it is (BNs and all) in ONNX, for onnxruntime benchmarks."""
    from .onnx_io import save_onnx
    import onnx

    source = load_torch(src, trust_pickle=options.trust_pickle, arch=options.arch, arch_kwargs=options.arch_kwargs)
    module = _as_module(source)
    example = _example_for(source, options, module)
    buffer = io.BytesIO()
    _to_onnx(module, example, buffer)
    return save_onnx(onnx.load_from_string(buffer.getvalue()), dst)


def _to_onnx(module, example, target) -> None:
    """Legacy (TorchScript-based) exporter, eval mode, no constant folding: unfolded BNs stay BNs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(example), target, dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.EVAL, opset_version=17,
                          input_names=[f"input{i}" if i else "input" for i in range(len(example))],
                          dynamic_axes={("input" if i == 0 else f"input{i}"): {0: "batch"} for i in range(len(example))})
