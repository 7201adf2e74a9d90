"""How a folded BN leaves an eager model (torchfold/apply.py): the module computing it is replaced
by exactly what remains of its forward, judged against the unfused model in torch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnfold import fuse_module

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import lookalikes  # noqa: E402
import spellings  # noqa: E402
import zoo  # noqa: E402


class FunctionalBlock(nn.Module):
    """A conv and a functional batch_norm on the block's own buffers, then a scale: what remains
    (conv, then ×2) is neither nothing nor a chain of children."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.register_buffer("mean", torch.randn(4) * 0.1)
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)
        self.beta = nn.Parameter(torch.randn(4) * 0.1)

    def forward(self, x):
        y = F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-5)
        return y * 2


def _bn_act():
    return zoo.fill_bn_stats(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), lookalikes.BatchNormAct2d(4)), (3, 6, 6))


def _frozen():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), spellings.FrozenBatchNorm2d(4))
    with torch.no_grad():
        model[1].running_mean.copy_(torch.randn(4) * 0.1)
        model[1].running_var.copy_(torch.rand(4) + 0.5)
        model[1].weight.copy_(torch.rand(4) + 0.5)
    return model.eval()


CASES = {
    "frozen_bn_becomes_identity": (_frozen, lambda m: isinstance(m[1], nn.Identity)),
    "bn_act_becomes_its_act": (_bn_act, lambda m: isinstance(m[1], nn.Sequential)
                               and [type(c) for c in m[1]] == [nn.Identity, nn.ReLU]),
    "functional_bn_leaves_a_graph": (lambda: nn.Sequential(FunctionalBlock()).eval(),
                                     lambda m: isinstance(m[0], torch.fx.GraphModule)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_folded_bn_leaves_the_forward(name, tmp_path):
    build, shape_ok = CASES[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(2, 3, 6, 6)
    fused, report = fuse_module(model, example=(x,))
    assert len(report.folded) == 1 and not report.skipped and report.identity_bns == 0, report
    assert shape_ok(fused), fused
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)
    program = torch.export.export(fused, (x,), strict=False)
    assert not [n for n in program.graph.nodes if "batch_norm" in str(n.target) or "rsqrt" in str(n.target)]
    # what replaced it pickles and loads where bnfold is not installed
    torch.save(fused, tmp_path / "m.pt")
    code = (f"import sys, torch; sys.path.insert(0, {str(ROOT / 'examples')!r}); "
            f"m = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False); "
            f"m(torch.randn(2, 3, 6, 6)); print('bnfold' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(tmp_path))
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
