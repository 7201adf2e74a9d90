"""One case per fold pattern: the fold happens, nothing foldable is left, the model checks,
and it computes what the unfused model computes (onnxruntime, optimizations off) and what
numpy float64 BN says."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bnfold import fuse_onnx
from onnx_builders import bn_count, bn_inits, bn_node, init, make_model, numpy_bn, run, vi, with_outputs

RNG_SEED = 1234


@dataclass
class Case:
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    folds: int = 1
    pattern: str = ""
    rtol: float = 1e-5
    atol: float = 1e-5
    # BN whose input/output we can check against numpy: (bn prefix, bn input name, eps)
    numpy_check: list[tuple[str, str, float]] = field(default_factory=list)
    # Where no runtime has a kernel for the original (BN-6), an equivalent model to run instead.
    reference: onnx.ModelProto | None = None


def _rng():
    return np.random.default_rng(RNG_SEED)


def conv_case(dims=2, groups=1, cin=4, cout=6, bias=True, dtype=np.float32, opset=17, k=3, **attrs) -> Case:
    rng = _rng()
    spatial = [7] * dims
    w = rng.normal(0, 0.3, (cout, cin // groups, *([k] * dims))).astype(dtype)
    inits = [init("W", w)] + bn_inits("bn", cout, rng, dtype)
    conv_in = ["x", "W"]
    if bias:
        inits.append(init("b", rng.normal(0, 0.2, cout).astype(dtype)))
        conv_in.append("b")
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("Conv", conv_in, ["z"], name="conv", group=groups, **attrs), bn_node("z", "y")]
    m = make_model(nodes, [vi("x", [2, cin, *spatial], elem)], [vi("y", None, elem)], inits, opset)
    x = rng.normal(0, 1, (2, cin, *spatial)).astype(dtype)
    tol = 1e-5 if dtype in (np.float32, np.float64) else 2e-2
    return Case(m, {"x": x}, 1, "Conv", tol, tol, [("bn", "z", 1e-5)])


def conv_transpose_case(dims=2, groups=1, cin=4, cout=6, bias=True, **attrs) -> Case:
    rng = _rng()
    w = rng.normal(0, 0.3, (cin, cout // groups, *([3] * dims))).astype(np.float32)
    inits = [init("W", w)] + bn_inits("bn", cout, rng)
    ins = ["x", "W"]
    if bias:
        inits.append(init("b", rng.normal(0, 0.2, cout).astype(np.float32)))
        ins.append("b")
    nodes = [helper.make_node("ConvTranspose", ins, ["z"], name="convT", group=groups, **attrs), bn_node("z", "y")]
    m = make_model(nodes, [vi("x", [2, cin, *([5] * dims)])], [vi("y", None)], inits)
    x = rng.normal(0, 1, (2, cin, *([5] * dims))).astype(np.float32)
    return Case(m, {"x": x}, 1, "ConvTranspose", numpy_check=[("bn", "z", 1e-5)])


def gemm_case(trans_a=0, trans_b=0, alpha=1.0, beta=1.0, c_shape=(5,), m_rows=3, k=4, n=5, opset=17) -> Case:
    rng = _rng()
    b = rng.normal(0, 0.5, (n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [init("B", b)] + bn_inits("bn", n, rng)
    ins = ["a", "B"]
    if c_shape is not None:
        inits.append(init("C", rng.normal(0, 0.5, c_shape).astype(np.float32)))
        ins.append("C")
    nodes = [helper.make_node("Gemm", ins, ["z"], name="gemm", transA=trans_a, transB=trans_b,
                              alpha=alpha, beta=beta), bn_node("z", "y")]
    a_shape = [k, m_rows] if trans_a else [m_rows, k]
    m = make_model(nodes, [vi("a", a_shape)], [vi("y", None)], inits, opset)
    return Case(m, {"a": rng.normal(0, 1, a_shape).astype(np.float32)}, 1, "Gemm",
                numpy_check=[("bn", "z", 1e-5)])


def matmul_case(weight_first=False, add_bias=None, bias_first=False) -> Case:
    """x @ W ([M, K] @ [K, N]) or W @ x ([C, K] @ [N, K, L] → [N, C, L]); optional Add(bias)."""
    rng = _rng()
    if weight_first:
        w = rng.normal(0, 0.5, (6, 4)).astype(np.float32)
        x_shape, channels, ins = [2, 4, 5], 6, ["W", "x"]
    else:
        w = rng.normal(0, 0.5, (4, 6)).astype(np.float32)
        x_shape, channels, ins = [3, 4], 6, ["x", "W"]
    inits = [init("W", w)] + bn_inits("bn", channels, rng)
    nodes = [helper.make_node("MatMul", ins, ["mm"], name="matmul")]
    pattern, bn_in = "MatMul", "mm"
    if add_bias is not None:
        inits.append(init("bias", rng.normal(0, 0.5, add_bias).astype(np.float32)))
        add_in = ["bias", "mm"] if bias_first else ["mm", "bias"]
        nodes.append(helper.make_node("Add", add_in, ["z"], name="add"))
        pattern, bn_in = "MatMul+Add", "z"
    nodes.append(bn_node(bn_in, "y"))
    m = make_model(nodes, [vi("x", x_shape)], [vi("y", None)], inits)
    return Case(m, {"x": rng.normal(0, 1, x_shape).astype(np.float32)}, 1, pattern,
                numpy_check=[("bn", bn_in, 1e-5)])


def constant_params_case() -> Case:
    """BN parameters and the conv weight come from Constant nodes and Identity, not initializers."""
    case = conv_case()
    g = case.model.graph
    consts = []
    for t in list(g.initializer):
        consts.append(helper.make_node("Constant", [], [t.name + "_c"], value=t))
    names = {t.name for t in g.initializer}
    del g.initializer[:]
    ident = helper.make_node("Identity", ["W_c"], ["W_id"], name="w_identity")
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in names:
                node.input[i] = "W_id" if name == "W" else name + "_c"
    nodes = consts + [ident] + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    case.numpy_check = []
    return case


def initializers_as_inputs_case() -> Case:
    """IR 3 / opset 7: every initializer is also listed as a graph input (old exporters)."""
    case = conv_case(opset=7)
    assert case.model.ir_version == 3 and len(case.model.graph.input) == 1 + len(case.model.graph.initializer)
    return case


def chain_case() -> Case:
    """Conv → BN → BN → Relu → Conv → BN: all three BNs fold."""
    rng = _rng()
    inits = [init("W1", rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)),
             init("W2", rng.normal(0, 0.3, (5, 4, 1, 1)).astype(np.float32))]
    inits += bn_inits("bn1", 4, rng) + bn_inits("bn2", 4, rng) + bn_inits("bn3", 5, rng)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             bn_node("c1", "b1", "bn1"), bn_node("b1", "b2", "bn2"),
             helper.make_node("Relu", ["b2"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W2"], ["c2"], name="conv2"), bn_node("c2", "y", "bn3")]
    m = make_model(nodes, [vi("x", [2, 3, 6, 6])], [vi("y", None)], inits)
    return Case(m, {"x": rng.normal(0, 1, (2, 3, 6, 6)).astype(np.float32)}, 3, "Conv")


def shared_weight_case() -> Case:
    """Two convs share one weight; each gets its own BN. The shared weight must be copied."""
    rng = _rng()
    inits = [init("W", rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32))]
    inits += bn_inits("bnA", 4, rng) + bn_inits("bnB", 4, rng)
    nodes = [helper.make_node("Conv", ["x", "W"], ["a"], name="convA"),
             helper.make_node("Conv", ["x", "W"], ["b"], name="convB"),
             bn_node("a", "ya", "bnA"), bn_node("b", "yb", "bnB")]
    m = make_model(nodes, [vi("x", [1, 3, 5, 5])], [vi("ya", None), vi("yb", None)], inits)
    return Case(m, {"x": rng.normal(0, 1, (1, 3, 5, 5)).astype(np.float32)}, 2, "Conv",
                numpy_check=[("bnA", "a", 1e-5), ("bnB", "b", 1e-5)])


def _subgraph(name: str, prefix: str, rng, channels=4) -> tuple[onnx.GraphProto, list]:
    """Conv (weight from the OUTER graph) → BN (params inside the body) as an If branch."""
    inner_inits = bn_inits(prefix, channels, rng)
    nodes = [helper.make_node("Conv", ["x", "W_outer"], [f"{prefix}_z"], name=f"{prefix}_conv", pads=[1, 1, 1, 1]),
             bn_node(f"{prefix}_z", f"{prefix}_y", prefix)]
    return helper.make_graph(nodes, name, [], [vi(f"{prefix}_y", None)], inner_inits), inner_inits


def if_subgraph_case() -> Case:
    rng = _rng()
    then_g, _ = _subgraph("then", "bnT", rng)
    else_g, _ = _subgraph("else", "bnE", rng)
    inits = [init("W_outer", rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32))]
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    m = make_model(nodes, [vi("cond", [], TensorProto.BOOL), vi("x", [1, 3, 5, 5])], [vi("y", None)], inits)
    x = rng.normal(0, 1, (1, 3, 5, 5)).astype(np.float32)
    return Case(m, {"cond": np.array(True), "x": x}, 2, "Conv")


def loop_subgraph_case() -> Case:
    """A Loop body applies Conv+BN to its carried state three times."""
    rng = _rng()
    inner = bn_inits("bnL", 3, rng)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Conv", ["s_in", "W_outer"], ["lz"], name="loop_conv", pads=[1, 1, 1, 1]),
         bn_node("lz", "s_out", "bnL")],
        "body", [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("s_in", None)],
        [vi("cond_out", [], TensorProto.BOOL), vi("s_out", None)], inner)
    inits = [init("W_outer", rng.normal(0, 0.3, (3, 3, 3, 3)).astype(np.float32)),
             init("trip", np.array(3, np.int64)), init("cond", np.array(True))]
    nodes = [helper.make_node("Loop", ["trip", "cond", "x"], ["y"], name="loop", body=body)]
    m = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", None)], inits)
    return Case(m, {"x": rng.normal(0, 1, (1, 3, 4, 4)).astype(np.float32)}, 1, "Conv")


def scan_subgraph_case() -> Case:
    """A Scan body applies Conv (outer weight) + BN to each of T slices."""
    rng = _rng()
    inner = bn_inits("bnS", 4, rng)
    body = helper.make_graph(
        [helper.make_node("Conv", ["xi", "W_outer"], ["sz"], name="scan_conv"), bn_node("sz", "yi", "bnS")],
        "body", [vi("xi", [1, 3, 4, 4])], [vi("yi", [1, 4, 2, 2])], inner)
    inits = [init("W_outer", rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32))]
    nodes = [helper.make_node("Scan", ["x"], ["y"], name="scan", body=body, num_scan_inputs=1)]
    m = make_model(nodes, [vi("x", [2, 1, 3, 4, 4])], [vi("y", None)], inits)
    return Case(m, {"x": rng.normal(0, 1, (2, 1, 3, 4, 4)).astype(np.float32)}, 1, "Conv")


def bf16_case() -> Case:
    """bf16 weights and BN parameters: folded in float64, cast once to bfloat16."""
    import ml_dtypes

    case = conv_case(dtype=np.float32, bias=True, opset=22)  # Conv takes bfloat16 from opset 22
    g = case.model.graph
    for t in g.initializer:
        t.CopyFrom(init(t.name, onnx.numpy_helper.to_array(t).astype(ml_dtypes.bfloat16)))
    g.input[0].type.tensor_type.elem_type = TensorProto.BFLOAT16
    g.output[0].type.tensor_type.elem_type = TensorProto.BFLOAT16
    case.feeds = {"x": case.feeds["x"].astype(ml_dtypes.bfloat16)}
    case.rtol = case.atol = 3e-2
    case.numpy_check = []
    return case


def mixed_precision_case() -> Case:
    """fp16 conv, fp32 BN parameters (allowed from opset 15): weight stays fp16."""
    case = conv_case(dtype=np.float16, opset=15)
    g = case.model.graph
    for t in g.initializer:
        if t.name.startswith("bn_"):
            arr = onnx.numpy_helper.to_array(t).astype(np.float32)
            t.CopyFrom(init(t.name, arr))
    return case


CASES = {
    "conv2d_bias": lambda: conv_case(),
    "conv2d_nobias": lambda: conv_case(bias=False),
    "conv1d": lambda: conv_case(dims=1),
    "conv3d": lambda: conv_case(dims=3),
    "conv_group2": lambda: conv_case(groups=2, cin=4, cout=6),
    "conv_depthwise": lambda: conv_case(groups=4, cin=4, cout=4),
    "conv_dilation_stride_pads": lambda: conv_case(dilations=[2, 2], strides=[2, 1], pads=[1, 2, 0, 1]),
    "conv_autopad_same_upper": lambda: conv_case(auto_pad="SAME_UPPER"),
    "convT2d_bias": lambda: conv_transpose_case(),
    "convT2d_nobias": lambda: conv_transpose_case(bias=False),
    "convT1d": lambda: conv_transpose_case(dims=1),
    "convT3d": lambda: conv_transpose_case(dims=3),
    "convT_group2": lambda: conv_transpose_case(groups=2, cin=4, cout=6),
    "convT_group3_stride_outpad": lambda: conv_transpose_case(groups=3, cin=6, cout=9, strides=[2, 2],
                                                              output_padding=[1, 1]),
    "gemm_plain_C_N": lambda: gemm_case(),
    "gemm_transB": lambda: gemm_case(trans_b=1),
    "gemm_transA_transB": lambda: gemm_case(trans_a=1, trans_b=1),
    "gemm_alpha_beta": lambda: gemm_case(alpha=0.7, beta=1.9),
    "gemm_no_C": lambda: gemm_case(c_shape=None),
    "gemm_C_scalar": lambda: gemm_case(c_shape=()),
    "gemm_C_1xN": lambda: gemm_case(c_shape=(1, 5), beta=0.5),
    "gemm_C_MxN": lambda: gemm_case(c_shape=(3, 5)),
    "gemm_C_Mx1": lambda: gemm_case(c_shape=(3, 1), beta=2.0),
    "gemm_opset7": lambda: gemm_case(opset=7),
    "gemm_opset11_no_C": lambda: gemm_case(opset=11, c_shape=None),
    "matmul_xW_rank2": lambda: matmul_case(),
    "matmul_Wx_rank3": lambda: matmul_case(weight_first=True),
    "matmul_add_bias_N": lambda: matmul_case(add_bias=(6,)),
    "matmul_add_bias_1xN_first": lambda: matmul_case(add_bias=(1, 6), bias_first=True),
    "matmul_add_bias_scalar": lambda: matmul_case(add_bias=()),
    "matmul_Wx_add_bias_Cx1": lambda: matmul_case(weight_first=True, add_bias=(6, 1)),
    "params_from_constant_nodes": constant_params_case,
    "initializers_listed_as_inputs": initializers_as_inputs_case,
    "chain_conv_bn_bn_relu_conv_bn": chain_case,
    "shared_weight_two_convs": shared_weight_case,
    "if_subgraph_outer_weight": if_subgraph_case,
    "loop_subgraph": loop_subgraph_case,
    "scan_subgraph": scan_subgraph_case,
    "dtype_bf16": bf16_case,
    "dtype_fp16": lambda: conv_case(dtype=np.float16),
    "dtype_fp64": lambda: conv_case(dtype=np.float64),
    "dtype_mixed_fp16_conv_fp32_bn": mixed_precision_case,
}
for _opset in (7, 9, 13, 14, 15, 21, 26, 28):
    CASES[f"conv_opset{_opset}"] = (lambda o: lambda: conv_case(opset=o))(_opset)
CASES["conv_opset6_is_test"] = lambda: _opset6_case()


def _opset6_case() -> Case:
    """BN-6 with is_test=1; onnxruntime has no BN-6 kernel, so the reference is the same
    graph stamped opset 7 (identical inference semantics for is_test=1, spatial=1)."""
    case = conv_case(opset=6)
    case.reference = copy.deepcopy(case.model)
    case.reference.opset_import[0].version = 7
    bn = case.model.graph.node[1]
    bn.attribute.extend([helper.make_attribute("is_test", 1), helper.make_attribute("spatial", 1)])
    case.numpy_check = []
    return case


@pytest.mark.parametrize("name", list(CASES))
def test_pattern_folds_exactly(name):
    case = CASES[name]()
    original = copy.deepcopy(case.model)
    onnx.checker.check_model(original, full_check=True)
    fused, report = fuse_onnx(copy.deepcopy(case.model))

    assert len(report.folded) == case.folds, report.skipped
    assert not report.skipped
    assert {f.pattern for f in report.folded} == {case.pattern}
    assert bn_count(fused) == 0
    onnx.checker.check_model(fused, full_check=True)
    assert [o.name for o in fused.graph.output] == [o.name for o in original.graph.output]
    assert [i.name for i in fused.graph.input] == [i.name for i in original.graph.input] or \
        original.ir_version < 4
    assert fused.opset_import == original.opset_import and fused.ir_version == original.ir_version

    expected = run(case.reference or original, case.feeds)
    got = run(fused, case.feeds)
    for e, g in zip(expected, got):
        assert g.dtype == e.dtype and g.shape == e.shape
        np.testing.assert_allclose(g.astype(np.float64), e.astype(np.float64), rtol=case.rtol, atol=case.atol)

    if case.numpy_check:
        _check_against_numpy_bn(original, case, got)


def _check_against_numpy_bn(original: onnx.ModelProto, case: Case, fused_outputs) -> None:
    """BN recomputed in float64 from the unfused layer output must match the fused output."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in original.graph.initializer}
    probe = with_outputs(original, [bn_in for _, bn_in, _ in case.numpy_check])
    values = run(probe, case.feeds)
    n_out = len(original.graph.output)
    for k, (prefix, _, eps) in enumerate(case.numpy_check):
        z = values[n_out + k]
        ref = numpy_bn(z, *(inits[f"{prefix}_{p}"] for p in ("scale", "B", "mean", "var")), eps)
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(fused_outputs[k].astype(np.float64), ref,
                                   rtol=max(case.rtol, 1e-5), atol=max(case.atol, 1e-5) * scale)


