"""Structural re-parameterization of TorchScript modules (torchfold/script_branches.py): timm's
RepVGG look-alike and MobileOne-style blocks, traced and scripted. Merged kernels are checked
against a deploy form re-parameterized by hand (float64, independent of bnfold), outputs against
the unfused module, and the result's convolutions against those of the deploy form."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnfold.torchfold.fuse import fuse_module
from test_branches import MobileOneDw, RepVggBlock, assert_same, conv_bn, random_bn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import lookalikes  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
KINDS = ["traced", "scripted"]
CONV_OPS = ("aten::_convolution", "aten::conv1d", "aten::conv2d", "aten::conv3d")


def to_script(kind: str, model: nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule:
    return torch.jit.trace(model, (x,), check_trace=False) if kind == "traced" else torch.jit.script(model)


def conv_nodes(module: torch.jit.ScriptModule) -> int:
    graph = module.inlined_graph
    return sum(len(graph.findAllNodes(op, True)) for op in CONV_OPS)


def held_tensors(module: torch.jit.ScriptModule, conv: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of the convolution module the report names as holding a merge (a
    convolution without a bias slot of its own leaves the bias to its block)."""
    modules = dict(module.named_modules())
    layer = modules[conv]
    for name in ("bnfold_bias", "bias"):
        if isinstance(getattr(layer, name, None), torch.Tensor):
            return layer.weight, getattr(layer, name)
    block = modules[conv.rpartition(".")[0].rpartition(".")[0]]
    biases = [f"bnfold_reparam_bias_{k}" for k in range(4) if block._c.hasattr(f"bnfold_reparam_bias_{k}")]
    assert len(biases) == 1, biases
    return layer.weight, block._c.getattr(biases[0])


def assert_holds(module, conv: str, weight: torch.Tensor, bias: torch.Tensor) -> None:
    got_w, got_b = held_tensors(module, conv)
    torch.testing.assert_close(got_w.double(), weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_b.double(), bias, atol=1e-6, rtol=1e-6)


# -- timm's RepVGG (examples/lookalikes.py) -------------------------------------------------------


def lookalike_deploy(block: lookalikes.RepVggBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's one 3×3 kernel and bias, by hand in float64."""
    w, b = conv_bn(block.conv_kxk.conv.weight, block.conv_kxk.bn)
    w1, b1 = conv_bn(F.pad(block.conv_1x1.conv.weight.double(), [1, 1, 1, 1]), block.conv_1x1.bn)
    w, b = w + w1, b + b1
    if block.identity is not None:
        eye = torch.zeros_like(w)
        for c in range(w.shape[0]):
            eye[c, c % w.shape[1], 1, 1] = 1.0
        wi, bi = conv_bn(eye, block.identity)
        w, b = w + wi, b + bi
    return w, b


def deploy_form(model: nn.Module) -> nn.Module:
    """The look-alike with every block's reparam_conv set, as timm's switch_to_deploy leaves it."""
    deployed = copy.deepcopy(model)
    for _, block in blocks(deployed):
        conv = block.conv_kxk.conv
        block.reparam_conv = nn.Conv2d(conv.in_channels, conv.out_channels, 3, conv.stride, 1, groups=conv.groups)
        w, b = lookalike_deploy(block)
        with torch.no_grad():
            block.reparam_conv.weight.copy_(w)
            block.reparam_conv.bias.copy_(b)
    return deployed


def blocks(model: nn.Module) -> list[tuple[str, lookalikes.RepVggBlock]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, lookalikes.RepVggBlock)]


@pytest.fixture(scope="module")
def repvgg():
    model, shape = lookalikes.build("repvgg")
    return model, torch.randn(2, *shape)


