"""`--variance biased` on a torch module: every BN's running_var × m/(m−1) (README, "The m/(m−1) correction"), with
m from the shape of the BN's input seen on an example input, or the values per channel given."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError
from ..options import VarianceOptions
from ..population import correction_factor, spatial_size, values_per_channel
from ..report import VarianceCorrection
from .hooks import recording_inputs


def tracked_bns(module: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """BN modules that hold running statistics, by qualified name."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.running_var is not None]


def correct_torch_variance(module: nn.Module, options: VarianceOptions,
                           example: tuple[torch.Tensor, ...] | None) -> list[VarianceCorrection]:
    """Multiply every BN's running_var by m/(m−1), in place on `module`."""
    bns = tracked_bns(module)
    shapes = {} if options.values_per_channel is not None else input_shapes(module, bns, example)
    corrections = []
    for name, bn in bns:
        shape = shapes.get(name)
        m = values_per_channel(options.train_batch_size, options.values_per_channel,
                               spatial_size(list(shape)) if shape else None, name)
        factor = correction_factor(m)
        with torch.no_grad():
            bn.running_var.copy_((bn.running_var.double() * factor).to(bn.running_var.dtype))
        corrections.append(VarianceCorrection(name, m, factor))
    return corrections


def input_shapes(module: nn.Module, bns, example) -> dict[str, tuple[int, ...]]:
    """The shape of each BN's input on `example` (an eval-mode forward pass)."""
    if example is None:
        raise UsageError("--variance biased on a torch model needs --shape or --example-input to know "
                         "each BN's spatial size, or --values-per-channel m")
    with recording_inputs(bns, _first_shape) as shapes, torch.no_grad():
        module.eval()(*example)
    return shapes


def _first_shape(args: tuple) -> tuple[int, ...]:
    return tuple(args[0].shape)
