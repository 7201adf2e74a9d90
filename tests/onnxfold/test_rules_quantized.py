"""BN after a layer whose weight is behind DequantizeLinear (quantized before folding): the fold
goes into the scales. Each positive case checks the count and pattern, that no BN is left,
onnx.checker, equality with the unfused model in onnxruntime (optimizations off), and the
quantized integers and scales against numpy float64: integers untouched where s > 0, reflected
about the zero point where s < 0, scales |s|·scale. Each negative case checks that nothing changed
and the reason."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import fuse_onnx
from onnx_builders import bn_count, bn_inits, bn_node, init, make_model, run, vi

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import zoo  # noqa: E402

X_SCALE, X_ZP = np.float32(0.03), np.uint8(128)


def _rng():
    return np.random.default_rng(22)


def _quantized(rng, shape, axis, per_axis=True, zp=None, low=-127):
    """Symmetric int8 weights as onnxruntime writes them ([-127, 127], zero point 0)."""
    q = rng.integers(low, 128, shape).astype(np.int8)
    n = shape[axis]
    scale = rng.uniform(0.002, 0.02, n if per_axis else ()).astype(np.float32)
    zero = np.zeros(n if per_axis else (), np.int8) if zp is None else np.asarray(zp, np.int8)
    return q, scale, zero


def _dq(name, axis, per_axis):
    attrs = {"axis": axis} if per_axis else {}
    return helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zp"], [name],
                            name=f"dq_{name}", **attrs)


def _inits(name, q, scale, zero):
    return [init(f"{name}_q", q), init(f"{name}_scale", scale), init(f"{name}_zp", zero)]


def _activation_qdq(x="x"):
    """x → QuantizeLinear → DequantizeLinear: the quantized activation a QDQ layer reads."""
    return [helper.make_node("QuantizeLinear", [x, "x_scale", "x_zp"], ["xq"], name="q_x"),
            helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"], name="dq_x")], \
        [init("x_scale", X_SCALE), init("x_zp", X_ZP)]


def conv_case(per_axis=True, negative=(), zero=(), bias=None, axis=0, opset=17, low=-127, channels=6):
    """x → Q → DQ → Conv(DQ(W_q)) [+ bias] → BN → y, with γ negated or zeroed in some channels."""
    rng = _rng()
    q, scale, zp = _quantized(rng, (channels, 4, 3, 3), axis, per_axis, low=low)
    nodes, inits = _activation_qdq()
    nodes.append(_dq("W", axis, per_axis))
    inits += _inits("W", q, scale, zp) + bn_inits("bn", channels, rng)
    conv_in = ["xd", "W"]
    if bias == "float":
        inits.append(init("b", rng.normal(0, 0.3, channels).astype(np.float32)))
        conv_in.append("b")
    elif bias == "int32":  # as quantize_static writes it: scale = input scale · weight scale, zero point 0
        b_scale = (X_SCALE * np.broadcast_to(scale, channels)).astype(np.float32)
        inits += [init("b_q", rng.integers(-3000, 3000, channels).astype(np.int32)), init("b_scale", b_scale),
                  init("b_zp", np.zeros(channels, np.int32))]
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zp"], ["b"], name="dq_b", axis=0))
        conv_in.append("b")
    _set_gamma(inits, "bn", negative, zero)
    nodes += [helper.make_node("Conv", conv_in, ["z"], name="conv", pads=[1, 1, 1, 1]), bn_node("z", "y")]
    model = make_model(nodes, [vi("x", [2, 4, 5, 5])], [vi("y", None)], inits, opset)
    return model, {"x": rng.normal(0, 1, (2, 4, 5, 5)).astype(np.float32)}, "DequantizeLinear→Conv"


def _set_gamma(inits, prefix, negative=(), zero=()):
    g = next(t for t in inits if t.name == f"{prefix}_scale")
    gamma = numpy_helper.to_array(g).copy()
    gamma[list(negative)] *= -1
    gamma[list(zero)] = 0
    g.CopyFrom(init(g.name, gamma))


def conv_transpose_case():
    rng = _rng()
    q, scale, zp = _quantized(rng, (4, 6, 3, 3), axis=1)
    nodes, inits = _activation_qdq()
    nodes += [_dq("W", 1, True), helper.make_node("ConvTranspose", ["xd", "W"], ["z"], name="convT"), bn_node("z", "y")]
    inits += _inits("W", q, scale, zp) + bn_inits("bn", 6, rng)
    _set_gamma(inits, "bn", negative=[1])
    model = make_model(nodes, [vi("x", [2, 4, 5, 5])], [vi("y", None)], inits)
    return model, {"x": rng.normal(0, 1, (2, 4, 5, 5)).astype(np.float32)}, "DequantizeLinear→ConvTranspose"


def gemm_case():
    """quantize_static's Linear: Gemm(transB=1), weight [N, K] per axis 0, int32 bias."""
    rng = _rng()
    q, scale, zp = _quantized(rng, (5, 8), axis=0)
    nodes, inits = _activation_qdq()
    b_scale = (X_SCALE * scale).astype(np.float32)
    inits += _inits("W", q, scale, zp) + bn_inits("bn", 5, rng) + [
        init("b_q", rng.integers(-3000, 3000, 5).astype(np.int32)), init("b_scale", b_scale),
        init("b_zp", np.zeros(5, np.int32))]
    _set_gamma(inits, "bn", negative=[0, 3])
    nodes += [_dq("W", 0, True), helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zp"], ["b"], axis=0),
              helper.make_node("Gemm", ["xd", "W", "b"], ["z"], name="gemm", transB=1), bn_node("z", "y")]
    model = make_model(nodes, [vi("x", [3, 8])], [vi("y", None)], inits)
    return model, {"x": rng.normal(0, 1, (3, 8)).astype(np.float32)}, "DequantizeLinear→Gemm"