@pytest.mark.parametrize("kind", KINDS)
def test_repvgg_lookalike(repvgg, kind):
    model, x = repvgg
    deployed = deploy_form(model)
    assert_same(deployed, model, x)  # the hand-made deploy form is the model
    source = to_script(kind, model, x)
    fused, report = fuse_module(source)
    assert (conv_nodes(source), conv_nodes(fused)) == (11, 6)
    assert conv_nodes(fused) == conv_nodes(to_script(kind, deployed, x))
    assert len(report.merged) == 5 and not report.unmerged
    assert not report.skipped and report.bn_after == 0 and not report.notes
    assert not fused.inlined_graph.findAllNodes("aten::batch_norm", True)
    assert {f.bn for f in report.folded if f.pattern == "merged branches"} == {"stages.1.1.identity",
                                                                                "stages.2.1.identity"}
    for (path, block), merged in zip(blocks(model), report.merged):
        assert merged.conv == f"{path}.conv_kxk.conv" and merged.kernel == [3, 3]
        assert_holds(fused, merged.conv, *lookalike_deploy(block))
    assert_same(fused, model, x)


# -- MobileOne-style blocks ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("kind", KINDS)
def test_mobileone_depthwise(kind, k):
    block = MobileOneDw(8, k).eval()
    x = torch.randn(2, 8, 8, 8)
    source = to_script(kind, block, x)
    fused, report = fuse_module(source)
    assert (conv_nodes(source), conv_nodes(fused)) == (2, 1)
    assert len(report.merged) == 1 and not report.unmerged and len(report.folded) == 3 and report.bn_after == 0
    assert report.merged[0].conv == "dw.0" and report.merged[0].kernel == [k, k]
    assert_holds(fused, "dw.0", *block.deploy())
    assert_same(fused, block, x)


def test_scripted_class_shared_by_blocks_that_all_merge():
    """Three blocks of one scripted class share one graph: it is rewritten once, each block's own
    kernel written into its own conv."""
    net = nn.Sequential(*(MobileOneDw(8, seed=s) for s in (1, 2, 3))).eval()
    source = torch.jit.script(net)
    modules = dict(source.named_modules())
    assert len({modules[p]._c._type().qualified_name() for p in ("0", "1", "2")}) == 1
    fused, report = fuse_module(source)
    assert (conv_nodes(source), conv_nodes(fused)) == (6, 3)
    assert [m.conv for m in report.merged] == ["0.dw.0", "1.dw.0", "2.dw.0"] and report.bn_after == 0
    for i, block in enumerate(net):
        assert_holds(fused, f"{i}.dw.0", *block.deploy())
    assert_same(fused, net, torch.randn(2, 8, 8, 8))


class Pair(nn.Module):
    """Two conv+BN branches of x, summed."""

    def __init__(self, a: nn.Conv2d, b: nn.Conv2d):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.a, self.bn_a = a, random_bn(nn.BatchNorm2d(a.out_channels), g)
        self.b, self.bn_b = b, random_bn(nn.BatchNorm2d(b.out_channels), g)

    def forward(self, x):
        return self.bn_a(self.a(x)) + self.bn_b(self.b(x))


class PairReused(Pair):
    """The b branch is also read after the sum."""

    def forward(self, x):
        branch = self.bn_b(self.b(x))
        return (self.bn_a(self.a(x)) + branch) * branch.mean()


