"""calibrate against an independent float64 implementation of Algorithm 2: torch float64
forward passes (training-mode BN, or eval for --upstream population) with hooks that keep
each BN's input, and the per-batch statistics combined in numpy."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnfold import CalibrateOptions, VarianceOptions, calibrate
from bnfold.torchfold.calibrate import calibrate_torch
from bnfold.cli import run as cli
from onnx_builders import run as run_onnx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import zoo  # noqa: E402


def algorithm2(model: nn.Module, data: np.ndarray, batch_size: int, upstream: str = "batch"):
    """E[x] = Σ n_b μ_b / Σ n_b, Var[x] = Σ n_b·n_b/(n_b−1)·σ²_b / Σ n_b, in float64."""
    ref = copy.deepcopy(model).double().eval()
    bns = [m for m in ref.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.train(upstream == "batch")
        m.momentum = 0.0
    seen: dict[int, np.ndarray] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, k=k: seen.__setitem__(k, args[0].numpy()))
             for k, m in enumerate(bns)]
    sums = [[0.0, 0.0, 0.0] for _ in bns]
    for start in range(0, len(data), batch_size):
        with torch.no_grad():
            ref(torch.from_numpy(data[start:start + batch_size].astype(np.float64)))
        for k in range(len(bns)):
            x = seen[k]
            axes = (0, *range(2, x.ndim))
            n = x.size // x.shape[1]
            sums[k][0] += n
            sums[k][1] = sums[k][1] + n * x.mean(axis=axes)
            sums[k][2] = sums[k][2] + n * n / (n - 1) * x.var(axis=axes)
    for h in hooks:
        h.remove()
    return [(s[1] / s[0], s[2] / s[0]) for s in sums]


def bn_stats(model: onnx.ModelProto):
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return [(inits[n.input[3]], inits[n.input[4]]) for n in model.graph.node if n.op_type == "BatchNormalization"]


class ConvChain(nn.Module):
    """Conv → BN → ReLU → Conv → BN: the second BN's input depends on the first's batch statistics."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5)

    def forward(self, x):
        return self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))


CASES = {
    "conv_bn": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (3, 8, 8)),
    "gemm_bn": (lambda: nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)), (6,)),
    "chain": (ConvChain, (3, 9, 9)),
}


def _export(model, shape, path):
    return zoo.export_onnx(model.eval(), torch.randn(2, *shape), path)