def matmul_case(through=False, mul_add=False):
    """x @ W, W [K, N] quantized per axis 1; optionally → Transpose → BN ([N, T, C] → [N, C, T])."""
    rng = _rng()
    q, scale, zp = _quantized(rng, (8, 6), axis=1)
    nodes, inits = _activation_qdq()
    inits += _inits("W", q, scale, zp) + bn_inits("bn", 6, rng)
    _set_gamma(inits, "bn", negative=[2])
    nodes += [_dq("W", 1, True), helper.make_node("MatMul", ["xd", "W"], ["z"], name="matmul")]
    x_shape, pattern = [3, 8], "DequantizeLinear→MatMul"
    if through:
        x_shape, pattern = [2, 5, 8], "DequantizeLinear→MatMul→Transpose"
        nodes += [helper.make_node("Transpose", ["z"], ["zt"], perm=[0, 2, 1], name="t"), bn_node("zt", "y")]
    else:
        nodes.append(bn_node("z", "y"))
    model = make_model(nodes, [vi("x", x_shape)], [vi("y", None)], inits)
    return model, {"x": rng.normal(0, 1, x_shape).astype(np.float32)}, pattern


def split_bn_case():
    """Conv(DQ W) → Mul → Add: a BN an exporter split (FrozenBatchNorm2d), on a quantized Conv."""
    rng = _rng()
    q, scale, zp = _quantized(rng, (6, 4, 3, 3), axis=0)
    nodes, inits = _activation_qdq()
    inits += _inits("W", q, scale, zp) + [init("m", rng.uniform(-2, 2, (1, 6, 1, 1)).astype(np.float32)),
                                          init("a", rng.normal(0, 1, (1, 6, 1, 1)).astype(np.float32))]
    nodes += [_dq("W", 0, True), helper.make_node("Conv", ["xd", "W"], ["z"], name="conv"),
              helper.make_node("Mul", ["z", "m"], ["zm"], name="mul"), helper.make_node("Add", ["zm", "a"], ["y"])]
    model = make_model(nodes, [vi("x", [2, 4, 5, 5])], [vi("y", None)], inits)
    return model, {"x": rng.normal(0, 1, (2, 4, 5, 5)).astype(np.float32)}, "DequantizeLinear→Conv+Mul"


FOLDS = {
    "conv_per_axis": lambda: conv_case(),
    "conv_per_tensor_becomes_per_axis": lambda: conv_case(per_axis=False),
    "conv_negative_gamma_rows_reflected": lambda: conv_case(negative=[0, 3]),
    "conv_zero_gamma_row_at_zero_point": lambda: conv_case(zero=[2]),
    "conv_float_bias": lambda: conv_case(bias="float", negative=[1]),
    "conv_int32_bias_requantized": lambda: conv_case(bias="int32", negative=[4]),
    "conv_per_tensor_int32_bias": lambda: conv_case(per_axis=False, bias="int32"),
    "convT_per_axis_1": conv_transpose_case,
    "gemm_transB_int32_bias": gemm_case,
    "matmul_xW_per_axis_1": lambda: matmul_case(),
    "matmul_through_transpose": lambda: matmul_case(through=True),
    "split_bn_mul_add": split_bn_case,
}