class CPE(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(8, 8, 3, 1, 1, groups=8)

    def forward(self, x):
        return x + self.proj(x)


class Nested(nn.Module):
    """A RepVGG block (no activation) summed with a 1×1 of the same input, then a CPE."""

    def __init__(self):
        super().__init__()
        self.inner = RepVggBlock(8, 8, seed=3)
        self.inner.act = nn.Identity()
        self.c = nn.Conv2d(8, 8, 1)
        self.cpe = CPE()

    def forward(self, x):
        return self.cpe(self.inner(x) + self.c(x))


@pytest.mark.parametrize("kind", KINDS)
def test_merged_block_is_a_branch_of_its_parent(kind):
    """Children merge first: the block's one conv is then a Conv term of the sum in its parent."""
    model = Nested().eval()
    x = torch.randn(2, 8, 6, 6)
    source = to_script(kind, model, x)
    fused, report = fuse_module(source)
    assert (conv_nodes(source), conv_nodes(fused)) == (4, 2)
    assert [(m.conv, len(m.branches)) for m in report.merged] == [("inner.conv3", 3), ("cpe.proj", 2),
                                                                 ("inner.conv3", 2)]
    w, b = model.inner.deploy()
    assert_holds(fused, "inner.conv3", w + F.pad(model.c.weight.double(), [1, 1, 1, 1]), b + model.c.bias.double())
    assert_same(fused, model, x)


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_no_branch_holds(kind):
    """ACNet's 1×3 + 3×1 is a 3×3 neither conv has: each block gets the kernel as its own tensor
    (scripted, both blocks are one class: the attribute is the class's, the values each block's)."""
    net = nn.Sequential(*(Pair(nn.Conv2d(4, 4, (1, 3), 1, (0, 1)), nn.Conv2d(4, 4, (3, 1), 1, (1, 0)))
                          for _ in range(2))).eval()
    x = torch.randn(2, 4, 7, 8)
    fused, report = fuse_module(to_script(kind, net, x))
    assert [(m.conv, m.kernel) for m in report.merged] == [(f"{i}.bnfold_reparam_weight_0", [3, 3]) for i in (0, 1)]
    assert conv_nodes(fused) == 2 and not report.unmerged
    modules = dict(fused.named_modules())
    assert all(modules[i].bnfold_reparam_weight_0.shape == (4, 4, 3, 3) for i in ("0", "1"))
    assert_same(fused, net, x)


# -- kept, with the reason -----------------------------------------------------------------------------


@pytest.mark.parametrize("a,b,pair,reason", [
    (nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 4, 5, 1, 0), Pair, "strides differ on spatial axis 0"),
    (nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 4, 2, 2, 0), Pair,
     "paddings give different output lengths on spatial axis 0"),
    (nn.Conv2d(4, 4, 3, 1, 1), nn.Conv2d(4, 4, 1, 1, 0), PairReused, "also used by 1 other node"),
    (nn.Conv2d(4, 4, 3, 1, 1, padding_mode="reflect"), nn.Conv2d(4, 4, 1, 1, 0), Pair,
     "reads its input through aten::pad (mode 'reflect')"),
], ids=["stride", "pad", "used-elsewhere", "padding-mode"])
@pytest.mark.parametrize("kind", KINDS)
def test_kept(kind, a, b, pair, reason):
    model = pair(a, b).eval()
    x = torch.randn(2, 4, 8, 8)
    fused, report = fuse_module(to_script(kind, model, x))
    assert not report.merged and conv_nodes(fused) == 2
    assert len(report.unmerged) == 1 and reason in report.unmerged[0].reason, report.unmerged
    assert len(report.folded) == 2  # each BN still folds into its own conv
    assert_same(fused, model, x)


class ReadsBranchWeight(nn.Module):
    """A parent that also reads a branch's weight of its block: merging would change what it reads."""

    def __init__(self):
        super().__init__()
        self.block = Pair(nn.Conv2d(4, 4, 3, 1, 1), nn.Conv2d(4, 4, 1))

    def forward(self, x):
        return self.block(x) * self.block.b.weight.sum()


@pytest.mark.parametrize("kind", KINDS)
def test_kept_weight_read_outside_the_block(kind):
    model = ReadsBranchWeight().eval()
    x = torch.randn(2, 4, 8, 8)
    fused, report = fuse_module(to_script(kind, model, x))
    assert not report.merged and conv_nodes(fused) == 2
    assert [(u.add.partition(":")[0], u.reason) for u in report.unmerged] == [("block", "block.b.weight is read by 2 ops")]
    assert_same(fused, model, x)


@pytest.mark.parametrize("kind,merged", [("traced", 1), ("scripted", 0)])
def test_class_with_instances_that_differ(kind, merged):
    """One block's 1×1 BN runs on batch statistics. Traced, each block is a class of its own and the
    other merges; scripted, both share one graph, so both keep their branches."""
    net = nn.Sequential(RepVggBlock(8, 8, seed=1), RepVggBlock(8, 8, seed=2)).eval()
    net[1].bn1.train()
    x = torch.randn(4, 8, 8, 8)
    fused, report = fuse_module(to_script(kind, net, x))
    assert len(report.merged) == merged and len(report.unmerged) == 2 - merged
    reasons = {u.add.partition(":")[0]: u.reason for u in report.unmerged}
    assert "batch_norm runs in training mode" in reasons["1"]
    if kind == "scripted":
        assert reasons["0"].startswith("the graph of RepVggBlock is shared with 1, where they are kept (")
    assert conv_nodes(fused) == 4 - merged
    assert_same(fused, net, x)


