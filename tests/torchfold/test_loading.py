"""Reading checkpoints as users have them and writing them back with nothing lost: prefixes,
_metadata, several weight sets, safetensors, -o suffixes, the torch report, the .pt2 pickle
check, TorchScript's graph-only parameters, and fuse_module leaving its input alone."""
from __future__ import annotations

import copy
import io
import json
import pickle
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from bnfold import fuse_module
from bnfold.cli import run as cli

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import lookalikes  # noqa: E402
import zoo  # noqa: E402
from test_checkpoints import assert_same_outputs, same_value  # noqa: E402


def small_cnn() -> nn.Module:
    """Conv-BN twice and a Linear head, for --arch tests/torchfold/test_loading:small_cnn."""
    return nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


ARCH = ["--arch", "test_loading:small_cnn"]
SHAPE = (3, 10, 10)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return zoo.fill_bn_stats(small_cnn(), SHAPE, steps=2, batch=6)


def run(args, capsys) -> tuple[int, str, str]:
    code = cli(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fuse_json(args, capsys) -> dict:
    code, out, err = run(["fuse", *args, "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


def refused(args, needle: str, folder: Path, capsys) -> str:
    """Exit 2, one line on stderr naming the problem, nothing written."""
    before = sorted(p.name for p in folder.iterdir())
    code, _, err = run(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert sorted(p.name for p in folder.iterdir()) == before
    return lines[0]


def from_state(state: dict, prefix: str = "") -> nn.Module:
    module = small_cnn()
    module.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=True)
    return module.eval()


def prefixed(state: OrderedDict, prefix: str) -> OrderedDict:
    out = OrderedDict((prefix + k, v) for k, v in state.items())
    out._metadata = OrderedDict(((prefix + k).rstrip("."), v) for k, v in state._metadata.items())
    return out


# -- prefixes and _metadata --------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "model.", "_orig_mod.", "module.", "model._orig_mod.", "module._orig_mod."])
def test_state_dict_prefix_is_found_and_kept(cnn, tmp_path, prefix, capsys):
    src = tmp_path / "sd.pt"
    saved = prefixed(cnn.state_dict(), prefix)
    torch.save(saved, src)
    report = fuse_json([str(src), *ARCH], capsys)
    assert len(report["folded"]) == 2 and report["skipped"] == []
    assert report["weight_sets"][0]["prefix"] == prefix
    fused = torch.load(report["output"], weights_only=True)
    assert list(fused) == list(saved) and fused._metadata == saved._metadata
    for key in ("4.num_batches_tracked", "8.weight", "8.bias", "1.num_batches_tracked"):
        assert same_value(saved[prefix + key], fused[prefix + key])
    assert fused[prefix + "1.weight"].eq(1).all() and fused[prefix + "4.bias"].eq(0).all()  # identities
    assert_same_outputs(from_state(fused, prefix), cnn, torch.randn(2, *SHAPE))


def test_no_prefix_fits_lists_the_candidates(cnn, tmp_path, capsys):
    src = tmp_path / "sd.pt"
    state = prefixed(cnn.state_dict(), "model.")
    state["model.extra.weight"] = torch.zeros(1)
    torch.save(state, src)
    line = refused(["fuse", str(src), *ARCH], "do not match --arch", tmp_path, capsys)
    assert "'model.'" in line and "''" in line and "model.extra.weight" not in line and "extra.weight" in line


class Versioned(nn.Module):
    """A module whose loader needs its version from _metadata (as torchvision's MNASNet does)."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        if local_metadata.get("version") != 2:
            raise ValueError("an MNASNet checkpoint of version 1 cannot be loaded")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def versioned() -> nn.Module:
    return Versioned()


def test_metadata_is_kept_so_a_versioned_loader_accepts_the_output(tmp_path, capsys):
    model = zoo.fill_bn_stats(Versioned(), SHAPE, steps=2, batch=6)
    src = tmp_path / "v.pt"
    torch.save({"state_dict": prefixed(model.state_dict(), "model."), "epoch": 7}, src)
    report = fuse_json([str(src), "--arch", "test_loading:versioned"], capsys)
    fused = torch.load(report["output"], weights_only=True)
    assert fused["epoch"] == 7 and fused["state_dict"]._metadata["model"] == {"version": 2}
    module = Versioned()
    state = OrderedDict((k[6:], v) for k, v in fused["state_dict"].items())
    state._metadata = OrderedDict((k[6:], v) for k, v in fused["state_dict"]._metadata.items())
    module.load_state_dict(state, strict=True)
    assert_same_outputs(module.eval(), model, torch.randn(2, *SHAPE))


# -- several weight sets in one file -----------------------------------------------------------


def test_every_fitting_state_dict_folds_and_the_rest_is_written_back(cnn, tmp_path, capsys):
    ema = copy.deepcopy(cnn)
    with torch.no_grad():
        ema[1].running_var.mul_(1.5)
    saved = {"epoch": 9, "state_dict": cnn.state_dict(), "state_dict_ema": prefixed(ema.state_dict(), "module."),
             "other_model": OrderedDict(w=torch.ones(2)), "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}
    src = tmp_path / "ckpt.pt"
    torch.save(saved, src)
    report = fuse_json([str(src), *ARCH], capsys)
    assert [w["name"] for w in report["weight_sets"]] == ["state_dict", "state_dict_ema"]
    assert len(report["folded"]) == 4 and {f["graph"] for f in report["folded"]} == {"state_dict", "state_dict_ema"}
    assert any("'other_model' does not fit --arch" in n for n in report["notes"])
    assert report["unchanged_keys"] == ["epoch", "other_model", "optimizer"]
    fused = torch.load(report["output"], weights_only=True)
    assert list(fused) == list(saved)
    for key in ("epoch", "other_model", "optimizer"):
        assert same_value(saved[key], fused[key])
    x = torch.randn(2, *SHAPE)
    assert_same_outputs(from_state(fused["state_dict"]), cnn, x)
    assert_same_outputs(from_state(fused["state_dict_ema"], "module."), ema, x)


def test_one_module_under_two_keys_folds_once(cnn, tmp_path, capsys):
    src = tmp_path / "last.pt"
    torch.save({"model": cnn, "ema": cnn, "epoch": 1}, src)
    report = fuse_json([str(src), "--trust-pickle"], capsys)
    assert [w["folded"] for w in report["weight_sets"]] == [2, 2]
    fused = torch.load(report["output"], weights_only=False)
    assert fused["model"] is fused["ema"] and fused["epoch"] == 1
    assert_same_outputs(fused["model"], cnn, torch.randn(2, *SHAPE))


def test_checkpoint_dicts_need_trust_and_state_dicts_need_arch(cnn, tmp_path, capsys):
    modules = tmp_path / "best.pt"
    torch.save({"model": cnn.half(), "train_args": {"imgsz": 10}}, modules)
    refused(["fuse", str(modules)], "--trust-pickle", tmp_path, capsys)
    states = tmp_path / "states.pt"
    torch.save({"state_dict": cnn.float().state_dict(), "epoch": 1}, states)
    refused(["fuse", str(states)], "--arch", tmp_path, capsys)


def test_tensors_saved_on_a_gpu_load_and_are_written_on_the_cpu(cnn, tmp_path, capsys):
    saved = tmp_path / "cpu.pt"
    torch.save(cnn.state_dict(), saved)
    src = tmp_path / "gpu.pt"  # the same file as a GPU machine writes it: storages located on cuda:0
    _rewrite_zip(saved, src, lambda name, data: data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
                 if name.endswith("data.pkl") else data)
    report = fuse_json([str(src), *ARCH], capsys)
    assert any("tensors saved on cuda:0 were loaded, folded and written on the CPU" in n for n in report["notes"])
    assert_same_outputs(from_state(torch.load(report["output"], weights_only=True)), cnn, torch.randn(2, *SHAPE))


# -- safetensors -------------------------------------------------------------------------------


def test_safetensors_in_and_out_with_metadata(cnn, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, str(src), metadata={"format": "pt", "x": "y"})
    report = fuse_json([str(src), *ARCH], capsys)
    assert report["format"] == "safetensors" and len(report["folded"]) == 2
    out = Path(report["output"])
    assert out.name == "model.fused.safetensors"
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt", "x": "y"}
        fused = {k: f.get_tensor(k) for k in f.keys()}
    assert_same_outputs(from_state(fused), cnn, torch.randn(2, *SHAPE))
    assert same_value(cnn.state_dict()["8.weight"], fused["8.weight"])


def _header(entries: dict) -> bytes:
    raw = json.dumps(entries).encode()
    return len(raw).to_bytes(8, "little") + raw


@pytest.mark.parametrize("case", ["length_past_end", "offsets_past_end", "bytes_do_not_match_shape"])
def test_bad_safetensors_is_exit_2(tmp_path, case, capsys):
    src = tmp_path / "bad.safetensors"
    if case == "length_past_end":
        src.write_bytes((10 ** 6).to_bytes(8, "little") + b'{"a": 1}')
        needle = "does not fit the file"
    elif case == "offsets_past_end":
        src.write_bytes(_header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}) + b"\0" * 8)
        needle = "do not fit"
    else:
        src.write_bytes(_header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}) + b"\0" * 8)
        needle = "for shape"
    refused(["fuse", str(src), *ARCH], needle, tmp_path, capsys)


# -- output format from -o, and the report -----------------------------------------------------


def test_output_suffix_sets_the_format(cnn, tmp_path, capsys):
    src = tmp_path / "m.pt"
    torch.save(cnn, src)
    dims = ["--shape", "input=2,3,10,10", "--trust-pickle"]
    report = fuse_json([str(src), "-o", str(tmp_path / "m.onnx"), *dims], capsys)
    onnx.checker.check_model(onnx.load(report["output"]))
    report = fuse_json([str(src), "-o", str(tmp_path / "m.pt2"), *dims], capsys)
    assert_same_outputs(torch.export.load(report["output"]).module(), cnn, torch.randn(2, *SHAPE))
    refused(["fuse", str(src), "-o", str(tmp_path / "x.onnx"), "--to", "pt2", *dims], "contradicts", tmp_path, capsys)
    refused(["fuse", str(src), "-o", str(tmp_path / "x.pt"), "--to", "onnx", *dims], "does not end in .onnx",
            tmp_path, capsys)


def test_pt2_to_onnx_runs_the_program_it_came_from(cnn, tmp_path, capsys):
    """torch.export's module refuses train()/eval(), which the legacy ONNX exporter calls."""
    src = tmp_path / "m.pt2"
    x = torch.randn(2, *SHAPE)
    torch.export.save(torch.export.export(cnn, (x,)), src)
    report = fuse_json([str(src), "-o", str(tmp_path / "m.onnx")], capsys)
    model = onnx.load(report["output"])
    onnx.checker.check_model(model)
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    import onnxruntime as ort

    sess = ort.InferenceSession(report["output"], providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), cnn(x))
    assert cli(["verify", str(src), report["output"]]) == 0


class TwoHeads(nn.Module):
    """Two inputs, two outputs, and a flatten by h.size(0): export turns the size into a
    sym_size that a tracer reads as a plain int."""

    def __init__(self, extra: str = ""):
        super().__init__()
        self.extra = extra
        self.c, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 6 * 6, 5)
        self.c2, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x, y):
        h = self.bn(self.c(x))
        out = self.fc(h.view(h.size(0), -1))
        if self.extra == "zeros":  # a size taken by an op the exporter can only read as an int
            out = out + torch.zeros(x.size(0), 1)
        if self.extra == "arange":  # … or cannot export at all once the size is traced
            out = out + torch.arange(x.shape[0]).view(-1, 1)
        return out, self.bn2(self.c2(y)).mean()


