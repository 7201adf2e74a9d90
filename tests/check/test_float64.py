"""The float64 kernels the per-site check computes layers with, against independent references:
Conv against the plain-numpy reference written from the operator definition, ConvTranspose
against onnxruntime running the ONNX operator, and each weight gradient through the adjoint
identity ⟨G, w⟩ = ⟨a, layer(x, w)⟩ with the reference layer."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from bnfold.check import float64 as k
from onnx_builders import init, make_model, run, vi
from numpy_ref import conv as ref_conv

RNG = np.random.default_rng(7)

# (spatial input, C_in, C_out, kernel, strides, dilations, pads begin, pads end, group)
CONV_CASES = {
    "3x3_pad1": ((7, 6), 4, 6, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), 1),
    "stride2_asym_pads": ((9, 8), 4, 6, (3, 2), (2, 1), (1, 1), (1, 0), (0, 2), 2),
    "depthwise_dilated": ((9, 9), 6, 6, (3, 3), (1, 1), (2, 2), (2, 2), (2, 2), 6),
    "1d": ((11,), 3, 5, (4,), (3,), (1,), (0,), (1,), 1),
    "3d": ((4, 5, 3), 2, 4, (2, 3, 1), (1, 2, 1), (1, 1, 1), (0, 1, 0), (1, 1, 0), 2),
}


def _geo(case) -> tuple[np.ndarray, np.ndarray, k.ConvGeometry]:
    spatial, cin, cout, kernel, strides, dil, pb, pe, group = case
    x = RNG.standard_normal((2, cin, *spatial))
    w = RNG.standard_normal((cout, cin // group, *kernel))
    return x, w, k.ConvGeometry(kernel, strides, dil, pb, pe, group)


@pytest.mark.parametrize("name", CONV_CASES)
def test_conv_matches_the_reference(name):
    x, w, geo = _geo(CONV_CASES[name])
    expected = ref_conv(x, w, strides=geo.strides, pads=[*geo.pads_begin, *geo.pads_end], dilations=geo.dilations,
                        group=geo.group)
    got = k.conv(x, w, geo)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", CONV_CASES)
def test_conv_weight_grad_is_the_adjoint(name):
    x, w, geo = _geo(CONV_CASES[name])
    pads = [*geo.pads_begin, *geo.pads_end]
    y = ref_conv(x, w, strides=geo.strides, pads=pads, dilations=geo.dilations, group=geo.group)
    a = RNG.standard_normal(y.shape)
    grad = k.conv_weight_grad(x, a, w.shape, geo)
    probe = RNG.standard_normal(w.shape)
    through = ref_conv(x, probe, strides=geo.strides, pads=pads, dilations=geo.dilations, group=geo.group)
    assert np.sum(grad * probe) == pytest.approx(np.sum(a * through), rel=1e-10)


# (spatial input, C_in, C_out, kernel, strides, dilations, pads, output_padding, group)
TRANSPOSE_CASES = {
    "k2_s2": ((4, 5), 4, 3, (2, 2), (2, 2), (1, 1), (0, 0, 0, 0), (0, 0), 1),
    "k3_s2_pad_outpad": ((4, 4), 4, 6, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), (1, 1), 2),
    "dilated_asym": ((5, 3), 2, 2, (3, 2), (1, 3), (2, 1), (1, 0, 2, 1), (0, 2), 1),
    "depthwise": ((5, 5), 4, 4, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), (0, 0), 4),
}


def _transpose_case(name):
    spatial, cin, cout, kernel, strides, dil, pads, outpad, group = TRANSPOSE_CASES[name]
    dims = len(spatial)
    x = RNG.standard_normal((2, cin, *spatial)).astype(np.float32)
    w = RNG.standard_normal((cin, cout // group, *kernel)).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=list(strides), dilations=list(dil),
                            pads=list(pads), output_padding=list(outpad), group=group)
    model = make_model([node], [vi("x", list(x.shape))], [vi("y", None)], [init("w", w)])
    geo = k.TransposeGeometry(kernel, strides, dil, tuple(pads[:dims]), tuple(pads[dims:]), outpad, group)
    return x, w, geo, run(model, {"x": x})[0]


@pytest.mark.parametrize("name", TRANSPOSE_CASES)
def test_conv_transpose_matches_onnxruntime(name):
    x, w, geo, expected = _transpose_case(name)
    got = k.conv_transpose(x.astype(np.float64), w.astype(np.float64), geo)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)  # onnxruntime computes in float32


@pytest.mark.parametrize("name", TRANSPOSE_CASES)
def test_conv_transpose_weight_grad_is_the_adjoint(name):
    x, w, geo, y = _transpose_case(name)
    x = x.astype(np.float64)
    a = RNG.standard_normal(y.shape)
    grad = k.conv_transpose_weight_grad(x, a, w.shape, geo)
    probe = RNG.standard_normal(w.shape)
    assert np.sum(grad * probe) == pytest.approx(np.sum(a * k.conv_transpose(x, probe, geo)), rel=1e-10)
    # …and that layer is the one onnxruntime runs, so the identity holds for the operator itself
    assert np.sum(grad * w) == pytest.approx(np.sum(a * y), rel=1e-5)


def test_kernel_larger_than_the_input_is_a_clear_error():
    with pytest.raises(ValueError, match="does not fit"):
        k.conv(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 3, 3)), k.ConvGeometry((3, 3), (1, 1), (1, 1), (0, 0), (0, 0)))


@pytest.mark.parametrize("name", CONV_CASES)
def test_patch_sums_are_the_conv_with_a_kernel_of_ones(name):
    x, w, geo = _geo(CONV_CASES[name])
    expected = ref_conv(np.abs(x), np.ones(w.shape), strides=geo.strides, pads=[*geo.pads_begin, *geo.pads_end],
                        dilations=geo.dilations, group=geo.group)
    got = k.patch_sums(k.patches(np.abs(x), geo), geo, w.shape[0])
    np.testing.assert_allclose(np.broadcast_to(got, expected.shape), expected, rtol=1e-12)


def test_zero_input_gives_zeros_of_the_output_shape():
    x, w, geo = _geo(CONV_CASES["stride2_asym_pads"])
    expected = k.conv(x, w, geo)
    zero = k.patches(np.zeros_like(x), geo)
    assert zero.cols is None
    assert k.conv(zero, w, geo).shape == expected.shape and not k.conv(zero, w, geo).any()
