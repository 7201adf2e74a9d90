"""Every way deployed models spell "layer then BN" (examples/spellings.py: torchvision's and
detectron2's FrozenBatchNorm2d, a Conv3d subclass, padding="same" in a forward torch.fx cannot
trace, timm's BatchNormAct2d, torch.ao's intrinsic and QAT conv-BN modules, HRNet, YOLO), in
every torch form bnfold reads and writes: eager (`fuse_module`), a pickle, traced TorchScript, a
`.pt2`, and a pickle written as ONNX (`-o NAME.onnx`).

Each case is judged without asking bnfold:
1. the fused model's outputs against the unfused model's, with torch.testing at verify's default
   float32 tolerances (atol = 1e-4 · RMS of the expected output, rtol = 1e-4);
2. the number of BNs folded equals the BN sites of the model's own ONNX export (torch's legacy
   exporter, eval mode, no constant folding): BatchNormalization nodes plus the Mul → Add by
   values computed from constants only (a hand-written frozen BN); every one of them can fold
   (QAT modules excepted: they must be kept, and say why);
3. nothing of a folded BN still runs: no batch_norm and no rsqrt (a frozen BN's) in the fused
   model's graph (torch.export of an eager result, a .pt2's program, the inlined TorchScript
   graph) and no BN-like module left in an eager result;
4. the ONNX written has no BatchNormalization and no BN's Mul → Add, and computes in
   onnxruntime what the unfused model computes in torch.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import io
import json
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from bnfold import fuse_module
from bnfold.cli import run as cli

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import spellings  # noqa: E402

FORMS = ["eager", "pickle", "torchscript", "pt2", "onnx"]

# BN sites by each model's structure; the ONNX count (the oracle of every fold test) must agree.
STRUCTURE = {
    "frozen_bn": 20,      # resnet18: stem, 8 BasicBlocks × 2, 3 downsamples
    "frozen_bn_d2": 9,    # stem, res2 × 2, res3 and res4 × (2 + shortcut)
    "conv3d_simple": 12,  # stem, 4 blocks × 2, 3 downsamples
    "same_pad": 13,       # embeddings, 4 MBConv blocks (2 + 3 + 3 + 3), top
    "batchnorm_act": 15,  # stem, bottlenecks 2 + 3 + 4 (SE) + 4 (SE), final
    "qat_intrinsic": 4,   # stem, conv1, conv2, head
    "qat_prepared": 4,    # the same; stem, conv1 and conv2 are QAT modules
    "hrnet": 43,          # stem 2, layer1 4, transitions 2 + 1, stage2 6, stage3 13, head 15
    "yolo": 36,
}
QAT_KEPT = {"qat_prepared": 3}  # BNs inside QAT modules: kept, with a reason
# torch's ONNX exporter has no aten::fused_moving_avg_obs_fake_quant (the default QAT fake-quant):
# the oracle is the structure's count, and there is no ONNX form
NO_ONNX = {"qat_prepared"}
# forms a model cannot be written in by torch itself
UNAVAILABLE = {("qat_prepared", "onnx"),
               ("qat_prepared", "pickle")}  # a prepared model's qconfig holds local functions: torch.save fails
BN_LIKE = (nn.modules.batchnorm._BatchNorm, spellings.FrozenBatchNorm2d, spellings.D2FrozenBatchNorm2d)
# verify's default float32 tolerances: atol = K · RMS(expected), rtol
K, RTOL = 1e-4, 1e-4


def flat(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for v in value for t in flat(v)] if isinstance(value, (tuple, list)) else []


def assert_outputs(got: list, expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected) and expected
    for g, e in zip(got, expected):
        e = e.double()
        atol = K * e.pow(2).mean().sqrt().item()
        torch.testing.assert_close(torch.as_tensor(g).double(), e, atol=atol, rtol=RTOL)


def onnx_export(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    """torch's legacy exporter, which keeps every BN as it is written (nothing folded)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(model), (x,), buf, dynamo=False, opset_version=17,
                          training=torch.onnx.TrainingMode.EVAL, do_constant_folding=False)
    return onnx.load_from_string(buf.getvalue())


