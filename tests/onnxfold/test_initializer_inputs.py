"""Initializers that are also graph inputs (IR 3 requires it; old exporters'
keep_initializers_as_inputs does it in any IR): the fused model must run with exactly the feeds
the original needs."""
from __future__ import annotations

import copy
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from bnfold import fuse_onnx
from onnx_builders import bn_count, run

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import zoo  # noqa: E402


def _export(model, shape, opset: int) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(2, *shape),), buffer, dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.EVAL, keep_initializers_as_inputs=True,
                          opset_version=opset, input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("ir", [3, 8], ids=["ir3", "ir8"])
def test_fused_model_takes_the_originals_feeds(ir):
    torch.manual_seed(0)
    model, shape = zoo.build("resnet18")
    original = _export(model, shape, opset=9 if ir == 3 else 13)
    original.ir_version = ir
    n_inputs = len(original.graph.input)
    assert n_inputs > 40  # every weight is also an input
    fused, report = fuse_onnx(copy.deepcopy(original))
    assert len(report.folded) == bn_count(original) == 20 and bn_count(fused) == 0
    assert [i.name for i in fused.graph.input if i.name not in {t.name for t in fused.graph.initializer}] == ["input"]
    onnx.checker.check_model(fused, full_check=True)
    feeds = {"input": np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)}
    np.testing.assert_allclose(run(fused, feeds)[0], run(original, feeds)[0], rtol=1e-4, atol=1e-4)
    if ir >= 4:
        assert any("no longer inputs" in n for n in report.notes)
        assert len(fused.graph.input) < n_inputs