@pytest.mark.parametrize("name", list(FOLDS))
def test_quantized_weight_folds_into_its_scales(name):
    model, feeds, pattern = FOLDS[name]()
    onnx.checker.check_model(model, full_check=True)
    fused, report = fuse_onnx(copy.deepcopy(model))
    assert {f.pattern for f in report.folded} >= {pattern} and not report.skipped, (report.folded, report.skipped)
    assert bn_count(fused) == 0 and "Mul" not in [n.op_type for n in fused.graph.node]
    onnx.checker.check_model(fused, full_check=True)
    expected, got = run(model, feeds)[0], run(fused, feeds)[0]
    # Float32 rounding of the new scales and bias (relative 1e-7 of each term), plus, for an int32
    # bias, its requantization: at most half a step of the new bias grid, X_SCALE·|s|·scale/2.
    atol = 1e-5 + (0.5 * float(X_SCALE) * 0.02 * _max_abs_s(model) if "int32" in name or "gemm" in name else 0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=atol)
    _check_integers_and_scales(model, fused)


def _max_abs_s(model) -> float:
    p = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    return float(np.max(np.abs(p["bn_scale"] / np.sqrt(p["bn_var"] + np.float32(1e-5)))))


def _check_integers_and_scales(model, fused) -> None:
    """The weight's DequantizeLinear, recomputed in numpy from the original's BN: W_q where s > 0,
    2·zp − W_q where s < 0, zp where s = 0; scale |s|·scale (scale where s = 0), per output channel."""
    p = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    if "bn_scale" not in p:
        return  # split BN: its map is the Mul/Add constants, checked by the output comparison
    s = p["bn_scale"].astype(np.float64) / np.sqrt(p["bn_var"].astype(np.float64) + np.float32(1e-5))
    f = {t.name: numpy_helper.to_array(t) for t in fused.graph.initializer}
    dq = next(n for n in fused.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "W")
    axis = next(helper.get_attribute_value(a) for a in dq.attribute if a.name == "axis")
    q, scale = p["W_q"].astype(np.int64), np.broadcast_to(p["W_scale"], s.shape).astype(np.float64)
    view = [1] * q.ndim
    view[axis] = -1
    expected_q = np.where(s.reshape(view) < 0, -q, q)
    expected_q = np.where(s.reshape(view) == 0, 0, expected_q)
    np.testing.assert_array_equal(f[dq.input[0]], expected_q.astype(np.int8))
    expected_scale = (scale * np.where(s == 0, 1, np.abs(s))).astype(np.float32)
    np.testing.assert_array_equal(f[dq.input[1]], expected_scale)
    assert (f[dq.input[1]] > 0).all() and f[dq.input[2]].shape == s.shape


def test_int32_bias_keeps_the_relation_onnxruntime_checks():
    """New bias scale = input scale · new weight scale (float32), and the requantized bias is within
    half a step of s·b + t, both recomputed here in numpy."""
    model, _, _ = conv_case(bias="int32", negative=[4])
    fused, _ = fuse_onnx(copy.deepcopy(model))
    p = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    f = {t.name: numpy_helper.to_array(t) for t in fused.graph.initializer}
    dq_w = next(n for n in fused.graph.node if n.output[0] == "W")
    dq_b = next(n for n in fused.graph.node if n.output[0] == "b")
    np.testing.assert_array_equal(f[dq_b.input[1]], (X_SCALE * f[dq_w.input[1]]).astype(np.float32))
    s = p["bn_scale"].astype(np.float64) / np.sqrt(p["bn_var"].astype(np.float64) + np.float32(1e-5))
    t = p["bn_B"] - s * p["bn_mean"]
    b = p["b_q"].astype(np.float64) * p["b_scale"].astype(np.float64)
    new_b = f[dq_b.input[0]].astype(np.float64) * f[dq_b.input[1]].astype(np.float64)
    assert f[dq_b.input[0]].dtype == np.int32
    assert (np.abs(new_b - (s * b + t)) <= f[dq_b.input[1]].astype(np.float64) / 2 * (1 + 1e-6)).all()


# -- kept, with the reason -------------------------------------------------------------------------


def reflection_out_of_range():
    """γ < 0 in channel 0 and a −128 in its row: −(−128) is not an int8."""
    model, _, _ = conv_case(negative=[0], low=-128)
    q = next(t for t in model.graph.initializer if t.name == "W_q")
    arr = numpy_helper.to_array(q).copy()
    arr[0, 0, 0, 0] = -128
    q.CopyFrom(init("W_q", arr))
    return model, "reflection about the zero point is outside int8"


