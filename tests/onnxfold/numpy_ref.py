"""Float64 references in plain numpy, written from the ONNX operator definitions, never from
bnfold: an N-d grouped Conv and a summed-branches block."""
from __future__ import annotations

import itertools

import numpy as np


def conv(x, w, b=None, strides=None, pads=None, dilations=None, group: int = 1) -> np.ndarray:
    """ONNX Conv in float64: y[n, o, p] = b[o] + Σ_{c in o's group, k} w[o, c, k] · x_pad[n, c, p·s + k·d]."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    dims = x.ndim - 2
    strides = list(strides or [1] * dims)
    dilations = list(dilations or [1] * dims)
    pads = list(pads or [0] * (2 * dims))
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[a], pads[a + dims]) for a in range(dims)])
    kernel = w.shape[2:]
    out_size = [(padded.shape[2 + a] - dilations[a] * (kernel[a] - 1) - 1) // strides[a] + 1 for a in range(dims)]
    c_out, c_in_g = w.shape[0], w.shape[1]
    out = np.zeros((x.shape[0], c_out, *out_size))
    per_group = c_out // group
    for k in itertools.product(*(range(n) for n in kernel)):
        window = tuple(slice(k[a] * dilations[a], k[a] * dilations[a] + strides[a] * (out_size[a] - 1) + 1, strides[a])
                       for a in range(dims))
        taps = padded[(slice(None), slice(None), *window)]
        for g in range(group):
            xs = taps[:, g * c_in_g:(g + 1) * c_in_g]
            ws = w[g * per_group:(g + 1) * per_group, :, *k]
            out[:, g * per_group:(g + 1) * per_group] += np.einsum("oc,nc...->no...", ws, xs)
    if b is not None:
        out += np.asarray(b, np.float64).reshape(1, -1, *([1] * dims))
    return out


def bn(x, scale, bias, mean, var, epsilon: float = 1e-5) -> np.ndarray:
    """BN at inference over axis 1 in float64 (Ioffe & Szegedy, Alg. 2); ε as the runtime stores it."""
    shape = [1] * np.ndim(x)
    shape[1] = -1
    f = lambda a: np.asarray(a, np.float64).reshape(shape)  # noqa: E731
    return f(scale) * (np.asarray(x, np.float64) - f(mean)) / np.sqrt(f(var) + np.float64(np.float32(epsilon))) \
        + f(bias)
