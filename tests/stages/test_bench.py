"""`bnfold bench`: blocks of fresh sessions, the JSON shape, the verdict, --fail-below in every
direction, providers, and the torch runtime. Timings themselves are never asserted here (see
benchmarks/): where an outcome depends on them, the timing core is replaced by synthetic
block times."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from torch import nn

from bnfold.check.timing import BlockTimes, order_statistic_rank
from bnfold.cli import run as cli
from onnx_builders import bn_inits, bn_node, init, make_model, vi

VERDICTS = {"B faster", "B slower", "same within ±1 %", "cannot tell"}
QUICK = ["--runs", "6", "--blocks", "6", "--warmup", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    rng = np.random.default_rng(0)
    inits = [init("W", rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32))] + bn_inits("bn", 8, rng)
    nodes = [helper.make_node("Conv", ["input", "W"], ["z"], name="conv"), bn_node("z", "y")]
    model = make_model(nodes, [vi("input", ["N", 3, 8, 8])], [vi("y", None)], inits)
    path = tmp_path_factory.mktemp("bench") / "tiny.onnx"
    onnx.save(model, str(path))
    return path


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_cli_json_shape_and_statistics(tiny, capsys):
    assert cli(["bench", str(tiny), *QUICK, "--batch-size", "1,3", "--json"]) == 0
    report = _json(capsys)
    assert report["original"]["bn_nodes"] == 1 and report["fused"]["bn_nodes"] == 0
    assert report["fused"]["nodes"] == report["original"]["nodes"] - 1
    assert report["threads"] == 1 and report["threads_reason"] == "--threads 1" and report["runtimes"] == ["onnxruntime"]
    assert report["blocks"] == 6 and report["runs"] == 6 and report["seconds"] is None
    configs = {(r["provider"], r["level"], r["batch_size"]) for r in report["results"]}
    assert configs == {("cpu", lvl, n) for lvl in ("disabled", "default") for n in (1, 3)}
    for r in report["results"]:
        assert r["runtime"] == "onnxruntime" and r["clock"] == "thread cpu" and r["verdict"] in VERDICTS and r["why"]
        assert r["a"]["runs"] == r["b"]["runs"] == 6 and r["blocks"] == len(r["block_ratios"]) == 6
        logs = np.sort(np.log(r["block_ratios"]))  # the estimate and interval, recomputed here
        assert r["speedup"] == pytest.approx(math.exp(np.median(logs)))
        assert r["speedup_ci"] == pytest.approx([math.exp(logs[0]), math.exp(logs[-1])])  # 6 blocks: the extremes
        assert r["a"]["p10_ms"] <= r["a"]["median_ms"] <= r["a"]["p90_ms"] and r["spread_pct"] >= 0


def test_default_threads_are_chosen_and_said(tiny, capsys):
    assert cli(["bench", str(tiny), "--runs", "6", "--blocks", "6", "--warmup", "0", "--level", "disabled",
                "--json"]) == 0
    report = _json(capsys)
    assert 1 <= report["threads"] <= (os.cpu_count() or 1)
    assert "other runnable task" in report["threads_reason"] and f"{report['threads']} free" in report["threads_reason"]


def test_a_wall_clock_with_more_than_one_thread(tiny, capsys):
    assert cli(["bench", str(tiny), "--runs", "6", "--blocks", "6", "--warmup", "0", "--level", "disabled",
                "--threads", "2", "--json"]) == 0
    assert _json(capsys)["results"][0]["clock"] == "wall"


def test_human_report_says_verdict_spread_and_threads(tiny, capsys):
    assert cli(["bench", str(tiny), *QUICK, "--level", "disabled"]) == 0
    text = capsys.readouterr().out
    assert "verdict" in text and "spread" in text and "95 % interval" in text
    assert "1 thread(s) (--threads 1)" in text and "6 blocks with fresh sessions" in text
    assert "ort cpu disabled ×1:" in text


# -- --fail-below on synthetic block times -----------------------------------------------------


class FakeCore:
    """Stands in for time_blocks: one run per block per model, A = r_b and B = 1; a third
    model (A′, --aa-check) gets A / q_b, so that A/A′ = q_b (default: A′ = A)."""

    def __init__(self, ratios: list[float], aa: list[float] | None = None):
        self.ratios, self.aa = ratios, aa or [1.0] * len(ratios)

    def __call__(self, makers, plan, seed=0, progress=None) -> BlockTimes:
        runs = [[[r] for r in self.ratios], [[1.0] for _ in self.ratios], [[r / q] for r, q in zip(self.ratios, self.aa)]]
        return BlockTimes(runs[:len(makers)], [[0.001] * len(self.ratios)] * len(makers))


CLEAN_FASTER = [1.20 + 0.001 * i for i in range(20)]
CLEAN_SLOWER = [0.80 + 0.001 * i for i in range(20)]
STRADDLING = [0.99 + 0.001 * i for i in range(20)]  # x(6) … x(15) = 0.995 … 1.004
NOISY = list(np.random.default_rng(0).lognormal(0, 0.15, 20))  # around 1, ± over 5 %
WIDE_ABOVE = list(1.3 * np.random.default_rng(0).lognormal(0, 0.15, 20))  # ± over 5 %, but wholly above 1


@pytest.mark.parametrize("ratios, code, outcome", [
    (CLEAN_FASTER, 0, "pass"), (CLEAN_SLOWER, 1, "fail"), (STRADDLING, 2, "cannot tell"), (NOISY, 2, "cannot tell"),
    (WIDE_ABOVE, 0, "pass"),
])
def test_fail_below(tiny, monkeypatch, capsys, ratios, code, outcome):
    monkeypatch.setattr("bnfold.onnxfold.bench.time_blocks", FakeCore(ratios))
    assert cli(["bench", str(tiny), "--level", "disabled", "--threads", "1", "--fail-below", "1.0", "--json"]) == code
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["fail_below"] == 1.0 and report["fail_below_outcome"] == outcome
    assert report["results"][0]["fail_below"] == outcome
    if code:
        assert len(captured.err.strip().splitlines()) == 1
    if ratios is NOISY:
        assert report["results"][0]["verdict"] == "cannot tell" and "too noisy" in report["results"][0]["why"]
        assert "too noisy" in captured.err
    if ratios is STRADDLING:
        assert "straddles 1" in captured.err and "cannot tell" in captured.err
    if ratios is WIDE_ABOVE:
        r = report["results"][0]
        assert r["verdict"] == "B faster" and r["half_width_pct"] > 5 and r["speedup_ci"][0] > 1.01


AA_BIASED = [1.03 + 0.0005 * i for i in range(20)]  # A against a copy of A: 3 % apart, a machine making things up
AA_CLEAN = [0.999 + 0.0001 * i for i in range(20)]
SLIGHTLY_FASTER = [1.02 + 0.0005 * i for i in range(20)]  # 1.0225–1.027: clear, unless 3 % can be made up
SLIGHTLY_SLOWER = [0.97 + 0.0005 * i for i in range(20)]


@pytest.mark.parametrize("ratios, aa, code, outcome, verdict", [
    (CLEAN_SLOWER, AA_CLEAN, 1, "fail", "B slower"),
    (SLIGHTLY_FASTER, AA_CLEAN, 0, "pass", "B faster"),
    (SLIGHTLY_SLOWER, AA_CLEAN, 1, "fail", "B slower"),
    (SLIGHTLY_FASTER, AA_BIASED, 2, "cannot tell", "cannot tell"),  # the bias could have made it up
    (SLIGHTLY_SLOWER, AA_BIASED, 2, "cannot tell", "cannot tell"),
    (CLEAN_SLOWER, AA_BIASED, 1, "fail", "B slower"),  # 3 % cannot make up 20 %
    (CLEAN_FASTER, AA_BIASED, 0, "pass", "B faster"),
])
def test_aa_check_decides_whether_the_run_is_trusted(tiny, monkeypatch, capsys, ratios, aa, code, outcome, verdict):
    monkeypatch.setattr("bnfold.onnxfold.bench.time_blocks", FakeCore(ratios, aa))
    assert cli(["bench", str(tiny), "--level", "disabled", "--threads", "1", "--aa-check", "--fail-below", "1.0",
                "--json"]) == code
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    r = report["results"][0]
    assert report["aa_checked"] is True and r["verdict"] == verdict and r["fail_below"] == outcome
    assert r["aa_check"] == ("biased" if aa is AA_BIASED else "passed")
    assert r["aa_speedup"] == pytest.approx(math.exp(np.median(np.log(aa))))
    assert (r["decision_ci"] == r["speedup_ci"]) == (aa is AA_CLEAN)
    if aa is AA_BIASED:
        assert "widened" in r["why"] and r["aa_bias_pct"] > 3
    if code:
        assert len(captured.err.strip().splitlines()) == 1
        assert ("A/A check" in captured.err) == (aa is AA_BIASED)


@pytest.mark.parametrize("args, models", [
    ([], 2), (["--fail-below", "1.0"], 3), (["--fail-below", "1.0", "--no-aa-check"], 2), (["--aa-check"], 3),
])
def test_aa_check_is_on_by_default_under_fail_below(tiny, monkeypatch, capsys, args, models):
    core = CapturingCore()
    monkeypatch.setattr("bnfold.onnxfold.bench.time_blocks", core)
    assert cli(["bench", str(tiny), "--level", "disabled", "--threads", "1", "--json", *args]) == 0
    assert [len(m) for m in core.makers] == [models] and _json(capsys)["aa_checked"] is (models == 3)


def test_aa_check_times_a_fresh_copy_of_a_in_every_block(tiny, torch_files, monkeypatch, capsys):
    core = CapturingCore()
    monkeypatch.setattr("bnfold.onnxfold.bench.time_blocks", core)
    monkeypatch.setattr("bnfold.torchfold.bench.time_blocks", core)
    assert cli(["bench", str(tiny), "--level", "disabled", "--threads", "1", "--aa-check", "--json"]) == 0
    assert cli(["bench", str(torch_files["pickle"]), "--trust-pickle", "--runtime", "torch", "--shape",
                "input=2,3,8,8", "--threads", "1", "--aa-check", "--json"]) == 0
    for makers in core.makers:
        assert len(makers) == 3
        a, a2 = makers[0](), makers[2]()
        assert a is not a2 and type(a) is type(a2)  # a new runner of A, not B, not the same one
        if hasattr(a, "module"):
            assert a.module is not a2.module
            x = torch.randn(2, 3, 8, 8)
            torch.testing.assert_close(a.module(x), a2.module(x))
        else:
            assert a.sess is not a2.sess and a.sess._model_path == a2.sess._model_path
    capsys.readouterr()
    assert cli(["bench", str(tiny), "--level", "disabled", "--threads", "1", "--json"]) == 0
    assert len(core.makers[-1]) == 2 and _json(capsys)["results"][0]["aa_check"] is None


def test_fail_below_fails_when_any_result_is_below(tiny, monkeypatch, capsys):
    """One configuration clearly below and one that cannot tell: a known regression fails."""
    fakes = iter([FakeCore(CLEAN_SLOWER), FakeCore(STRADDLING)])
    monkeypatch.setattr("bnfold.onnxfold.bench.time_blocks", lambda *a, **k: next(fakes)(*a, **k))
    assert cli(["bench", str(tiny), "--threads", "1", "--fail-below", "1.0", "--json"]) == 1
    outcomes = [r["fail_below"] for r in _json(capsys)["results"]]
    assert outcomes == ["fail", "cannot tell"]


def test_the_synthetic_interval_is_the_order_statistics(tiny, monkeypatch, capsys):
    monkeypatch.setattr("bnfold.onnxfold.bench.time_blocks", FakeCore(CLEAN_FASTER))
    assert cli(["bench", str(tiny), "--level", "disabled", "--threads", "1", "--json"]) == 0
    r = _json(capsys)["results"][0]
    k = order_statistic_rank(20)
    assert k == 6 and r["speedup_ci"] == pytest.approx([CLEAN_FASTER[k - 1], CLEAN_FASTER[20 - k]])
    assert r["verdict"] == "B faster"


# -- options and providers ---------------------------------------------------------------------


@pytest.mark.parametrize("args, needle", [
    (["--provider", "cuda"], "onnxruntime-gpu"), (["--provider", "CUDAExecutionProvider"], "onnxruntime-gpu"),
    (["--provider", "tensorrt"], "TensorRT"), (["--provider", "openvino"], "onnxruntime-openvino"),
    (["--provider", "nosuch"], "unknown execution provider"), (["--level", "fastest"], "optimization level"),
    (["--batch-size", "one"], "--batch-size"), (["--batch-size", "1,,2"], "empty item"), (["--runs", "0"], "--runs"),
    (["--blocks", "5"], "--blocks"), (["--runs", "x"], "--runs"), (["--bogus"], "No such option"),
    (["--seconds", "1"], "give one"), (["--runtime", "torch"], "needs a torch checkpoint"),
    (["--runtime", "tvm"], "--runtime"), (["--torch-form", "onnx"], "--torch-form"),
    (["--torch-form", "torchscript"], "is ONNX"),
])
def test_bad_options_exit_2_one_line(tiny, args, needle, capsys, monkeypatch):
    monkeypatch.delenv("BNFOLD_DEBUG", raising=False)
    assert cli(["bench", str(tiny), "--runs", "3", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err and captured.out == ""
    assert needle in lines[0]


def test_missing_provider_from_the_command_line(tiny, bnfold_run):
    proc = bnfold_run(["bench", str(tiny), "--runs", "3", "--provider", "cuda"])
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "pip install onnxruntime-gpu" in proc.stderr


def test_fixed_batch_model_refuses_other_batch_sizes(tmp_path, capsys):
    rng = np.random.default_rng(0)
    inits = [init("W", rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32))] + bn_inits("bn", 8, rng)
    nodes = [helper.make_node("Conv", ["input", "W"], ["z"], name="conv"), bn_node("z", "y")]
    path = tmp_path / "fixed.onnx"
    onnx.save(make_model(nodes, [vi("input", [1, 3, 8, 8])], [vi("y", None)], inits), str(path))
    assert cli(["bench", str(path), "--batch-size", "4", "--runs", "2"]) == 2
    assert cli(["bench", str(path), "--batch-size", "1", *QUICK, "--level", "disabled", "--json"]) == 0
    onnx.save(make_model(nodes, [vi("input", [3, 3, 8, 8])], [vi("y", None)], inits), str(path))
    capsys.readouterr()
    assert cli(["bench", str(path), *QUICK, "--level", "disabled", "--json"]) == 0  # its own batch by default
    assert _json(capsys)["results"][0]["batch_size"] == 3
    assert cli(["bench", str(path), "--batch-size", "1", "--runs", "2"]) == 2


def test_a_non_cpu_provider_reports_node_placement(tiny, monkeypatch, capsys):
    """Placement is profiled for any provider but the CPU. This onnxruntime has none, so the CPU
    is made to look like another provider: every node then shows up as CPU fallback."""
    monkeypatch.setattr("bnfold.onnxfold.bench.provider_name", lambda name: "XnnpackExecutionProvider")
    assert cli(["bench", str(tiny), *QUICK, "--level", "disabled", "--json"]) == 0
    captured = capsys.readouterr()
    r = json.loads(captured.out)["results"][0]
    assert r["placement"] == {"A": {"CPUExecutionProvider": 2}, "B": {"CPUExecutionProvider": 1}}
    assert r["clock"] == "wall"  # only a CPU run is timed on the thread's CPU clock
    assert "2 of 2 nodes of A and 1 of 1 nodes of B ran on the CPU" in " ".join(captured.err.split())
    assert cli(["bench", str(tiny), *QUICK, "--level", "disabled"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "node placement ort cpu disabled ×1: A: 2 on CPUExecutionProvider; B: 1 on CPUExecutionProvider" in text


def test_cpu_fallback_of_a_gpu_provider_is_a_warning():
    from bnfold.onnxfold.bench import cpu_fallback
    from bnfold.report import BenchResult, Timing

    t = Timing(1.0, 0.9, 1.1, 1.0, 10, 5.0)
    r = BenchResult("cuda", "default", 1, t, t, 1.0, [0.99, 1.01],
                    placement={"A": {"CUDAExecutionProvider": 40, "CPUExecutionProvider": 3},
                               "B": {"CUDAExecutionProvider": 30}})
    assert cpu_fallback(r) == ("cuda default ×1: 3 of 43 nodes of A ran on the CPU (fallback), so this time is not "
                               "all cuda")
    r.placement = {"A": {"CUDAExecutionProvider": 40}, "B": {"CUDAExecutionProvider": 30}}
    assert cpu_fallback(r) is None


# -- the torch runtime -------------------------------------------------------------------------


def _conv_bn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 1.5)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torch_bench")
    model = _conv_bn()
    torch.save(model, folder / "conv_bn.pt")
    torch.jit.save(torch.jit.script(model), str(folder / "conv_bn.ts.pt"))
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 8, 8),)), str(folder / "conv_bn.pt2"))
    return {"model": model, "pickle": folder / "conv_bn.pt", "torchscript": folder / "conv_bn.ts.pt",
            "pt2": folder / "conv_bn.pt2"}


class CapturingCore:
    """Stands in for the timing core: keeps the makers it is given, returns clean block times."""

    def __init__(self):
        self.makers = []

    def __call__(self, makers, plan, seed=0, progress=None):
        self.makers.append(makers)
        return FakeCore(CLEAN_FASTER)(makers, plan)


@pytest.mark.parametrize("kind, forms, expected", [
    ("pickle", None, ["eager"]),
    ("pickle", "eager,torchscript", ["eager", "torchscript"]),
    ("torchscript", None, ["torchscript"]),
    ("pt2", None, ["export"]),
])
def test_torch_runtime_times_the_module_and_its_fold(torch_files, monkeypatch, capsys, kind, forms, expected):
    core = CapturingCore()
    monkeypatch.setattr("bnfold.torchfold.bench.time_blocks", core)
    args = ["bench", str(torch_files[kind]), "--trust-pickle", "--runtime", "torch", "--shape", "input=2,3,8,8",
            "--threads", "1", "--json"] + (["--torch-form", forms] if forms else [])
    assert cli(args) == 0
    report = _json(capsys)
    assert report["runtimes"] == ["torch"] and [r["level"] for r in report["results"]] == expected
    assert all(r["runtime"] == "torch" and r["provider"] == "cpu" and r["clock"] == "thread cpu"
               and r["batch_size"] == 2 for r in report["results"])  # the batch --shape gave, not --batch-size's 1
    assert report["original"]["bn_nodes"] == 1 and report["fused"]["bn_nodes"] == 0
    assert report["original"]["format"] == {"pickle": "torch-pickle", "torchscript": "torchscript",
                                            "pt2": "torch-export"}[kind]
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_out = torch_files["model"](x)
        for makers in core.makers:  # what was timed: the original and its fold, computing the same
            a, b = makers[0](), makers[1]()
            assert a.inputs[0].shape == (2, 3, 8, 8)
            torch.testing.assert_close(a.module(x), expected_out)
            torch.testing.assert_close(b.module(x), expected_out, rtol=1e-5, atol=1e-5)
            assert a.module is not makers[0]().module  # a fresh copy for every block


def test_torch_runtime_end_to_end_beside_onnxruntime(torch_files, capsys):
    assert cli(["bench", str(torch_files["pickle"]), "--trust-pickle", "--shape", "input=1,3,8,8", *QUICK,
                "--level", "disabled", "--json"]) == 0
    report = _json(capsys)
    assert report["runtimes"] == ["torch", "onnxruntime"]
    assert [(r["runtime"], r["level"]) for r in report["results"]] == [("torch", "eager"), ("onnxruntime", "disabled")]
    assert all(r["verdict"] in VERDICTS and len(r["block_ratios"]) == 6 for r in report["results"])
    assert any("folded" in n for n in report["notes"])


def test_pt2_by_default_times_torch_and_its_onnx_export(torch_files, capsys):
    assert cli(["bench", str(torch_files["pt2"]), "--batch-size", "2", *QUICK, "--level", "disabled", "--json"]) == 0
    report = _json(capsys)
    assert [(r["runtime"], r["level"], r["batch_size"]) for r in report["results"]] == [
        ("torch", "export", 2), ("onnxruntime", "disabled", 2)]
    # the program was exported at batch 2 and guards it: that is the default, and another batch size is refused up
    # front, naming the file, in either runtime
    assert cli(["bench", str(torch_files["pt2"]), *QUICK, "--level", "disabled", "--json"]) == 0
    assert {r["batch_size"] for r in _json(capsys)["results"]} == {2}
    for runtime in ("auto", "torch", "onnxruntime"):
        assert cli(["bench", str(torch_files["pt2"]), *QUICK, "--runtime", runtime, "--batch-size", "1"]) == 2
        err = capsys.readouterr().err
        assert "conv_bn.pt2" in err and "fixed batch size 2" in err and "--batch-size 2" in err
        assert len(err.strip().splitlines()) == 1


def test_shape_sets_the_batch_so_batch_sizes_collapse(tiny, capsys):
    assert cli(["bench", str(tiny), "--shape", "input=4,3,8,8", "--batch-size", "1,8", *QUICK, "--level",
                "disabled", "--provider", "cpu,cpu", "--json"]) == 0
    report = _json(capsys)
    assert [(r["provider"], r["batch_size"]) for r in report["results"]] == [("cpu", 4)]  # once, at --shape's batch
    assert any("--shape" in n for n in report["notes"])


def test_pt2_with_keyword_inputs_is_refused_naming_the_file(tmp_path, capsys):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x, *, scale):
            return self.bn(self.conv(x)) * scale

    program = torch.export.export(Scaled().eval(), (torch.randn(2, 3, 8, 8),), {"scale": torch.tensor(2.0)})
    torch.export.save(program, tmp_path / "kw.pt2")
    assert cli(["bench", str(tmp_path / "kw.pt2"), *QUICK, "--runtime", "torch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kw.pt2" in err[0] and "keyword inputs (scale)" in err[0]


def test_torch_runtime_refuses_forms_a_checkpoint_cannot_take(torch_files):
    assert cli(["bench", str(torch_files["torchscript"]), "--runtime", "torch", "--torch-form", "eager",
                "--shape", "input=1,3,8,8", "--runs", "2"]) == 2


def test_torch_cuda_missing_names_what_to_install(monkeypatch):
    from bnfold.errors import MissingProvider
    from bnfold.torchfold.bench import torch_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MissingProvider, match="CUDA build of torch"):
        torch_devices(["cuda"])
    assert torch_devices(["all"]) == ["cpu"] and torch_devices(["CPU"]) == ["cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert torch_devices(["all"]) == ["cpu", "cuda"] and torch_devices(["cuda"]) == ["cuda"]


def test_a_cuda_run_waits_for_the_gpu_and_is_timed_on_the_wall_clock(monkeypatch):
    """No GPU here: what a CUDA configuration relies on, checked piece by piece. Kernels are
    queued asynchronously, so a run must end with the GPU done, and the thread's CPU clock
    would miss GPU time."""
    from bnfold.check.timing import use_thread_clock
    from bnfold.torchfold.bench import ModuleRun

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: waited.append(True))
    ModuleRun(nn.Identity(), (torch.ones(1),), cuda=True)()
    ModuleRun(nn.Identity(), (torch.ones(1),), cuda=False)()
    assert waited == [True]
    assert not use_thread_clock(1, on_cpu=False) and not use_thread_clock(2, on_cpu=True)


class Embedder(nn.Module):
    """Integer ids in: a fold that guessed float inputs could not run it."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.bn = nn.Embedding(10, 8), nn.Linear(8, 6), nn.BatchNorm1d(6)

    def forward(self, ids):
        return self.bn(self.fc(self.emb(ids).mean(1)))


