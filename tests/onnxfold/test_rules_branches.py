"""Sums of parallel branches of one input merged into one Conv (rules_branches).

Positive cases check the merges and folds, that no BN is left, one Conv per block, onnx.checker,
equality with the unfused model in onnxruntime (optimizations off) and with the block
recomputed branch by branch in numpy float64. Negative cases check that nothing changed and
the reason."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from onnx import helper

from bnfold import fuse_onnx
from onnx_builders import bn_count, bn_inits, bn_node, init, make_model, run, vi
import numpy_ref


@dataclass
class ConvBranch:
    kernel: tuple[int, ...] = (3, 3)
    pads: tuple[int, ...] | None = None  # None: centred (k // 2 on both sides)
    stride: int = 1
    dilation: int = 1
    group: int | None = None  # None: the block's
    bias: bool = False
    bn: bool = True
    auto_pad: str | None = None


@dataclass
class Identity:
    bn: bool = True  # BN(x), or x itself


@dataclass
class Block:
    branches: list
    cin: int = 4
    cout: int = 4
    size: int = 8
    group: int = 1
    sum_op: str = "Add"  # "Add" chain, "Add" balanced tree, or one "Sum"
    balanced: bool = False
    bn_after: bool = False
    params: dict = field(default_factory=dict)


def build(block: Block, seed: int = 5):
    """The block as ONNX (branches summed, then Relu) and its float64 numpy reference."""
    rng = np.random.default_rng(seed)
    dims = len(next(b.kernel for b in block.branches if isinstance(b, ConvBranch)))
    nodes, inits, terms, reference = [], [], [], []
    for i, b in enumerate(block.branches):
        if isinstance(b, Identity):
            if b.bn:
                inits += bn_inits(f"id{i}", block.cin, rng)
                nodes.append(bn_node("x", f"t{i}", f"id{i}"))
                terms.append(f"t{i}")
                reference.append(("bn", f"id{i}"))
            else:
                terms.append("x")
                reference.append(("x", None))
            continue
        group = b.group or block.group
        w = rng.normal(0, 0.3, (block.cout, block.cin // group, *b.kernel)).astype(np.float32)
        inits.append(init(f"W{i}", w))
        conv_in = ["x", f"W{i}"]
        if b.bias:
            inits.append(init(f"b{i}", rng.normal(0, 0.2, block.cout).astype(np.float32)))
            conv_in.append(f"b{i}")
        pads = list(b.pads) if b.pads is not None else [k // 2 * b.dilation for k in b.kernel] * 2
        attrs = dict(strides=[b.stride] * dims, dilations=[b.dilation] * dims, group=group)
        if b.auto_pad:
            attrs["auto_pad"] = b.auto_pad
        else:
            attrs["pads"] = pads
        out = f"c{i}" if b.bn else f"t{i}"
        nodes.append(helper.make_node("Conv", conv_in, [out], name=f"conv{i}", **attrs))
        if b.bn:
            inits += bn_inits(f"bn{i}", block.cout, rng)
            nodes.append(bn_node(out, f"t{i}", f"bn{i}"))
        terms.append(f"t{i}")
        reference.append(("conv", (i, pads, attrs, b)))
    nodes += _sum(terms, block)
    last = "s"
    if block.bn_after:
        inits += bn_inits("after", block.cout, rng)
        nodes.append(bn_node("s", "sb", "after"))
        last = "sb"
    nodes.append(helper.make_node("Relu", [last], ["y"], name="relu"))
    shape = [2, block.cin, *([block.size] * dims)]
    model = make_model(nodes, [vi("x", shape)], [vi("y", None)], inits)
    feeds = {"x": rng.normal(0, 1, shape).astype(np.float32)}
    return model, feeds, reference


def _sum(terms: list[str], block: Block) -> list[onnx.NodeProto]:
    if block.sum_op == "Sum":
        return [helper.make_node("Sum", terms, ["s"], name="sum")]
    if block.balanced and len(terms) == 4:
        return [helper.make_node("Add", terms[:2], ["p"], name="add_left"),
                helper.make_node("Add", terms[2:], ["q"], name="add_right"),
                helper.make_node("Add", ["p", "q"], ["s"], name="add")]
    nodes, acc = [], terms[0]
    for k, term in enumerate(terms[1:]):
        out = "s" if k == len(terms) - 2 else f"acc{k}"
        nodes.append(helper.make_node("Add", [acc, term], [out], name=f"add{k}"))
        acc = out
    return nodes


def numpy_block(model: onnx.ModelProto, feeds, reference, block: Block) -> np.ndarray:
    """Each branch in float64 from the original initializers, summed, BN, Relu."""
    p = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    x = feeds["x"].astype(np.float64)
    bn = lambda v, prefix: numpy_ref.bn(v, *(p[f"{prefix}_{k}"] for k in ("scale", "B", "mean", "var")))  # noqa: E731
    total = 0.0
    for kind, what in reference:
        if kind == "x":
            total = total + x
        elif kind == "bn":
            total = total + bn(x, what)
        else:
            i, pads, attrs, b = what
            pads = _same_upper(x.shape[2:], b) if b.auto_pad else pads
            z = numpy_ref.conv(x, p[f"W{i}"], p.get(f"b{i}"), attrs["strides"], pads, attrs["dilations"],
                               attrs["group"])
            total = total + (bn(z, f"bn{i}") if b.bn else z)
    if block.bn_after:
        total = bn(total, "after")
    return np.maximum(total, 0.0)


def _same_upper(spatial, b: ConvBranch) -> list[int]:
    totals = [max((-(-n // b.stride) - 1) * b.stride + b.dilation * (k - 1) + 1 - n, 0) for n, k in zip(spatial, b.kernel)]
    return [t // 2 for t in totals] + [t - t // 2 for t in totals]


REPVGG = [ConvBranch((3, 3)), ConvBranch((1, 1)), Identity()]
CASES = {
    "repvgg_identity": Block(REPVGG),
    "repvgg_stride2_widening": Block([ConvBranch((3, 3), stride=2), ConvBranch((1, 1), stride=2)], cout=6),
    "repvgg_group2": Block(REPVGG, cin=4, cout=4, group=2),
    "mobileone_depthwise_k3_overparam": Block([ConvBranch((3, 3)), ConvBranch((3, 3)), ConvBranch((3, 3)),
                                               ConvBranch((1, 1)), Identity()], group=4),
    "mobileone_depthwise_stride2": Block([ConvBranch((3, 3), stride=2), ConvBranch((1, 1), stride=2)], group=4,
                                         size=9),
    "acnet_3x3_1x3_3x1": Block([ConvBranch((3, 3)), ConvBranch((1, 3), pads=(0, 1, 0, 1)),
                                ConvBranch((3, 1), pads=(1, 0, 1, 0))], cout=6),
    "fastvit_repcpe_conv_plus_x": Block([ConvBranch((7, 7), bias=True, bn=False), Identity(bn=False)], group=4,
                                       size=9),
    "dilated_3x3_plus_1x1_plus_bn": Block([ConvBranch((3, 3), dilation=2), ConvBranch((1, 1)), Identity()]),
    "conv1d_repvgg": Block([ConvBranch((3,)), ConvBranch((1,)), Identity()], size=10),
    "sum_op": Block(REPVGG, sum_op="Sum"),
    "balanced_add_tree": Block(REPVGG + [ConvBranch((5, 5))], balanced=True),
    "folded_convs_with_bias": Block([ConvBranch((3, 3), bias=True, bn=False), ConvBranch((1, 1), bias=True, bn=False),
                                     Identity()]),
    "same_upper_even_kernel": Block([ConvBranch((2, 2), auto_pad="SAME_UPPER"), ConvBranch((1, 1)), Identity()]),
    "bn_after_the_sum": Block([ConvBranch((3, 3), bias=True, bn=False), ConvBranch((1, 1), bias=True, bn=False)],
                              bn_after=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_branches_merge_into_one_conv(name):
    block = CASES[name]
    model, feeds, reference = build(block)
    onnx.checker.check_model(model, full_check=True)
    fused, report = fuse_onnx(copy.deepcopy(model))

    assert len(report.merged) == 1 and not report.unmerged, report.unmerged
    assert len(report.merged[0].branches) == len(block.branches)
    assert len(report.folded) == bn_count(model) and not report.skipped, report.skipped
    assert bn_count(fused) == 0
    assert [n.op_type for n in fused.graph.node] == ["Conv", "Relu"]
    onnx.checker.check_model(fused, full_check=True)
    expected, got = run(model, feeds)[0], run(fused, feeds)[0]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, numpy_block(model, feeds, reference, block), rtol=1e-5, atol=1e-5)


def test_merged_kernel_is_the_sum_of_the_placed_kernels():
    """RepVGG by hand: W₃·s₃ + pad(W₁·s₁) + identity·s_id at the centre, biases t₃ + t₁ + t_id."""
    model, _, _ = build(CASES["repvgg_identity"])
    fused, _ = fuse_onnx(copy.deepcopy(model))
    p = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    affine = {}
    for prefix in ("bn0", "bn1", "id2"):
        s = p[f"{prefix}_scale"] / np.sqrt(p[f"{prefix}_var"] + np.float64(np.float32(1e-5)))
        affine[prefix] = (s, p[f"{prefix}_B"] - s * p[f"{prefix}_mean"])
    want = p["W0"] * affine["bn0"][0][:, None, None, None]
    want[:, :, 1:2, 1:2] += p["W1"] * affine["bn1"][0][:, None, None, None]
    want[np.arange(4), np.arange(4), 1, 1] += affine["id2"][0]
    conv = fused.graph.node[0]
    out = {t.name: onnx.numpy_helper.to_array(t) for t in fused.graph.initializer}
    np.testing.assert_allclose(out[conv.input[1]], want.astype(np.float32), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out[conv.input[2]], sum(t for _, t in affine.values()).astype(np.float32), rtol=1e-6,
                               atol=1e-7)


# -- kept, with the reason ---------------------------------------------------------------------------
# Folded Convs (no BN), so the model must come back byte for byte.


UNMERGED = {
    "strides_differ": (Block([ConvBranch((3, 3), stride=2, bias=True, bn=False),
                              ConvBranch((5, 5), pads=(0, 0, 0, 0), bias=True, bn=False)]),
                       "strides differ on spatial axis 0"),
    "pads_not_centred_alike": (Block([ConvBranch((3, 3), bias=True, bn=False),
                                      ConvBranch((3, 3), pads=(0, 0, 2, 2), bias=True, bn=False)]),
                               "paddings do not centre the kernels alike on spatial axis 0"),
    # Equal shapes at 8×8 by luck of the rounding: floor((8 + 0 − 1)/2) = floor((8 − 1 − 1)/2).
    "pads_differ_stride2": (Block([ConvBranch((3, 3), stride=2, bias=True, bn=False),
                                   ConvBranch((3, 3), pads=(0, 0, 1, 1), stride=2, bias=True, bn=False)]),
                            "paddings give different output lengths on spatial axis 0"),
    "groups_differ": (Block([ConvBranch((3, 3), bias=True, bn=False),
                             ConvBranch((3, 3), group=2, bias=True, bn=False)]), "groups differ"),
    "dilations_differ": (Block([ConvBranch((3, 3), bias=True, bn=False),
                                ConvBranch((3, 3), dilation=2, bias=True, bn=False)]),
                         "dilations differ on spatial axis 0: [1, 2]"),
}


@pytest.mark.parametrize("name", list(UNMERGED))
def test_branches_that_cannot_merge_are_kept_with_reason(name):
    block, reason = UNMERGED[name]
    model, feeds, _ = build(block)
    onnx.checker.check_model(model, full_check=True)
    before = model.SerializeToString()
    fused, report = fuse_onnx(copy.deepcopy(model))
    assert report.merged == [] and len(report.unmerged) == 1
    assert reason in report.unmerged[0].reason, report.unmerged[0].reason
    assert fused.SerializeToString() == before


def test_identity_bn_of_a_branch_sum_that_cannot_merge_stays_with_reasons():
    """RepVGG with a misaligned 3×3: the identity BN cannot fold anywhere; both reasons are given."""
    block = Block([ConvBranch((3, 3), pads=(0, 0, 2, 2)), ConvBranch((3, 3)), Identity()])
    model, feeds, _ = build(block)
    fused, report = fuse_onnx(copy.deepcopy(model))
    assert report.merged == [] and "do not centre the kernels alike" in report.unmerged[0].reason
    assert [s.bn for s in report.skipped] == ["id2"] and bn_count(fused) == 1
    np.testing.assert_allclose(run(fused, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_a_sum_of_different_inputs_is_not_a_branch_sum():
    """A residual Add (conv(x) + y) is an ordinary Add: no merge, nothing reported, nothing changed."""
    rng = np.random.default_rng(3)
    inits = [init("W", rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "y_in"], ["y"], name="residual")]
    model = make_model(nodes, [vi("x", [1, 4, 5, 5]), vi("y_in", [1, 4, 5, 5])], [vi("y", None)], inits)
    before = model.SerializeToString()
    fused, report = fuse_onnx(copy.deepcopy(model))
    assert report.merged == [] and report.unmerged == []
    assert fused.SerializeToString() == before


def test_a_branch_read_elsewhere_is_kept():
    block = Block([ConvBranch((3, 3), bias=True, bn=False), ConvBranch((1, 1), bias=True, bn=False)])
    model, _, _ = build(block)
    model.graph.output.append(vi("t1", [2, 4, 8, 8]))
    before = model.SerializeToString()
    fused, report = fuse_onnx(copy.deepcopy(model))
    assert report.merged == [] and "Conv 'conv1' is also used outside the sum" in report.unmerged[0].reason
    assert fused.SerializeToString() == before


def test_conv_plus_its_input_when_that_input_is_a_conv_output():
    """FastViT's RepCPE after a layer: x = Conv(a); y = DWConv7×7(x) + x. The sum is of branches
    of x (x itself is the identity branch), not of a: one Conv of x replaces it."""
    rng = np.random.default_rng(9)
    inits = [init("Wp", rng.normal(0, 0.3, (4, 3, 1, 1)).astype(np.float32)),
             init("Wd", rng.normal(0, 0.3, (4, 1, 7, 7)).astype(np.float32)),
             init("bd", rng.normal(0, 0.2, 4).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["a", "Wp"], ["x"], name="patch"),
             helper.make_node("Conv", ["x", "Wd", "bd"], ["pe"], name="pe", group=4, pads=[3, 3, 3, 3]),
             helper.make_node("Add", ["pe", "x"], ["y"], name="add")]
    model = make_model(nodes, [vi("a", [2, 3, 9, 9])], [vi("y", None)], inits)
    fused, report = fuse_onnx(copy.deepcopy(model))
    assert len(report.merged) == 1 and report.merged[0].branches == ["Conv 'pe' 7×7", "identity"]
    assert [n.op_type for n in fused.graph.node] == ["Conv", "Conv"]
    onnx.checker.check_model(fused, full_check=True)
    feeds = {"a": rng.normal(0, 1, (2, 3, 9, 9)).astype(np.float32)}
    np.testing.assert_allclose(run(fused, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)
    p = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    x = numpy_ref.conv(feeds["a"], p["Wp"])
    want = numpy_ref.conv(x, p["Wd"], p["bd"], pads=[3] * 4, group=4) + x
    np.testing.assert_allclose(run(fused, feeds)[0], want, rtol=1e-5, atol=1e-5)


def test_merges_and_kept_sums_are_rendered(capsys):
    from bnfold.render import Output
    from bnfold.render.fold import render_fold

    _, merged = fuse_onnx(build(CASES["repvgg_identity"])[0])
    _, kept = fuse_onnx(build(UNMERGED["groups_differ"][0])[0])
    render_fold(merged, Output())
    render_fold(kept, Output())
    text = capsys.readouterr().out
    assert "merged 1 sum(s) of parallel branches" in text and "3×3" in text and "(identity)" in text
    assert "kept 1 sum(s) of parallel branches" in text and "groups differ" in text
