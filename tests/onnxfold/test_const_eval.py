"""Parameters computed at run time from constants (const_eval): evaluated once, then folded.

References: the unfused model in onnxruntime with optimizations off, and the layer + BN
recomputed in numpy float64 from the original initializers."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bnfold import fuse_onnx
from bnfold.onnxfold import const_eval
from onnx_builders import bn_count, bn_inits, bn_node, init, make_model, run, vi
import numpy_ref

RNG_SEED = 15


def _dynamo_bias(w_name: str, like: str, out: str, prefix: str) -> list[onnx.NodeProto]:
    """What torch's dynamo exporter (optimize=False) writes for a bias-free Conv:
    Expand(CastLike(0, x), Expand(Shape(W)[0:1], [1]))."""
    return [
        helper.make_node("Shape", [w_name], [f"{prefix}_shape"], start=0, end=1),
        helper.make_node("Constant", [], [f"{prefix}_one"], value_ints=[1]),
        helper.make_node("Expand", [f"{prefix}_shape", f"{prefix}_one"], [f"{prefix}_size"]),
        helper.make_node("Constant", [], [f"{prefix}_zero"], value=helper.make_tensor("z", TensorProto.FLOAT, [], [0.0])),
        helper.make_node("CastLike", [f"{prefix}_zero", like], [f"{prefix}_zero_like"]),
        helper.make_node("Expand", [f"{prefix}_zero_like", f"{prefix}_size"], [out]),
    ]


def dynamo_conv_model(groups=1, cin=4, cout=6, stride=1, chain=False):
    """Conv (bias computed as above) → BN [→ Relu → Conv (computed bias) → BN]."""
    rng = np.random.default_rng(RNG_SEED)
    inits = [init("W", rng.normal(0, 0.3, (cout, cin // groups, 3, 3)).astype(np.float32))] + bn_inits("bn", cout, rng)
    nodes = _dynamo_bias("W", "x", "b", "c1") + [
        helper.make_node("Conv", ["x", "W", "b"], ["z"], name="conv", group=groups, pads=[1, 1, 1, 1],
                         strides=[stride, stride]),
        bn_node("z", "y" if not chain else "y1")]
    if chain:
        inits += [init("W2", rng.normal(0, 0.3, (cout, cout, 1, 1)).astype(np.float32))] + bn_inits("bn2", cout, rng)
        nodes += [helper.make_node("Relu", ["y1"], ["r"], name="relu")] + _dynamo_bias("W2", "r", "b2", "c2") + [
            helper.make_node("Conv", ["r", "W2", "b2"], ["z2"], name="conv2"), bn_node("z2", "y", "bn2")]
    m = make_model(nodes, [vi("x", [2, cin, 8, 8])], [vi("y", None)], inits, opset=20)
    return m, {"x": rng.normal(0, 1, (2, cin, 8, 8)).astype(np.float32)}


def transposed_weight_model():
    """What the legacy exporter writes for Linear(bias=False) on [N, K]: MatMul(x, Transpose(W))."""
    rng = np.random.default_rng(RNG_SEED)
    inits = [init("W", rng.normal(0, 0.5, (6, 4)).astype(np.float32))] + bn_inits("bn", 6, rng)
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0], name="t"),
             helper.make_node("MatMul", ["x", "Wt"], ["z"], name="mm"), bn_node("z", "y")]
    return make_model(nodes, [vi("x", [3, 4])], [vi("y", None)], inits), {"x": rng.normal(0, 1, (3, 4)).astype(np.float32)}


def computed_bn_params_model():
    """BN scale and variance stored as fp16 and cast, mean reshaped from [1, C]."""
    m, feeds = dynamo_conv_model()
    g = m.graph
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    keep = [t for t in g.initializer if t.name not in ("bn_scale", "bn_var", "bn_mean")]
    del g.initializer[:]
    g.initializer.extend(keep + [init("scale16", arrays["bn_scale"].astype(np.float16)),
                                 init("var16", arrays["bn_var"].astype(np.float16)),
                                 init("mean_row", arrays["bn_mean"].reshape(1, -1)), init("flat", np.array([-1]))])
    casts = [helper.make_node("Cast", ["scale16"], ["bn_scale"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["var16"], ["bn_var"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["mean_row", "flat"], ["bn_mean"])]
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return m, feeds


CASES = {
    "conv_dynamo_bias": lambda: dynamo_conv_model(),
    "conv_dynamo_bias_group2": lambda: dynamo_conv_model(groups=2),
    "conv_dynamo_bias_depthwise_stride2": lambda: dynamo_conv_model(groups=4, cin=4, cout=4, stride=2),
    "conv_dynamo_bias_chain": lambda: dynamo_conv_model(chain=True),
    "matmul_transposed_weight": transposed_weight_model,
    "bn_params_computed": computed_bn_params_model,
}
COMPUTING_OPS = {"Expand", "CastLike", "Shape", "Transpose", "Cast", "Reshape"}


@pytest.mark.parametrize("name", list(CASES))
def test_computed_parameters_are_evaluated_then_folded(name):
    model, feeds = CASES[name]()
    onnx.checker.check_model(model, full_check=True)
    bns = bn_count(model)
    fused, report = fuse_onnx(copy.deepcopy(model))

    assert len(report.folded) == bns and not report.skipped, report.skipped
    assert bn_count(fused) == 0
    assert not [n.op_type for n in fused.graph.node if n.op_type in COMPUTING_OPS]
    assert any("evaluated once and removed" in note for note in report.notes)
    onnx.checker.check_model(fused, full_check=True)
    for e, g in zip(run(model, feeds), run(fused, feeds)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups,stride", [(1, 1), (4, 2)], ids=["dense", "depthwise_stride2"])
def test_against_numpy_float64(groups, stride):
    model, feeds = dynamo_conv_model(groups=groups, cin=4, cout=4 if groups == 4 else 6, stride=stride)
    fused, _ = fuse_onnx(copy.deepcopy(model))
    src = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    z = numpy_ref.conv(feeds["x"], src["W"], None, [stride] * 2, [1] * 4, group=groups)
    expected = numpy_ref.bn(z, *(src[f"bn_{p}"] for p in ("scale", "B", "mean", "var")))
    np.testing.assert_allclose(run(fused, feeds)[0], expected, rtol=1e-5, atol=1e-5)


def test_other_constant_subgraphs_stay_as_they_are():
    """Only what a fold reads is evaluated: a Reshape target computed from constants elsewhere stays."""
    model, feeds = dynamo_conv_model()
    g = model.graph
    g.initializer.extend([init("two", np.array([2], np.int64)), init("rest", np.array([-1], np.int64))])
    g.node.extend([helper.make_node("Concat", ["two", "rest"], ["target"], axis=0, name="target"),
                   helper.make_node("Reshape", ["y", "target"], ["flat"], name="flatten")])
    g.output[0].CopyFrom(vi("flat", [2, 6 * 64]))
    fused, report = fuse_onnx(copy.deepcopy(model))
    assert len(report.folded) == 1
    assert [n.op_type for n in fused.graph.node] == ["Conv", "Concat", "Reshape"]
    np.testing.assert_allclose(run(fused, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)


# -- kept, with the reason -------------------------------------------------------------------------


def bias_from_graph_input():
    m, _ = dynamo_conv_model()
    g = m.graph
    g.input.append(vi("offset", [6]))
    for node in g.node:
        if node.op_type == "Expand" and node.output[0] == "b":
            node.output[0] = "b_const"
    g.node.insert(len(g.node) - 2, helper.make_node("Add", ["b_const", "offset"], ["b"], name="add_offset"))
    return m, "bias of Conv is not constant: 'offset' is a graph input"


def bias_from_random_op():
    m, _ = dynamo_conv_model()
    g = m.graph
    for node in g.node:
        if node.op_type == "Expand" and node.output[0] == "b":
            node.output[0] = "b_const"
    g.node.insert(len(g.node) - 2, helper.make_node("RandomNormalLike", ["b_const"], ["b"], name="noise"))
    return m, "computed by RandomNormalLike 'noise', which bnfold does not evaluate"


def bias_over_the_size_bound():
    """Slice(Expand(0, [2^25]), 0, 6): the Expand alone is over the bound; nothing is allocated."""
    m, _ = dynamo_conv_model()
    g = m.graph
    g.initializer.extend([init("zero", np.zeros(1, np.float32)), init("huge", np.array([1 << 25], np.int64)),
                          init("s0", np.array([0], np.int64)), init("s6", np.array([6], np.int64))])
    for node in g.node:
        if node.op_type == "Conv":
            node.input[2] = "b_sliced"
    g.node.insert(0, helper.make_node("Expand", ["zero", "huge"], ["big"], name="big"))
    g.node.insert(1, helper.make_node("Slice", ["big", "s0", "s6"], ["b_sliced"], name="slice"))
    return m, f"Expand 'big' would compute {1 << 25} elements (bound: {const_eval.MAX_ELEMENTS})"


SKIPS = {f.__name__: f for f in (bias_from_graph_input, bias_from_random_op, bias_over_the_size_bound)}


@pytest.mark.parametrize("name", list(SKIPS))
def test_non_constant_subgraph_is_kept_with_reason(name):
    model, reason = SKIPS[name]()
    before = model.SerializeToString()
    fused, report = fuse_onnx(copy.deepcopy(model))
    assert report.folded == [] and len(report.skipped) == 1
    assert reason in report.skipped[0].reason, report.skipped[0].reason
    assert fused.SerializeToString() == before


def test_subgraph_over_the_node_bound_is_not_evaluated():
    """A chain of MAX_NODES + 1 Neg nodes behind the bias."""
    m, _ = dynamo_conv_model()
    g = m.graph
    n = const_eval.MAX_NODES + 1
    chain = [helper.make_node("Neg", [f"b{i}" if i else "b_const"], [f"b{i + 1}" if i + 1 < n else "b"])
             for i in range(n)]
    for node in g.node:
        if node.op_type == "Expand" and node.output[0] == "b":
            node.output[0] = "b_const"
    conv_at = next(i for i, node in enumerate(g.node) if node.op_type == "Conv")
    for k, node in enumerate(chain):
        g.node.insert(conv_at + k, node)
    before = m.SerializeToString()
    fused, report = fuse_onnx(copy.deepcopy(m))
    assert report.folded == [] and f"more than {const_eval.MAX_NODES} nodes" in report.skipped[0].reason
    assert fused.SerializeToString() == before


def test_numpy_reference_conv_matches_torch():
    """The float64 reference the tests trust, checked once against torch's own conv."""
    import torch

    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(2, 6, 9, 8)), rng.normal(size=(6, 3, 3, 2)), rng.normal(size=6)
    got = numpy_ref.conv(x, w, b, strides=[2, 1], pads=[1, 0, 1, 1], dilations=[1, 2], group=2)
    padded = torch.nn.functional.pad(torch.from_numpy(x), (0, 1, 1, 1))
    want = torch.nn.functional.conv2d(padded, torch.from_numpy(w), torch.from_numpy(b), stride=(2, 1),
                                      dilation=(1, 2), groups=2).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_values_forgotten_for_memory_are_recomputed(monkeypatch):
    """With nothing remembered between evaluations, every fold still gets its value."""
    monkeypatch.setattr(const_eval, "MAX_REMEMBERED", 0)
    model, feeds = CASES["conv_dynamo_bias_chain"]()
    fused, report = fuse_onnx(copy.deepcopy(model))
    assert len(report.folded) == 2 and bn_count(fused) == 0
    assert not [n for n in fused.graph.node if n.op_type in COMPUTING_OPS]
    np.testing.assert_allclose(run(fused, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)


def costly_biases_model(chains: int, adds: int, size: int, channels: int = 4) -> onnx.ModelProto:
    """`chains` Conv → BN pairs, each Conv's bias Slice(ConstantOfShape([size]) + 0.25 … (`adds`
    times), 0, channels): inside the per-value bounds, costly together."""
    rng = np.random.default_rng(RNG_SEED)
    nodes, inits, outputs = [], [init("s0", np.array([0], np.int64)), init("sc", np.array([channels], np.int64)),
                                 init("quarter", np.array(0.25, np.float32)), init("size", np.array([size], np.int64))], []
    for k in range(chains):
        nodes.append(helper.make_node("ConstantOfShape", ["size"], [f"c{k}_0"],
                                      value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])))
        nodes += [helper.make_node("Add", [f"c{k}_{i}", "quarter"], [f"c{k}_{i + 1}"]) for i in range(adds)]
        nodes += [helper.make_node("Slice", [f"c{k}_{adds}", "s0", "sc"], [f"b{k}"]),
                  helper.make_node("Conv", ["x", f"W{k}", f"b{k}"], [f"z{k}"], name=f"conv{k}"),
                  bn_node(f"z{k}", f"y{k}", f"bn{k}")]
        inits += [init(f"W{k}", rng.normal(size=(channels, 3, 3, 3)).astype(np.float32)),
                  *bn_inits(f"bn{k}", channels, rng)]
        outputs.append(vi(f"y{k}", None))
    return make_model(nodes, [vi("x", [1, 3, 6, 6])], outputs, inits)


