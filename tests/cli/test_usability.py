"""Small things a user trips on: --version, help off a terminal, what verify says about its
inputs, how calibrate reports drift, whole error messages."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import bnfold
from bnfold.cli import run as cli
from onnx_builders import bn_inits, bn_node, make_model, vi

EXE = Path(sys.executable).with_name("bnfold")


def _model(tmp_path: Path, mean_shift: float = 0.0) -> Path:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "W"), *bn_inits("bn", 4, rng)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["z"]), bn_node("z", "y")]
    path = tmp_path / "m.onnx"
    onnx.save(make_model(nodes, [vi("x", ["N", 3, 6, 6])], [vi("y", None)], inits), str(path))
    return path


def test_version():
    proc = subprocess.run([str(EXE), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"bnfold {bnfold.__version__}"


@pytest.mark.parametrize("command", ["fuse", "verify", "bench", "calibrate"])
def test_help_off_a_terminal_shows_whole_option_names(command, bnfold_run, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    proc = bnfold_run([command, "--help"])  # stdout is captured: not a terminal
    assert proc.returncode == 0
    assert "<bool>" not in proc.stdout and "--values-per-chan…" not in proc.stdout
    if command in ("fuse", "calibrate"):
        assert "--values-per-channel" in proc.stdout and "--train-batch-size" in proc.stdout


def test_verify_with_data_does_not_claim_a_seed(tmp_path, capsys):
    src = _model(tmp_path)
    np.savez(tmp_path / "in.npz", x=np.zeros((2, 3, 6, 6), np.float32))
    assert cli(["verify", str(src), str(src), "--data", str(tmp_path / "in.npz"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] is None
    assert cli(["verify", str(src), str(src), "--data", str(tmp_path / "in.npz")]) == 0
    out = capsys.readouterr().out
    assert "seed" not in out and "inputs from --data" in out


def test_calibrate_reports_mean_drift_in_standard_deviations(tmp_path, capsys):
    """A stored mean of ~0: a relative change would read as thousands of per cent; the drift is
    given absolutely and in units of the channel's σ (the scale BN divides by)."""
    src = _model(tmp_path)
    model = onnx.load(str(src))
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    model.graph.initializer[[t.name for t in model.graph.initializer].index("bn_mean")].CopyFrom(
        numpy_helper.from_array(np.full(4, 1e-6, np.float32), "bn_mean"))
    onnx.save(model, str(src))
    np.save(tmp_path / "d.npy", np.random.default_rng(1).normal(size=(16, 3, 6, 6)).astype(np.float32))
    assert cli(["calibrate", str(src), "--data", str(tmp_path / "d.npy"), "--batch-size", "8", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)["bns"]
    calibrated = onnx.load(str(tmp_path / "m.calibrated.onnx"))
    bn = next(n for n in calibrated.graph.node if n.op_type == "BatchNormalization")
    new_mean = next(numpy_helper.to_array(t) for t in calibrated.graph.initializer if t.name == bn.input[3])
    shift = np.abs(new_mean.astype(np.float64) - np.float32(1e-6))
    assert row["mean_max_abs_change"] == pytest.approx(shift.max(), rel=1e-4)
    assert row["mean_max_change_in_std"] == pytest.approx((shift / np.sqrt(stored["bn_var"].astype(np.float64))).max(),
                                                          rel=1e-4)
    assert row["mean_max_change_in_std"] < 100  # the relative change would be ~1e5 here


def test_onnxruntime_errors_are_not_cut_mid_sentence():
    from bnfold.check.runtime import _first_line

    sentence = "Got invalid dimensions for input: x for the following indices index: 2 Got: 2 Expected: 6. "
    long = (sentence * 12).strip()
    assert _first_line(RuntimeError(sentence.strip())) == sentence.strip()  # the old cut was at 300 characters
    cut = _first_line(RuntimeError(long))
    assert cut.endswith("Expected: 6.") and len(cut) <= 600 and long.startswith(cut)
    assert _first_line(RuntimeError("x" * 700)).endswith("…")


def test_torch_shape_names_must_be_the_models_inputs(tmp_path, capsys):
    import torch
    from torch import nn

    path = tmp_path / "m.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), path)
    assert cli(["verify", str(path), str(path), "--trust-pickle", "--shape", "bogus=1,3,8,8"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert cli(["verify", str(path), str(path), "--trust-pickle", "--shape", "input=1,3,8,8", "--json"]) == 0
    capsys.readouterr()
    assert cli(["fuse", str(path), "--trust-pickle", "--to", "onnx", "--shape", "bogus=1,3,8,8"]) == 2
    assert cli(["fuse", str(path), "--trust-pickle", "--to", "onnx", "--shape", "input=1,3,8,8"]) == 0
