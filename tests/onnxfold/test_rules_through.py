"""BN behind shape-only ops (rules_through): layer → Reshape/Flatten/Squeeze/Unsqueeze/Transpose → BN.

Each positive case checks the count of folds, that no BN is left, onnx.checker, equality with
the unfused model in onnxruntime (optimizations off) and BN recomputed in numpy float64 from
the unfused layer's output. Each negative case checks that nothing changed and the reason."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import helper

from bnfold import fuse_onnx
from onnx_builders import bn_count, bn_inits, bn_node, init, make_model, run, vi, with_outputs
import numpy_ref


@dataclass
class Case:
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    pattern: str
    bn_input: str  # the unfused value BN reads, for the numpy check


def _rng():
    return np.random.default_rng(115)


def _ints(name, values):
    return init(name, np.array(values, np.int64))


def levit_case(weight_transposed=False, add_bias=False) -> Case:
    """timm LinearNorm, legacy export: MatMul → Flatten(axis=2) → BN → Reshape(·, Shape(MatMul))."""
    rng = _rng()
    w = rng.normal(0, 0.5, (8, 6)).astype(np.float32)
    inits = bn_inits("bn", 6, rng)
    nodes = []
    if weight_transposed:  # the legacy exporter's Linear: Transpose(W[out, in])
        inits.append(init("Wt", w.T.copy()))
        nodes.append(helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0], name="t"))
    else:
        inits.append(init("W", w))
    nodes.append(helper.make_node("MatMul", ["x", "W"], ["mm"], name="linear"))
    z, pattern = "mm", "MatMul→Flatten"
    if add_bias:
        inits.append(init("b", rng.normal(0, 0.5, 6).astype(np.float32)))
        nodes.append(helper.make_node("Add", ["mm", "b"], ["z"], name="bias"))
        z, pattern = "z", "MatMul+Add→Flatten"
    nodes += [helper.make_node("Flatten", [z], ["flat"], axis=2, name="flatten"), bn_node("flat", "normed"),
              helper.make_node("Shape", [z], ["shape"], name="shape"),
              helper.make_node("Reshape", ["normed", "shape"], ["y"], name="back")]
    m = make_model(nodes, [vi("x", ["N", 5, 8])], [vi("y", ["N", 5, 6])], inits)
    return Case(m, {"x": rng.normal(0, 1, (2, 5, 8)).astype(np.float32)}, pattern, "flat")


def levit_dynamo_case() -> Case:
    """timm LinearNorm, dynamo export: the target [N·5, 6] is concatenated from Shape(x) at run time."""
    rng = _rng()
    inits = [init("W", rng.normal(0, 0.5, (8, 6)).astype(np.float32)), _ints("minus1", [-1]), _ints("six", [6]),
             _ints("five", 5), _ints("tail", [5, 6])] + bn_inits("bn", 6, rng)
    nodes = [helper.make_node("Shape", ["x"], ["n1"], start=0, end=1), helper.make_node("Squeeze", ["n1"], ["n"]),
             helper.make_node("MatMul", ["x", "W"], ["mm"], name="linear"),
             helper.make_node("Mul", ["n", "five"], ["rows"]), helper.make_node("Reshape", ["rows", "minus1"], ["rows1"]),
             helper.make_node("Concat", ["rows1", "six"], ["target"], axis=0),
             helper.make_node("Reshape", ["mm", "target"], ["view"], allowzero=1, name="view"), bn_node("view", "normed"),
             helper.make_node("Reshape", ["n", "minus1"], ["n_1"]),
             helper.make_node("Concat", ["n_1", "tail"], ["back_target"], axis=0),
             helper.make_node("Reshape", ["normed", "back_target"], ["y"], allowzero=1)]
    m = make_model(nodes, [vi("x", ["N", 5, 8])], [vi("y", None)], inits)
    return Case(m, {"x": rng.normal(0, 1, (3, 5, 8)).astype(np.float32)}, "MatMul→Reshape", "view")


def matmul_transpose_case(extra_unsqueeze=False) -> Case:
    """[N, T, K] @ [K, C] → Transpose(0, 2, 1) → [N, C, T] → BN1d (tokens as length)."""
    rng = _rng()
    inits = [init("W", rng.normal(0, 0.5, (8, 6)).astype(np.float32))] + bn_inits("bn", 6, rng)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="linear"),
             helper.make_node("Transpose", ["mm"], ["t"], perm=[0, 2, 1], name="tokens_last")]
    last, pattern = "t", "MatMul→Transpose"
    if extra_unsqueeze:
        inits.append(_ints("axes", [3]))
        nodes.append(helper.make_node("Unsqueeze", ["t", "axes"], ["u"], name="unsq"))
        nodes.append(helper.make_node("Identity", ["u"], ["u_id"], name="ident"))
        last, pattern = "u_id", "MatMul→Transpose→Unsqueeze→Identity"
    nodes.append(bn_node(last, "y"))
    m = make_model(nodes, [vi("x", [2, 5, 8])], [vi("y", None)], inits)
    return Case(m, {"x": rng.normal(0, 1, (2, 5, 8)).astype(np.float32)}, pattern, last)


def weight_first_case() -> Case:
    """W [C, K] @ x [N, K, L] → [N, C, L] → Unsqueeze(3) → BN2d: channels are W's rows."""
    rng = _rng()
    inits = [init("W", rng.normal(0, 0.5, (6, 8)).astype(np.float32)), _ints("axes", [3])] + bn_inits("bn", 6, rng)
    nodes = [helper.make_node("MatMul", ["W", "x"], ["mm"], name="linear"),
             helper.make_node("Unsqueeze", ["mm", "axes"], ["u"], name="unsq"), bn_node("u", "y")]
    m = make_model(nodes, [vi("x", [2, 8, 5])], [vi("y", None)], inits)
    return Case(m, {"x": rng.normal(0, 1, (2, 8, 5)).astype(np.float32)}, "MatMul→Unsqueeze", "u")


