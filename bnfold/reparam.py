"""Structural re-parameterization: parallel branches of one input, summed, as one convolution.

RepVGG trains y = BN(W₃ ⋆ x) + BN(W₁ ⋆ x) + BN(x) and deploys one 3×3 convolution; MobileOne,
ACNet (3×3 + 1×3 + 3×1) and DBB train similar sums, and a CPE computes x + dwconv(x). Once every
Conv+BN is folded, each branch is affine in x, and a convolution is linear in its kernel, so with
one stride, dilation and group count

    Σᵢ (Wᵢ ⋆ x + bᵢ) = (Σᵢ W̃ᵢ) ⋆ x + Σᵢ bᵢ,

W̃ᵢ being Wᵢ placed at its offset inside the merged window, zeros elsewhere. A per-channel affine
s·x + t (a BN of x; x itself is s = 1, t = 0) is a one-tap kernel holding s_c at
[c, c mod (C_in/g)] — channel c's own input within its group — and t in the bias; it needs
C_in = C_out and stride 1.

Along one spatial axis, output o of branch i reads input o·S − Bᵢ + k·D for taps k < Kᵢ, Bᵢ and Eᵢ
being the zeros padded before and after the input (an identity: K = 1, B = E = 0); it has
⌊(L + Bᵢ + Eᵢ − D(Kᵢ − 1) − 1) / S⌋ + 1 outputs. The branches are one convolution iff

- rank, channel counts, groups and strides S agree, and so do the dilations D of the branches
  with more than one tap along the axis (a 1-tap kernel reads the same under any dilation);
- Bᵢ + Eᵢ − D(Kᵢ − 1) agree: the same output length for every input length L;
- every branch starts a whole number of taps after the earliest: with B = maxᵢ Bᵢ,
  (B − Bᵢ) mod D = 0. Branch i then sits at tap (B − Bᵢ)/D of a kernel of
  K = maxᵢ ((B − Bᵢ)/D + Kᵢ) taps, padded B before and, after, the Eᵢ of the branch that reaches
  furthest.

Zero padding then reads the same zeros in both forms, so the merge is exact. Pads need not be
symmetric: an even kernel padded (0, 1) — ONNX's SAME_UPPER, torch's padding="same" — merges with a
1×1 at its first tap, so kernels whose sizes differ by an odd number merge when their pads say
where the smaller one sits, and are refused (different output lengths) when symmetric pads
cannot. We also require K ≤ maxᵢ Kᵢ (the kernels centred alike): a merge that grows the window
(two 3×3 shifted apart make a 5×5) is exact but may cost more than the branches it replaces.

Everything is summed in float64; each format casts the result once to its storage dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import Skip


@dataclass(frozen=True)
class Window:
    """What a branch reads along every spatial axis: zeros padded before and after, explicitly."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]

    def __post_init__(self):
        for name in ("kernel", "strides", "dilations", "pads_begin", "pads_end"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if len({len(self.kernel), len(self.strides), len(self.dilations), len(self.pads_begin),
                len(self.pads_end)}) != 1:
            raise ValueError(f"a window's fields must have one length per spatial axis: {self}")

    def length_offset(self, a: int, d: int) -> int:
        """B + E − d·(K − 1) along axis a: equal offsets give equal output lengths. `d` is the merged
        dilation: a 1-tap kernel reads the same whatever its own."""
        return self.pads_begin[a] + self.pads_end[a] - d * (self.kernel[a] - 1)


@dataclass
class ConvBranch:
    """W ⋆ x + b, a BN after it already folded in. `storage` says how the format keeps the weight
    (dtype, device): the merged kernel is stored once, so the branches must agree on it."""

    label: str
    weight: np.ndarray  # [C_out, C_in/groups, k…], float64
    bias: np.ndarray | None  # [C_out], float64; None is zeros
    window: Window
    groups: int = 1
    storage: str = ""

    def __post_init__(self):
        self.weight = np.asarray(self.weight, dtype=np.float64)
        channels = self.weight.shape[0]
        self.bias = np.zeros(channels) if self.bias is None else np.asarray(self.bias, dtype=np.float64).reshape(-1)
        if self.weight.ndim < 3 or len(self.window.kernel) != self.weight.ndim - 2 \
                or self.window.kernel != self.weight.shape[2:] or self.bias.shape != (channels,):
            raise ValueError(f"{self.label}: weight {self.weight.shape}, bias {self.bias.shape} and window "
                             f"{self.window} do not fit together")


@dataclass
class AffineBranch:
    """s·x + t per channel (a BN of x); no scale and shift: x itself."""

    label: str
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None


@dataclass
class Merged:
    """One convolution computing the sum: float64 kernel and bias, and what it reads."""

    weight: np.ndarray
    bias: np.ndarray
    window: Window
    groups: int


def merge(branches: list[ConvBranch | AffineBranch]) -> Merged:
    """The one convolution computing the sum of `branches`, or Skip with the reason it is not one."""
    convs = [b for b in branches if isinstance(b, ConvBranch)]
    affines = [b for b in branches if isinstance(b, AffineBranch)]
    if not convs:
        raise Skip("no convolution among the summed terms")
    first = convs[0]
    _require_alike(first, convs[1:])
    dims = first.weight.ndim - 2
    for a in range(dims):
        if len({b.window.strides[a] for b in convs}) > 1:
            raise Skip(f"strides differ on spatial axis {a}: "
                       + ", ".join(f"{b.label} {b.window.strides[a]}" for b in convs))
    _require_identity_fits(affines, first)
    identity = Window((1,) * dims, (1,) * dims, (1,) * dims, (0,) * dims, (0,) * dims)
    placed = [(b.label, b.window) for b in convs] + [(b.label, identity) for b in affines]
    window = _merged_window(placed, dims)
    weight, bias = _summed_kernel(convs, affines, window, first)
    return Merged(weight, bias, window, first.groups)


def _require_alike(first: ConvBranch, others: list[ConvBranch]) -> None:
    for b in others:
        if b.weight.ndim != first.weight.ndim:
            raise Skip(f"{first.label} and {b.label} have different ranks")
        if b.groups != first.groups:
            raise Skip(f"groups differ: {first.label} has {first.groups}, {b.label} {b.groups}")
        if b.weight.shape[:2] != first.weight.shape[:2]:
            raise Skip(f"channel counts differ: {first.label} {_channels(first)}, {b.label} {_channels(b)}")
        if b.storage != first.storage:
            raise Skip(f"weights are stored differently: {first.label} {first.storage}, {b.label} {b.storage}")


def _channels(b: ConvBranch) -> str:
    return f"{b.weight.shape[1] * b.groups} → {b.weight.shape[0]} channels"


def _require_identity_fits(affines: list[AffineBranch], conv: ConvBranch) -> None:
    """x (or s·x + t) keeps the input's channels and positions: so must the convolutions."""
    c_out, c_in = conv.weight.shape[0], conv.weight.shape[1] * conv.groups
    for b in affines:
        if c_in != c_out:
            raise Skip(f"{b.label} adds the input itself, but {conv.label} maps {c_in} channels to {c_out}")
        if any(s != 1 for s in conv.window.strides):
            raise Skip(f"{b.label} adds the input itself, but {conv.label} has stride {list(conv.window.strides)}: "
                       "the sum would mix sizes")
        for values in (b.scale, b.shift):
            if values is not None and np.shape(values) != (c_out,):
                raise Skip(f"{b.label} has {np.size(values)} channels, the convolutions {c_out}")


def _merged_window(placed: list[tuple[str, Window]], dims: int) -> Window:
    kernel, dilations, begin, end = [], [], [], []
    for a in range(dims):
        spread = {w.dilations[a] for _, w in placed if w.kernel[a] > 1}
        if len(spread) > 1:
            raise Skip(f"dilations differ on spatial axis {a}: {sorted(spread)}")
        d = spread.pop() if spread else 1
        lengths = {w.length_offset(a, d) for _, w in placed}
        if len(lengths) > 1:
            raise Skip(f"paddings give different output lengths on spatial axis {a}: " + _pads_text(placed, a))
        start = max(w.pads_begin[a] for _, w in placed)
        if any((start - w.pads_begin[a]) % d for _, w in placed):
            raise Skip(f"paddings do not put the taps on one dilation grid on spatial axis {a}: "
                       + _pads_text(placed, a))
        size = max((start - w.pads_begin[a]) // d + w.kernel[a] for _, w in placed)
        longest = max(w.kernel[a] for _, w in placed)
        if size > longest:
            raise Skip(f"paddings do not centre the kernels alike on spatial axis {a}: " + _pads_text(placed, a)
                       + f" would need a {size}-tap kernel (largest: {longest})")
        kernel.append(size)
        dilations.append(d)
        begin.append(start)
        end.append(lengths.pop() + d * (size - 1) - start)
    strides = placed[0][1].strides
    return Window(tuple(kernel), strides, tuple(dilations), tuple(begin), tuple(end))


def _pads_text(placed: list[tuple[str, Window]], a: int) -> str:
    return ", ".join(f"{label} pads ({w.pads_begin[a]}, {w.pads_end[a]})" for label, w in placed)


def _summed_kernel(convs: list[ConvBranch], affines: list[AffineBranch], merged: Window,
                   first: ConvBranch) -> tuple[np.ndarray, np.ndarray]:
    """Σ W̃ᵢ and Σ bᵢ in float64; an affine puts s_c at [c, c mod (C_in/g), its tap]."""
    c_out, c_in_group = first.weight.shape[:2]
    weight = np.zeros((c_out, c_in_group, *merged.kernel))
    bias = np.zeros(c_out)
    for b in convs:
        at = _tap(merged, b.window)
        weight[(slice(None), slice(None), *(slice(o, o + k) for o, k in zip(at, b.window.kernel)))] += b.weight
        bias += b.bias
    channels = np.arange(c_out)
    identity_at = [start // d for start, d in zip(merged.pads_begin, merged.dilations)]  # its pads are 0
    for b in affines:
        weight[(channels, channels % c_in_group, *identity_at)] += 1.0 if b.scale is None else b.scale
        bias += 0.0 if b.shift is None else b.shift
    return weight, bias


def _tap(merged: Window, window: Window) -> list[int]:
    """Where a branch's first tap sits in the merged kernel, per axis."""
    return [(start - b) // d for start, b, d in zip(merged.pads_begin, window.pads_begin, merged.dilations)]
