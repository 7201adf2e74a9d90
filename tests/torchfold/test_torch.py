"""PyTorch: every pattern and skip rule on small modules, and every checkpoint format through
the CLI, compared with the unfused model run in torch (and in onnxruntime after --to onnx)."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnfold import fuse_module
from bnfold.cli import run as cli

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import zoo  # noqa: E402


def _filled(model: nn.Module, shape) -> nn.Module:
    return zoo.fill_bn_stats(model, shape, steps=2, batch=6)


# verify's default tolerances, (k, rtol) with atol = k · RMS(expected), by dtype (README).
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4), torch.float16: (0.15, 1e-2)}


def assert_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    """torch's own comparison (not bnfold's), at verify's default tolerances for `dtype`."""
    k, rtol = TOLERANCES[dtype]
    expected = expected.double()
    atol = k * expected.pow(2).mean().sqrt().item()
    torch.testing.assert_close(got.double(), expected, atol=atol, rtol=rtol)


def _assert_same(fused, original, x):
    with torch.no_grad():
        expected, got = original(x), fused(x)
    assert_close(got, expected, x.dtype)


class Residual(nn.Module):
    """BN applied to a sum: the conv's output has two users, nothing folds into it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x) + x)


class SharedConv(nn.Module):
    """One conv called twice, each call followed by its own BN."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x))


class Functional(nn.Module):
    """F.batch_norm in eval with the module's own buffers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.randn(4) * 0.3)
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.gamma, self.beta = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4))

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-3)


class OtherUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        z = self.conv(x)
        return self.bn(z) * torch.sigmoid(z)


PATTERNS = {
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 6, 3, dilation=2), nn.BatchNorm1d(6)), (3, 16), "Conv1d"),
    "conv2d_groups_reflect": (lambda: nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, padding=1, padding_mode="reflect",
                                                              bias=False), nn.BatchNorm2d(6)), (4, 9, 9), "Conv2d"),
    "conv2d_depthwise_stride": (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, groups=4), nn.BatchNorm2d(4)),
                                (4, 9, 9), "Conv2d"),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4)), (2, 5, 5, 5), "Conv3d"),
    "convT1d": (lambda: nn.Sequential(nn.ConvTranspose1d(4, 6, 3, stride=2), nn.BatchNorm1d(6)), (4, 7),
                "ConvTranspose1d"),
    "convT2d_group2": (lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False), nn.BatchNorm2d(6)),
                       (4, 5, 5), "ConvTranspose2d"),
    "convT3d_group3": (lambda: nn.Sequential(nn.ConvTranspose3d(6, 9, 2, stride=2, groups=3), nn.BatchNorm3d(9)),
                       (6, 3, 3, 3), "ConvTranspose3d"),
    "linear_bn1d": (lambda: nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6)), (8,), "Linear"),
    "bn_affine_false": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)), (3, 6, 6),
                        "Conv2d"),
    "syncbatchnorm": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)), (3, 6, 6), "Conv2d"),
    "functional_batch_norm": (Functional, (3, 6, 6), "Conv2d"),
}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_pattern_folds(name):
    build, shape, pattern = PATTERNS[name]
    torch.manual_seed(0)
    model = build()
    if name == "syncbatchnorm":  # SyncBatchNorm trains only on GPU: give it statistics by hand
        bn = model[1]
        bn.running_mean.copy_(torch.randn(4) * 0.3)
        bn.running_var.copy_(torch.rand(4) + 0.5)
        model.eval()
    elif name != "functional_batch_norm":
        model = _filled(model, shape)
    model.eval()
    original = copy.deepcopy(model)
    fused, report = fuse_module(model)
    assert [f.pattern for f in report.folded] == [pattern] and report.skipped == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    _assert_same(fused, original, torch.randn(5, *shape))


SKIPS = {
    "bn_on_a_sum": (Residual, (4, 5, 5), "not a Conv/ConvTranspose/Linear"),
    "shared_conv": (SharedConv, (4, 5, 5), "called 2 times"),
    "other_user": (OtherUser, (3, 6, 6), "also used by 1 other"),
    "track_running_stats_false": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)),
                                  (3, 6, 6), "track_running_stats=False"),
    "linear_on_rank3": (lambda: nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5)), (5, 5), "rank 3"),
    "linear_flattened_across_features": (lambda: nn.Sequential(nn.Linear(5, 3), nn.Flatten(1), nn.BatchNorm1d(12)),
                                         (4, 5), "BN's axis 1 is not the Linear's feature axis"),
}


@pytest.mark.parametrize("name", list(SKIPS))
def test_skip_keeps_the_bn_and_says_why(name):
    build, shape, reason = SKIPS[name]
    torch.manual_seed(0)
    model = build().eval()
    original = copy.deepcopy(model)
    fused, report = fuse_module(model, example=(torch.randn(2, *shape),))
    assert report.folded == [] and report.skipped and all(reason in s.reason for s in report.skipped), report.skipped
    _assert_same(fused, original, torch.randn(3, *shape))


class TokenLinearNorm(nn.Module):
    """LeViT's LinearNorm: Linear on [B, N, C] tokens, BatchNorm1d over flatten(0, 1), reshape_as."""

    def __init__(self):
        super().__init__()
        self.linear, self.bn = nn.Linear(5, 6, bias=False), nn.BatchNorm1d(6)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