def test_shared_weight_is_copied_not_scaled_for_all():
    """Each conv gets W scaled by its own BN: s_A·W and s_B·W, computed here in numpy."""
    case = shared_weight_case()
    fused, _ = fuse_onnx(copy.deepcopy(case.model))
    src = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in case.model.graph.initializer}
    out = {t.name: onnx.numpy_helper.to_array(t) for t in fused.graph.initializer}
    convs = {n.name: n for n in fused.graph.node if n.op_type == "Conv"}
    assert convs["convA"].input[1] != convs["convB"].input[1]
    for conv, bn in (("convA", "bnA"), ("convB", "bnB")):
        s = src[f"{bn}_scale"] / np.sqrt(src[f"{bn}_var"] + np.float32(1e-5))
        expected = (src["W"] * s[:, None, None, None]).astype(np.float32)
        np.testing.assert_array_equal(out[convs[conv].input[1]], expected)


def test_unused_parameters_are_pruned():
    fused, _ = fuse_onnx(copy.deepcopy(conv_case().model))
    names = {t.name for t in fused.graph.initializer}
    assert not any(n.startswith("bn_") for n in names), names
    assert len(fused.graph.node) == 1


@pytest.mark.parametrize("weight_first,add_bias", [(False, (6,)), (False, None), (True, None)],
                         ids=["xW_add", "xW", "Wx"])
