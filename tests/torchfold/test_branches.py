"""Structural re-parameterization on the torch side (torchfold/branches.py): RepVGG and
MobileOne-style blocks in train-time form, as eager modules (fuse_module, CLI pickle) and as
`.pt2` programs. Merged kernels are checked against a deploy form re-parameterized by hand here
(float64, independent of bnfold), outputs against the unfused module."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnfold.cli import run as cli
from bnfold.torchfold.fuse import fuse_module

aten = torch.ops.aten
EVEN_SAME = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")


def random_bn(bn: nn.modules.batchnorm._BatchNorm, g: torch.Generator) -> nn.modules.batchnorm._BatchNorm:
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.2)
    return bn


class RepVggBlock(nn.Module):
    """Train-time RepVGG: 3×3 conv+BN, 1×1 conv+BN and (same shape) a BN of the input, summed."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv3 = nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False)
        self.bn3 = random_bn(nn.BatchNorm2d(cout), g)
        self.conv1 = nn.Conv2d(cin, cout, 1, stride, 0, groups=groups, bias=False)
        self.bn1 = random_bn(nn.BatchNorm2d(cout), g)
        self.identity = random_bn(nn.BatchNorm2d(cout), g) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.bn3(self.conv3(x)) + self.bn1(self.conv1(x))
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)

    def deploy(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's one 3×3 kernel and bias, by hand in float64 (the RepVGG paper's recipe)."""
        w3, b3 = conv_bn(self.conv3.weight, self.bn3)
        w1, b1 = conv_bn(F.pad(self.conv1.weight.double(), [1, 1, 1, 1]), self.bn1)
        w, b = w3 + w1, b3 + b1
        if self.identity is not None:
            c, per = w.shape[0], w.shape[1]
            eye = torch.zeros_like(w)
            for i in range(c):
                eye[i, i % per, 1, 1] = 1.0
            wi, bi = conv_bn(eye, self.identity)
            w, b = w + wi, b + bi
        return w, b


class MobileOneDw(nn.Module):
    """MobileOne's depthwise block: k×k dw conv+BN, 1×1 dw conv+BN and a BN skip."""

    def __init__(self, c: int, k: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.dw = nn.Sequential(nn.Conv2d(c, c, k, 1, k // 2, groups=c, bias=False), random_bn(nn.BatchNorm2d(c), g))
        self.scale = nn.Sequential(nn.Conv2d(c, c, 1, groups=c, bias=False), random_bn(nn.BatchNorm2d(c), g))
        self.skip = random_bn(nn.BatchNorm2d(c), g)

    def forward(self, x):
        return F.relu(self.skip(x) + self.dw(x) + self.scale(x))

    def deploy(self) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.dw[0].kernel_size[0]
        w, b = conv_bn(self.dw[0].weight, self.dw[1])
        w1, b1 = conv_bn(F.pad(self.scale[0].weight.double(), [k // 2] * 4), self.scale[1])
        eye = torch.zeros_like(w)
        eye[:, 0, k // 2, k // 2] = 1.0
        wi, bi = conv_bn(eye, self.skip)
        return w + w1 + wi, b + b1 + bi


def conv_bn(weight: torch.Tensor, bn) -> tuple[torch.Tensor, torch.Tensor]:
    std = (bn.running_var.double() + bn.eps).sqrt()
    s = bn.weight.double() / std
    return weight.double() * s.reshape(-1, 1, 1, 1), bn.bias.double() - bn.running_mean.double() * s


def repvgg_net() -> nn.Sequential:
    """Stride-1 and stride-2 blocks, groups 1 and 2: 10 convs in train form, 5 deployed."""
    return nn.Sequential(RepVggBlock(3, 8, 2, seed=1), RepVggBlock(8, 8, seed=2), RepVggBlock(8, 8, groups=2, seed=3),
                         RepVggBlock(8, 16, 2, groups=2, seed=4), RepVggBlock(16, 16, groups=2, seed=5)).eval()


def count(module: nn.Module, kind) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


def assert_same(fused, original, x) -> float:
    with torch.no_grad():
        want, got = original(x), fused(x)
    rms = want.double().pow(2).mean().sqrt().item()
    torch.testing.assert_close(got, want, atol=1e-4 * rms, rtol=1e-4)
    return (got.double() - want.double()).abs().max().item()


def merged_convs(fused: nn.Module) -> list[nn.Conv2d]:
    return [m for name, m in fused.named_modules() if name.endswith("reparam_conv")]


def assert_deploy_form(fused: nn.Module, blocks: list) -> None:
    convs = merged_convs(fused)
    assert len(convs) == len(blocks)
    for conv, block in zip(convs, blocks):
        w, b = block.deploy()
        assert conv.kernel_size == w.shape[2:]
        torch.testing.assert_close(conv.weight.double(), w, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(conv.bias.double(), b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("stride,groups", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_repvgg_block(stride, groups):
    block = RepVggBlock(8, 8, stride, groups).eval()
    fused, report = fuse_module(block)
    assert count(block, nn.Conv2d) == 2 and count(fused, nn.Conv2d) == 1
    assert count(fused, nn.BatchNorm2d) == 0 and report.bn_after == 0
    assert len(report.merged) == 1 and not report.unmerged
    assert len(report.folded) == (3 if stride == 1 else 2)
    assert_deploy_form(fused, [block])
    assert_same(fused, block, torch.randn(2, 8, 8, 8))


def test_repvgg_net():
    net = repvgg_net()
    fused, report = fuse_module(net)
    assert (count(net, nn.Conv2d), count(fused, nn.Conv2d)) == (10, 5)
    assert count(net, nn.BatchNorm2d) == 13 and count(fused, nn.BatchNorm2d) == 0 and not report.skipped
    assert {f.bn for f in report.folded if f.pattern == "merged branches"} == {"1.identity", "2.identity",
                                                                                "4.identity"}
    assert_deploy_form(fused, list(net))
    assert_same(fused, net, torch.randn(2, 3, 8, 8))
    assert isinstance(net[0].bn3, nn.BatchNorm2d)  # fuse_module works on a copy


@pytest.mark.parametrize("k", [3, 5])
def test_mobileone_depthwise(k):
    block = MobileOneDw(8, k).eval()
    fused, report = fuse_module(block)
    assert (count(block, nn.Conv2d), count(fused, nn.Conv2d)) == (2, 1)
    assert count(fused, nn.BatchNorm2d) == 0 and len(report.folded) == 3
    assert merged_convs(fused)[0].groups == 8
    assert_deploy_form(fused, [block])
    assert_same(fused, block, torch.randn(2, 8, 8, 8))


def test_cli_pickle(tmp_path, capsys):
    net = repvgg_net()
    torch.save(net, tmp_path / "net.pt")
    assert cli(["fuse", str(tmp_path / "net.pt"), "-o", str(tmp_path / "out.pt"), "--trust-pickle", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["merged"]) == 5 and report["bn_after"] == 0
    fused = torch.load(tmp_path / "out.pt", weights_only=False).eval()
    assert count(fused, nn.Conv2d) == 5
    assert_deploy_form(fused, list(net))
    assert_same(fused, net, torch.randn(2, 3, 8, 8))


def aten_convs(gm) -> list:
    return [n for n in gm.graph.nodes if n.target is aten.conv2d.default]


def test_pt2(tmp_path, capsys):
    net = repvgg_net()
    x = torch.randn(2, 3, 8, 8)
    torch.export.save(torch.export.export(net, (x,)), tmp_path / "net.pt2")
    assert cli(["fuse", str(tmp_path / "net.pt2"), "-o", str(tmp_path / "out.pt2"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["merged"]) == 5 and not report["skipped"]
    before = torch.export.load(tmp_path / "net.pt2").module()
    fused = torch.export.load(tmp_path / "out.pt2").module()
    assert (len(aten_convs(before)), len(aten_convs(fused))) == (10, 5)
    assert not [n for n in fused.graph.nodes if "batch_norm" in str(n.target)]
    for node, block in zip(aten_convs(fused), net):
        w, b = block.deploy()
        torch.testing.assert_close(getattr(fused, node.args[1].target).double(), w, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(getattr(fused, node.args[2].target).double(), b, atol=1e-6, rtol=1e-6)
    assert_same(fused, net, x)


def test_pt2_mobileone(tmp_path, capsys):
    block = MobileOneDw(8).eval()
    x = torch.randn(2, 8, 8, 8)
    torch.export.save(torch.export.export(block, (x,)), tmp_path / "m.pt2")
    assert cli(["fuse", str(tmp_path / "m.pt2"), "-o", str(tmp_path / "out.pt2"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["merged"]) == 1
    fused = torch.export.load(tmp_path / "out.pt2").module()
    assert len(aten_convs(fused)) == 1 and aten_convs(fused)[0].args[6] == 8
    assert_same(fused, block, x)


# -- kept, with the reason -------------------------------------------------------------------------


class TwoConvs(nn.Module):
    def __init__(self, a: nn.Conv2d, b: nn.Conv2d, share: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.a, self.bn_a = a, random_bn(nn.BatchNorm2d(a.out_channels), g)
        self.b, self.bn_b = b, random_bn(nn.BatchNorm2d(b.out_channels), g)
        self.share = share

    def forward(self, x):
        branch = self.bn_b(self.b(x))
        y = self.bn_a(self.a(x)) + branch
        return y * branch.mean() if self.share else y


@pytest.mark.parametrize("a,b,share,reason", [
    (nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 4, 5, 1, 0), False, "strides differ on spatial axis 0"),
    (nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 4, 2, 2, 0), False,
     "paddings give different output lengths on spatial axis 0"),
    (nn.Conv2d(4, 4, 3, 1, 1), nn.Conv2d(4, 4, 1, 1, 0), True, "also used by 1 other node"),
    (nn.Conv2d(4, 4, 3, 1, 1, padding_mode="reflect"), nn.Conv2d(4, 4, 1, 1, 0), False, "padding_mode='reflect'"),
    pytest.param(nn.Conv2d(4, 4, 2, padding="same"), nn.Conv2d(4, 4, 1), False,
                 "needs uneven padding on spatial axis 0 (0 before, 1 after), which a torch Conv does not take",
                 marks=EVEN_SAME),
], ids=["stride", "pad", "used-elsewhere", "padding-mode", "uneven"])
def test_kept(a, b, share, reason):
    model = TwoConvs(a, b, share).eval()
    fused, report = fuse_module(model)
    assert not report.merged and count(fused, nn.Conv2d) == 2
    assert len(report.unmerged) == 1 and reason in report.unmerged[0].reason, report.unmerged
    assert len(report.folded) == 2  # each BN still folds into its own conv
    assert_same(fused, model, torch.randn(2, 4, 8, 8))


@pytest.mark.parametrize("a,b,kernel,dilation", [
    # a 1-tap kernel reads the same under any dilation: the merged Conv takes the 3×3's, not the first's
    (nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, 1, 2, dilation=2), (3, 3), (2, 2)),
    # torch pads a 2×2 "same" (0, 1): it sits at the 3×3's lower right taps
    pytest.param(nn.Conv2d(4, 4, 3, 1, 1), nn.Conv2d(4, 4, 2, padding="same"), (3, 3), (1, 1), marks=EVEN_SAME),
], ids=["1x1-beside-dilated-3x3", "same-2x2-in-3x3"])
def test_merged_beyond_centred_kernels(a, b, kernel, dilation):
    model = TwoConvs(a, b).eval()
    fused, report = fuse_module(model)
    assert len(report.merged) == 1 and not report.unmerged and len(report.folded) == 2
    (conv,) = merged_convs(fused)
    assert (conv.kernel_size, conv.dilation) == (kernel, dilation)
    assert_same(fused, model, torch.randn(2, 4, 7, 8))


def test_pt2_1x1_beside_dilated_3x3(tmp_path, capsys):
    model = TwoConvs(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, 1, 2, dilation=2)).eval()
    x = torch.randn(2, 4, 8, 8)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    assert cli(["fuse", str(tmp_path / "m.pt2"), "-o", str(tmp_path / "out.pt2"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["merged"]) == 1
    fused = torch.export.load(tmp_path / "out.pt2").module()
    assert [list(n.args[5]) if len(n.args) > 5 else [1, 1] for n in aten_convs(fused)] == [[2, 2]]
    assert_same(fused, model, x)


def test_state_dict_keeps_layout():
    block = RepVggBlock(8, 8).eval()
    fused, report = fuse_module(block, keep_layout=True)
    assert not report.merged and [u.reason for u in report.unmerged] == [
        "state_dict keeps the architecture; use --to onnx/pt2 or fuse_module to re-parameterize"]
    assert fused.state_dict().keys() == block.state_dict().keys()
    assert_same(fused, block, torch.randn(2, 8, 8, 8))