def test_the_whole_models_evaluation_is_bounded_before_it_is_spent(monkeypatch):
    """Four chains of 4 × 1024 elements each, a whole-model bound of 10,000 elements: two fold,
    two are kept saying why, and no node past the bound ever runs."""
    from onnx.reference import ReferenceEvaluator

    monkeypatch.setattr(const_eval, "MAX_TOTAL_ELEMENTS", 10_000)
    computed = []
    real_run = ReferenceEvaluator.run

    def counting_run(self, *args, **kwargs):
        outputs = real_run(self, *args, **kwargs)
        computed.append(sum(np.asarray(o).size for o in outputs))
        return outputs

    monkeypatch.setattr(ReferenceEvaluator, "run", counting_run)
    model = costly_biases_model(chains=4, adds=3, size=1024)
    x = {"x": np.random.default_rng(0).normal(size=(1, 3, 6, 6)).astype(np.float32)}
    fused, report = fuse_onnx(copy.deepcopy(model))
    assert len(report.folded) == 2 and len(report.skipped) == 2
    assert all("for the whole model" in s.reason for s in report.skipped), [s.reason for s in report.skipped]
    assert sum(computed) <= 10_000
    for got, want in zip(run(fused, x), run(model, x)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_small_file_cannot_make_the_evaluation_costly():
    """The 2.5 KB model of the report: one Conv bias computed by 63 nodes of 2^24 elements each
    (each inside the per-value bounds) took 106 s and 4.5 GB; the whole-model bound stops it
    after four such values."""
    import time

    model = costly_biases_model(chains=1, adds=61, size=1 << 24)
    assert len(model.SerializeToString()) < 3000
    start = time.perf_counter()
    _, report = fuse_onnx(model)
    assert time.perf_counter() - start < 30
    assert report.folded == [] and "for the whole model" in report.skipped[0].reason
