"""verify for PyTorch checkpoints: original and fused compared in torch (or against the
fused ONNX export in onnxruntime), with the same comparison as the ONNX path."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from . import formats
from .compare import compare_outputs, merge
from .errors import BadInput
from .inputs import describe_inputs
from .torch_io import EXPORT, load_arrays, load_torch
from .verify import VerifyReport, read_signature, run_session


def verify_torch(original: Path, fused: Path, *, data=None, shapes=None, batch_size=None, seed=0, batches=1,
                 atol=None, rtol=None, options: Any = None) -> VerifyReport:
    options = options or SimpleNamespace(trust_pickle=False, arch=None, arch_kwargs={})
    a = _runnable(load_torch(original, trust_pickle=options.trust_pickle, arch=options.arch,
                             arch_kwargs=options.arch_kwargs))
    onnx_fused = formats.detect_format(fused) == formats.ONNX
    if onnx_fused:
        from .runtime import session

        sess = session(fused, "cpu")
        b = None
    else:
        b = _runnable(load_torch(fused, trust_pickle=options.trust_pickle, arch=options.arch,
                                 arch_kwargs=options.arch_kwargs))
    runtime = "torch vs onnxruntime" if onnx_fused else "torch"
    report = VerifyReport(str(original), str(fused), False, runtime, "cpu", atol, rtol, seed, batches)
    runs = []
    for k in range(batches):
        example = _example(a, data, shapes, batch_size, seed + k, original)
        feeds = {f"input{i}" if i else "input": t.numpy() for i, t in enumerate(example)}
        if k == 0:
            report.inputs = describe_inputs(feeds)
        expected = _outputs(a(*example))
        if onnx_fused:
            names = [i.name for i in read_signature(fused).graph.input]
            got = run_session(sess, dict(zip(names, feeds.values())), fused)
            got = dict(zip(expected, got.values()))
        else:
            got = _outputs(b(*example))
        runs.append(compare_outputs(expected, got, atol, rtol))
    report.outputs = merge(runs)
    report.passed = all(o.passed for o in report.outputs)
    return report


def _runnable(source):
    module = source.module.module() if source.kind == EXPORT else source.module
    if hasattr(module, "eval") and source.kind != EXPORT:
        module.eval()
    return module


def _example(module, data, shapes, batch_size, seed, path) -> tuple[torch.Tensor, ...]:
    if data is not None:
        return load_arrays(data)
    g = torch.Generator().manual_seed(seed)
    if shapes:
        return tuple(torch.randn(*dims, generator=g) for dims in shapes.values())
    from .torch_pass import guess_example

    guess = guess_example(module) if isinstance(module, torch.nn.Module) else None
    if guess is None:
        raise BadInput("cannot tell the model's input shape: pass --shape NAME=D0,D1,… or --data", path)
    n = batch_size or 2
    return tuple(torch.randn(n, *t.shape[1:], generator=g, dtype=t.dtype) for t in guess)


def _outputs(value) -> dict[str, np.ndarray]:
    if isinstance(value, torch.Tensor):
        return {"output": value.detach().numpy()}
    if isinstance(value, (tuple, list)):
        return {f"output{i}": v.detach().numpy() for i, v in enumerate(value) if isinstance(v, torch.Tensor)}
    if isinstance(value, dict):
        return {str(k): v.detach().numpy() for k, v in value.items() if isinstance(v, torch.Tensor)}
    raise BadInput(f"model returned {type(value).__name__}; bnfold compares tensors")