def test_matmul_opset6_legacy_broadcast(weight_first, add_bias):
    """Opset 6 has no runtime with BN-6 and legacy Add broadcasting, so the fused graph
    (MatMul → Add[broadcast=1, axis=1]) is evaluated here by hand in numpy and compared with
    BN recomputed in float64 from the original constants."""
    case = matmul_case(weight_first=weight_first, add_bias=add_bias)
    m = case.model
    m.opset_import[0].version, m.ir_version = 6, 3
    m.graph.input.extend(vi(t.name, list(t.dims)) for t in m.graph.initializer)
    for node in m.graph.node:
        if node.op_type == "BatchNormalization":
            node.attribute.append(helper.make_attribute("is_test", 1))
        if node.op_type == "Add":
            node.attribute.append(helper.make_attribute("broadcast", 1))
    fused, report = fuse_onnx(copy.deepcopy(m))
    assert len(report.folded) == 1 and bn_count(fused) == 0
    onnx.checker.check_model(fused)

    src = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    x = case.feeds["x"].astype(np.float64)
    z = src["W"] @ x if weight_first else x @ src["W"]
    if add_bias:
        z = z + src["bias"]
    expected = numpy_bn(z, src["bn_scale"], src["bn_B"], src["bn_mean"], src["bn_var"], 1e-5)

    consts = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in fused.graph.initializer}
    values = {"x": x}
    for node in fused.graph.node:
        a, b = (values.get(n, consts.get(n)) for n in node.input)
        if node.op_type == "MatMul":
            values[node.output[0]] = a @ b
        else:
            attrs = {at.name: helper.get_attribute_value(at) for at in node.attribute}
            assert node.op_type == "Add" and attrs == {"broadcast": 1, "axis": 1} and b.ndim == 1
            values[node.output[0]] = a + b.reshape((1, -1) + (1,) * (a.ndim - 2))
    np.testing.assert_allclose(values["y"], expected, rtol=1e-5, atol=1e-5)
