"""verify fails closed on nested outputs: every tensor leaf of a forward's list/dict/namedtuple/
dataclass output (and of an ONNX sequence) is compared by its path, a different structure is a
mismatch (exit 1, naming the path), and a comparison that compared no tensor element is exit 2.

The reference for the honest case is torch itself: both pickled modules run on the same --data
input here, and the per-leaf error the report gives must be the error torch shows."""
from __future__ import annotations

import copy
import dataclasses
import json
from collections import namedtuple
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import bnfold.torchfold.params as params
from bnfold.cli import run as cli

SHAPE = ["--shape", "input=1,3,8,8"]
DEEP = "[0]['scores'][1]['deep']"
LEAVES = {"c1": "[0]['boxes']", "c2": "[0]['scores'][0]", "c3": DEEP}


def conv_bn(c_out: int) -> nn.Sequential:
    block = nn.Sequential(nn.Conv2d(3, c_out, 3), nn.BatchNorm2d(c_out))
    block[1].running_mean.uniform_(-1, 1)
    block[1].running_var.uniform_(0.5, 2.0)
    block[1].weight.data.uniform_(0.5, 1.5)
    return block


class Nested(nn.Module):
    """A detector-like output: a list of dicts, one leaf three levels down. Each branch has its
    own channel count, so a sabotaged fold can pick one branch by the size of its bias."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = conv_bn(4), conv_bn(6), conv_bn(5)

    def forward(self, x):
        return [{"boxes": self.c1(x), "scores": [self.c2(x), {"deep": self.c3(x)}]}]


Pair = namedtuple("Pair", ["boxes", "scores"])


@dataclasses.dataclass
class Detections:
    boxes: torch.Tensor
    scores: torch.Tensor
    count: int


class Shaped(nn.Module):
    """One conv whose forward returns the output form named by `form` (set after pickling a copy)."""

    def __init__(self, form: str):
        super().__init__()
        self.form, self.conv = form, nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return {
            "list3": lambda: [y, y + 1, y + 2], "list2": lambda: [y, y + 1],
            "keys_scores": lambda: {"boxes": y, "scores": y + 1}, "keys_labels": lambda: {"boxes": y, "labels": y + 1},
            "count_int": lambda: {"boxes": y, "n": 3}, "count_4": lambda: {"boxes": y, "n": 4},
            "count_tensor": lambda: {"boxes": y, "n": y}, "list1": lambda: [y], "dict1": lambda: {"a": y},
            "pair": lambda: Pair(y, y + 1), "pair_bad": lambda: Pair(y, y + 1.5),
            "dataclass": lambda: Detections(y, y + 1, 3), "dataclass_bad": lambda: Detections(y, y + 1, 2),
            "none": lambda: None, "empty_list": lambda: [], "values": lambda: {"n": 3, "label": "cat"},
            "empty_tensor": lambda: y[:0], "empty_dict": lambda: {},
        }[self.form]()


@pytest.fixture(scope="module")
def nested(tmp_path_factory):
    """The original Nested, its honest fold by bnfold, and a --data input."""
    out = tmp_path_factory.mktemp("nested")
    torch.manual_seed(0)
    model = Nested().eval()
    src = out / "nested.pt"
    torch.save(model, src)
    fused = out / "nested.fused.pt"
    assert cli(["fuse", str(src), "-o", str(fused), "--trust-pickle", *SHAPE]) == 0
    data = out / "in.npz"
    np.savez(data, input=np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32))
    return model, src, fused, data


def _report(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def _leaves(value, path=""):
    """torch's own flattening of the Nested output, written out for this one form."""
    if isinstance(value, torch.Tensor):
        return {path: value}
    if isinstance(value, dict):
        return {k: v for key, child in value.items() for k, v in _leaves(child, f"{path}[{key!r}]").items()}
    return {k: v for i, child in enumerate(value) for k, v in _leaves(child, f"{path}[{i}]").items()}