def test_linear_bn1d_on_flattened_tokens_folds():
    model = TokenLinearNorm()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 1.5)
    model.eval()
    fused, report = fuse_module(model, example=(torch.randn(2, 4, 5),))
    assert [(f.bn, f.producer, f.pattern) for f in report.folded] == [("bn", "linear", "Linear")]
    assert report.skipped == [] and isinstance(fused.bn, nn.Identity)
    _assert_same(fused, model, torch.randn(3, 7, 5))


def test_training_mode_module_folds_its_eval_behaviour():
    model = _filled(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (3, 6, 6))
    original = copy.deepcopy(model).eval()
    model.train()
    fused, report = fuse_module(model)
    assert len(report.folded) == 1 and any("training mode" in n for n in report.notes)
    _assert_same(fused, original, torch.randn(2, 3, 6, 6))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["fp64", "fp16"])
def test_dtype_is_kept(dtype):
    model = _filled(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (3, 6, 6)).to(dtype)
    fused, _ = fuse_module(copy.deepcopy(model))
    assert fused[0].weight.dtype == dtype and fused[0].bias.dtype == dtype
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():  # the reference: the unfused model in float64
        reference = copy.deepcopy(model).double()(x)
        got = fused(x.to(dtype))
    assert got.dtype == dtype
    assert_close(got, reference, dtype)


# ---------------------------------------------------------------------------------------------
# Formats, through the CLI

MODELS = ["resnet18", "mobilenet_v2", "dcgan", "mlp"]


@pytest.fixture(scope="module")
def trained():
    return {name: zoo.build(name) for name in MODELS}


def _save(kind: str, model: nn.Module, shape, path: Path) -> Path:
    model = copy.deepcopy(model)
    if kind == "pickle":
        torch.save(model, path)
    elif kind == "state_dict":
        torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    elif kind == "torchscript":
        torch.jit.save(torch.jit.script(model), str(path))
    else:  # a dynamic batch dimension, which the fused program must keep
        batch = torch.export.Dim("batch", min=1, max=64)
        torch.export.save(torch.export.export(model, (torch.randn(2, *shape),), dynamic_shapes=({0: batch},)),
                          str(path))
    return path


def _load(kind: str, path: Path, name: str):
    if kind == "pickle":
        return torch.load(path, weights_only=False)
    if kind == "state_dict":
        full, test, _, _ = zoo.MODELS[name]
        module = test()
        module.load_state_dict({k[7:]: v for k, v in torch.load(path)["state_dict"].items()}, strict=True)
        return module.eval()
    if kind == "torchscript":
        return torch.jit.load(str(path))
    return torch.export.load(str(path)).module()


ARCH = {"resnet18": ("resnet18", {"width": 8, "num_classes": 10}), "mobilenet_v2": ("mobilenet_v2", {
    "width_mult": 0.25, "num_classes": 10}), "dcgan": ("dcgan_generator", {"nz": 16, "ngf": 8}),
    "mlp": ("mlp", {"features": 16, "hidden": 32, "layers": 2, "num_classes": 10})}


# mobilenet_v2 as a .pt2 (two exports of 52 BNs) took a minute; the families of test_checkpoints cover .pt2
ROUND_TRIPS = [(name, kind) for name in MODELS for kind in ("pickle", "state_dict", "torchscript", "pt2")
               if (name, kind) != ("mobilenet_v2", "pt2")]


@pytest.mark.parametrize("name,kind", ROUND_TRIPS)
def test_format_round_trip(trained, tmp_path, kind, name, capsys):
    model, shape = trained[name]
    src = _save(kind, model, shape, tmp_path / f"{name}.{'pt2' if kind == 'pt2' else 'pt'}")
    args = ["fuse", str(src), "--json", "--shape", "input=" + ",".join(map(str, (2, *shape)))]
    if kind == "pickle":
        args.append("--trust-pickle")
    if kind == "state_dict":
        factory, kwargs = ARCH[name]
        args += ["--arch", f"zoo:{factory}", "--arch-kwargs", json.dumps(kwargs)]
    assert cli(args) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len(report["folded"]) == n_bn and report["skipped"] == []
    fused = _load(kind, Path(report["output"]), name)
    if kind in ("pickle", "pt2"):
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    if kind == "torchscript":
        assert "batch_norm" not in str(fused.inlined_graph)
    _assert_same(fused, model, torch.randn(3, *shape))


