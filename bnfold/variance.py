"""The m/(m−1) correction for stored *biased* variances (SPEC §3).

Algorithm 2 of the BN paper uses Var[x] = m/(m−1) · E_B[σ²_B] at inference, m being the
number of values each channel's statistics are taken over in one batch: N for a BN over
[N, C], N·p·q for feature maps [N, C, p, q] (the paper's effective mini-batch, §3.2).
PyTorch's running_var already holds that unbiased estimate, so it is used as stored; ONNX
training mode and some frameworks store the biased σ²_B, and `--variance biased` multiplies
it by m/(m−1) before folding. m comes from the training batch size times the BN input's
spatial size, or directly from --values-per-channel.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from .errors import BadInput, UsageError
from .fold_math import cast_exact
from .onnx_graph import ModelIndex, NotConstant
from .report import VarianceCorrection


def correction_factor(m: int) -> float:
    """m / (m − 1): Bessel's correction for a variance taken over m values."""
    if m < 2:
        raise UsageError(f"the variance correction needs at least 2 values per channel, got m={m}")
    return m / (m - 1)


def m_for(batch_size: int | None, values: int | None, spatial: int | None, bn: str,
                       path: str | None = None) -> int:
    """m for one BN: --values-per-channel, else N × spatial size."""
    if values is not None:
        return values
    if batch_size is None:
        raise UsageError("--variance biased needs the training batch size (--batch-size N) "
                         "or --values-per-channel m")
    if spatial is None:
        raise BadInput(f"BN {bn!r}: the spatial size of its input is not static; give --values-per-channel m",
                       path)
    return batch_size * spatial


def check_options(batch_size: int | None, values: int | None) -> None:
    if batch_size is None and values is None:
        raise UsageError("--variance biased needs the training batch size (--batch-size N) "
                         "or --values-per-channel m")
    for name, v in (("--batch-size", batch_size), ("--values-per-channel", values)):
        if v is not None and v < 1:
            raise UsageError(f"{name} must be positive")


def spatial_size(shape: list | None) -> int | None:
    """Product of the dims after N and C, or None if unknown or symbolic."""
    if shape is None or len(shape) < 2:
        return None
    dims = shape[2:]
    if not all(isinstance(d, int) and d > 0 for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64)) if dims else 1


def correct_biased_variance(model: onnx.ModelProto, base_dir: Path | str, *, batch_size: int | None,
                            values_per_channel: int | None, path: str | None = None) -> list[VarianceCorrection]:
    """Multiply every inference BN's stored variance by m/(m−1), in place."""
    check_options(batch_size, values_per_channel)
    index = ModelIndex(model, base_dir)
    corrections = []
    for scope in index.scopes:
        for bn in scope.nodes:
            if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or len(bn.input) < 5:
                continue
            name = bn.name or bn.output[0]
            m = m_for(batch_size, values_per_channel,
                                                spatial_size(index.shape(bn.input[0])), name, path)
            factor = correction_factor(m)
            try:
                var = index.constant(scope, bn.input[4])
            except NotConstant as exc:
                raise BadInput(f"BN {name!r}: its variance is not constant ({exc})", path) from None
            corrected = cast_exact(var.astype(np.float64) * factor, var.dtype, "variance")
            index.replace_input(scope, bn, 4, corrected, f"{name}_var")
            corrections.append(VarianceCorrection(name, m, factor))
    index.apply()
    return corrections


def correct_torch_variance(module, options, example) -> list[VarianceCorrection]:
    """The same for a torch module: m from the BN's input shape seen on `example`."""
    import torch
    from torch import nn

    check_options(options.batch_size, options.values_per_channel)
    bns = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.running_var is not None]
    shapes: dict[str, tuple[int, ...]] = {}
    if options.values_per_channel is None:
        if example is None:
            raise UsageError("--variance biased on a torch model needs --shape or --example-input to know "
                             "each BN's spatial size, or --values-per-channel m")
        hooks = [m.register_forward_pre_hook(ShapeRecorder(shapes, n)) for n, m in bns]
        try:
            with torch.no_grad():
                module.eval()(*example)
        finally:
            for h in hooks:
                h.remove()
    corrections = []
    for name, bn in bns:
        shape = shapes.get(name)
        m = m_for(options.batch_size, options.values_per_channel,
                                            spatial_size(list(shape)) if shape else None, name)
        factor = correction_factor(m)
        with torch.no_grad():
            bn.running_var.copy_((bn.running_var.double() * factor).to(bn.running_var.dtype))
        corrections.append(VarianceCorrection(name, m, factor))
    return corrections


class ShapeRecorder:
    """Forward pre-hook that notes the shape of a module's input."""

    def __init__(self, shapes: dict, name: str):
        self.shapes, self.name = shapes, name

    def __call__(self, _module, args) -> None:
        self.shapes[self.name] = tuple(args[0].shape)
