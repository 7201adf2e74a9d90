"""Fuse a PyTorch checkpoint: load, fold every weight set it holds (fx / export / TorchScript /
ATen pass), write it back in the same format, or convert with --to."""
from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import torch
from torch import nn

from ..detect import stored_size
from ..errors import BadInput, UsageError
from ..options import FuseOptions, LoadOptions
from ..report import CalibrationReport, FoldedBN, FoldReport, SkippedBN, VarianceCorrection, WeightSetReport
from .calibrate import calibrate_torch
from .checkpoint import STATE, WeightSet
from .params import tensor_key
from .convert import write_module
from .inputs import example_inputs
from .branches import merge_exported, merge_module
from .apply import fold_module
from .export import count_aten_bn, fold_exported, in_program
from .io import EAGER, EXPORT, HF_FOLDER, TORCHSCRIPT, TorchSource, load_torch, save_bytes, torch_bytes
from .sites import copy_module
from .variance import correct_torch_variance

STATE_DICT_NOTE = ("state_dict: each folded BN is set to the identity (γ=1, β=0, μ=0, σ²=1−ε) so the file loads "
                   "into the original architecture with strict=True; to remove the BN cost use --to onnx, "
                   "--to pt2, or bnfold.fuse_module at load time")
HF_FOLDER_NOTE = ("Hugging Face folder: each folded BN is set to the identity (γ=1, β=0, μ=0, σ²=1−ε) because "
                  "from_pretrained rebuilds the original architecture, BNs and all, from config.json; to remove "
                  "the BN cost write -o NAME.onnx or -o NAME.pt2, or call bnfold.fuse_module on the model "
                  "from_pretrained returns")


def fuse_module(module: nn.Module, example: tuple[torch.Tensor, ...] | None = None,
                keep_layout: bool = False) -> tuple[nn.Module, FoldReport]:
    """Fold the BNs of `module` and return the folded module with a report.

    `module` itself is not changed: the fold works on a copy (a deepcopy of an nn.Module; a
    save/load round trip of a ScriptModule, whose class graphs are shared process-wide), so it
    needs the memory of a second model. `example` (positional inputs) tells the ranks a
    Linear → BatchNorm1d needs and what to export a module torch.fx cannot trace with; without
    it bnfold guesses from the first layer. `keep_layout` sets folded BNs to the identity
    instead of removing them, so the state_dict keeps its keys."""
    if isinstance(module, torch.jit.ScriptModule):
        from .script_graph import reload

        return fold_in_place(reload(module), example, keep_layout)
    return fold_in_place(copy_module(module), example, keep_layout)


def fold_in_place(module, example: tuple | None = None, keep_layout: bool = False,
                  runnable: bool = True, shared: set | None = None) -> tuple[nn.Module, FoldReport]:
    """fuse_module on a module bnfold owns (just loaded): changes it, or returns a reloaded
    ScriptModule. A ScriptModule that will only be saved (`runnable` False) is not reloaded
    after its last change."""
    report = FoldReport(input=type(module).__name__, output=None, format="torch")
    if isinstance(module, torch.jit.ScriptModule):
        from .script import fold_script_module
        from .script_branches import merge_script_module
        from .script_graph import reload

        report.format = TORCHSCRIPT
        # Blocks that are only sums of branches merge first: merging inlines graphs, which caches
        # each method's graph as it is, so before the fold's edits no reload is needed
        left = merge_script_module(module, report, blocks_only=True)
        fold_script_module(module, report, example)
        if left:
            module = reload(module)
            merge_script_module(module, report)
        report.bn_before = len(report.folded) + len(report.skipped)
        report.bn_after = len(report.skipped) + report.identity_bns
        return (reload(module) if runnable else module), report
    module, found = fold_module(module, report, "identity" if keep_layout else "remove", example, shared)
    report.bn_before = len(report.folded) + len(report.skipped)
    left, kept = count_bn_modules(module), len(report.skipped)
    module = merge_module(module, report, keep_layout, found.branch_owners, found.unseen, found.refused)
    # BNs a merge removed that had been folded into an identity (a forward of their own) are gone now
    report.identity_bns -= (left - count_bn_modules(module)) - (kept - len(report.skipped))
    report.bn_after = len(report.skipped) + report.identity_bns
    return module, report


