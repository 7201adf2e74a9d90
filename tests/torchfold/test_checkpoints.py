"""Model families as people have them on disk, through `bnfold fuse`: YOLO (ultralytics v8) and
timm's RepVGG, DLA/HRNet and LeViT look-alikes (examples/lookalikes.py), each as a full pickle, a
training checkpoint dict, traced and scripted TorchScript, a `.pt2` and a state_dict.

Each case checks the count of folds, the BNs kept and why, that no foldable BN is left, the
fused model against the unfused one in torch (verify's default tolerances: atol = k·RMS of the
original output, k = 1e-4 and rtol 1e-4 in float32, k = 0.15 and rtol 1e-2 in float16), and
that everything in the file that is not a folded weight came back unchanged."""
from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bnfold.cli import run as cli

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import lookalikes  # noqa: E402
from checkpoint_layouts import LAYOUTS, PREFIXES, write  # noqa: E402

# family → (BNs that fold, BNs kept because their input is not a layer's output)
EXPECTED = {
    "yolo": (36, set()),
    "repvgg": (11, {"stages.1.1.identity", "stages.2.1.identity"}),
    "dla_hrnet": (10, set()),
    "levit": (12, {"head.bn", "head_dist.bn"}),
}
# layouts whose module may change shape: RepVGG's identity BNs merge into the block's one Conv
# (branches.py, script_branches.py); a state_dict keeps them
REPARAM_LAYOUTS = ("pickle", "pt2", "traced", "scripted")


class Families(dict):
    """Each family built once per test process, when first asked for."""

    def __missing__(self, name):
        self[name] = lookalikes.build(name)
        return self[name]


@pytest.fixture(scope="module")
def families():
    return Families()


def outputs(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for v in value for t in outputs(v)] if isinstance(value, (tuple, list)) else []


def assert_same_outputs(fused, original, x, half: bool = False) -> float:
    """Fused against unfused at verify's default tolerances (float16's for a `half` model, whose
    outputs may be float32: YOLO's cached anchors do not follow .half()); returns the largest error."""
    with torch.no_grad():
        want, got = outputs(original(x)), outputs(fused(x))
    assert len(want) == len(got) and want
    worst = 0.0
    for w, g in zip(want, got):
        rms = w.double().pow(2).mean().sqrt().item()
        k, rtol = (0.15, 1e-2) if half or w.dtype == torch.float16 else (1e-4, 1e-4)
        torch.testing.assert_close(g, w, atol=k * rms, rtol=rtol)
        worst = max(worst, (g.double() - w.double()).abs().max().item())
    return worst


