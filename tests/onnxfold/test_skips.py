"""One case per skip rule: nothing is folded, the model is left byte-for-byte as it was,
and the report gives the reason."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bnfold import fuse_onnx
from onnx_builders import bn_count, bn_inits, bn_node, init, make_model, run, vi
from test_rules_before import conv_case, matmul_case

RNG = np.random.default_rng(7)


def _conv_bn(extra_nodes=(), outputs=("y",), weight_as_input=False, opset=17, bn_attrs=None, bn_outputs=("y",),
             check=True):
    inits = bn_inits("bn", 4, RNG)
    inputs = [vi("x", [1, 3, 5, 5])]
    if weight_as_input:
        inputs.append(vi("W", [4, 3, 3, 3]))
    else:
        inits.append(init("W", RNG.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)))
    bn = bn_node("z", "y", **(bn_attrs or {}))
    del bn.output[:]
    bn.output.extend(bn_outputs)
    nodes = [helper.make_node("Conv", ["x", "W"], ["z"], name="conv"), bn, *extra_nodes]
    return make_model(nodes, inputs, [vi(o, None) for o in outputs], inits, opset) if check else \
        helper.make_model(helper.make_graph(nodes, "g", inputs, [vi(o, [1, 4, 3, 3]) for o in outputs], inits),
                          opset_imports=[helper.make_opsetid("", opset)])


def other_consumer():
    return _conv_bn([helper.make_node("Relu", ["z"], ["r"])], outputs=("y", "r")), "also used by 1 other"


def graph_output():
    return _conv_bn(outputs=("y", "z")), "also a graph output"


def weight_not_constant():
    return _conv_bn(weight_as_input=True), "weight of Conv is not constant: 'W' is a graph input"


def bn_param_not_constant():
    m = _conv_bn()
    m.graph.input.append(helper.make_tensor_value_info("bn_scale", TensorProto.FLOAT, [4]))
    for i, t in enumerate(m.graph.initializer):
        if t.name == "bn_scale":
            del m.graph.initializer[i]
            break
    return m, "BN scale is not constant: 'bn_scale' is a graph input"


def training_mode():
    model = _conv_bn(opset=15, bn_attrs={"training_mode": 1}, bn_outputs=("y", "rm", "rv"), check=False)
    return model, "training_mode=1"


def extra_outputs():
    return _conv_bn(opset=9, bn_outputs=("y", "rm", "rv"), check=False), "running-statistics outputs"


def is_test_zero_opset6():
    return _conv_bn(opset=6, bn_attrs={"is_test": 0}, check=False), "is_test=0"


def spatial_zero():
    return _conv_bn(opset=7, bn_attrs={"spatial": 0, "is_test": 1}, check=False), "spatial=0"


def producer_not_foldable():
    inits = bn_inits("bn", 3, RNG)
    nodes = [helper.make_node("Relu", ["x"], ["z"], name="relu"), bn_node("z", "y")]
    return make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", None)], inits), "Relu 'relu' is not a foldable"


def bn_on_graph_input():
    inits = bn_inits("bn", 3, RNG)
    return make_model([bn_node("x", "y")], [vi("x", [1, 3, 4, 4])], [vi("y", None)], inits), "is a graph input"


def matmul_channel_axis_mismatch():
    """[N, T, K] @ [K, D] → [N, T, D]: BN normalizes axis 1 (T), which W does not produce."""
    inits = [init("W", RNG.normal(0, 1, (4, 6)).astype(np.float32))] + bn_inits("bn", 5, RNG)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z"], name="mm"), bn_node("z", "y")]
    return make_model(nodes, [vi("x", [2, 5, 4])], [vi("y", None)], inits), "rank-3 output"


def matmul_rank_unknown():
    m = matmul_case().model
    m.graph.input[0].type.tensor_type.ClearField("shape")
    return m, "rank of the MatMul output is unknown"


def matmul_no_constant():
    inits = bn_inits("bn", 6, RNG)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z"], name="mm"), bn_node("z", "y")]
    return make_model(nodes, [vi("x", [3, 4]), vi("w", [4, 6])], [vi("y", None)], inits), "no constant operand"


def fp16_overflow():
    """s = γ/sqrt(σ²+ε) ≈ 6e4/1e-2: the fp16 weight would overflow to inf."""
    case = conv_case(dtype=np.float16, bias=False)
    for t in case.model.graph.initializer:
        if t.name == "bn_scale":
            t.CopyFrom(init("bn_scale", np.full(6, 60000, np.float16)))
        if t.name == "bn_var":
            t.CopyFrom(init("bn_var", np.full(6, 1e-4, np.float16)))
    return case.model, "overflows float16"


def gemm_c_not_constant():
    inits = [init("B", RNG.normal(0, 1, (4, 5)).astype(np.float32))] + bn_inits("bn", 5, RNG)
    nodes = [helper.make_node("Gemm", ["a", "B", "c"], ["z"], name="gemm"), bn_node("z", "y")]
    return make_model(nodes, [vi("a", [3, 4]), vi("c", [5])], [vi("y", None)], inits), "C of Gemm is not constant"


SKIPS = {f.__name__: f for f in (
    other_consumer, graph_output, weight_not_constant, bn_param_not_constant, training_mode, extra_outputs,
    is_test_zero_opset6, spatial_zero, producer_not_foldable, bn_on_graph_input, matmul_channel_axis_mismatch,
    matmul_rank_unknown, matmul_no_constant, fp16_overflow, gemm_c_not_constant)}


@pytest.mark.parametrize("name", list(SKIPS))
def test_unfoldable_bn_is_kept_with_reason(name):
    model, reason = SKIPS[name]()
    before = model.SerializeToString()
    fused, report = fuse_onnx(copy.deepcopy(model))
    assert report.folded == []
    assert len(report.skipped) == 1
    assert reason in report.skipped[0].reason, report.skipped[0].reason
    assert fused.SerializeToString() == before


@pytest.mark.parametrize("bad_var", [-0.5, float("nan")], ids=["negative_variance", "nan_variance"])
def test_broken_bn_is_kept_with_warning_and_the_rest_folds(bad_var):
    inits = [init("W1", RNG.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)),
             init("W2", RNG.normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32))]
    inits += bn_inits("bad", 4, RNG) + bn_inits("good", 4, RNG)
    var = next(t for t in inits if t.name == "bad_var")
    arr = onnx.numpy_helper.to_array(var).copy()
    arr[2] = bad_var
    var.CopyFrom(init("bad_var", arr))
    nodes = [helper.make_node("Conv", ["x", "W1"], ["z1"], name="conv1"), bn_node("z1", "b1", "bad"),
             helper.make_node("Conv", ["b1", "W2"], ["z2"], name="conv2"), bn_node("z2", "y", "good")]
    model = make_model(nodes, [vi("x", [1, 3, 5, 5])], [vi("y", None)], inits)
    fused, report = fuse_onnx(copy.deepcopy(model))
    assert [f.bn for f in report.folded] == ["good"]
    assert [s.bn for s in report.skipped] == ["bad"]
    assert len(report.warnings) == 1 and "'bad'" in report.warnings[0] and "channel(s) [2]" in report.warnings[0]
    assert bn_count(fused) == 1
    x = RNG.normal(0, 1, (1, 3, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(run(fused, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5, equal_nan=True)