def quantized_on_another_axis():
    return conv_case(axis=1, channels=4)[0], "quantized per axis 1; the fold scales its axis 0"


def per_tensor_below_opset_13():
    return conv_case(per_axis=False, opset=12)[0], "opset < 13 has no per-axis DequantizeLinear"


def shared_dequantize():
    model, _, _ = conv_case()
    g = model.graph
    g.node.append(helper.make_node("Conv", ["xd", "W"], ["z2"], name="conv2", pads=[1, 1, 1, 1]))
    g.output.append(vi("z2", None))
    return make_model(g.node, g.input, g.output, g.initializer), "also feeds 1 other node(s)"


def rounding_between_conv_and_bn():
    """Conv → Q → DQ → BN: onnxruntime's quantize_static with BatchNormalization in its op types."""
    model, _, _ = conv_case()
    g = model.graph
    conv, bn = g.node[-2], g.node[-1]
    conv.output[0] = "zc"
    g.initializer.extend([init("z_scale", np.float32(0.05)), init("z_zp", np.uint8(128))])
    g.node.insert(len(g.node) - 1, helper.make_node("QuantizeLinear", ["zc", "z_scale", "z_zp"], ["zq"]))
    g.node.insert(len(g.node) - 1, helper.make_node("DequantizeLinear", ["zq", "z_scale", "z_zp"], ["z"]))
    return make_model(g.node, g.input, g.output, g.initializer), \
        "a QuantizeLinear→DequantizeLinear pair rounds the output of Conv 'conv' before the BN"


def bn_before_quantized_layer():
    """BN → Conv(DQ W): the BN would scale the weight's input channels, which per-output scales cannot hold."""
    rng = _rng()
    q, scale, zp = _quantized(rng, (6, 4, 1, 1), axis=0)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("r", "h"), _dq("W", 0, True),
             helper.make_node("Conv", ["h", "W"], ["y"], name="conv")]
    model = make_model(nodes, [vi("x", [2, 4, 5, 5])], [vi("y", None)], _inits("W", q, scale, zp) + bn_inits("bn", 4, rng))
    return model, "(next layer: Conv 'conv' reads a quantized (DequantizeLinear) parameter"


def grouped_conv_transpose():
    model, _, _ = conv_transpose_case()
    g = model.graph
    q = numpy_helper.to_array(next(t for t in g.initializer if t.name == "W_q"))[:, :3]
    for name, value in (("W_q", q), ("W_scale", np.full(3, 0.01, np.float32)), ("W_zp", np.zeros(3, np.int8))):
        next(t for t in g.initializer if t.name == name).CopyFrom(init(name, value))
    next(n for n in g.node if n.op_type == "ConvTranspose").attribute.append(helper.make_attribute("group", 2))
    return make_model(g.node, g.input, [vi("y", None)], g.initializer), "grouped ConvTranspose"


SKIPS = {f.__name__: f for f in (reflection_out_of_range, quantized_on_another_axis, per_tensor_below_opset_13,
                                 shared_dequantize, rounding_between_conv_and_bn, bn_before_quantized_layer,
                                 grouped_conv_transpose)}


@pytest.mark.parametrize("name", list(SKIPS))
def test_quantized_bn_that_cannot_fold_is_kept_with_reason(name):
    model, reason = SKIPS[name]()
    onnx.checker.check_model(model, full_check=True)
    before = model.SerializeToString()
    fused, report = fuse_onnx(copy.deepcopy(model))
    assert report.folded == [] and len(report.skipped) == 1
    assert reason in report.skipped[0].reason, report.skipped[0].reason
    assert fused.SerializeToString() == before


# -- a resnet-shaped CNN quantized by onnxruntime ----------------------------------------------------


@pytest.fixture(scope="module")
def quantized_resnet(tmp_path_factory):
    """A small resnet-shaped CNN (stem, two basic blocks, one with a strided 1×1 downsample, convs
    with and without bias, γ < 0 in a third of the channels) exported with its BNs, then quantized
    by onnxruntime's quantize_static, per channel and per tensor, with random calibration data."""
    import torch

    out = tmp_path_factory.mktemp("qdq")
    net = _resnet_like(torch)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    src = zoo.export_onnx(net, x, out / "float.onnx")
    models = {"float": onnx.load(str(src))}
    for name, per_channel, bn_quantized in (("per_channel", True, False), ("per_tensor", False, False),
                                            ("bn_in_op_types", True, True)):
        models[name] = onnx.load(str(_quantize(src, out / f"{name}.onnx", per_channel, bn_quantized)))
    feeds = {"input": np.random.default_rng(5).normal(0, 1, (4, 3, 16, 16)).astype(np.float32)}
    return models, feeds


