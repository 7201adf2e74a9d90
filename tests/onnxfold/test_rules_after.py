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


def test_mul_that_is_not_per_channel_is_left_alone_saying_why():
    model, _, _ = split_bn_conv_mul_add(const_shape=(1, 1, 3, 1))
    before = model.SerializeToString()
    fused, report = fuse_onnx(copy.deepcopy(model))
    assert report.folded == [] and fused.SerializeToString() == before
    assert [(s.bn, s.op, s.producer) for s in report.skipped] == [("mul", "Mul", "conv")]  # its Add follows a Mul
    assert "constant of shape (1, 1, 3, 1) is not per-channel on axis 1" in report.skipped[0].reason


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


# -- per-feature Mul/Add after MatMul and Gemm (tf2onnx's Keras Dense + BatchNormalization) ----------


def tf2onnx_dense_bn(tokens: int | None = None):
    """Keras `Dense(32)` then `BatchNormalization()` in inference, as tf2onnx writes them (opset 13):
    TensorFlow computes BN on a non-4-d input as x·mul + sub with mul = γ·rsqrt(σ²+ε) and
    sub = β − μ·mul folded to constants, so the graph is MatMul → Add(BiasAdd) → Mul → Add, with
    tf2onnx's tensor names. TensorFlow itself is too heavy for the test environment: the graph is
    written here with onnx.helper. `tokens`: Dense on a sequence, [N, T, 16] → [N, T, 32]."""
    d, k = 32, 16
    w = RNG.normal(0, 0.3, (k, d)).astype(np.float32)
    bias = RNG.normal(0, 0.2, d).astype(np.float32)
    gamma, beta = RNG.uniform(0.5, 1.5, d), RNG.normal(0, 0.3, d)
    mean, var = RNG.normal(0, 0.5, d), RNG.uniform(0.3, 2, d)
    mul = (gamma / np.sqrt(var + 1e-3)).astype(np.float32)  # Keras' ε
    sub = (beta - mean * mul).astype(np.float32)
    p = "sequential/"
    inits = [init(f"{p}dense/MatMul/ReadVariableOp:0", w), init(f"{p}dense/BiasAdd/ReadVariableOp:0", bias),
             init(f"{p}batch_normalization/batchnorm/mul:0", mul), init(f"{p}batch_normalization/batchnorm/sub:0", sub)]
    nodes = [helper.make_node("MatMul", ["input_1", f"{p}dense/MatMul/ReadVariableOp:0"], [f"{p}dense/MatMul:0"],
                              name=f"{p}dense/MatMul"),
             helper.make_node("Add", [f"{p}dense/MatMul:0", f"{p}dense/BiasAdd/ReadVariableOp:0"],
                              [f"{p}dense/BiasAdd:0"], name=f"{p}dense/BiasAdd"),
             helper.make_node("Mul", [f"{p}dense/BiasAdd:0", f"{p}batch_normalization/batchnorm/mul:0"],
                              [f"{p}batch_normalization/batchnorm/mul_1:0"], name=f"{p}batch_normalization/batchnorm/mul_1"),
             helper.make_node("Add", [f"{p}batch_normalization/batchnorm/mul_1:0", f"{p}batch_normalization/batchnorm/sub:0"],
                              ["batch_normalization"], name=f"{p}batch_normalization/batchnorm/add_1")]
    shape = ["unk__6", k] if tokens is None else ["unk__6", tokens, k]
    model = make_model(nodes, [vi("input_1", shape)], [vi("batch_normalization", None)], inits, opset=13)
    x = _x(3, k) if tokens is None else _x(3, tokens, k)
    expected = (x.astype(np.float64) @ w + bias) * mul + sub  # the Keras formula, in float64
    return model, {"input_1": x}, expected


def gemm_mul_add():
    """Gemm(transB=1) → Mul([1, N]) → Add([N]): torch Linear followed by a split BN."""
    inits = [init("W", RNG.normal(0, 0.3, (6, 4)).astype(np.float32)), init("b", RNG.normal(0, 0.2, 6).astype(np.float32)),
             init("m", RNG.uniform(-2, 2, (1, 6)).astype(np.float32)), init("a", RNG.normal(0, 1, 6).astype(np.float32))]
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["z"], name="gemm", transB=1),
             helper.make_node("Mul", ["z", "m"], ["zm"], name="mul"), helper.make_node("Add", ["zm", "a"], ["y"], name="add")]
    x = _x(3, 4)
    p = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in inits}
    return make_model(nodes, [vi("x", [3, 4])], [vi("y", None)], inits), {"x": x}, \
        (x @ p["W"].T + p["b"]) * p["m"] + p["a"]