class ConvBeforeSum(nn.Module):
    """A layer and its BN before the sum of branches, in the same forward: merging the sum first
    would inline that BN into the block's graph, where the fold could no longer cut it."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.pre, self.pre_bn = nn.Conv2d(8, 8, 3, 1, 1, bias=False), random_bn(nn.BatchNorm2d(8), g)
        self.pair = Pair(nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.Conv2d(8, 8, 1, bias=False))

    def forward(self, x):
        y = torch.relu(self.pre_bn(self.pre(x)))
        return self.pair.bn_a(self.pair.a(y)) + self.pair.bn_b(self.pair.b(y))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model_type", [RepVggBlock, ConvBeforeSum])
def test_blocks_merge_before_or_after_the_fold_alike(kind, model_type):
    """A block that is only its sums merges before the fold, one with more in its forward after
    it: either way every BN leaves the graph, none stays as an identity, and the model computes
    what it did."""
    model = nn.Sequential(model_type(8, 8) if model_type is RepVggBlock else model_type(),
                          model_type(8, 8) if model_type is RepVggBlock else model_type()).eval()
    x = torch.randn(2, 8, 6, 6)
    fused, report = fuse_module(to_script(kind, model, x))
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(f.bn for f in report.folded) == sorted(bns)
    assert not report.skipped and report.identity_bns == 0 and not report.notes
    assert len(report.merged) == 2 and not report.unmerged
    assert not fused.inlined_graph.findAllNodes("aten::batch_norm", True)
    assert_same(fused, model, x)


class CallsGrandchildren(nn.Module):
    """Calls its child's submodules itself: the child's own forward (scripted, it is compiled)
    calls the same BN but never runs."""

    def __init__(self):
        super().__init__()
        self.pair = Pair(nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.Conv2d(8, 8, 1, bias=False))

    def forward(self, x):
        return torch.relu(self.pair.bn_a(self.pair.a(x)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model_type", [CallsGrandchildren, ConvBeforeSum])
def test_a_forward_that_never_runs_is_not_folded_or_merged(kind, model_type):
    """The BN's call is cut, and the sum merged, where the model runs them, not in the child's
    unused forward (which also calls them: cut there, the BN would run on after its fold)."""
    model = model_type().eval()
    x = torch.randn(2, 8, 6, 6)
    fused, report = fuse_module(to_script(kind, model, x))
    assert report.identity_bns == 0 and not report.skipped
    assert len(report.merged) == (1 if model_type is ConvBeforeSum else 0)
    assert not fused.inlined_graph.findAllNodes("aten::batch_norm", True)
    assert_same(fused, model, x)


class ExportedMethodReadsABranch(nn.Module):
    """A scripted model whose @torch.jit.export method runs a branch's Conv on its own."""

    def __init__(self):
        super().__init__()
        self.block = RepVggBlock(8, 8, seed=1)

    def forward(self, x):
        return self.block(x)

    @torch.jit.export
    def side(self, x):
        return self.block.conv3(x)


def test_a_branch_read_by_an_exported_method_is_not_merged():
    """Merging writes the merged kernel over a branch's weight: an exported method that runs that
    branch itself would compute something else. Kept, with the reason; both methods unchanged."""
    model = ExportedMethodReadsABranch().eval()
    x = torch.randn(2, 8, 6, 6)
    fused, report = fuse_module(torch.jit.script(model))
    assert not report.merged and any("block.conv3.weight is read by 2 ops" in u.reason for u in report.unmerged)
    assert_same(fused, model, x)
    torch.testing.assert_close(fused.side(x), model.side(x), rtol=1e-5, atol=1e-5)