@pytest.mark.parametrize("dynamic, extra, batches_that_run", [
    (False, "", [2]), (True, "", [2, 1, 5]), (True, "zeros", [2]), (True, "arange", [2]),
])
def test_pt2_to_onnx_keeps_the_programs_dynamic_batch(tmp_path, capsys, dynamic, extra, batches_that_run):
    torch.manual_seed(0)
    model = TwoHeads(extra).eval()
    for bn in (model.bn, model.bn2):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    args = (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8))
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, args, dynamic_shapes=({0: batch}, {0: batch}) if dynamic else None)
    torch.export.save(program, tmp_path / "m.pt2")
    report = fuse_json([str(tmp_path / "m.pt2"), "-o", str(tmp_path / "m.onnx")], capsys)
    import onnxruntime as ort

    sess = ort.InferenceSession(report["output"], providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert [i.shape[0] for i in sess.get_inputs()] == (["batch"] * 2 if batches_that_run != [2] else [2, 2])
    for n in batches_that_run:
        x, y = torch.randn(n, 3, 8, 8), torch.randn(n, 3, 8, 8)
        got = sess.run(None, dict(zip(names, (x.numpy(), y.numpy()))))
        with torch.no_grad():
            expected = model(x, y)
        for g, e in zip(got, expected):
            torch.testing.assert_close(torch.from_numpy(g).reshape(e.shape), e)
    assert any("keeps the program's input shapes fixed" in n for n in report["notes"]) == (dynamic and bool(extra))
    if extra == "arange":  # bench: torch times every batch asked for, onnxruntime the one its export takes
        assert cli(["bench", str(tmp_path / "m.pt2"), "--batch-size", "1,2", "--runs", "6", "--blocks", "6",
                    "--warmup", "0", "--threads", "1", "--level", "disabled", "--json"]) == 0
        bench = json.loads(capsys.readouterr().out)
        assert [(r["runtime"], r["batch_size"]) for r in bench["results"]] == [
            ("torch", 1), ("torch", 2), ("onnxruntime", 2)]
        assert any("timed in torch only" in n for n in bench["notes"])


def test_report_says_what_happened(cnn, tmp_path, capsys):
    src = tmp_path / "sd.pt"
    torch.save({"state_dict": cnn.state_dict(), "epoch": 3}, src)
    code, out, err = run(["fuse", str(src), *ARCH], capsys)
    text = " ".join(out.split())
    assert code == 0, err
    assert "folded 2 of 2 BNs (kept as identity so the state_dict loads strictly)" in text
    assert "weight set 'state_dict' (state_dict, float32)" in text and "written back unchanged: epoch" in text
    assert "nodes" not in text and "BN 2 → 2" not in text


# -- torch.export archives with pickles --------------------------------------------------------


class Payload:
    """Unpickling this writes a file: the side effect a malicious checkpoint would have."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def _rewrite_zip(src: Path, dst: Path, change) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            zout.writestr(item, change(item.filename, zin.read(item.filename)))


@pytest.mark.parametrize("where", ["weights_config", "sample_inputs"])
def test_pt2_with_a_pickle_is_refused_without_running_it(cnn, tmp_path, where, capsys):
    clean = tmp_path / "clean.pt2"
    torch.export.save(torch.export.export(cnn, (torch.randn(2, *SHAPE),)), str(clean))
    marker = tmp_path / "marker.txt"
    evil = io.BytesIO()
    torch.save(Payload(marker), evil)

    def change(name: str, data: bytes) -> bytes:
        if where == "weights_config" and name.endswith("model_weights_config.json"):
            config = json.loads(data)
            config["config"]["0.weight"]["use_pickle"] = True
            return json.dumps(config).encode()
        if where == "weights_config" and name.endswith("data/weights/" + _weight_file(clean, "0.weight")):
            return evil.getvalue()
        if where == "sample_inputs" and name.endswith("sample_inputs/model.pt"):
            return evil.getvalue()
        return data

    src = tmp_path / "evil.pt2"
    _rewrite_zip(clean, src, change)
    clean.unlink()
    line = refused(["fuse", str(src)], "--trust-pickle", tmp_path, capsys)
    assert ("model_weights_config.json (0.weight)" if where == "weights_config" else "sample_inputs/model.pt") in line
    assert not marker.exists()


def _weight_file(pt2: Path, fqn: str) -> str:
    with zipfile.ZipFile(pt2) as z:
        name = next(n for n in z.namelist() if n.endswith("model_weights_config.json"))
        return json.loads(z.read(name))["config"][fqn]["path_name"]


# -- TorchScript: everything from the graph ----------------------------------------------------


class OddEps(nn.Module):
    """Non-default eps and momentum, Linear → BatchNorm1d, a bias-less conv."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5, eps=1e-1, momentum=0.3)
        self.fc, self.bn1 = nn.Linear(5, 7), nn.BatchNorm1d(7, eps=0.5)

    def forward(self, x):
        return self.bn1(self.fc(self.bn(self.conv(x)).mean((2, 3))))


@pytest.mark.parametrize("how", ["trace", "script"])
def test_torchscript_takes_eps_from_the_graph_and_folds_linear_bn1d(tmp_path, how, capsys):
    model = zoo.fill_bn_stats(OddEps(), SHAPE, steps=2, batch=6)
    x = torch.randn(2, *SHAPE)
    module = torch.jit.trace(copy.deepcopy(model), x) if how == "trace" else torch.jit.script(copy.deepcopy(model))
    if how == "trace":
        assert not hasattr(module.bn, "eps")  # a traced BN has its eps only in the graph
    src = tmp_path / "m.pt"
    torch.jit.save(module, str(src))
    report = fuse_json([str(src)], capsys)
    assert sorted((f["bn"], f["pattern"]) for f in report["folded"]) == [("bn", "Conv2d"), ("bn1", "Linear")]
    fused = torch.jit.load(report["output"])
    assert not fused.inlined_graph.findAllNodes("aten::batch_norm", True)
    assert_same_outputs(fused, model, torch.randn(4, *SHAPE))


class EmbeddingLinearBN(nn.Module):
    """Token ids → Embedding → Linear → BatchNorm1d: the first layer says nothing of the input."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.bn = nn.Embedding(10, 6), nn.Linear(6, 4), nn.BatchNorm1d(4)

    def forward(self, ids):
        return self.bn(self.fc(self.emb(ids)))


def test_scripted_linear_bn1d_folds_only_when_the_rank_can_be_established(tmp_path, capsys):
    model = EmbeddingLinearBN()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    model.eval()
    src = tmp_path / "e.pt"
    torch.jit.save(torch.jit.script(model), str(src))
    report = fuse_json([str(src), "-o", str(tmp_path / "guess.pt")], capsys)
    assert report["folded"] == [] and "rank of the Linear output is unknown" in report["skipped"][0]["reason"]
    ids = tmp_path / "ids.npy"
    np.save(ids, np.array([1, 2, 3], dtype=np.int64))
    report = fuse_json([str(src), "--example-input", str(ids)], capsys)
    assert [f["pattern"] for f in report["folded"]] == ["Linear"]
    assert_same_outputs(torch.jit.load(report["output"]), model, torch.tensor([4, 5, 6, 7]))


def test_scripted_rank3_linear_bn1d_is_kept(tmp_path, capsys):
    model = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5)).eval()
    src = tmp_path / "r3.pt"
    torch.jit.save(torch.jit.script(model), str(src))
    report = fuse_json([str(src), "--shape", "input=2,5,5"], capsys)
    assert report["folded"] == [] and "rank 3" in report["skipped"][0]["reason"]


@pytest.mark.parametrize("how", ["trace", "script"])
def test_bn_subclass_with_activation_is_cut_inside_its_own_graph(tmp_path, how, capsys):
    model = zoo.fill_bn_stats(lookalikes.ConvNormAct(3, 6, 3), SHAPE, steps=2, batch=6)
    x = torch.randn(2, *SHAPE)
    module = torch.jit.trace(copy.deepcopy(model), x) if how == "trace" else torch.jit.script(copy.deepcopy(model))
    src = tmp_path / "cna.pt"
    torch.jit.save(module, str(src))
    report = fuse_json([str(src)], capsys)
    assert [f["bn"] for f in report["folded"]] == ["bn"] and report["identity_bns"] == 0
    fused = torch.jit.load(report["output"])
    assert not fused.inlined_graph.findAllNodes("aten::batch_norm", True)
    assert fused.inlined_graph.findAllNodes("aten::relu_", True)  # the activation inside the BN stays
    assert_same_outputs(fused, model, x)


# -- fuse_module leaves its input alone --------------------------------------------------------


def test_fuse_module_does_not_change_the_module_passed_in():
    model, shape = lookalikes.build("levit")
    before = pickle.dumps(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fused, report = fuse_module(model)
    assert len(report.folded) == 12
    assert pickle.dumps(model) == before  # no Proxy or FakeTensor cached on it by tracing
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(m.attention_bias_cache == {} for m in fused.modules() if isinstance(m, lookalikes.LevitAttention))
    pickle.dumps(fused)
    scripted = torch.jit.script(copy.deepcopy(model))
    graph = str(scripted.inlined_graph)
    fuse_module(scripted)
    assert str(scripted.inlined_graph) == graph
    assert_same_outputs(scripted, model, torch.randn(2, *shape))
