"""--variance biased: the stored variance times m/(m−1), m = N for [N, C] and N·p·q for
feature maps, checked against numpy float64 BN with the corrected variance."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from bnfold import FuseOptions, VarianceOptions, fuse_onnx
from bnfold.cli import run as cli
from bnfold.errors import BadInput, UsageError
from bnfold.torchfold.variance import correct_torch_variance
from onnx_builders import numpy_bn, run, with_outputs
from test_rules_before import conv_case, gemm_case


def _check(case, m: int):
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in case.model.graph.initializer}
    fused, report = fuse_onnx(copy.deepcopy(case.model), FuseOptions(variance=VarianceOptions("biased", train_batch_size=m_batch(case, m))))
    assert [(v.values_per_channel, v.factor) for v in report.variance] == [(m, pytest.approx(m / (m - 1)))]
    z = run(with_outputs(case.model, ["z"]), case.feeds)[1]
    expected = numpy_bn(z, inits["bn_scale"], inits["bn_B"], inits["bn_mean"],
                        inits["bn_var"].astype(np.float64) * m / (m - 1), 1e-5)
    np.testing.assert_allclose(run(fused, case.feeds)[0], expected, rtol=1e-5, atol=1e-5)


def m_batch(case, m):
    return m // case.spatial


def test_gemm_bn_m_is_the_batch_size():
    case = gemm_case()
    case.spatial = 1
    _check(case, 4)  # N = 4 → m = 4, factor 4/3


def test_feature_map_bn_m_is_n_p_q():
    case = conv_case()  # 7×7 input, 3×3 kernel, no padding → 5×5 feature maps
    case.spatial = 25
    _check(case, 8 * 25)


def test_values_per_channel_overrides_and_missing_batch_size_is_usage_error():
    case = conv_case()
    _, report = fuse_onnx(copy.deepcopy(case.model), FuseOptions(variance=VarianceOptions("biased", values_per_channel=3)))
    assert report.variance[0].factor == pytest.approx(1.5)
    with pytest.raises(UsageError, match="--train-batch-size"):
        FuseOptions(variance=VarianceOptions("biased"))


def test_dynamic_spatial_size_needs_values_per_channel():
    case = conv_case()
    case.model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(BadInput, match="--values-per-channel"):
        fuse_onnx(copy.deepcopy(case.model), FuseOptions(variance=VarianceOptions("biased", train_batch_size=8)))


def test_cli_variance_biased_without_batch_size_exits_2(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(conv_case().model, str(path))
    assert cli(["fuse", str(path), "--variance", "biased"]) == 2
    assert cli(["fuse", str(path), "--variance", "biased", "--batch-size", "8"]) == 2  # not the training N
    assert cli(["fuse", str(path), "--variance", "biased", "--train-batch-size", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["variance"][0]["values_per_channel"] == 200


def test_torch_running_var_times_m_over_m_minus_1():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 5),
                          nn.BatchNorm1d(5)).eval()
    for bn in (model[1], model[4]):
        bn.running_var.uniform_(0.5, 2.0)
    before = [model[1].running_var.clone(), model[4].running_var.clone()]
    options = VarianceOptions("biased", train_batch_size=16)
    corrections = correct_torch_variance(model, options, (torch.randn(2, 3, 8, 8),))
    assert [c.values_per_channel for c in corrections] == [16 * 36, 16]
    np.testing.assert_allclose(model[1].running_var.numpy(), before[0].numpy() * (576 / 575), rtol=1e-6)
    np.testing.assert_allclose(model[4].running_var.numpy(), before[1].numpy() * (16 / 15), rtol=1e-6)


def test_verify_compares_with_the_corrected_model_and_still_catches_a_wrong_fold(tmp_path, monkeypatch, capsys):
    """--variance biased changes what the model computes on purpose; --verify must then hold the
    fused model to the corrected one (pass), and still fail a fold that is wrong."""
    path = tmp_path / "m.onnx"
    onnx.save(conv_case().model, str(path))
    args = ["fuse", str(path), "--variance", "biased", "--train-batch-size", "8", "--verify", "--json"]
    assert cli(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verify"]["passed"] and "corrected statistics" in report["verify"]["original"]
    import bnfold.onnxfold.rules_before as rules

    real = rules.fold_bias
    monkeypatch.setattr(rules, "fold_bias", lambda bias, affine: real(bias, affine) + 0.01)
    (tmp_path / "m.fused.onnx").unlink()
    assert cli(args) == 1
    capsys.readouterr()
    assert not (tmp_path / "m.fused.onnx").exists()


def test_torch_variance_biased_with_verify(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    import zoo

    model, shape = zoo.build("resnet18")
    src = tmp_path / "r.pt"
    torch.save(model, src)
    assert cli(["fuse", str(src), "--trust-pickle", "--variance", "biased", "--train-batch-size", "8", "--shape",
                "input=2," + ",".join(map(str, shape)), "--verify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verify"]["passed"] and len(report["variance"]) == 20 and len(report["folded"]) == 20