def count_bn_modules(module: nn.Module) -> int:
    """BN modules, and the batch_norm calls of GraphModules (a re-parameterized block keeps the
    BNs it could not merge as calls on plain tensors)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()) + \
        sum(1 for m in module.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes
            if n.op == "call_function" and n.target is torch.nn.functional.batch_norm)


def fuse_torch_file(src: Path, target: Path, options: FuseOptions, reference: Path | None = None) -> FoldReport:
    """Fuse the checkpoint `src` into `target`; `reference` receives the module with corrected
    statistics, before folding (what the fused model must equal)."""
    start = time.perf_counter()
    source = load_torch(src, options.load)
    corrections = _correct_variance(source, options)
    calibration = _calibrate_first(source, options)
    if reference is not None:
        save_bytes(reference, torch_bytes(copy.deepcopy(source.module)))
    report, folded = fold_source(source, options.to, options.load)
    if report.untraced and not report.folded:
        raise BadInput(f"{report.untraced[0]} cannot be traced and nothing in it could be folded "
                       f"({report.notes[0] if report.notes else ''})", src)
    report.variance, report.calibration = corrections, calibration
    report.input, report.size_before = str(src), stored_size(src)
    report.notes += write_module(source, folded, options.to, target, options.load)
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
    if source.kind not in EAGER:
        raise BadInput(f"{what} needs an eager module (a pickle, or a state_dict with --arch), not {source.kind}",
                       source.path)
    if len(source.sets) != 1:
        raise UsageError(f"{what} works on one weight set; this checkpoint holds "
                         f"{', '.join(repr(s.name) for s in source.sets)}", source.path)


def fold_source(source: TorchSource, to: str = "same", load: LoadOptions | None = None) -> tuple[FoldReport, list]:
    """The report and the folded module of each weight set that will be written."""
    report = FoldReport(input=str(source.path), output=None, format=source.kind, notes=list(source.notes))
    sets = source.sets if to == "same" else source.sets[:1]
    if len(source.sets) > len(sets):
        report.notes.append(f"--to {to} writes one weight set, {sets[0].name!r}; "
                            f"{', '.join(repr(s.name) for s in source.sets[1:])} not written")
    done: dict[int, tuple] = {}  # one module under two keys (ultralytics' model is ema) folds once
    folded = []
    for ws in sets:
        if id(ws.module) not in done:
            done[id(ws.module)] = _fold_set(ws, to, load or LoadOptions(), _held_elsewhere(ws, sets))
        module, sub = done[id(ws.module)]
        _merge(report, sub, ws, several=len(sets) > 1)
        folded.append(module)
    if source.container is not None:
        keys = {ws.key for ws in sets}
        report.unchanged_keys = [str(k) for k in source.container if k not in keys]
    if any(ws.kind == STATE for ws in sets) and to == "same" and report.folded:
        report.notes.append(HF_FOLDER_NOTE if source.kind == HF_FOLDER else STATE_DICT_NOTE)
    return report, folded


def _held_elsewhere(ws: WeightSet, sets: list[WeightSet]) -> set:
    """Keys of `ws`'s tensors that another model of the file holds too (two weight sets that share
    a conv weight but not their BN statistics): each set is folded in place, on its own."""
    others = [s.module for s in sets if s.module is not ws.module and isinstance(s.module, nn.Module)]
    if not others or not isinstance(ws.module, nn.Module) or isinstance(ws.module, torch.jit.ScriptModule):
        return set()
    return (_keys(ws.module) & set().union(*map(_keys, others))) - {None}


def _keys(module: nn.Module) -> set:
    return {tensor_key(t) for t in (*module.parameters(), *module.buffers())
            if not isinstance(t, nn.parameter.UninitializedTensorMixin)}


def _fold_set(ws: WeightSet, to: str, load: LoadOptions, shared: set | None = None) -> tuple:
    if ws.kind == EXPORT:
        report, done = FoldReport(input="", output=None, format=EXPORT), []
        gm = ws.module.module()
        report.bn_before = count_aten_bn(gm)
        folded = merge_exported(fold_exported(gm, report, done), report)
        report.bn_after = count_aten_bn(gm)
        if to in ("same", "pt2") and not report.merged:  # written as a program: the program itself, edited alike
            folded = in_program(ws.module, gm, done) or folded
        return folded, report
    example = example_inputs(load, ws.module) if load.shapes or load.example_input else None
    # written as it is, a TorchScript module need not be runnable (reloaded) after the fold
    kept_form = to == "same" or (to, ws.kind) == ("torchscript", TORCHSCRIPT)
    return fold_in_place(ws.module, example, keep_layout=ws.kind == STATE and to == "same", runnable=not kept_form,
                         shared=shared)


def _merge(report: FoldReport, sub: FoldReport, ws: WeightSet, several: bool) -> None:
    scope = ws.name if several else ""
    report.folded += [FoldedBN(f.bn, f.producer, f.pattern, scope) for f in sub.folded]
    report.skipped += [SkippedBN(s.bn, s.reason, s.producer, scope) for s in sub.skipped]
    report.merged += [dataclasses.replace(m, graph=scope) for m in sub.merged]
    report.unmerged += [dataclasses.replace(u, graph=scope) for u in sub.unmerged]
    label = f"{ws.name}: " if scope else ""
    report.notes += [label + n for n in sub.notes]
    report.warnings += [label + w for w in sub.warnings]
    report.untraced += sub.untraced
    report.bn_before += sub.bn_before
    report.bn_after += sub.bn_after
    report.identity_bns += sub.identity_bns
    report.weight_sets.append(WeightSetReport(ws.name, ws.kind, _dtype(ws.module), ws.layout.prefix if ws.layout
                                              else "", len(sub.folded), len(sub.skipped)))


def _dtype(module) -> str:
    state = getattr(module, "state_dict", {})  # an ExportedProgram's is a dict, a module's a method
    tensors = (state() if callable(state) else state).values()
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), None)
    return str(dtype).replace("torch.", "") if dtype is not None else ""