def matmul_mul_only():
    """MatMul → Mul (no bias): the Mul goes into W, and nothing is added after the MatMul."""
    inits = [init("W", RNG.normal(0, 0.3, (4, 6)).astype(np.float32)), init("m", RNG.uniform(-2, 2, 6).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z"], name="mm"), helper.make_node("Mul", ["z", "m"], ["y"], name="mul")]
    x = _x(2, 5, 4)
    p = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in inits}
    return make_model(nodes, [vi("x", [2, 5, 4])], [vi("y", None)], inits), {"x": x}, (x @ p["W"]) * p["m"]


PER_FEATURE = {
    "tf2onnx_dense_bn_2d": (lambda: tf2onnx_dense_bn(), ["MatMul+Add+Mul", "MatMul+Add+Add"], ["MatMul", "Add"]),
    "tf2onnx_dense_bn_3d": (lambda: tf2onnx_dense_bn(tokens=5), ["MatMul+Add+Mul", "MatMul+Add+Add"],
                            ["MatMul", "Add"]),
    "gemm_mul_add": (gemm_mul_add, ["Gemm+Mul", "Gemm+Add"], ["Gemm"]),
    "matmul_mul_no_bias": (matmul_mul_only, ["MatMul+Mul"], ["MatMul"]),
}


@pytest.mark.parametrize("name", list(PER_FEATURE))
def test_per_feature_affine_after_matmul_or_gemm_folds(name):
    build, patterns, ops_after = PER_FEATURE[name]
    model, feeds, expected = build()
    fused, report = fuse_onnx(copy.deepcopy(model))
    assert [f.pattern for f in report.folded] == patterns and report.skipped == []
    assert [n.op_type for n in fused.graph.node] == ops_after
    onnx.checker.check_model(fused, full_check=True)
    assert [o.name for o in fused.graph.output] == [o.name for o in model.graph.output]
    got = run(fused, feeds)[0]
    np.testing.assert_allclose(got, run(model, feeds)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_per_token_mul_after_matmul_is_kept_with_reason():
    """[N, T, C] · constant [T, 1]: it scales tokens, not features; the MatMul's weight cannot take it."""
    model, _, _ = tf2onnx_dense_bn(tokens=5)
    mul = next(t for t in model.graph.initializer if t.name.endswith("batchnorm/mul:0"))
    mul.CopyFrom(init(mul.name, RNG.uniform(0.5, 2, (5, 1)).astype(np.float32)))
    model = make_model(model.graph.node, model.graph.input, [vi("batch_normalization", None)],
                       model.graph.initializer, opset=13)
    before = model.SerializeToString()
    fused, report = fuse_onnx(copy.deepcopy(model))
    assert report.folded == [] and [(s.op, s.producer) for s in report.skipped] == [("Mul", "sequential/dense/BiasAdd")]
    assert "constant of shape (5, 1) is not per-channel on axis 2" in report.skipped[0].reason
    assert fused.SerializeToString() == before


def test_mul_of_a_value_read_elsewhere_is_an_ordinary_node():
    """GELU's x·0.5 where x = MatMul + bias also feeds the erf branch: not a split BN, nothing reported."""
    model, _, _ = tf2onnx_dense_bn()
    g = model.graph
    g.node.append(helper.make_node("Relu", ["sequential/dense/BiasAdd:0"], ["side"], name="side"))
    g.output.append(vi("side", None))
    model = make_model(g.node, g.input, [vi("batch_normalization", None), vi("side", None)], g.initializer, opset=13)
    before = model.SerializeToString()
    fused, report = fuse_onnx(copy.deepcopy(model))
    assert report.folded == [] and report.skipped == [] and fused.SerializeToString() == before


def test_report_counts_bn_like_sites_as_the_user_does(capsys):
    """A BN, a Mul with its Add, and a Mul that cannot fold: 2 sites folded (one of each kind), 1 kept
    (a Mul), in the text and in --json; "folded" and "skipped" keep one entry per node."""
    from bnfold.render import Output
    from bnfold.render.fold import render_fold

    model, _, _ = split_bn_conv_mul_add()
    g = model.graph
    g.initializer.extend([init("W2", RNG.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)),
                          init("W3", RNG.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)),
                          init("m3", RNG.uniform(0.5, 2, (1, 1, 3, 1)).astype(np.float32)), *bn_inits("bn", 4, RNG)])
    g.node.extend([helper.make_node("Conv", ["x", "W2"], ["z2"], name="conv2"), bn_node("z2", "y2"),
                   helper.make_node("Conv", ["x", "W3"], ["z3"], name="conv3"),
                   helper.make_node("Mul", ["z3", "m3"], ["y3"], name="mul3")])
    model = make_model(g.node, g.input, [vi("y", None), vi("y2", None), vi("y3", None)], g.initializer)
    _, report = fuse_onnx(copy.deepcopy(model))
    data = report.to_dict()
    assert data["sites"] == {"folded": 2, "kept": 1, "folded_kinds": {"Mul+Add": 1, "BatchNormalization": 1},
                             "kept_kinds": {"Mul": 1}}
    assert [(f["op"], f["site"]) for f in data["folded"]] == [("Mul", "mul+add"), ("Add", "mul+add"),
                                                              ("BatchNormalization", "")]
    assert [(s["bn"], s["op"]) for s in data["skipped"]] == [("mul3", "Mul")]
    render_fold(report, Output())
    text = " ".join(capsys.readouterr().out.split())  # as rich wraps it, joined
    assert "folded 2 BN-like sites (1 Mul+Add, 1 BatchNormalization)" in text
    assert "kept 1 BN-like site (1 Mul)" in text and "mul + add (Mul+Add)" in text
