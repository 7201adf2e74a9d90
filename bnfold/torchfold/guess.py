"""An input for a module when the user gave none: the size its metadata names, or one shaped for
its first layer — enough to learn ranks (Linear → BatchNorm1d) and to export a piece fx cannot
trace."""
from __future__ import annotations

import torch
from torch import nn

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def guess_example(module: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """An input shaped for the first layer, to learn the ranks the graph sees (Linear+BN1d)."""
    first = next((m for m in module.modules() if isinstance(m, (nn.Linear, *CONV_TYPES, *CONV_T_TYPES))), None)
    dtype = module_dtype(module)
    if isinstance(first, nn.Linear):
        return (torch.randn(2, first.in_features, dtype=dtype),)
    if isinstance(first, (*CONV_TYPES, *CONV_T_TYPES)):
        size = 1 if isinstance(first, CONV_T_TYPES) else 32  # generators start from 1×1 noise
        return (torch.randn(2, first.in_channels, *([size] * len(first.kernel_size)), dtype=dtype),)
    return None


def metadata_example(module: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """An input of the size the model says it takes: timm's pretrained_cfg["input_size"] (C, H, W),
    ultralytics' args["imgsz"]."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(module, attr, None)
        size = cfg.get("input_size") if isinstance(cfg, dict) else None
        if isinstance(size, (tuple, list)) and all(isinstance(d, int) and 0 < d <= 4096 for d in size):
            return (torch.randn(2, *size, dtype=module_dtype(module)),)
    args = getattr(module, "args", None)
    imgsz = args.get("imgsz") if isinstance(args, dict) else getattr(args, "imgsz", None)
    if isinstance(imgsz, int) and 0 < imgsz <= 4096:
        return (torch.randn(2, 3, imgsz, imgsz, dtype=module_dtype(module)),)
    return None


def module_dtype(module: nn.Module) -> torch.dtype:
    param = next(module.parameters(), None)
    return param.dtype if param is not None and param.is_floating_point() else torch.float32