def onnx_bn_sites(graph: onnx.GraphProto) -> int:
    """BatchNormalization nodes, plus Mul → Add pairs whose other operands are computed from
    constants only (x · scale + bias: a frozen BN written out), the Mul read by the Add alone."""
    constant = {t.name for t in graph.initializer}
    for node in graph.node:  # nodes are in topological order
        if node.op_type == "Constant" or (node.input and all(i in constant for i in node.input if i)):
            constant.update(node.output)
    readers = Counter(i for n in graph.node for i in n.input)
    add_of = {i: n for n in graph.node if n.op_type == "Add" for i in n.input}
    pairs = 0
    for node in graph.node:
        if node.op_type != "Mul" or sum(i in constant for i in node.input) != 1:
            continue
        add = add_of.get(node.output[0])
        if add is not None and readers[node.output[0]] == 1 and \
                any(i in constant for i in add.input if i != node.output[0]):
            pairs += 1
    return sum(n.op_type == "BatchNormalization" for n in graph.node) + pairs


def graph_bn_ops(graph: torch.fx.Graph) -> int:
    """batch_norm of any overload, and rsqrt (what a frozen BN computes), in an fx/ATen graph."""
    return sum(n.op == "call_function" and ("batch_norm" in str(n.target) or "rsqrt" in str(n.target))
               for n in graph.nodes)


def script_bn_ops(module: torch.jit.ScriptModule) -> int:
    graph = module.inlined_graph
    return sum(len(graph.findAllNodes(kind, True)) for kind in ("aten::batch_norm", "aten::rsqrt"))


@dataclasses.dataclass
class Case:
    name: str
    model: nn.Module
    example: torch.Tensor  # what bnfold is given to trace/export with
    x: torch.Tensor        # what outputs are compared on (same shape: a .pt2 fixes its batch)
    expected: list[torch.Tensor]

    @functools.cached_property
    def onnx_sites(self) -> int:
        if self.name in NO_ONNX:
            return STRUCTURE[self.name]
        return onnx_bn_sites(onnx_export(self.model, self.example).graph)

    @property
    def kept(self) -> int:
        return QAT_KEPT.get(self.name, 0)

    @property
    def folds(self) -> int:
        return self.onnx_sites - self.kept


class Spellings(dict):
    """Each look-alike built once per test session, when first asked for."""

    def __missing__(self, name):
        model, shape = spellings.build(name)
        g = torch.Generator().manual_seed(1)
        example, x = torch.randn(2, *shape, generator=g), torch.randn(2, *shape, generator=g)
        with torch.no_grad():
            expected = flat(model(x))
        self[name] = Case(name, model, example, x, expected)
        return self[name]


@pytest.fixture(scope="session")
def cases():
    return Spellings()


# What runs without the slow mark (a few seconds of folding in all): the forms each spelling was
# reported in, and the tiny intrinsic model in every form. pt2 forms and the larger models are slow.
QUICK = {"frozen_bn": {"eager", "pickle", "onnx"}, "frozen_bn_d2": {"eager"}, "conv3d_simple": {"eager", "pickle"},
         "same_pad": {"eager", "pickle", "onnx"}, "batchnorm_act": {"eager", "pickle"}, "qat_intrinsic": set(FORMS),
         "qat_prepared": {"eager"}, "hrnet": {"torchscript"}, "yolo": set()}


def slow_unless(quick: bool):
    return () if quick else pytest.mark.slow


@pytest.mark.parametrize("name", [pytest.param(name, marks=slow_unless(bool(QUICK[name])))
                                  for name in STRUCTURE if name not in NO_ONNX])
def test_onnx_export_counts_every_bn_site(cases, name):
    """The oracle: the legacy ONNX export shows every BN the model's structure has."""
    assert cases[name].onnx_sites == STRUCTURE[name]


# -- the forms -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Fused:
    folded: list[str]
    skipped: list[tuple[str, str]]
    outputs: list
    left: list[int]  # counts of BN computations still there, each must equal the BNs kept


