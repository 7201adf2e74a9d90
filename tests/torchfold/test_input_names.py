"""One input, two names, in every command: a torch model's input is its forward's parameter (x)
or the name bnfold's ONNX export gives its position (input, input1, …). `--shape` and `--data`
take either, in any order, in verify, fuse and bench — also where bench feeds onnxruntime the
export."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from bnfold.cli import run as cli
from bnfold.errors import UsageError
from bnfold.torchfold.inputs import export_shapes, forward_params, ordered_shapes

QUICK = ["--runs", "6", "--blocks", "6", "--warmup", "1", "--threads", "1"]
X, Y = [2, 3, 8, 8], [2, 5]


class Two(nn.Module):
    """Two inputs of different ranks, so an input fed in the wrong place cannot run."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Linear(5, 5)

    def forward(self, x, y):
        return self.bn(self.conv(x)).mean((2, 3)) + self.fc(y)


class Keywords(nn.Module):
    """A Hugging Face forward: named inputs, then **kwargs."""

    def forward(self, pixel_values, labels=None, **kwargs):
        return pixel_values


class Star(nn.Module):
    def forward(self, *args):
        return args[0]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    path = tmp_path_factory.mktemp("names") / "two.pt"
    torch.save(Two().eval(), path)
    return path


@pytest.mark.parametrize("shapes", [{"y": Y, "x": X}, {"x": X, "y": Y}, {"input1": Y, "input": X},
                                    {"y": Y, "input": X}])
def test_shapes_go_to_their_input_whatever_the_order_or_name(shapes):
    assert ordered_shapes(shapes, Two()) == [X, Y]
    assert export_shapes(shapes, Two()) == {"input": X, "input1": Y}


@pytest.mark.parametrize("shapes, needle", [({"x": X, "input": X}, "input 0 twice (x and input)"),
                                            ({"y": Y}, "no shape for input 0 (x)"),
                                            ({"z": X}, "unknown input(s) ['z']")])
def test_a_shape_given_twice_or_out_of_reach_is_a_usage_error(shapes, needle):
    with pytest.raises(UsageError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        ordered_shapes(shapes, Two())


def test_forward_names_before_kwargs_count_and_args_do_not():
    assert forward_params(Keywords()) == ["pixel_values", "labels"]
    assert forward_params(Star()) is None
    assert ordered_shapes({"b": Y, "a": X}, Star()) == [Y, X]  # *args: in the order given


@pytest.mark.parametrize("names", [("x", "y"), ("input", "input1")])
def test_bench_takes_verify_s_names_for_onnxruntime_too(two, names, capsys):
    args = ["bench", str(two), "--trust-pickle", "--runtime", "onnxruntime", *QUICK, "--json",
            "--shape", f"{names[1]}={','.join(map(str, Y))}", "--shape", f"{names[0]}={','.join(map(str, X))}"]
    assert cli(args) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert [(i["name"], i["shape"]) for i in report["inputs"]] == [("input", X), ("input1", Y)]


def test_bench_data_named_like_the_forward_feeds_onnxruntime(two, tmp_path, capsys):
    data = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(data, y=rng.normal(size=Y).astype(np.float32), x=rng.normal(size=X).astype(np.float32))
    assert cli(["bench", str(two), "--trust-pickle", "--runtime", "onnxruntime", *QUICK, "--json",
                "--data", str(data)]) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert [(i["name"], i["shape"]) for i in report["inputs"]] == [("input", X), ("input1", Y)]


def test_verify_and_fuse_take_shapes_in_any_order(two, tmp_path, capsys):
    shapes = ["--shape", "y=2,5", "--shape", "x=2,3,8,8"]
    out = tmp_path / "two.onnx"
    assert cli(["fuse", str(two), "--trust-pickle", "-o", str(out), *shapes]) == 0
    assert cli(["verify", str(two), str(out), "--trust-pickle", *shapes]) == 0, capsys.readouterr().err