def conv_case(groups=1, cin=4, cout=6, stride=1, size=8, shape_op="Reshape", bias=True) -> Case:
    """Conv → (Reshape [N, C, H·W] | Squeeze(2, 3) | Flatten(1)) → BN1d."""
    rng = _rng()
    inits = [init("W", rng.normal(0, 0.3, (cout, cin // groups, 3, 3)).astype(np.float32))] + bn_inits("bn", cout, rng)
    conv_in = ["x", "W"]
    if bias:
        inits.append(init("b", rng.normal(0, 0.2, cout).astype(np.float32)))
        conv_in.append("b")
    nodes = [helper.make_node("Conv", conv_in, ["z"], name="conv", group=groups, strides=[stride, stride])]
    out = (size - 3) // stride + 1
    if shape_op == "Reshape":
        inits.append(_ints("target", [0, cout, out * out]))
        nodes.append(helper.make_node("Reshape", ["z", "target"], ["s"], name="reshape"))
    elif shape_op == "Squeeze":
        inits.append(_ints("axes", [2, 3]))
        nodes.append(helper.make_node("Squeeze", ["z", "axes"], ["s"], name="squeeze"))
    else:
        nodes.append(helper.make_node("Flatten", ["z"], ["s"], axis=1, name="flatten"))
    nodes.append(bn_node("s", "y"))
    m = make_model(nodes, [vi("x", [2, cin, size, size])], [vi("y", None)], inits)
    return Case(m, {"x": rng.normal(0, 1, (2, cin, size, size)).astype(np.float32)}, f"Conv→{shape_op}", "s")


def conv_transpose_case() -> Case:
    rng = _rng()
    inits = [init("W", rng.normal(0, 0.3, (4, 3, 2, 2)).astype(np.float32)), _ints("target", [2, 6, 16])]
    inits += bn_inits("bn", 6, rng)
    nodes = [helper.make_node("ConvTranspose", ["x", "W"], ["z"], name="up", group=2, strides=[2, 2]),
             helper.make_node("Reshape", ["z", "target"], ["s"], name="reshape"), bn_node("s", "y")]
    m = make_model(nodes, [vi("x", [2, 4, 2, 2])], [vi("y", None)], inits)
    return Case(m, {"x": rng.normal(0, 1, (2, 4, 2, 2)).astype(np.float32)}, "ConvTranspose→Reshape", "s")


def gemm_case(opset=17) -> Case:
    """Gemm [N, C] → Unsqueeze(2) → [N, C, 1] → BN (axes as an attribute before opset 13)."""
    rng = _rng()
    inits = [init("B", rng.normal(0, 0.5, (5, 4)).astype(np.float32)), init("C", rng.normal(0, 0.5, 5).astype(np.float32))]
    inits += bn_inits("bn", 5, rng)
    if opset >= 13:
        inits.append(_ints("axes", [2]))
        unsq = helper.make_node("Unsqueeze", ["z", "axes"], ["u"], name="unsq")
    else:
        unsq = helper.make_node("Unsqueeze", ["z"], ["u"], name="unsq", axes=[2])
    nodes = [helper.make_node("Gemm", ["a", "B", "C"], ["z"], name="gemm", transB=1, beta=0.5), unsq, bn_node("u", "y")]
    m = make_model(nodes, [vi("a", [3, 4])], [vi("y", None)], inits, opset=opset)
    return Case(m, {"a": rng.normal(0, 1, (3, 4)).astype(np.float32)}, "Gemm→Unsqueeze", "u")


CASES = {
    "levit_flatten_shape_reader": lambda: levit_case(),
    "levit_transposed_weight": lambda: levit_case(weight_transposed=True),
    "levit_matmul_add_bias": lambda: levit_case(add_bias=True),
    "levit_dynamo_dynamic_reshape": levit_dynamo_case,
    "matmul_transpose_tokens": lambda: matmul_transpose_case(),
    "matmul_transpose_unsqueeze_identity": lambda: matmul_transpose_case(extra_unsqueeze=True),
    "matmul_weight_first_unsqueeze": weight_first_case,
    "conv_reshape": lambda: conv_case(),
    "conv_group2_stride2_reshape": lambda: conv_case(groups=2, stride=2, size=9),
    "conv_depthwise_stride2_squeeze": lambda: conv_case(groups=4, cin=4, cout=4, stride=2, size=3, shape_op="Squeeze"),
    "conv_nobias_flatten_1x1_map": lambda: conv_case(size=3, shape_op="Flatten", bias=False),
    "convT_group2_stride2_reshape": conv_transpose_case,
    "gemm_unsqueeze": lambda: gemm_case(),
    "gemm_unsqueeze_opset11": lambda: gemm_case(opset=11),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bn_behind_shape_ops_folds_exactly(name):
    case = CASES[name]()
    original = copy.deepcopy(case.model)
    onnx.checker.check_model(original, full_check=True)
    fused, report = fuse_onnx(copy.deepcopy(case.model))

    assert len(report.folded) == 1 and not report.skipped, report.skipped
    assert report.folded[0].pattern == case.pattern
    assert bn_count(fused) == 0
    onnx.checker.check_model(fused, full_check=True)
    assert [o.name for o in fused.graph.output] == [o.name for o in original.graph.output]
    for e, g in zip(run(original, case.feeds), run(fused, case.feeds)):
        assert g.shape == e.shape and g.dtype == e.dtype
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)

    # BN in numpy float64 on the value the unfused BN reads; the fused graph still names BN's output.
    bn = next(n for n in original.graph.node if n.op_type == "BatchNormalization")
    z = run(with_outputs(original, [case.bn_input]), case.feeds)[-1]
    params = {t.name: onnx.numpy_helper.to_array(t) for t in original.graph.initializer}
    expected = numpy_ref.bn(z, *(params[p] for p in bn.input[1:5]))
    got = run(with_outputs(fused, [bn.output[0]]), case.feeds)[-1]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_the_layer_gets_the_shift_and_the_chain_stays():
    """LeViT legacy: MatMul(W') → Add(t) → Flatten → Reshape(Shape); the Shape reads the Add."""
    fused, _ = fuse_onnx(copy.deepcopy(levit_case().model))
    ops = [n.op_type for n in fused.graph.node]
    assert ops == ["MatMul", "Add", "Flatten", "Shape", "Reshape"]
    add = fused.graph.node[1]
    shape = fused.graph.node[3]
    assert shape.input[0] == add.output[0]


# -- kept, with the reason ---------------------------------------------------------------------------


def reshape_moves_channel_axis():
    """Conv [1, 4, 4, 1] → Reshape [4, 4]: the conv's channels land on axis 0; BN's axis 1 is H."""
    rng = _rng()
    inits = [init("W", rng.normal(0, 0.3, (4, 3, 1, 1)).astype(np.float32)), _ints("target", [4, 4])]
    inits += bn_inits("bn", 4, rng)
    nodes = [helper.make_node("Conv", ["x", "W"], ["z"], name="conv"),
             helper.make_node("Reshape", ["z", "target"], ["s"], name="reshape"), bn_node("s", "y")]
    return make_model(nodes, [vi("x", [1, 3, 4, 1])], [vi("y", None)], inits), \
        "Reshape puts the Conv's channel axis on axis 0 of a rank-2 tensor; BN normalizes axis 1"


def reshape_mixes_channel_axis():
    """MatMul [2, 6, 4] (channels last) → Reshape [2, 4, 6]: the 4 BN channels mix tokens and features."""
    rng = _rng()
    inits = [init("W", rng.normal(0, 0.3, (3, 4)).astype(np.float32)), _ints("target", [2, 4, 6])]
    inits += bn_inits("bn", 4, rng)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z"], name="linear"),
             helper.make_node("Reshape", ["z", "target"], ["s"], name="reshape"), bn_node("s", "y")]
    return make_model(nodes, [vi("x", [2, 6, 3])], [vi("y", None)], inits), \
        "Reshape [2, 6, 4] → [2, 4, 6] does not keep the channel axis 2 whole"


def flatten_merges_channel_axis():
    rng = _rng()
    inits = [init("W", rng.normal(0, 0.3, (4, 3, 1, 1)).astype(np.float32))] + bn_inits("bn", 36, rng)
    nodes = [helper.make_node("Conv", ["x", "W"], ["z"], name="conv"),
             helper.make_node("Flatten", ["z"], ["s"], axis=1, name="flatten"), bn_node("s", "y")]
    return make_model(nodes, [vi("x", [2, 3, 3, 3])], [vi("y", None)], inits), \
        "Flatten(axis=1) merges the channel axis 1 with axes [2, 3] of shape [3, 3]"


def transpose_moves_channel_axis():
    rng = _rng()
    inits = [init("W", rng.normal(0, 0.3, (4, 3, 1, 1)).astype(np.float32))] + bn_inits("bn", 4, rng)
    nodes = [helper.make_node("Conv", ["x", "W"], ["z"], name="conv"),
             helper.make_node("Transpose", ["z"], ["s"], perm=[0, 2, 1, 3], name="swap"), bn_node("s", "y")]
    return make_model(nodes, [vi("x", [2, 3, 4, 4])], [vi("y", None)], inits), \
        "Transpose puts the Conv's channel axis on axis 2"


def dynamic_target_unprovable():
    """The target comes from another input's shape at run time: nothing says where channels go."""
    rng = _rng()
    inits = [init("W", rng.normal(0, 0.3, (8, 6)).astype(np.float32))] + bn_inits("bn", 6, rng)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z"], name="linear"),
             helper.make_node("Shape", ["like"], ["target"]),
             helper.make_node("Reshape", ["z", "target"], ["s"], name="reshape"), bn_node("s", "y")]
    m = make_model(nodes, [vi("x", [2, 5, 8]), vi("like", ["A", "B"])], [vi("y", None)], inits)
    return m, "Reshape [2, 5, 6] → [?, ?] does not keep the channel axis 2 whole"


def intermediate_read_by_another_node():
    case = levit_case()
    g = case.model.graph
    g.node.append(helper.make_node("Relu", ["flat"], ["side"], name="side"))
    g.output.append(vi("side", ["N", 6]))
    return case.model, "output 'flat' of Flatten is also used by 1 other node(s)"


def no_layer_behind_the_chain():
    rng = _rng()
    inits = [_ints("target", [2, 6, 5])] + bn_inits("bn", 6, rng)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "target"], ["s"], name="reshape"), bn_node("s", "y")]
    return make_model(nodes, [vi("x", [2, 30])], [vi("y", None)], inits), \
        "producer Relu 'relu' behind Reshape is not a foldable layer"


SKIPS = {f.__name__: f for f in (reshape_moves_channel_axis, reshape_mixes_channel_axis, flatten_merges_channel_axis,
                                 transpose_moves_channel_axis, dynamic_target_unprovable,
                                 intermediate_read_by_another_node, no_layer_behind_the_chain)}


@pytest.mark.parametrize("name", list(SKIPS))
def test_bn_behind_shape_ops_is_kept_with_reason(name):
    model, reason = SKIPS[name]()
    onnx.checker.check_model(model, full_check=True)
    before = model.SerializeToString()
    fused, report = fuse_onnx(copy.deepcopy(model))
    assert report.folded == [] and len(report.skipped) == 1
    assert reason in report.skipped[0].reason, report.skipped[0].reason
    assert fused.SerializeToString() == before
