"""Folds beyond "BN after its layer": into the next layer, exporter-split BNs (Mul/Add),
and --standalone affine. Same checks as test_rules: count, nothing left, checker, and equality
with the unfused model in onnxruntime."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import helper

from bnfold import fuse_onnx
from bnfold.onnxfold.fold_pass import fold_model
from onnx_builders import bn_count, bn_inits, bn_node, init, make_model, run, vi

RNG = np.random.default_rng(11)


def _relu_bn(channels, shape, opset=17):
    """x → Relu → BN: nothing before the BN to fold into."""
    return [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("r", "h")], bn_inits("bn", channels, RNG)


def next_gemm(trans_b=0, with_c=True):
    nodes, inits = _relu_bn(6, [3, 6])
    b = RNG.normal(0, 0.5, (4, 6) if trans_b else (6, 4)).astype(np.float32)
    inits.append(init("B", b))
    ins = ["h", "B"]
    if with_c:
        inits.append(init("C", RNG.normal(0, 0.5, (4,)).astype(np.float32)))
        ins.append("C")
    nodes.append(helper.make_node("Gemm", ins, ["y"], name="gemm", transB=trans_b, alpha=0.8, beta=1.3))
    return make_model(nodes, [vi("x", [3, 6])], [vi("y", None)], inits), {"x": _x(3, 6)}, "next Gemm"


def next_matmul(weight_first=False):
    if weight_first:  # W [5, 6] @ h [2, 6, 7]
        nodes, inits = _relu_bn(6, [2, 6, 7])
        inits.append(init("W", RNG.normal(0, 0.5, (5, 6)).astype(np.float32)))
        nodes.append(helper.make_node("MatMul", ["W", "h"], ["y"], name="mm"))
        return make_model(nodes, [vi("x", [2, 6, 7])], [vi("y", None)], inits), {"x": _x(2, 6, 7)}, "next MatMul"
    nodes, inits = _relu_bn(6, [3, 6])
    inits.append(init("W", RNG.normal(0, 0.5, (6, 5)).astype(np.float32)))
    nodes.append(helper.make_node("MatMul", ["h", "W"], ["y"], name="mm"))
    return make_model(nodes, [vi("x", [3, 6])], [vi("y", None)], inits), {"x": _x(3, 6)}, "next MatMul"


def next_conv(groups=1, bias=True):
    nodes, inits = _relu_bn(6, [1, 6, 5, 5])
    inits.append(init("W", RNG.normal(0, 0.3, (4 * groups // 2 * 2 if groups > 1 else 4, 6 // groups, 3, 3))
                      .astype(np.float32)))
    ins = ["h", "W"]
    if bias:
        inits.append(init("b", RNG.normal(0, 0.3, (onnx.numpy_helper.to_array(inits[-1]).shape[0],))
                          .astype(np.float32)))
        ins.append("b")
    nodes.append(helper.make_node("Conv", ins, ["y"], name="conv", group=groups))
    return make_model(nodes, [vi("x", [1, 6, 5, 5])], [vi("y", None)], inits), {"x": _x(1, 6, 5, 5)}, "next Conv"


def split_bn_conv_mul_add(const_shape=(1, 4, 1, 1)):
    """Conv → Mul(c) → Add(d), per-channel constants: a BN an exporter split in two."""
    inits = [init("W", RNG.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)),
             init("m", RNG.uniform(0.5, 2, const_shape).astype(np.float32)),
             init("a", RNG.normal(0, 1, const_shape).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["z"], name="conv"),
             helper.make_node("Mul", ["z", "m"], ["zm"], name="mul"),
             helper.make_node("Add", ["a", "zm"], ["y"], name="add")]
    return make_model(nodes, [vi("x", [1, 3, 5, 5])], [vi("y", None)], inits), {"x": _x(1, 3, 5, 5)}, "Conv+Mul"


def _x(*shape):
    return RNG.normal(0, 1, shape).astype(np.float32)


FOLDS = {
    "next_gemm": lambda: next_gemm(),
    "next_gemm_transB_no_C": lambda: next_gemm(trans_b=1, with_c=False),
    "next_matmul_xW": lambda: next_matmul(),
    "next_matmul_Wx_rank3": lambda: next_matmul(weight_first=True),
    "next_conv_valid": lambda: next_conv(),
    "next_conv_group2_nobias": lambda: next_conv(groups=2, bias=False),
    "split_bn_conv_mul_add": lambda: split_bn_conv_mul_add(),
    "split_bn_conv_mul_add_shape_C11": lambda: split_bn_conv_mul_add((4, 1, 1)),
}


@pytest.mark.parametrize("name", list(FOLDS))
def test_fold(name):
    model, feeds, pattern = FOLDS[name]()
    fused, report = fuse_onnx(copy.deepcopy(model))
    assert pattern in {f.pattern for f in report.folded}, (report.folded, report.skipped)
    assert report.skipped == [] and bn_count(fused) == 0
    if pattern == "Conv+Mul":
        assert [n.op_type for n in fused.graph.node] == ["Conv"]
    onnx.checker.check_model(fused, full_check=True)
    np.testing.assert_allclose(run(fused, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_next_conv_with_padding_is_not_folded():
    model, _, _ = next_conv()
    conv = model.graph.node[-1]
    conv.attribute.append(helper.make_attribute("pads", [1, 1, 1, 1]))
    before = model.SerializeToString()
    fused, report = fuse_onnx(copy.deepcopy(model))
    assert report.folded == [] and "padded borders" in report.skipped[0].reason
    assert fused.SerializeToString() == before


def test_mul_that_is_not_per_channel_is_left_alone():
    model, _, _ = split_bn_conv_mul_add(const_shape=(1, 1, 3, 1))
    before = model.SerializeToString()
    fused, report = fuse_onnx(copy.deepcopy(model))
    assert report.folded == [] and fused.SerializeToString() == before


@pytest.mark.parametrize("opset", [7, 17])
def test_standalone_affine_rewrites_what_cannot_fold(opset):
    nodes, inits = _relu_bn(6, [2, 6, 4, 4])
    model = make_model(nodes, [vi("x", [2, 6, 4, 4])], [vi("h", None)], inits, opset)
    report = fold_model(model_copy := copy.deepcopy(model), standalone="affine")
    assert report.skipped == [] and [r.bn for r in report.rewritten] == ["bn"]
    assert "not the output of a layer" in report.rewritten[0].reason or "Relu" in report.rewritten[0].reason
    assert [n.op_type for n in model_copy.graph.node] == ["Relu", "Mul", "Add"]
    onnx.checker.check_model(model_copy, full_check=True)
    feeds = {"x": _x(2, 6, 4, 4)}
    np.testing.assert_allclose(run(model_copy, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_standalone_keep_is_the_default():
    nodes, inits = _relu_bn(6, [2, 6, 4, 4])
    model = make_model(nodes, [vi("x", [2, 6, 4, 4])], [vi("h", None)], inits)
    _, report = fuse_onnx(copy.deepcopy(model))
    assert report.rewritten == [] and len(report.skipped) == 1