def test_integer_inputs_from_data_reach_the_fold_and_no_torch_traceback_leaks(tmp_path, capsys):
    torch.manual_seed(0)
    model = Embedder().eval()
    model.bn.running_mean.uniform_(-1, 1), model.bn.running_var.uniform_(0.5, 2)
    torch.save(model, tmp_path / "emb.pt")
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 10, (4, 5)).astype(np.int64))
    assert cli(["fuse", str(tmp_path / "emb.pt"), "--trust-pickle", "-o", str(tmp_path / "out.pt")]) == 0
    assert "Traceback" not in capsys.readouterr().err  # torch.fx's ShapeProp prints its own on a float guess
    assert cli(["bench", str(tmp_path / "emb.pt"), "--trust-pickle", "--data", str(tmp_path / "ids.npy"), *QUICK,
                "--level", "disabled", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "Traceback" not in captured.err and report["fused"]["bn_nodes"] == 0
    assert [(r["runtime"], r["batch_size"]) for r in report["results"]] == [("torch", 4), ("onnxruntime", 4)]


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(5, 4)

    def forward(self, x, v):
        return self.bn(self.conv(x)).mean((2, 3)) + self.fc(v)


def test_torch_data_goes_to_inputs_by_name_then_by_position(tmp_path, capsys):
    torch.manual_seed(0)
    model = TwoInputs().eval()
    model.bn.running_mean.uniform_(-1, 1), model.bn.running_var.uniform_(0.5, 2)
    torch.save(model, tmp_path / "two.pt")
    rng = np.random.default_rng(0)
    x, v = rng.normal(size=(3, 3, 8, 8)).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)
    np.savez(tmp_path / "named.npz", v=v, x=x)  # not in the forward's order
    np.savez(tmp_path / "positional.npz", x, v)
    np.savez(tmp_path / "wrong.npz", img=x, ids=v)
    for data in ("named", "positional"):
        assert cli(["bench", str(tmp_path / "two.pt"), "--trust-pickle", "--data", str(tmp_path / f"{data}.npz"),
                    "--runtime", "torch", *QUICK, "--json"]) == 0
        assert _json(capsys)["results"][0]["batch_size"] == 3
    assert cli(["bench", str(tmp_path / "two.pt"), "--trust-pickle", "--data", str(tmp_path / "wrong.npz"),
                "--runtime", "torch", *QUICK]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wrong.npz" in err[0] and "['ids', 'img']" in err[0] and "['x', 'v']" in err[0]
