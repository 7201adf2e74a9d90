"""verify for PyTorch checkpoints: original and fused run in torch (or the fused ONNX export
in onnxruntime) on the same inputs, compared with the same rule as the ONNX path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import detect
from ..check.compare import compare_outputs, merge
from ..check.inputs import describe_inputs
from ..check.runtime import run_session, session
from ..errors import BadInput
from ..onnxfold.io import read_signature
from ..options import LoadOptions, VerifyOptions
from ..report import VerifyReport
from .convert import runnable
from .fx import guess_example
from .io import EXPORT, load_arrays, load_torch


def verify_torch(original: Path, fused: Path, options: VerifyOptions, load: LoadOptions) -> VerifyReport:
    a = _eval(load_torch(original, load))
    onnx_fused = detect.detect_format(fused) == detect.ONNX
    b = session(fused, "cpu") if onnx_fused else _eval(load_torch(fused, load))
    runtime = "torch vs onnxruntime" if onnx_fused else "torch"
    seed = None if options.data is not None else options.seed
    batches = 1 if options.data is not None else options.batches
    report = VerifyReport(str(original), str(fused), False, runtime, "cpu", options.atol, options.rtol, seed, batches)
    onnx_names = [i.name for i in read_signature(fused).graph.input] if onnx_fused else []
    runs = []
    for k in range(batches):
        example = _example(a, options, options.seed + k, original)
        feeds = {f"input{i}" if i else "input": t.numpy() for i, t in enumerate(example)}
        if k == 0:
            report.inputs = describe_inputs(feeds)
        with torch.no_grad():
            expected = outputs_of(a(*example))
            if onnx_fused:
                got = run_session(b, dict(zip(onnx_names, feeds.values())), fused)
                got = dict(zip(expected, got.values()))
            else:
                got = outputs_of(b(*example))
        runs.append(compare_outputs(expected, got, options.atol, options.rtol))
    report.outputs = merge(runs)
    report.passed = all(o.passed for o in report.outputs)
    return report


def _eval(source):
    module = runnable(source)
    if source.kind != EXPORT and hasattr(module, "eval"):
        module.eval()
    return module


def _example(module, options: VerifyOptions, seed: int, path: Path) -> tuple[torch.Tensor, ...]:
    if options.data is not None:
        return load_arrays(options.data)
    g = torch.Generator().manual_seed(seed)
    if options.shapes:
        return tuple(torch.randn(*dims, generator=g) for dims in options.shapes.values())
    guess = guess_example(module) if isinstance(module, torch.nn.Module) else None
    if guess is None:
        raise BadInput("cannot tell the model's input shape: pass --shape NAME=D0,D1,… or --data", path)
    n = options.batch_size or 2
    return tuple(torch.randn(n, *t.shape[1:], generator=g, dtype=t.dtype) for t in guess)


def outputs_of(value) -> dict[str, np.ndarray]:
    if isinstance(value, torch.Tensor):
        return {"output": value.detach().cpu().numpy()}
    if isinstance(value, (tuple, list)):
        return {f"output{i}": v.detach().cpu().numpy() for i, v in enumerate(value) if isinstance(v, torch.Tensor)}
    if isinstance(value, dict):
        return {str(k): v.detach().cpu().numpy() for k, v in value.items() if isinstance(v, torch.Tensor)}
    raise BadInput(f"model returned {type(value).__name__}; bnfold compares tensors")