def fuse_cli(args: list[str], capsys) -> dict:
    code = cli(["fuse", *args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def from_report(report: dict) -> tuple[list[str], list[tuple[str, str]]]:
    return [f["bn"] for f in report["folded"]], [(s["bn"], s["reason"]) for s in report["skipped"]]


def eager_result(fused: nn.Module, case: Case, folded, skipped) -> Fused:
    with torch.no_grad():
        outputs = flat(fused(case.x))
    modules = sum(isinstance(m, BN_LIKE) for m in fused.modules())
    graph = torch.export.export(fused, (case.example,)).graph
    return Fused(folded, skipped, outputs, [modules, graph_bn_ops(graph)])


def fuse_eager(case: Case, tmp_path: Path, capsys) -> Fused:
    fused, report = fuse_module(case.model, example=(case.example,))
    return eager_result(fused, case, [f.bn for f in report.folded], [(s.bn, s.reason) for s in report.skipped])


def example_file(case: Case, tmp_path: Path) -> list[str]:
    path = tmp_path / "x.npy"
    np.save(path, case.example.numpy())
    return ["--example-input", str(path)]


def fuse_pickle(case: Case, tmp_path: Path, capsys) -> Fused:
    src = tmp_path / f"{case.name}.pt"
    torch.save(case.model, src)
    report = fuse_cli([str(src), "--trust-pickle", "-o", str(tmp_path / "out.pt"), *example_file(case, tmp_path)],
                      capsys)
    fused = torch.load(report["output"], weights_only=False).eval()
    return eager_result(fused, case, *from_report(report))


def fuse_torchscript(case: Case, tmp_path: Path, capsys) -> Fused:
    src = tmp_path / f"{case.name}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(copy.deepcopy(case.model), case.example, check_trace=False)
    torch.jit.save(traced, str(src))
    report = fuse_cli([str(src), "-o", str(tmp_path / "out.pt"), *example_file(case, tmp_path)], capsys)
    fused = torch.jit.load(report["output"])
    with torch.no_grad():
        outputs = flat(fused(case.x))
    return Fused(*from_report(report), outputs, [script_bn_ops(fused)])


def fuse_pt2(case: Case, tmp_path: Path, capsys) -> Fused:
    src = tmp_path / f"{case.name}.pt2"
    torch.export.save(torch.export.export(copy.deepcopy(case.model), (case.example,)), str(src))
    report = fuse_cli([str(src), "-o", str(tmp_path / "out.pt2")], capsys)
    fused = torch.export.load(report["output"]).module()
    with torch.no_grad():
        outputs = flat(fused(case.x))
    return Fused(*from_report(report), outputs, [graph_bn_ops(fused.graph)])


def fuse_to_onnx(case: Case, tmp_path: Path, capsys) -> Fused:
    src = tmp_path / f"{case.name}.pt"
    torch.save(case.model, src)
    report = fuse_cli([str(src), "--trust-pickle", "-o", str(tmp_path / "out.onnx"),
                       *example_file(case, tmp_path)], capsys)
    model = onnx.load(report["output"])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: case.x.numpy()})
    return Fused(*from_report(report), outputs, [onnx_bn_sites(model.graph)])


FUSE = {"eager": fuse_eager, "pickle": fuse_pickle, "torchscript": fuse_torchscript, "pt2": fuse_pt2,
        "onnx": fuse_to_onnx}
CASES = [pytest.param(name, form, id=f"{name}-{form}", marks=slow_unless(form in QUICK[name]))
         for name in STRUCTURE for form in FORMS if (name, form) not in UNAVAILABLE]


@pytest.mark.parametrize("name,form", CASES)
def test_spelling(cases, name, form, tmp_path, capsys):
    case = cases[name]
    fused = FUSE[form](case, tmp_path, capsys)
    assert_outputs(fused.outputs, case.expected)
    assert len(fused.folded) == case.folds, f"folded {len(fused.folded)} of {case.folds}; kept {fused.skipped}"
    assert fused.left == [case.kept] * len(fused.left), f"BN computations left {fused.left}, kept {case.kept}"
    if not case.kept:
        assert fused.skipped == []
        return
    qat = spellings.qat_modules(case.model)
    assert len(fused.skipped) == case.kept and len(qat) == case.kept
    for bn, reason in fused.skipped:
        assert any(bn == q or bn.startswith(q + ".") for q in qat), (bn, qat)
        assert "qat" in reason.lower() and "convert" in reason and "read by 2 ops" not in reason, reason
