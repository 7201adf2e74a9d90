"""verify for PyTorch checkpoints: original and fused run in torch (or the fused ONNX export
in onnxruntime) on the same inputs, compared with the same rule as the ONNX path.

A forward may return any nesting of tensors (a detector's list of dicts, a namedtuple, a
dataclass, a container registered with torch's pytree): every leaf is compared by its path.
An ONNX export holds the forward's tensors in the order torch flattens them, so against the
fused ONNX the tensor leaves are matched by position; the forward's non-tensor values are not
in the export and are left out."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.utils._pytree as pytree

from .. import detect
from ..check.compare import Flat, compare_trees, conclude, flatten, flatten_named
from ..check.inputs import describe_inputs
from ..check.runtime import run_session, session
from ..errors import BadInput
from ..onnxfold.io import read_signature
from ..options import LoadOptions, VerifyOptions
from ..report import OutputComparison, VerifyReport
from .inputs import data_inputs, ordered_shapes, shape_hint
from .guess import guess_example
from .io import EXPORT, load_torch
from .script_graph import guess_script_example


def verify_torch(original: Path, fused: Path, options: VerifyOptions, load: LoadOptions) -> VerifyReport:
    """Every weight set of `original` against the same set of `fused` (by key; the first set
    against a single-set output such as --to pt2), on the same inputs."""
    source = load_torch(original, load)
    onnx_fused = detect.detect_format(fused) == detect.ONNX
    target = None if onnx_fused else load_torch(fused, load)
    runtime = "torch vs onnxruntime" if onnx_fused else "torch"
    seed = None if options.data is not None else options.seed
    batches = 1 if options.data is not None else options.batches
    report = VerifyReport(str(original), str(fused), False, runtime, "cpu", options.atol, options.rtol, seed, batches)
    pairs = _pairs(source, target)
    hint = _program_example(source.sets[0])
    if len(pairs) < len(source.sets):
        report.notes.append(f"compared weight set {pairs[0][0]!r} only: {fused} holds one")
    runs = []
    for name, a, b in pairs:
        for run in _compare(a, b, fused, options, original, report, hint):
            for comparison in run:
                comparison.name = f"{name}/{comparison.name}" if len(pairs) > 1 else comparison.name
            runs.append(run)
    conclude(report, runs)
    return report


def _pairs(source, target) -> list[tuple[str, object, object]]:
    if target is None:
        return [(source.sets[0].name, _eval(source.sets[0]), None)]
    theirs = {ws.name: ws for ws in target.sets}
    pairs = [(ws.name, _eval(ws), _eval(theirs[ws.name])) for ws in source.sets if ws.name in theirs]
    return pairs or [(source.sets[0].name, _eval(source.sets[0]), _eval(target.sets[0]))]


def _compare(a, b, fused: Path, options: VerifyOptions, original: Path, report: VerifyReport,
             hint: tuple[torch.Tensor, ...] | None = None) -> list[list]:
    """One list of OutputComparisons per input batch; `b` None: the fused ONNX in onnxruntime."""
    session_b = session(fused, "cpu") if b is None else None
    onnx_outputs = session_b is not None and bool(session_b.get_outputs())
    onnx_names = [i.name for i in read_signature(fused).graph.input] if b is None else []
    runs = []
    for k in range(1 if options.data is not None else options.batches):
        example = _example(a, options, options.seed + k, original, hint)
        feeds = {f"input{i}" if i else "input": t.numpy() for i, t in enumerate(example)}
        if not report.inputs:
            report.inputs = describe_inputs(feeds)
        with torch.no_grad():
            expected = outputs_of(_run(a, example, original), original)
            if b is None:
                got = run_session(session_b, dict(zip(onnx_names, feeds.values())), fused) if onnx_outputs else {}
                runs.append(_against_onnx(expected, got, options, report))
            else:
                runs.append(compare_trees(expected, outputs_of(_run(b, example, fused), fused), options.atol,
                                          options.rtol))
    return runs


def _run(module, example: tuple, path):
    """The module on `example`; one that cannot run on it is the input's or the options' fault."""
    try:
        return module(*example)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        first = str(exc).splitlines()[0][:150] if str(exc) else type(exc).__name__
        raise BadInput(f"torch cannot run the model on inputs of shape {[list(t.shape) for t in example]}: {first}; "
                       f"{shape_hint(example)}", path) from None


def _against_onnx(expected: Flat, got: dict, options: VerifyOptions, report: VerifyReport) -> list:
    """The forward's tensors against the export's outputs, matched by position (a sequence's
    tensors counted one by one): another count is a mismatch, said once."""
    tensors = {p: v for p, v in expected.entries.items() if isinstance(v, np.ndarray)}
    values = [v for _, v in flatten_named(got).leaves()]
    dropped = len(expected.leaves()) - len(tensors)
    note = f"{dropped} non-tensor value(s) in the forward's output are not in an ONNX model: not compared"
    if dropped and note not in report.notes:
        report.notes.append(note)
    if len(values) != len(tensors):
        return [OutputComparison("output", False, kind="structure",
                                 message=f"the fused ONNX model has {len(values)} output tensor(s), the "
                                         f"original's forward returns {len(tensors)}")]
    return compare_trees(Flat(tensors), Flat(dict(zip(tensors, values))), options.atol, options.rtol)


def _eval(ws):
    module = ws.module.module() if ws.kind == EXPORT else ws.module
    if ws.kind != EXPORT and hasattr(module, "eval"):
        module.eval()
    return module


def _program_example(ws) -> tuple[torch.Tensor, ...] | None:
    """An exported program's own example inputs: the shapes its guards were made for."""
    if ws.kind != EXPORT or not ws.module.example_inputs:
        return None
    args, kwargs = ws.module.example_inputs
    if kwargs or not args or not all(isinstance(t, torch.Tensor) for t in args):
        return None  # verify feeds tensors by position only: such a program needs --data it can take
    return tuple(args)


