"""`bnfold verify` and `fuse --verify`: honest folds pass, sabotaged copies fail, bad input is exit 2."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import bnfold
from bnfold.cli import run as cli

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import zoo  # noqa: E402

HONEST = ["resnet18", "mobilenet_v2", "efficientnet_b0", "mlp", "dcgan"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify")
    result = {}
    for name in HONEST:
        net, shape = zoo.build(name)
        src = zoo.export_onnx(net, torch.randn(2, *shape), out / f"{name}.onnx")
        result[name] = (src, Path(bnfold.fuse_file(src).output))
    return result


@pytest.mark.parametrize("name", HONEST)
def test_honest_fold_passes(pairs, name, capsys):
    src, fused = pairs[name]
    assert cli(["verify", str(src), str(fused), "--json", "--batches", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["batches"] == 2 and report["outputs"][0]["passed"]
    assert report["inputs"][0]["name"] == "input" and report["inputs"][0]["shape"][0] == 2
    assert report["outputs"][0]["cosine_similarity"] > 0.999999


def _sabotaged(fused: Path, tmp: Path, how: str) -> Path:
    """A copy of the fused model with one thing broken in the middle folded Conv."""
    model = onnx.load(str(fused))
    convs = [n for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 2]
    conv = convs[len(convs) // 2]
    inits = {t.name: t for t in model.graph.initializer}
    w, b = (onnx.numpy_helper.to_array(inits[n]).copy() for n in conv.input[1:3])
    c = w.shape[0] // 2
    if how == "weight_0.5pct":
        w[c] *= np.float32(1.005)
    elif how == "bias_0.01":
        b[c] += np.float32(0.01)
    elif how == "swapped_channels":
        w[[c, c + 1]], b[[c, c + 1]] = w[[c + 1, c]], b[[c + 1, c]]
    elif how == "nan_weight":
        w.flat[0] = np.nan
    for name, array in zip(conv.input[1:3], (w, b)):
        inits[name].CopyFrom(onnx.numpy_helper.from_array(array, name))
    path = tmp / f"sabotaged_{how}.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("how", ["weight_0.5pct", "bias_0.01", "swapped_channels", "nan_weight"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_sabotaged_copy_fails_with_exit_1(pairs, tmp_path, name, how, capsys):
    src, fused = pairs[name]
    bad = _sabotaged(fused, tmp_path, how)
    assert cli(["verify", str(src), str(bad), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["passed"]
    failing = [o for o in report["outputs"] if not o["passed"]]
    assert [o["name"] for o in failing] == ["output"] and failing[0]["message"]
    if how == "nan_weight":
        assert failing[0]["nonfinite_mismatches"] > 0


def test_human_report_names_the_failing_output(pairs, tmp_path, capsys):
    src, fused = pairs["resnet18"]
    assert cli(["verify", str(src), str(_sabotaged(fused, tmp_path, "bias_0.01"))]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "output:" in out and "elements differ" in out


def test_user_data_is_used(pairs, tmp_path, capsys):
    src, fused = pairs["mlp"]
    data = tmp_path / "in.npz"
    np.savez(data, input=np.random.default_rng(3).normal(size=(5, 16)).astype(np.float32))
    assert cli(["verify", str(src), str(fused), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"][0]["shape"] == [5, 16]


def _bad_cases(pairs, tmp: Path) -> dict[str, list[str]]:
    src, fused = pairs["mlp"]
    wrong_name, wrong_dtype, text = tmp / "names.npz", tmp / "dtype.npz", tmp / "notes.onnx"
    np.savez(wrong_name, x=np.zeros((2, 16), np.float32))
    np.savez(wrong_dtype, input=np.zeros((2, 16), np.float64))
    text.write_text("not a model\n")
    other = pairs["resnet18"][1]
    return {
        "missing_original": [str(tmp / "nope.onnx"), str(fused)],
        "text_fused": [str(src), str(text)],
        "unknown_shape_input": [str(src), str(fused), "--shape", "nosuch=1,16"],
        "data_wrong_names": [str(src), str(fused), "--data", str(wrong_name)],
        "data_wrong_dtype": [str(src), str(fused), "--data", str(wrong_dtype)],
        "different_models": [str(src), str(other)],
        "missing_provider": [str(src), str(fused), "--provider", "tensorrt"],
    }


@pytest.mark.parametrize("case", ["missing_original", "text_fused", "unknown_shape_input", "data_wrong_names",
                                  "data_wrong_dtype", "different_models", "missing_provider"])
def test_bad_input_exit_2_one_line(pairs, tmp_path, case, bnfold_run):
    args = _bad_cases(pairs, tmp_path)[case]
    proc = bnfold_run(["verify", *args])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error:") and "Traceback" not in proc.stderr


def test_fuse_verify_keeps_output_on_pass(pairs, tmp_path, capsys):
    src = pairs["resnet18"][0]
    dst = tmp_path / "ok.onnx"
    assert cli(["fuse", str(src), "-o", str(dst), "--verify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verify"]["passed"] and report["output"] == str(dst) and dst.exists()


def test_fuse_verify_writes_nothing_when_the_fold_is_wrong(pairs, tmp_path, monkeypatch, capsys):
    """A deliberately broken fold (bias off by 0.01) must be caught before anything is written."""
    import bnfold.onnxfold.rules_before as rules

    real = rules.fold_bias
    monkeypatch.setattr(rules, "fold_bias", lambda bias, affine: real(bias, affine) + 0.01)
    src = pairs["resnet18"][0]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli(["fuse", str(src), "-o", str(tmp_path / "bad.onnx"), "--verify", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["output"] is None and not report["verify"]["passed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
