"""`bnfold bench`: interleaving, JSON shape, provider errors, a smoke run through the CLI.
Timings themselves are never asserted here (see benchmarks/)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import importlib

# `bnfold.bench` the package attribute is the API function; the module is reached by name.
bench_mod = importlib.import_module("bnfold.check.timing")
from bnfold.cli import run as cli
from onnx_builders import bn_inits, bn_node, init, make_model, vi
from onnx import helper


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    rng = np.random.default_rng(0)
    inits = [init("W", rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32))] + bn_inits("bn", 8, rng)
    nodes = [helper.make_node("Conv", ["input", "W"], ["z"], name="conv"), bn_node("z", "y")]
    model = make_model(nodes, [vi("input", ["N", 3, 8, 8])], [vi("y", None)], inits)
    path = tmp_path_factory.mktemp("bench") / "tiny.onnx"
    import onnx

    onnx.save(model, str(path))
    return path


def test_cli_smoke_json_shape(tiny, capsys):
    assert cli(["bench", str(tiny), "--runs", "6", "--warmup", "1", "--threads", "1", "--batch-size", "1,3",
                "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["original"]["bn_nodes"] == 1 and report["fused"]["bn_nodes"] == 0
    assert report["fused"]["nodes"] == report["original"]["nodes"] - 1 and report["threads"] == 1
    configs = {(r["provider"], r["level"], r["batch_size"]) for r in report["results"]}
    assert configs == {("cpu", lvl, n) for lvl in ("disabled", "default") for n in (1, 3)}
    for r in report["results"]:
        assert r["a"]["runs"] == r["b"]["runs"] == 6
        lo, hi = r["speedup_ci"]
        assert lo <= hi and r["speedup"] == pytest.approx(r["a"]["median_ms"] / r["b"]["median_ms"])
        assert r["a"]["p10_ms"] <= r["a"]["median_ms"] <= r["a"]["p90_ms"]


def test_runs_are_interleaved(tiny, monkeypatch):
    """Record which session runs when: A and B alternate, rotating who goes first."""
    calls: list[str] = []
    real_session = bench_mod.session

    class Recorder:
        def __init__(self, inner, tag):
            self.inner, self.tag = inner, tag

        def get_outputs(self):
            return self.inner.get_outputs()

        def run(self, names, feeds):
            calls.append(self.tag)
            return self.inner.run(names, feeds)

    tags = iter("ABAB")
    monkeypatch.setattr(bench_mod, "session", lambda *a, **k: Recorder(real_session(*a, **k), next(tags)))
    feeds = {"input": np.zeros((1, 3, 8, 8), np.float32)}
    bench_mod.time_interleaved([tiny, tiny], feeds, "cpu", "disabled", 1, warmup=0, runs=4, seconds=None)
    assert "".join(calls) == "AB" + "ABBAABBA"  # one checked run each, then the rotated rounds


def test_fail_below_exits_1(tiny, capsys):
    assert cli(["bench", str(tiny), str(tiny), "--runs", "5", "--warmup", "0", "--level", "disabled",
                "--fail-below", "1000", "--json"]) == 1


@pytest.mark.parametrize("args", [["--provider", "cuda"], ["--provider", "nosuch"], ["--level", "fastest"],
                                  ["--batch-size", "one"], ["--runs", "1"]])
def test_bad_options_exit_2_one_line(tiny, args):
    exe = Path(sys.executable).with_name("bnfold")
    env = {k: v for k, v in os.environ.items() if k != "BNFOLD_DEBUG"}
    proc = subprocess.run([str(exe), "bench", str(tiny), "--runs", "3", *args], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    if args[1] == "cuda":
        assert "onnxruntime-gpu" in lines[0]


def test_fixed_batch_model_refuses_other_batch_sizes(tmp_path):
    import onnx

    rng = np.random.default_rng(0)
    inits = [init("W", rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32))] + bn_inits("bn", 8, rng)
    nodes = [helper.make_node("Conv", ["input", "W"], ["z"], name="conv"), bn_node("z", "y")]
    path = tmp_path / "fixed.onnx"
    onnx.save(make_model(nodes, [vi("input", [1, 3, 8, 8])], [vi("y", None)], inits), str(path))
    assert cli(["bench", str(path), "--batch-size", "4", "--runs", "2"]) == 2
    assert cli(["bench", str(path), "--batch-size", "1", "--runs", "2", "--warmup", "0", "--json"]) == 0