@pytest.mark.parametrize("name", ["resnet18", "dcgan"])
def test_to_onnx_verifies_in_onnxruntime(trained, tmp_path, name, capsys):
    model, shape = trained[name]
    src = _save("torchscript", model, shape, tmp_path / f"{name}.pt")
    dims = "input=" + ",".join(map(str, (2, *shape)))
    assert cli(["fuse", str(src), "--to", "onnx", "--shape", dims, "--json"]) == 0
    out = Path(json.loads(capsys.readouterr().out)["output"])
    assert out.suffix == ".onnx"
    assert cli(["verify", str(src), str(out), "--shape", dims, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["runtime"] == "torch vs onnxruntime"


def test_verify_in_torch_catches_a_wrong_fold(trained, tmp_path, capsys):
    model, shape = trained["resnet18"]
    src = _save("torchscript", model, shape, tmp_path / "r.pt")
    dims = "input=" + ",".join(map(str, (2, *shape)))
    assert cli(["fuse", str(src), "--shape", dims, "--json"]) == 0
    fused_path = Path(json.loads(capsys.readouterr().out)["output"])
    fused = torch.jit.load(str(fused_path))
    with torch.no_grad():
        getattr(fused.stem, "0").weight[1] *= 1.005
    torch.jit.save(fused, str(fused_path))
    assert cli(["verify", str(src), str(fused_path), "--shape", dims, "--json"]) == 1


def test_bad_torch_inputs(trained, tmp_path, bnfold_run):
    model, shape = trained["mlp"]
    pickle_path = _save("pickle", model, shape, tmp_path / "m.pt")
    sd_path = _save("state_dict", model, shape, tmp_path / "sd.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    cases = {
        "untrusted_pickle": ([str(pickle_path)], "--trust-pickle"),
        "state_dict_without_arch": ([str(sd_path)], "--arch"),
        "arch_not_importable": ([str(sd_path), "--arch", "nosuchpkg.mod:build"], "cannot import"),
        "arch_keys_mismatch": ([str(sd_path), "--arch", "zoo:mlp", "--arch-kwargs", '{"features": 16, "hidden": 8}'],
                               "does not fit --arch"),
        "junk": ([str(junk)], "junk.pt"),
    }
    for case, (args, needle) in cases.items():
        before = sorted(p.name for p in tmp_path.iterdir())
        proc = bnfold_run(["fuse", *args], cwd=ROOT / "examples")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (case, proc.stderr)
        assert needle in lines[0] and "Traceback" not in proc.stderr, (case, lines)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, case


def test_fuse_verify_and_bench_on_a_torch_checkpoint(trained, tmp_path, capsys):
    model, shape = trained["dcgan"]
    src = _save("torchscript", model, shape, tmp_path / "g.pt")
    dims = "input=" + ",".join(map(str, (2, *shape)))
    assert cli(["fuse", str(src), "--shape", dims, "--verify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verify"]["passed"] and report["verify"]["runtime"] == "torch" and Path(report["output"]).exists()
    assert cli(["bench", str(src), "--shape", dims, "--runs", "3", "--warmup", "0", "--threads", "1",
                "--level", "disabled", "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)
    assert bench["original"]["bn_nodes"] == 3 and bench["fused"]["bn_nodes"] == 0


class DataDependent(nn.Module):
    """fx cannot trace a branch on a tensor's value; its Sequential child still folds."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.block(x)
        return y if y.sum() > 0 else -y


class DataDependentNoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y if y.sum() > 0 else -y


def test_untraceable_model_folds_its_traceable_parts():
    model = _filled(DataDependent(), (3, 6, 6))
    original = copy.deepcopy(model)
    fused, report = fuse_module(model)
    assert [f.bn for f in report.folded] == ["block.1"] and report.untraced == ["DataDependent"]
    assert any("cannot be traced" in n for n in report.notes)
    _assert_same(fused, original, torch.randn(2, 3, 6, 6))


def test_untraceable_model_with_nothing_foldable_is_exit_2(tmp_path, bnfold_run):
    path = tmp_path / "u.pt"
    torch.save(DataDependentNoBN().eval(), path)
    proc = bnfold_run(["fuse", str(path), "--trust-pickle"])
    assert proc.returncode == 2 and "cannot be traced" in proc.stderr, proc.stderr
    assert not (tmp_path / "u.fused.pt").exists()


def test_pt2_is_folded_in_its_own_graph(trained, tmp_path, capsys):
    """A `.pt2` is folded in the program's own graph (a bias a layer gains lifted as a constant):
    its dynamic dimensions (here torch.export's Dim.AUTO batch) keep the ranges the user's export
    gave them, and it computes what the model does at any batch."""
    model, shape = trained["resnet18"]
    program = torch.export.export(copy.deepcopy(model), (torch.randn(2, *shape),),
                                  dynamic_shapes=({0: torch.export.Dim.AUTO},))
    src = tmp_path / "r.pt2"
    torch.export.save(program, str(src))
    assert cli(["fuse", str(src), "--json"]) == 0
    fused = torch.export.load(json.loads(capsys.readouterr().out)["output"])
    ranges = lambda p: sorted((str(k), str(v.lower), str(v.upper)) for k, v in p.range_constraints.items())  # noqa: E731
    assert ranges(fused) == ranges(program)
    assert not [n for n in fused.graph.nodes if "batch_norm" in str(n.target)]
    for batch in (1, 5):
        _assert_same(fused.module(), model, torch.randn(batch, *shape))
