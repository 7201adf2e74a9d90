"""The shared branch-merge math (bnfold.reparam), on its own: each merged convolution is compared,
in float64 and at two input sizes, with torch's convolution of every branch padded as it says,
summed; each refusal with its reason."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnfold.errors import Skip
from bnfold.reparam import AffineBranch, ConvBranch, Window, merge

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv(label: str, cin: int, cout: int, kernel: tuple, stride=1, dilation=1, pads=None, groups: int = 1,
         seed: int = 0, storage: str = "float32") -> ConvBranch:
    """A random branch; `pads` (before..., after...) or centred d·(k − 1)/2 on both sides."""
    rng = np.random.default_rng(seed)
    dims = len(kernel)
    strides, dilations = (stride,) * dims, (dilation,) * dims
    if pads is None:
        pads = tuple(d * (k - 1) // 2 for d, k in zip(dilations, kernel)) * 2
    weight = rng.normal(0, 0.5, (cout, cin // groups, *kernel))
    window = Window(kernel, strides, dilations, pads[:dims], pads[dims:])
    return ConvBranch(label, weight, rng.normal(0, 0.5, cout), window, groups, storage)


def bn(label: str, channels: int, seed: int = 1) -> AffineBranch:
    rng = np.random.default_rng(seed)
    return AffineBranch(label, rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.5, channels))


def convolve(x: torch.Tensor, weight, bias, window: Window, groups: int) -> torch.Tensor:
    """torch's convolution with explicit zero pads before and after each axis (F.pad lists the last axis first)."""
    pad = [p for b, e in zip(reversed(window.pads_begin), reversed(window.pads_end)) for p in (b, e)]
    return CONV[len(window.kernel)](F.pad(x, pad), torch.as_tensor(weight), torch.as_tensor(bias), window.strides,
                                    0, window.dilations, groups)


def summed(x: torch.Tensor, branches: list) -> torch.Tensor:
    total = 0
    for b in branches:
        if isinstance(b, ConvBranch):
            total = total + convolve(x, b.weight, b.bias, b.window, b.groups)
        else:
            view = (1, -1) + (1,) * (x.ndim - 2)
            scale = torch.ones(x.shape[1]) if b.scale is None else torch.as_tensor(b.scale)
            shift = torch.zeros(x.shape[1]) if b.shift is None else torch.as_tensor(b.shift)
            total = total + x * scale.to(x).reshape(view) + shift.to(x).reshape(view)
    return total