def _resnet_like(torch):
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride, bias):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=bias), nn.BatchNorm2d(cout)
            self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.down = None if stride == 1 else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                               nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=True), nn.BatchNorm2d(8), nn.ReLU(),
                        Block(8, 8, 1, bias=True), Block(8, 16, 2, bias=False),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    zoo.fill_bn_stats(net, (3, 16, 16))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight[::3] *= -1
    return net.eval()


def _quantize(src, dst, per_channel: bool, bn_quantized: bool):
    """quantize_static in QDQ format. With BatchNormalization in its op types (its default) it puts
    a Q/DQ pair between each Conv and its BN and quantizes γ, β; without it, and without quantizing
    Conv outputs, each Conv feeds its BN directly (the layout of QAT exports)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry

    class Random(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": np.random.default_rng(k).normal(0, 1, (2, 3, 16, 16)).astype(np.float32)}
                                 for k in range(4)])

        def get_next(self):
            return next(self.batches, None)

    ops = None if bn_quantized else [op for op in QDQRegistry if op != "BatchNormalization"]
    extra = {} if bn_quantized else {"OpTypesToExcludeOutputQuantization": ["Conv"]}
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's advice to pre-process
    quantize_static(str(src), str(dst), Random(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    op_types_to_quantize=ops, extra_options=extra)
    return dst


@pytest.mark.parametrize("name", ["per_channel", "per_tensor"])
def test_quantize_static_resnet_folds_and_computes_the_same(quantized_resnet, name):
    """Onnxruntime with optimizations off runs both models' DequantizeLinear → Conv in float32 on the
    same integers. They differ by the fold's float32 rounding (scales, float bias: relative ~1e-7)
    and, for an int32 bias, its requantization (at most half a step of input scale · weight
    scale). A perturbation δ moves a requantized activation by one step of its grid where its
    exact value lies within δ of a rounding boundary (probability ≈ δ / step), never more. Hence:
    every output within two steps of the output's grid, on average within a quarter step."""
    models, feeds = quantized_resnet
    model = models[name]
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    fused, report = fuse_onnx(copy.deepcopy(model))
    assert bn_count(model) == 6 and len(report.folded) == 6 and not report.skipped, report.skipped
    assert {f.pattern for f in report.folded} == {"DequantizeLinear→Conv"}
    assert bn_count(fused) == 0 and sum(n.op_type == "Conv" for n in fused.graph.node) == convs
    onnx.checker.check_model(fused, full_check=True)
    _check_integers_kept(model, fused)
    expected, got = run(model, feeds)[0], run(fused, feeds)[0]
    step = _output_step(model)
    assert np.abs(got - expected).max() <= 2 * step * (1 + 1e-6)
    assert np.abs(got - expected).mean() <= step / 4
    reference = run(models["float"], feeds)[0]  # the fold does not add error against the float model
    assert np.abs(got - reference).max() <= np.abs(expected - reference).max() + 2 * step


def _check_integers_kept(model, fused) -> None:
    """Int8 weights: the same values up to the sign of whole rows (s < 0); no new DequantizeLinear."""
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == TensorProto.INT8}
    after = {t.name: numpy_helper.to_array(t) for t in fused.graph.initializer}
    dqs = [n for n in fused.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == sum(n.op_type == "DequantizeLinear" for n in model.graph.node)
    for dq in dqs:
        old = next((before[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear"
                    and n.output[0] == dq.output[0] and n.input[0] in before), None)
        if old is not None and old.ndim == 4:
            new = after[dq.input[0]]
            assert ((new == old) | (new == -old)).all() and new.dtype == np.int8


def _output_step(model) -> float:
    """The scale of the DequantizeLinear that computes the model's output."""
    out = model.graph.output[0].name
    dq = next(n for n in model.graph.node if n.output[0] == out)
    return float(next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == dq.input[1]))


def test_quantize_static_with_bn_in_its_op_types_keeps_every_bn_with_the_reason(quantized_resnet):
    """Its default layout rounds each Conv's output before the BN: no exact fold, and the model is left as it was."""
    models, _ = quantized_resnet
    model = models["bn_in_op_types"]
    before = model.SerializeToString()
    fused, report = fuse_onnx(copy.deepcopy(model))
    assert report.folded == [] and len(report.skipped) == bn_count(model) == 6
    assert all("QuantizeLinear→DequantizeLinear pair" in s.reason for s in report.skipped), report.skipped
    assert fused.SerializeToString() == before