def test_honest_nested_fold_passes_with_every_leaf_by_path(nested, capsys):
    model, src, fused, data = nested
    assert cli(["verify", str(src), str(fused), "--trust-pickle", "--data", str(data), "--json"]) == 0
    report = _report(capsys)
    x = torch.from_numpy(np.load(data)["input"])
    with torch.no_grad():
        expected = _leaves(model(x))
        got = _leaves(torch.load(fused, weights_only=False).eval()(x))
    outputs = {o["name"]: o for o in report["outputs"]}
    assert list(outputs) == list(expected) == list(LEAVES.values())
    assert report["passed"] and all(o["passed"] and o["kind"] == "tensor" for o in outputs.values())
    assert report["compared_elements"] == sum(t.numel() for t in expected.values())
    for path, tensor in expected.items():
        assert outputs[path]["shape"] == list(tensor.shape)
        error = (tensor.double() - got[path].double()).abs().max().item()
        assert outputs[path]["max_abs_error"] == pytest.approx(error, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("conv", ["c1", "c2", "c3"])
def test_one_sabotaged_leaf_fails_naming_its_path(nested, tmp_path, conv, capsys):
    model, src, _, _ = nested
    bad = copy.deepcopy(model)
    with torch.no_grad():
        getattr(bad, conv)[0].bias[1] += 1.0
    path = tmp_path / "bad.pt"
    torch.save(bad, path)
    assert cli(["verify", str(src), str(path), "--trust-pickle", *SHAPE, "--json"]) == 1
    report = _report(capsys)
    failing = [o["name"] for o in report["outputs"] if not o["passed"]]
    assert not report["passed"] and failing == [LEAVES[conv]]
    assert len(report["outputs"]) == 3


def test_human_report_names_the_deep_path(nested, tmp_path, capsys):
    model, src, _, _ = nested
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.c3[0].bias[0] += 1.0
    torch.save(bad, tmp_path / "bad.pt")
    assert cli(["verify", str(src), str(tmp_path / "bad.pt"), "--trust-pickle", *SHAPE]) == 1
    out = capsys.readouterr().out
    assert f"{DEEP}: " in out and "elements differ" in out and "FAIL" in out


def test_fuse_verify_catches_a_wrong_fold_in_one_deep_leaf(nested, tmp_path, monkeypatch, capsys):
    """Only the 5-channel conv (the deep leaf's) gets a bias off by 1: fuse --verify says where,
    and writes nothing."""
    real = params.fold_bias
    monkeypatch.setattr(params, "fold_bias",
                        lambda bias, affine: real(bias, affine) + (1.0 if len(affine.scale) == 5 else 0.0))
    src = nested[1]
    dst = tmp_path / "out.pt"
    assert cli(["fuse", str(src), "-o", str(dst), "--trust-pickle", *SHAPE, "--verify", "--json"]) == 1
    report = _report(capsys)
    assert [o["name"] for o in report["verify"]["outputs"] if not o["passed"]] == [DEEP]
    assert report["output"] is None and not dst.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("to", ["same", "onnx"])
def test_fuse_verify_passes_an_honest_nested_fold(nested, tmp_path, to, capsys):
    dst = tmp_path / ("out.onnx" if to == "onnx" else "out.pt")
    assert cli(["fuse", str(nested[1]), "-o", str(dst), "--trust-pickle", *SHAPE, "--verify", "--json"]) == 0
    verify = _report(capsys)["verify"]
    assert verify["passed"] and [o["name"] for o in verify["outputs"]] == list(LEAVES.values())
    assert verify["compared_elements"] == 4 * 36 + 6 * 36 + 5 * 36 and dst.exists()


def _pair(tmp_path: Path, original: str, fused: str) -> list[str]:
    torch.manual_seed(0)
    model = Shaped(original).eval()
    torch.save(model, tmp_path / "a.pt")
    model.form = fused
    torch.save(model, tmp_path / "b.pt")
    return [str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--trust-pickle", *SHAPE]


# (original form, fused form) → {path: words its message must hold}; every other output passes
MISMATCHES = {
    "shorter_list": ("list3", "list2", {"[2]": "missing from the fused"}),
    "longer_list": ("list2", "list3", {"[2]": "not in the original"}),
    "other_key": ("keys_scores", "keys_labels", {"['scores']": "missing from the fused",
                                                  "['labels']": "not in the original"}),
    "value_differs": ("count_int", "count_4", {"['n']": "value differs: original int 3, fused int 4"}),
    "tensor_for_value": ("count_int", "count_tensor", {"['n']": "original is int 3, fused is a tensor"}),
    "dict_for_list": ("list1", "dict1", {"output": "original is a list of 1 items, fused is a dict of 1 keys"}),
    "namedtuple_leaf": ("pair", "pair_bad", {".scores": "elements differ"}),
    "dataclass_value": ("dataclass", "dataclass_bad", {".count": "value differs"}),
    "empty_for_tensor": ("empty_list", "list1", {"[0]": "not in the original"}),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_structure_mismatch_is_exit_1_naming_the_path(tmp_path, case, capsys):
    original, fused, expected = MISMATCHES[case]
    assert cli(["verify", *_pair(tmp_path, original, fused), "--json"]) == 1
    report = _report(capsys)
    failing = {o["name"]: o["message"] for o in report["outputs"] if not o["passed"]}
    assert sorted(failing) == sorted(expected) and not report["passed"]
    for path, words in expected.items():
        assert words in failing[path], failing[path]


def test_records_and_values_pass_when_equal(tmp_path, capsys):
    assert cli(["verify", *_pair(tmp_path, "dataclass", "dataclass"), "--json"]) == 0
    outputs = {o["name"]: o for o in _report(capsys)["outputs"]}
    assert list(outputs) == [".boxes", ".scores", ".count"]
    assert outputs[".count"]["kind"] == "value" and outputs[".count"]["passed"]


@pytest.mark.parametrize("form, why", [("none", "no tensor outputs"), ("empty_list", "no tensor outputs"),
                                       ("empty_dict", "no tensor outputs"), ("values", "no tensor outputs"),
                                       ("empty_tensor", "every output tensor is empty")])
def test_nothing_compared_is_exit_2(tmp_path, form, why, capsys):
    assert cli(["verify", *_pair(tmp_path, form, form), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and why in captured.err and "nothing was verified" in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_fuse_verify_of_a_model_with_only_empty_outputs_is_exit_2_and_writes_nothing(tmp_path, capsys):
    torch.manual_seed(0)
    src = tmp_path / "src" / "m.pt"
    src.parent.mkdir()
    model = Shaped("empty_tensor").eval()
    model.conv = conv_bn(4)
    torch.save(model, src)
    assert cli(["fuse", str(src), "-o", str(tmp_path / "out.pt"), "--trust-pickle", *SHAPE, "--verify"]) == 2
    assert "every output tensor is empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_torch_against_an_onnx_with_other_outputs_is_a_mismatch(nested, tmp_path, capsys):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["input"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, tmp_path / "one.onnx")
    assert cli(["verify", str(nested[1]), str(tmp_path / "one.onnx"), "--trust-pickle", *SHAPE, "--json"]) == 1
    [failure] = [o for o in _report(capsys)["outputs"] if not o["passed"]]
    assert "1 output tensor(s)" in failure["message"] and "returns 3" in failure["message"]


# -- ONNX: sequence, optional and no outputs ---------------------------------------------------


def _onnx_model(outputs: list, nodes: list) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(a.astype(np.float32), n) for n, a in
             [("W", rng.normal(size=(3, 2, 1, 1))), ("B", rng.normal(size=3)), ("gamma", rng.uniform(0.5, 1.5, 3)),
              ("beta", rng.normal(size=3)), ("mean", rng.normal(size=3)), ("var", rng.uniform(0.5, 2, 3))]]
    graph = helper.make_graph([helper.make_node("Conv", ["x", "W", "B"], ["c"]),
                               helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"]), *nodes],
                              "g", [x], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _sequence_model() -> onnx.ModelProto:
    tensor = helper.make_tensor_type_proto(TensorProto.FLOAT, [1, 3, 4, 4])
    seq = helper.make_value_info("s", helper.make_sequence_type_proto(tensor))
    return _onnx_model([seq], [helper.make_node("Relu", ["y"], ["r"]), helper.make_node("SequenceConstruct",
                                                                                         ["r", "y"], ["s"])])


@pytest.fixture(scope="module")
def sequence_pair(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq")
    onnx.save(_sequence_model(), out / "seq.onnx")
    assert cli(["fuse", str(out / "seq.onnx")]) == 0
    return out / "seq.onnx", out / "seq.fused.onnx"


def test_onnx_sequence_output_is_compared_element_by_element(sequence_pair, capsys):
    src, fused = sequence_pair
    assert cli(["verify", str(src), str(fused), "--json"]) == 0
    report = _report(capsys)
    assert [o["name"] for o in report["outputs"]] == ["s[0]", "s[1]"] and report["compared_elements"] == 2 * 48


def test_onnx_sabotaged_sequence_fails_naming_the_sequence(sequence_pair, tmp_path, capsys):
    src, fused = sequence_pair
    model = onnx.load(str(fused))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    bias = next(t for t in model.graph.initializer if t.name == conv.input[2])
    array = onnx.numpy_helper.to_array(bias).copy()
    array[1] += np.float32(0.01)
    bias.CopyFrom(onnx.numpy_helper.from_array(array, bias.name))
    onnx.save(model, tmp_path / "bad.onnx")
    assert cli(["verify", str(src), str(tmp_path / "bad.onnx"), "--json"]) == 1
    failing = [o["name"] for o in _report(capsys)["outputs"] if not o["passed"]]
    assert failing == ["s[0]", "s[1]"]  # Relu(y) and y both carry the broken channel


def _onnx_without_tensors(kind: str) -> onnx.ModelProto:
    if kind == "no_outputs":
        return _onnx_model([], [])
    if kind == "empty_sequence":
        tensor = helper.make_tensor_type_proto(TensorProto.FLOAT, [1, 3, 4, 4])
        seq = helper.make_value_info("s", helper.make_sequence_type_proto(tensor))
        return _onnx_model([seq], [helper.make_node("SequenceEmpty", [], ["s"], dtype=TensorProto.FLOAT)])
    tensor = helper.make_tensor_type_proto(TensorProto.FLOAT, [1, 3, 4, 4])
    optional = helper.make_value_info("o", helper.make_optional_type_proto(tensor))
    return _onnx_model([optional], [helper.make_node("Optional", [], ["o"], type=tensor)])


@pytest.mark.parametrize("kind", ["no_outputs", "empty_sequence", "optional_none"])
def test_onnx_without_tensor_outputs_is_exit_2(tmp_path, kind, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(_onnx_without_tensors(kind), path)
    assert cli(["verify", str(path), str(path), "--json"]) == 2
    err = capsys.readouterr().err
    assert "nothing was verified: no tensor outputs to compare" in err and len(err.strip().splitlines()) == 1
    assert cli(["fuse", str(path), "-o", str(tmp_path / "out.onnx"), "--verify"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_onnx_fused_without_outputs_is_a_mismatch(sequence_pair, tmp_path, capsys):
    onnx.save(_onnx_without_tensors("no_outputs"), tmp_path / "none.onnx")
    assert cli(["verify", str(sequence_pair[0]), str(tmp_path / "none.onnx"), "--json"]) == 1
    failing = {o["name"]: o["message"] for o in _report(capsys)["outputs"] if not o["passed"]}
    assert list(failing) == ["s"] and "missing from the fused" in failing["s"]


def test_containers_torch_pytree_knows_are_walked_too():
    from collections import deque

    from bnfold.check.compare import path_name
    from bnfold.torchfold.run import outputs_of

    x = torch.arange(3.0)
    leaves = outputs_of({"q": deque([x, x + 1])}).leaves()
    assert [path_name(p) for p, _ in leaves] == ["['q'][0]", "['q'][1]"]
    np.testing.assert_array_equal(leaves[1][1], np.arange(1.0, 4.0, dtype=np.float32))


def test_many_outputs_are_shown_one_row_each(capsys):
    from bnfold.check.compare import compare_outputs, conclude
    from bnfold.render import Output
    from bnfold.render.verify import render_verify
    from bnfold.report import VerifyReport

    x = np.ones((2, 3), np.float32)
    outputs = {f"out{i}": [x, {"n": i}] for i in range(3)}
    fused = copy.deepcopy(outputs)
    fused["out2"][0] = x + np.float32(1)
    report = VerifyReport("a", "b", True, "torch", "cpu", None, None, 0, 1)
    conclude(report, [compare_outputs(outputs, fused)])
    render_verify(report, Output())
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if "out2[0]" in line and "FAIL" in line)
    assert "1" in row and any("out0[1]['n']" in line and "pass" in line for line in lines)
    assert lines[-1].startswith("FAIL") and "optimizations off" not in lines[0]


class Boxed:
    """A container torch's pytree knows only because it was registered, without keys."""

    def __init__(self, boxes, scores):
        self.boxes, self.scores = boxes, scores


torch.utils._pytree.register_pytree_node(Boxed, lambda b: ([b.boxes, b.scores], None),
                                         lambda children, _: Boxed(*children))


def test_a_container_registered_without_keys_is_walked_by_position():
    from bnfold.check.compare import path_name
    from bnfold.torchfold.run import outputs_of

    x = torch.arange(2.0)
    leaves = outputs_of([Boxed(x, {"deep": x + 1})]).leaves()
    assert [path_name(p) for p, _ in leaves] == ["[0][0]", "[0][1]['deep']"]