def _example(module, options: VerifyOptions, seed: int, path: Path,
             hint: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, ...]:
    dtype = _float_dtype(module)
    if options.data is not None:
        return tuple(t.to(dtype) if t.is_floating_point() else t for t in data_inputs(options.data, module))
    g = torch.Generator().manual_seed(seed)
    if options.shapes:
        return tuple(torch.randn(*dims, generator=g).to(dtype) for dims in ordered_shapes(options.shapes, module, path))
    if hint is not None:  # a fixed batch is the only one the program takes
        return tuple(torch.randn(options.batch_size or t.shape[0], *t.shape[1:], generator=g).to(t.dtype)
                     if t.ndim and t.is_floating_point() else t for t in hint)
    guess = guess_example(module) if isinstance(module, torch.nn.Module) else None
    if guess is None and isinstance(module, torch.jit.ScriptModule):
        guess = guess_script_example(module)
    if guess is None:
        raise BadInput("cannot tell the model's input shape: pass --shape NAME=D0,D1,… or --data", path)
    n = options.batch_size or 2
    return tuple(torch.randn(n, *t.shape[1:], generator=g).to(t.dtype) for t in guess)


def _float_dtype(module) -> torch.dtype:
    """Inputs in the model's own float dtype (a float16 checkpoint takes float16)."""
    params = module.parameters() if hasattr(module, "parameters") else ()
    return next((p.dtype for p in params if p.is_floating_point()), torch.float32)


def outputs_of(value, path: Path | None = None) -> Flat:
    """Every tensor (as numpy) and every other leaf of a forward's output, by path."""
    return flatten(value, _tensor_array, _pytree_children, where=path)


def _tensor_array(value) -> np.ndarray | None:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value if isinstance(value, np.ndarray) else None


def _pytree_children(value) -> list[tuple[str, object]] | None:
    """A container torch's pytree knows beyond lists, tuples, dicts, namedtuples and dataclasses
    (a deque, a library's registered output class): its children under pytree's keys, or by
    position where the class was registered without keys."""
    if type(value) not in pytree.SUPPORTED_NODES:
        return None
    # One level only (every child a leaf): the walk in check.compare goes deeper itself.
    try:
        children, _ = pytree.tree_flatten_with_path(value, is_leaf=lambda x: x is not value)
    except ValueError:  # registered without a flatten_with_keys_fn
        flat, _ = pytree.tree_flatten(value, is_leaf=lambda x: x is not value)
        return [(f"[{i}]", child) for i, child in enumerate(flat)]
    return [(pytree.keystr(key), child) for key, child in children]
