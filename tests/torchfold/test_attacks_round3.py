"""Round 3 attacks on the `.pt2` fold in the program's own graph (torchfold/export.py in_program)
and on TorchScript merges before the fold. Each test judges bnfold's output against the original
module run in torch."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from bnfold import fuse_module
from bnfold.cli import run as cli


def _random_bns(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def _fuse_pt2(model: nn.Module, x: torch.Tensor, tmp_path) -> nn.Module:
    src, dst = tmp_path / "in.pt2", tmp_path / "out.pt2"
    torch.export.save(torch.export.export(model, (x,)), src)
    assert cli(["fuse", str(src), "-o", str(dst)]) in (0, None)
    return torch.export.load(dst).module()


class TwoFunctionalConvs(nn.Module):
    """Two bias-less functional convolutions whose weights live in one module (not summed, so no
    branch merge): each gains a bias when its BN folds."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w1 = nn.Parameter(torch.randn(4, 3, 3, 3, generator=g))
        self.w2 = nn.Parameter(torch.randn(4, 3, 3, 3, generator=g))
        self.b1, self.b2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.cat([self.b1(F.conv2d(x, self.w1, padding=1)), self.b2(F.conv2d(x, self.w2, padding=1))], 1)


def test_pt2_two_new_biases_in_one_module(tmp_path):
    """Two layers of one module gaining a bias both get the constant name `bnfold_bias`: the written .pt2 cannot be loaded as a module (and one bias is lost)."""
    model = _random_bns(TwoFunctionalConvs())
    x = torch.randn(2, 3, 6, 6)
    want = copy.deepcopy(model)(x)
    fused = _fuse_pt2(model, x, tmp_path)
    got = fused(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


class ConvBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class CallsChildrenDirectly(nn.Module):
    """`first`'s forward is never called: its parent calls its conv and BN itself; `second`, of the
    same scripted class, runs its own forward."""

    def __init__(self):
        super().__init__()
        self.first, self.second = ConvBn(), ConvBn()

    def forward(self, x):
        return self.second(self.first.bn(self.first.conv(x)))


def test_script_children_called_by_parent():
    """Scripted: a conv+BN pair whose own forward nothing calls but whose parent calls conv and BN directly folds wrong (output off by more than its scale)."""
    model = _random_bns(CallsChildrenDirectly())
    x = torch.randn(2, 4, 6, 6)
    want = model(x)
    fused, _ = fuse_module(torch.jit.script(model))
    torch.testing.assert_close(fused(x), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
