"""Issue 15 end to end on torch look-alikes exported by torch itself: LeViT (BN behind
Flatten/Reshape, weights behind Transpose), RepVGG in its train-time form (branch merging) and
a dynamo-exported ResNet (biases computed at run time). References: the unfused model in
onnxruntime (optimizations off), the torch module in float64, and for RepVGG the deploy form
re-parameterized by hand in torch (lookalikes.reparameterize_model)."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from bnfold import fuse_onnx
from bnfold.render import Output
from bnfold.render.fold import render_fold
from onnx_builders import bn_count, run
import onnx_lookalikes as lookalikes
import spellings  # examples/, on the path through onnx_lookalikes


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("lookalikes")
    cache = {}

    def get(name: str):
        if name not in cache:
            build, export = {
                "levit_legacy": (lookalikes.levit, lookalikes.export_legacy),
                "levit_dynamo": (lookalikes.levit, lookalikes.export_dynamo),
                "repvgg_legacy": (lookalikes.repvgg, lookalikes.export_legacy),
                "resnet_dynamo": (lambda: lookalikes.zoo.build("resnet18"), lookalikes.export_dynamo),
                "frozen_bn_legacy": (lambda: (spellings.frozen_bn(), (3, 32, 32)), lookalikes.export_legacy),
            }[name]
            net, shape = build()
            x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
            model = onnx.load(str(export(net, x, out / f"{name}.onnx")))
            cache[name] = (net, x, model, *fuse_onnx(copy.deepcopy(model)))
        return cache[name]

    return get


def _check_equal(net, x, model, fused):
    onnx.checker.check_model(fused, full_check=True)
    feeds = {model.graph.input[0].name: x.numpy()}
    got = run(fused, feeds)[0]
    np.testing.assert_allclose(got, run(model, feeds)[0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        want = copy.deepcopy(net).double()(x.double()).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,through", [("levit_legacy", "MatMul→Flatten"), ("levit_dynamo", "MatMul→Reshape")])
def test_levit_linear_norm_folds_through_flatten_and_reshape(exported, name, through):
    net, x, model, fused, report = exported(name)
    linear_norms = sum(isinstance(m, lookalikes.LinearNorm) for m in net.modules())
    assert bn_count(model) == len(report.folded) and not report.skipped, report.skipped
    assert bn_count(fused) == 0
    assert sum(f.pattern == through for f in report.folded) == linear_norms
    _check_equal(net, x, model, fused)


def test_repvgg_train_form_becomes_the_deploy_form(exported):
    net, x, model, fused, report = exported("repvgg_legacy")
    blocks = [m for m in net.modules() if isinstance(m, lookalikes.RepVGGBlock)]
    assert len(report.merged) == len(blocks) and not report.unmerged
    assert bn_count(fused) == 0 and len(report.folded) == bn_count(model)
    convs = [n for n in fused.graph.node if n.op_type == "Conv"]
    assert len(convs) == len(blocks)
    _check_equal(net, x, model, fused)

    deploy = lookalikes.reparameterize_model(net)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in fused.graph.initializer}
    for conv, block in zip(convs, [m for m in deploy.modules() if isinstance(m, lookalikes.RepVGGBlock)]):
        np.testing.assert_allclose(weights[conv.input[1]], block.deploy.weight.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(weights[conv.input[2]], block.deploy.bias.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_dynamo_resnet_biases_computed_at_run_time_fold(exported):
    net, x, model, fused, report = exported("resnet_dynamo")
    assert bn_count(model) == 20 and len(report.folded) == 20 and not report.skipped
    assert bn_count(fused) == 0
    assert not [n for n in fused.graph.node if n.op_type in ("Expand", "CastLike")]
    _check_equal(net, x, model, fused)


def test_frozen_batchnorm_resnet_counts_one_site_per_bn(exported, capsys):
    """torchvision's FrozenBatchNorm2d exports as a Mul and an Add per BN: 40 nodes fold, 20 BN-like
    sites, counted as the user counts them in the text and in --json (one entry per node stays)."""
    net, x, model, fused, report = exported("frozen_bn_legacy")
    frozen = sum(isinstance(m, spellings.FrozenBatchNorm2d) for m in net.modules())
    assert frozen == 20 and bn_count(model) == 0
    assert len(report.folded) == 2 * frozen and not report.skipped, report.skipped
    data = report.to_dict()
    assert data["sites"] == {"folded": frozen, "kept": 0, "folded_kinds": {"Mul+Add": frozen}, "kept_kinds": {}}
    assert len({f["site"] for f in data["folded"]}) == frozen and [f["op"] for f in data["folded"][:2]] == ["Mul", "Add"]
    render_fold(report, Output())
    text = " ".join(capsys.readouterr().out.split())  # as rich wraps it, joined
    assert f"folded {frozen} BN-like sites ({frozen} Mul+Add)" in text and "BatchNormalization" not in text
    assert not [n for n in fused.graph.node if n.op_type in ("Mul", "Sqrt", "Reciprocal")]
    _check_equal(net, x, model, fused)

