"""Float64 kernels of the layers BN folds into, written from the ONNX operator definitions.

The per-site check computes the original's layer+BN and the fused layer in float64; onnxruntime
has no float64 Conv or ConvTranspose on the CPU, so they are numpy here: im2col and one matrix
product per group (float64 BLAS). Each kernel also has the product's other side, the gradient
with respect to the weight, Σ_p a[p, o] · x_patch[p, i], which the per-channel test reads.

    Conv:          y[n, o, p] = Σ_{c in o's group, k} w[o, c, k] · x_pad[n, c, p·s + k·d]
    ConvTranspose: the Conv of x with s − 1 zeros between its elements, padded by d·(k − 1) − pad,
                   with the kernel flipped and its two channel axes swapped (per group)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


@dataclass(frozen=True)
class ConvGeometry:
    """Everything but the weights: explicit pads (auto_pad already resolved), per spatial axis."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]
    group: int = 1


@dataclass
class Patches:
    """im2col of one input: [P, group, C_in/group · prod(kernel)] and the output's spatial shape;
    `cols` None for an input of zeros (the per-site check's zero input), whose every product is 0."""

    cols: np.ndarray | None
    batch: int
    out: tuple[int, ...]


def patches(x: np.ndarray, geo: ConvGeometry) -> Patches:
    dims = x.ndim - 2
    n, c = x.shape[:2]
    if not x.any():
        sizes = [x.shape[2 + a] + b + e - (d * (kk - 1) + 1) for a, (b, e, d, kk)
                 in enumerate(zip(geo.pads_begin, geo.pads_end, geo.dilations, geo.kernel))]
        if min(sizes, default=0) < 0:
            raise ValueError(f"kernel {list(geo.kernel)} does not fit the padded input")
        return Patches(None, n, tuple(size // s + 1 for size, s in zip(sizes, geo.strides)))
    padded = np.pad(x, [(0, 0), (0, 0)] + [(max(b, 0), max(e, 0)) for b, e in zip(geo.pads_begin, geo.pads_end)])
    # a negative pad (ConvTranspose's equivalent Conv) crops instead
    crop = tuple(slice(max(-b, 0), padded.shape[2 + a] - max(-e, 0))
                 for a, (b, e) in enumerate(zip(geo.pads_begin, geo.pads_end)))
    padded = padded[(slice(None), slice(None), *crop)]
    extent = [d * (k - 1) + 1 for d, k in zip(geo.dilations, geo.kernel)]
    if any(padded.shape[2 + a] < extent[a] for a in range(dims)):
        raise ValueError(f"kernel {list(geo.kernel)} does not fit the padded input {list(padded.shape[2:])}")
    windows = sliding_window_view(padded, extent, axis=tuple(range(2, 2 + dims)))
    step = (slice(None), slice(None), *(slice(None, None, s) for s in geo.strides),
            *(slice(None, None, d) for d in geo.dilations))
    windows = windows[step]  # [N, C, *out, *kernel]
    out = windows.shape[2:2 + dims]
    order = (0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))
    cols = windows.transpose(order).reshape(n * int(np.prod(out, dtype=np.int64)), geo.group, -1)
    return Patches(np.ascontiguousarray(cols, dtype=np.float64), n, tuple(out))


def conv(x: np.ndarray | Patches, w: np.ndarray, geo: ConvGeometry) -> np.ndarray:
    """ONNX Conv without its bias, in float64; `x` may be its patches, computed once for several weights."""
    p = x if isinstance(x, Patches) else patches(x, geo)
    g = geo.group
    c_out = w.shape[0]
    if p.cols is None:
        return np.zeros((p.batch, c_out, *p.out))
    wg = np.asarray(w, np.float64).reshape(g, c_out // g, -1)  # [g, C_out/g, K]
    if g == 1:
        y = (p.cols[:, 0, :] @ wg[0].T)[:, None, :]
    else:
        y = np.matmul(p.cols.transpose(1, 0, 2), wg.transpose(0, 2, 1)).transpose(1, 0, 2)  # [P, g, C_out/g]
    y = y.reshape(p.batch, *p.out, c_out)
    return np.moveaxis(y, -1, 1)


def conv_weight_grad(x: np.ndarray | Patches, a: np.ndarray, w_shape: tuple[int, ...], geo: ConvGeometry) -> np.ndarray:
    """Σ over every output position p of a[n, o, p] · x_patch(n, p)[c, k], shaped like the weight."""
    p = x if isinstance(x, Patches) else patches(x, geo)
    g = geo.group
    c_out = a.shape[1]
    if p.cols is None:
        return np.zeros(w_shape)
    ag = np.moveaxis(np.asarray(a, np.float64), 1, -1).reshape(-1, g, c_out // g)  # [P, g, C_out/g]
    if g == 1:
        grad = (ag[:, 0, :].T @ p.cols[:, 0, :])[None]
    else:
        grad = np.matmul(ag.transpose(1, 2, 0), p.cols.transpose(1, 0, 2))  # [g, C_out/g, K]
    return grad.reshape(w_shape)


@dataclass(frozen=True)
class TransposeGeometry:
    """ConvTranspose's attributes, with output_padding and explicit pads."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]
    output_padding: tuple[int, ...]
    group: int = 1

    def as_conv(self) -> ConvGeometry:
        """The geometry of the equivalent Conv (stride 1) on the zero-stuffed input."""
        full = [d * (k - 1) for d, k in zip(self.dilations, self.kernel)]
        return ConvGeometry(self.kernel, (1,) * len(self.kernel), self.dilations,
                            tuple(f - b for f, b in zip(full, self.pads_begin)),
                            tuple(f - e + o for f, e, o in zip(full, self.pads_end, self.output_padding)), self.group)


def stuff(x: np.ndarray, strides: tuple[int, ...]) -> np.ndarray:
    """x with s − 1 zeros between neighbours along each spatial axis."""
    shape = [*x.shape[:2], *((n - 1) * s + 1 for n, s in zip(x.shape[2:], strides))]
    out = np.zeros(shape, np.float64)
    out[(slice(None), slice(None), *(slice(None, None, s) for s in strides))] = x
    return out


def transposed_kernel(w: np.ndarray, group: int) -> np.ndarray:
    """ConvTranspose weight [C_in, C_out/g, *k] → the equivalent Conv's [C_out, C_in/g, *k], flipped."""
    c_in, c_out_g = w.shape[:2]
    k = w.shape[2:]
    wg = np.asarray(w, np.float64).reshape(group, c_in // group, c_out_g, *k).swapaxes(1, 2)
    flipped = wg[(Ellipsis, *(slice(None, None, -1) for _ in k))]
    return flipped.reshape(group * c_out_g, c_in // group, *k)


def untransposed_kernel(k_grad: np.ndarray, w_shape: tuple[int, ...], group: int) -> np.ndarray:
    """The inverse of transposed_kernel: a gradient of the equivalent Conv's kernel, as ConvTranspose's."""
    c_in, c_out_g = w_shape[:2]
    k = w_shape[2:]
    flipped = k_grad.reshape(group, c_out_g, c_in // group, *k)[(Ellipsis, *(slice(None, None, -1) for _ in k))]
    return flipped.swapaxes(1, 2).reshape(w_shape)


def conv_transpose_patches(x: np.ndarray, geo: TransposeGeometry) -> Patches:
    return patches(stuff(np.asarray(x, np.float64), geo.strides), geo.as_conv())


def patch_sums(p: Patches, geo: ConvGeometry, c_out: int) -> np.ndarray:
    """Σ over each output's patch of its input: the Conv of the input with a kernel of ones, the
    same for every output channel of a group ([N, 1, *out] without groups: it broadcasts)."""
    g = geo.group
    if p.cols is None:
        return np.zeros((p.batch, 1, *p.out))
    sums = np.moveaxis(p.cols.sum(axis=-1).reshape(p.batch, *p.out, g), -1, 1)  # [N, g, *out]
    return sums if g == 1 or c_out == g else np.repeat(sums, c_out // g, axis=1)


def conv_transpose(x: np.ndarray | Patches, w: np.ndarray, geo: TransposeGeometry) -> np.ndarray:
    p = x if isinstance(x, Patches) else conv_transpose_patches(x, geo)
    return conv(p, transposed_kernel(w, geo.group), geo.as_conv())


def conv_transpose_weight_grad(x: np.ndarray | Patches, a: np.ndarray, w_shape: tuple[int, ...],
                               geo: TransposeGeometry) -> np.ndarray:
    p = x if isinstance(x, Patches) else conv_transpose_patches(x, geo)
    k_shape = (w_shape[1] * geo.group, w_shape[0] // geo.group, *w_shape[2:])
    return untransposed_kernel(conv_weight_grad(p, a, k_shape, geo.as_conv()), w_shape, geo.group)