C = 4
CASES = {
    "repvgg_3x3_1x1_bn": ([conv("3×3", C, C, (3, 3)), conv("1×1", C, C, (1, 1), seed=1), bn("bn", C)], (3, 3)),
    "repvgg_groups2_identity": ([conv("3×3", C, C, (3, 3), groups=2), conv("1×1", C, C, (1, 1), groups=2, seed=1),
                                 AffineBranch("x")], (3, 3)),
    "mobileone_depthwise": ([conv(f"3×3 #{i}", C, C, (3, 3), groups=C, seed=i) for i in range(3)]
                            + [conv("1×1", C, C, (1, 1), groups=C, seed=3), bn("bn", C)], (3, 3)),
    "stride2_widening": ([conv("3×3", C, 6, (3, 3), stride=2), conv("1×1", C, 6, (1, 1), stride=2, seed=1)], (3, 3)),
    "acnet_3x3_1x3_3x1": ([conv("3×3", C, 6, (3, 3)), conv("1×3", C, 6, (1, 3), pads=(0, 1, 0, 1), seed=1),
                           conv("3×1", C, 6, (3, 1), pads=(1, 0, 1, 0), seed=2)], (3, 3)),
    # a 1-tap kernel reads the same under any dilation: the 1×1 and x join the dilated 3×3
    "dilated_3x3_1x1_identity": ([conv("3×3 d2", C, C, (3, 3), dilation=2), conv("1×1", C, C, (1, 1), seed=1),
                                  bn("bn", C)], (3, 3)),
    "dilated_1x1_first": ([conv("1×1", C, C, (1, 1), seed=1), conv("5×5 d3", C, C, (5, 5), dilation=3)], (5, 5)),
    # even kernels padded unevenly (SAME_UPPER / torch's "same"): the smaller kernels sit at its first tap
    "even_2x2_upper_1x1_identity": ([conv("2×2", C, C, (2, 2), pads=(0, 0, 1, 1)), conv("1×1", C, C, (1, 1), seed=1),
                                     bn("bn", C)], (2, 2)),
    "3x3_plus_2x2_same": ([conv("3×3", C, C, (3, 3)), conv("2×2", C, C, (2, 2), pads=(0, 0, 1, 1), seed=1)], (3, 3)),
    "conv1d_3_1_identity": ([conv("3", C, C, (3,)), conv("1", C, C, (1,), seed=1), AffineBranch("x")], (3,)),
    "conv3d_3_1_bn": ([conv("3×3×3", C, C, (3, 3, 3)), conv("1×1×1", C, C, (1, 1, 1), seed=1), bn("bn", C)],
                      (3, 3, 3)),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("size", [7, 8])
def test_merged_conv_computes_the_sum(name, size):
    branches, kernel = CASES[name]
    merged = merge(branches)
    assert merged.window.kernel == kernel
    dims = len(kernel)
    x = torch.randn((2, C) + (size,) * dims, dtype=torch.float64, generator=torch.Generator().manual_seed(size))
    want = summed(x, branches)
    got = convolve(x, merged.weight, merged.bias, merged.window, merged.groups)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_repvgg_kernel_by_hand():
    """W₃ + pad(W₁) + s at [c, c, 1, 1]; biases b₃ + b₁ + t; pads (1, 1)."""
    w3, w1, affine = conv("3×3", C, C, (3, 3)), conv("1×1", C, C, (1, 1), seed=1), bn("bn", C)
    merged = merge([w3, w1, affine])
    want = w3.weight.copy()
    want[:, :, 1:2, 1:2] += w1.weight
    want[np.arange(C), np.arange(C), 1, 1] += affine.scale
    np.testing.assert_array_equal(merged.weight, want)
    np.testing.assert_array_equal(merged.bias, w3.bias + w1.bias + affine.shift)
    assert merged.weight.dtype == np.float64
    assert (merged.window.pads_begin, merged.window.pads_end) == ((1, 1), (1, 1))


def test_grouped_identity_is_each_channels_own_input():
    """Groups of 2 channels: output channel c reads input c mod 2 of its group."""
    merged = merge([conv("3×3", C, C, (3, 3), groups=2), AffineBranch("x")])
    ones = merged.weight - conv("3×3", C, C, (3, 3), groups=2).weight
    assert [tuple(i) for i in np.argwhere(ones != 0)] == [(0, 0, 1, 1), (1, 1, 1, 1), (2, 0, 1, 1), (3, 1, 1, 1)]


REFUSED = {
    "strides": ([conv("a", C, C, (3, 3), stride=2), conv("b", C, C, (5, 5), pads=(0,) * 4)],
                "strides differ on spatial axis 0: a 2, b 1"),
    "groups": ([conv("a", C, C, (3, 3)), conv("b", C, C, (3, 3), groups=2)], "groups differ: a has 1, b 2"),
    "ranks": ([conv("a", C, C, (3, 3)), conv("b", C, C, (3,))], "a and b have different ranks"),
    "channels": ([conv("a", C, C, (3, 3)), conv("b", C, 6, (3, 3))], "channel counts differ"),
    "storage": ([conv("a", C, C, (3, 3)), conv("b", C, C, (1, 1), storage="float16")],
                "weights are stored differently: a float32, b float16"),
    "dilations": ([conv("a", C, C, (3, 3)), conv("b", C, C, (3, 3), dilation=2)],
                  "dilations differ on spatial axis 0: [1, 2]"),
    "identity_channels": ([conv("a", C, 6, (3, 3)), AffineBranch("x")], "x adds the input itself, but a maps 4 "
                                                                        "channels to 6"),
    "identity_stride": ([conv("a", C, C, (3, 3), stride=2), bn("bn", C)], "bn adds the input itself, but a has "
                                                                          "stride [2, 2]"),
    "affine_channels": ([conv("a", C, C, (3, 3)), bn("bn", 3)], "bn has 3 channels, the convolutions 4"),
    # 3 and 2 taps, padded evenly: no common centre, and the outputs differ in length
    "odd_difference_symmetric": ([conv("a", C, C, (3, 3)), conv("b", C, C, (2, 2), pads=(0,) * 4)],
                                 "paddings give different output lengths on spatial axis 0: a pads (1, 1), "
                                 "b pads (0, 0)"),
    "valid_5x5_plus_3x3": ([conv("a", C, C, (5, 5), pads=(0,) * 4), conv("b", C, C, (3, 3), pads=(0,) * 4)],
                           "paddings give different output lengths"),
    "identity_beside_valid": ([conv("a", C, C, (3, 3), pads=(0,) * 4), AffineBranch("x")],
                              "paddings give different output lengths"),
    "off_grid": ([conv("a", C, C, (3, 3), dilation=2), conv("b", C, C, (3, 3), dilation=2, pads=(1, 1, 3, 3))],
                 "paddings do not put the taps on one dilation grid on spatial axis 0"),
    "shifted": ([conv("a", C, C, (3, 3)), conv("b", C, C, (3, 3), pads=(0, 0, 2, 2))],
                "paddings do not centre the kernels alike on spatial axis 0: a pads (1, 1), b pads (0, 2) would "
                "need a 4-tap kernel (largest: 3)"),
    "no_conv": ([bn("bn", C), AffineBranch("x")], "no convolution among the summed terms"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_with_reason(name):
    branches, reason = REFUSED[name]
    with pytest.raises(Skip) as refused:
        merge(branches)
    assert reason in str(refused.value)


def test_branches_that_do_not_fit_together_are_a_bug():
    with pytest.raises(ValueError, match="do not fit together"):
        ConvBranch("a", np.zeros((4, 4, 3, 3)), None, Window((1, 1), (1, 1), (1, 1), (0, 0), (0, 0)))
