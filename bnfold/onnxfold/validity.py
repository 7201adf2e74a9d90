"""What a layer's constants must be for the model to be valid at all. A model that breaks these
is one onnxruntime refuses too: bad input, said in one line, never a fold that crashes on it."""
from __future__ import annotations

import numpy as np
import onnx

from ..errors import BadInput

INVALID = "an invalid model: onnxruntime refuses it too"


def layer_bias(layer: onnx.NodeProto, bias: np.ndarray | None, channels: int) -> np.ndarray | None:
    """A Conv's or ConvTranspose's bias: one value per output channel, in one dimension."""
    if bias is not None and bias.shape != (channels,):
        raise BadInput(f"{layer.op_type} {layer.name!r}: bias has shape {list(bias.shape)}, but the layer has "
                       f"{channels} output channels ({INVALID})")
    return bias


def broadcast_bias(layer: onnx.NodeProto, bias: np.ndarray | None, out_shape: tuple[int, ...], what: str
                   ) -> np.ndarray | None:
    """A Gemm's C, or the constant of MatMul → Add: it must broadcast to the layer's output
    (`out_shape`, with 1 where the size is not known)."""
    if bias is None:
        return None
    try:
        fits = bias.ndim <= len(out_shape) and np.broadcast_shapes(bias.shape, out_shape) is not None
    except ValueError:
        fits = False
    if not fits:
        raise BadInput(f"{layer.op_type} {layer.name!r}: {what} of shape {list(bias.shape)} does not broadcast to the "
                       f"output's {list(out_shape)} ({INVALID})")
    return bias