@pytest.mark.parametrize("upstream", ["batch", "population"])
@pytest.mark.parametrize("n_samples,batch", [(48, 16), (50, 16)], ids=["equal_batches", "unequal_last_batch"])
@pytest.mark.parametrize("name", list(CASES))
def test_onnx_matches_algorithm_2(tmp_path, name, n_samples, batch, upstream):
    build, shape = CASES[name]
    torch.manual_seed(0)
    model = zoo.fill_bn_stats(build(), shape, steps=1)
    src = _export(model, shape, tmp_path / "m.onnx")
    data = np.random.default_rng(1).normal(0.3, 1.7, (n_samples, *shape)).astype(np.float32)
    np.savez(tmp_path / "d.npz", input=data)
    calibrated, report = calibrate(src, CalibrateOptions(tmp_path / "d.npz", batch, upstream))
    assert report.batches == -(-n_samples // batch) and report.samples == n_samples
    expected = algorithm2(model, data, batch, upstream)
    for (mean, var), (ref_mean, ref_var) in zip(bn_stats(calibrated), expected, strict=True):
        np.testing.assert_allclose(mean, ref_mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var, ref_var, rtol=1e-4, atol=1e-6)


def test_torch_matches_algorithm_2_and_update_bn(tmp_path):
    torch.manual_seed(0)
    model = zoo.fill_bn_stats(ConvChain(), (3, 9, 9), steps=1)
    data = np.random.default_rng(2).normal(0.3, 1.7, (48, 3, 9, 9)).astype(np.float32)
    np.save(tmp_path / "d.npy", data)
    ours = copy.deepcopy(model)
    calibrate_torch(ours, CalibrateOptions(tmp_path / "d.npy", 16))
    expected = algorithm2(model, data, 16)
    bns = [m for m in ours.modules() if isinstance(m, nn.BatchNorm2d)]
    for m, (ref_mean, ref_var) in zip(bns, expected):
        np.testing.assert_allclose(m.running_mean.numpy(), ref_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m.running_var.numpy(), ref_var, rtol=1e-5, atol=1e-6)
    # torch's update_bn (momentum=None: equal weight per batch, unbiased batch variance) agrees
    # when batches are equal, which is when the two definitions coincide.
    swa = copy.deepcopy(model)
    loader = [torch.from_numpy(data[i:i + 16]) for i in range(0, 48, 16)]
    torch.optim.swa_utils.update_bn(loader, swa)
    for a, b in zip(bns, [m for m in swa.modules() if isinstance(m, nn.BatchNorm2d)]):
        np.testing.assert_allclose(a.running_mean.numpy(), b.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.running_var.numpy(), b.running_var.numpy(), rtol=1e-4, atol=1e-6)


def test_cli_calibrate_then_fuse(tmp_path, capsys):
    torch.manual_seed(0)
    model = zoo.fill_bn_stats(ConvChain(), (3, 9, 9), steps=1)
    src = _export(model, (3, 9, 9), tmp_path / "m.onnx")
    data = np.random.default_rng(3).normal(0, 1, (40, 3, 9, 9)).astype(np.float32)
    np.savez(tmp_path / "d.npz", input=data)
    assert cli(["calibrate", str(src), "--data", str(tmp_path / "d.npz"), "--batch-size", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["batches"] == 5 and len(report["bns"]) == 2 and report["bns"][0]["values_per_channel"] == 8 * 49
    out = Path(report["output"])
    assert out.name == "m.calibrated.onnx"
    expected = algorithm2(model, data, 8)
    for (mean, var), (ref_mean, ref_var) in zip(bn_stats(onnx.load(str(out))), expected):
        np.testing.assert_allclose(mean, ref_mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var, ref_var, rtol=1e-4, atol=1e-6)
    assert cli(["fuse", str(out), "--verify", "--json"]) == 0


def _bad(tmp_path):
    torch.manual_seed(0)
    src = _export(zoo.fill_bn_stats(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)), (6,), steps=1), (6,),
                  tmp_path / "m.onnx")
    ok = np.zeros((8, 6), np.float32)
    np.savez(tmp_path / "names.npz", x=ok)
    np.savez(tmp_path / "dtype.npz", input=ok.astype(np.float64))
    np.savez(tmp_path / "shape.npz", input=np.zeros((8, 7), np.float32))
    np.savez(tmp_path / "empty.npz", input=np.zeros((0, 6), np.float32))
    np.savez(tmp_path / "ok.npz", input=ok)
    return src, {
        "wrong_names": ["--data", str(tmp_path / "names.npz"), "--batch-size", "4"],
        "wrong_dtype": ["--data", str(tmp_path / "dtype.npz"), "--batch-size", "4"],
        "wrong_shape": ["--data", str(tmp_path / "shape.npz"), "--batch-size", "4"],
        "empty": ["--data", str(tmp_path / "empty.npz"), "--batch-size", "4"],
        "batch_of_one": ["--data", str(tmp_path / "ok.npz"), "--batch-size", "1"],
        "missing_data": ["--data", str(tmp_path / "nope.npz"), "--batch-size", "4"],
    }


@pytest.mark.parametrize("case", ["wrong_names", "wrong_dtype", "wrong_shape", "empty", "batch_of_one",
                                  "missing_data"])
def test_bad_data_exit_2_no_output(tmp_path, case, bnfold_run):
    src, cases = _bad(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = bnfold_run(["calibrate", str(src), *cases[case]])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_population_upstream_uses_the_corrected_stored_variance(tmp_path):
    """With --variance biased the stored variances are corrected before the BNs, normalizing with
    them (--upstream population), produce the inputs the downstream BN is measured on."""
    torch.manual_seed(0)
    model = zoo.fill_bn_stats(ConvChain(), (3, 9, 9), steps=1)
    src = _export(model, (3, 9, 9), tmp_path / "m.onnx")
    data = np.random.default_rng(5).normal(0, 1, (32, 3, 9, 9)).astype(np.float32)
    np.savez(tmp_path / "d.npz", input=data)
    calibrated, report = calibrate(src, CalibrateOptions(tmp_path / "d.npz", 16, "population"),
                                   VarianceOptions("biased", values_per_channel=5))
    assert [v.factor for v in report.variance] == [pytest.approx(1.25)] * 2
    corrected = copy.deepcopy(model)
    with torch.no_grad():
        corrected.b1.running_var *= 1.25
        corrected.b2.running_var *= 1.25
    expected = algorithm2(corrected, data, 16, "population")
    (mean2, var2) = bn_stats(calibrated)[1]
    np.testing.assert_allclose(mean2, expected[1][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(var2, expected[1][1], rtol=1e-4, atol=1e-6)


def test_fuse_calibrate_verify_holds_the_fused_model_to_the_calibrated_one(tmp_path, capsys):
    torch.manual_seed(0)
    src = _export(zoo.fill_bn_stats(ConvChain(), (3, 9, 9), steps=1), (3, 9, 9), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", input=np.random.default_rng(4).normal(0, 2, (24, 3, 9, 9)).astype(np.float32))
    assert cli(["fuse", str(src), "--calibrate", str(tmp_path / "d.npz"), "--batch-size", "8", "--verify",
                "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verify"]["passed"] and report["calibration"]["batches"] == 3 and report["output"]


def test_literal_algorithm_2_over_stored_activations(tmp_path):
    """A reference that shares no structure with the implementation: the conv's activations for
    the whole data set are computed once, then Alg. 2 is applied literally, batch by batch:
    E[x] = mean of the batch means, Var[x] = m/(m−1) · mean of the biased batch variances."""
    torch.manual_seed(0)
    model = zoo.fill_bn_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (3, 8, 8), steps=1)
    data = np.random.default_rng(7).normal(0.5, 2.0, (48, 3, 8, 8)).astype(np.float32)
    conv = model[0]
    with torch.no_grad():
        acts = F.conv2d(torch.from_numpy(data).double(), conv.weight.double(), conv.bias.double()).numpy()
    batch = 16
    per_batch = [acts[i:i + batch].transpose(1, 0, 2, 3).reshape(4, -1) for i in range(0, 48, batch)]
    m = per_batch[0].shape[1]  # N·p·q = 16·6·6
    expected_mean = np.mean([v.mean(axis=1) for v in per_batch], axis=0)
    expected_var = m / (m - 1) * np.mean([v.var(axis=1) for v in per_batch], axis=0)
    np.testing.assert_allclose(expected_mean, acts.mean(axis=(0, 2, 3)), rtol=1e-12)  # equal batches

    src = _export(model, (3, 8, 8), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", input=data)
    calibrated, report = calibrate(src, CalibrateOptions(tmp_path / "d.npz", batch))
    [(mean, var)] = bn_stats(calibrated)
    assert report.bns[0].values_per_channel == m
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, expected_var, rtol=1e-5)

    np.save(tmp_path / "d.npy", data)
    ours = copy.deepcopy(model)
    calibrate_torch(ours, CalibrateOptions(tmp_path / "d.npy", batch))
    torch.testing.assert_close(ours[1].running_mean.double(), torch.from_numpy(expected_mean), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1].running_var.double(), torch.from_numpy(expected_var), rtol=1e-5, atol=0)


@pytest.mark.parametrize("upstream", ["batch", "population"])
@pytest.mark.parametrize("kind", ["onnx", "torch"])
def test_one_step_equals_two_steps(tmp_path, kind, upstream):
    """`fuse --calibrate … --variance biased` must compute the network that `calibrate …
    --variance biased` followed by `fuse` computes: the m/(m−1) correction applies once."""
    torch.manual_seed(0)
    model = zoo.fill_bn_stats(ConvChain(), (3, 9, 9), steps=1)
    if kind == "onnx":
        src = _export(model, (3, 9, 9), tmp_path / "m.onnx")
    else:
        src = tmp_path / "m.pt"
        torch.save(model.eval(), src)
    data = np.random.default_rng(8).normal(0.2, 1.5, (32, 3, 9, 9)).astype(np.float32)
    np.save(tmp_path / "d.npy", data)
    ext = src.suffix
    common = ["--variance", "biased", "--train-batch-size", "4", "--upstream", upstream]
    trust = ["--trust-pickle", "--shape", "input=2,3,9,9"] if kind == "torch" else []
    assert cli(["fuse", str(src), "--calibrate", str(tmp_path / "d.npy"), "--batch-size", "8", *common, *trust,
                "-o", str(tmp_path / f"one{ext}")]) == 0
    assert cli(["calibrate", str(src), "--data", str(tmp_path / "d.npy"), "--batch-size", "8", *common,
                *trust[:1], "-o", str(tmp_path / f"cal{ext}")]) == 0
    assert cli(["fuse", str(tmp_path / f"cal{ext}"), *trust, "-o", str(tmp_path / f"two{ext}")]) == 0
    x = np.random.default_rng(9).normal(size=(4, 3, 9, 9)).astype(np.float32)
    if kind == "onnx":
        one, two = (run_onnx(onnx.load(str(tmp_path / f"{n}.onnx")), {"input": x})[0] for n in ("one", "two"))
    else:
        with torch.no_grad():
            one, two = (torch.load(tmp_path / f"{n}.pt", weights_only=False)(torch.from_numpy(x)).numpy()
                        for n in ("one", "two"))
    np.testing.assert_allclose(one, two, rtol=1e-6, atol=1e-6)