def same_value(a, b) -> bool:
    """Equal in value and type, recursively; tensors bit for bit, everything else as pickled bytes."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return pickle.dumps(a) == pickle.dumps(b)


def fuse(args: list[str], capsys) -> dict:
    code = cli(["fuse", *args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def check_counts(report: dict, family: str, model: nn.Module, sets: int = 1, layout: str = "") -> None:
    """Every BN of the family folds but the ones it cannot, by module path: the same set in
    every layout, so an eager model folds every BN its own `.pt2` export folds."""
    folds, kept = EXPECTED[family]
    if layout in REPARAM_LAYOUTS:
        merged = {k for k in kept if k.endswith(".identity")}
        folds, kept = folds + len(merged), kept - merged
        assert {f["bn"] for f in report["folded"] if f["pattern"] == "merged branches"} == merged
    bns = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert len(report["folded"]) == folds * sets, report["skipped"]
    assert {f["bn"] for f in report["folded"]} == bns - kept
    assert {s["bn"] for s in report["skipped"]} == kept
    assert all("input comes from" in s["reason"] for s in report["skipped"])


def untouched_keys(original: dict, fused: dict, report: dict, prefix: str = "") -> None:
    """Every state_dict entry that is not a folded layer's weight/bias or a folded BN's tensor
    is bit for bit what it was."""
    changed = set()
    for f in report["folded"]:
        changed |= {f"{prefix}{f['producer']}.{k}" for k in ("weight", "bias")}
        changed |= {f"{prefix}{f['bn']}.{k}" for k in ("weight", "bias", "running_mean", "running_var")}
    assert list(fused) == list(original)
    for key in original:
        if key not in changed:
            assert same_value(original[key], fused[key]), key


# -- reading the fused file back ----------------------------------------------------------------


def from_state(family: str, state: dict, prefix: str = "") -> nn.Module:
    module = lookalikes.FAMILIES[family][0]()
    module.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=True)
    return module.eval()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", list(EXPECTED))
def test_family_layout(families, family, layout, tmp_path, capsys):
    model, shape = families[family]
    src, args, saved = write(layout, family, model, shape, tmp_path)
    report = fuse([str(src), *args], capsys)
    out = Path(report["output"])
    x = torch.randn(2, *shape)  # a .pt2's batch is the one it was exported with
    if layout == "checkpoint":
        check_checkpoint(family, saved, out, report, x)
    elif layout == "state_dict":
        check_state_dict(family, saved, out, report, x, model)
    else:
        check_counts(report, family, model, layout=layout)
        fused = load_fused(layout, out)
        assert_same_outputs(fused, model, x)
        check_nothing_foldable_left(layout, fused, report)


def load_fused(layout: str, path: Path):
    if layout == "pickle":
        return torch.load(path, weights_only=False).eval()
    if layout in ("traced", "scripted"):
        return torch.jit.load(str(path))
    return torch.export.load(str(path)).module()


def check_nothing_foldable_left(layout: str, fused, report: dict) -> None:
    kept = len(report["skipped"])
    if layout in ("traced", "scripted"):
        left = len(fused.inlined_graph.findAllNodes("aten::batch_norm", True))
    elif layout == "pt2":
        left = sum("batch_norm" in str(n.target) for n in fused.graph.nodes)
    else:
        left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert left == kept + report["identity_bns"]


def check_checkpoint(family: str, saved: dict, out: Path, report: dict, x) -> None:
    fused = torch.load(out, weights_only=False)
    sets = ("model", "ema") if family == "yolo" else ("state_dict", "state_dict_ema")
    check_counts(report, family, lookalikes.FAMILIES[family][0](), sets=2)
    assert [w["name"] for w in report["weight_sets"]] == list(sets)
    assert list(fused) == list(saved)
    for key in saved:
        if key not in sets:
            assert same_value(saved[key], fused[key]), key
    for key in sets:
        if family == "yolo":
            assert all(p.dtype == torch.float16 for p in fused[key].parameters())
            assert_same_outputs(fused[key].eval(), saved[key].eval(), x.half(), half=True)
            assert fused[key].names == saved[key].names and fused[key].args == saved[key].args
        else:
            assert_same_outputs(from_state(family, fused[key]), from_state(family, saved[key]), x)
            scoped = {**report, "folded": [f for f in report["folded"] if f["graph"] == key]}
            untouched_keys(saved[key], fused[key], scoped)
            assert fused[key]._metadata == saved[key]._metadata


def check_state_dict(family: str, saved: dict, out: Path, report: dict, x, model: nn.Module) -> None:
    check_counts(report, family, model)
    fused = torch.load(out, weights_only=True)
    prefix = PREFIXES[family]
    if family == "yolo":
        assert [k for k in fused if k != "state_dict"] == [k for k in saved if k != "state_dict"]
        assert all(same_value(saved[k], fused[k]) for k in saved if k != "state_dict")
        saved, fused = saved["state_dict"], fused["state_dict"]
    assert report["weight_sets"][0]["prefix"] == prefix
    assert fused._metadata == saved._metadata
    untouched_keys(saved, fused, report, prefix)
    assert_same_outputs(from_state(family, fused, prefix), model, x)
