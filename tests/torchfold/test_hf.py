"""Hugging Face save_pretrained folders through `bnfold fuse`, `verify` and `calibrate`: tiny
transformers ResNet and MobileNetV2 built from a config (examples/hf_folders.py), saved as
model.safetensors, as shards with an index, and as pytorch_model.bin.

The fused folder is judged by transformers itself: `from_pretrained` must load it with no
missing, unexpected or mismatched key, and its logits must equal the unfused model's
(torch.testing). The ONNX output must hold no BatchNormalization and match in onnxruntime.
Hostile folders (shard names leading out, links out, deep JSON, code in the folder) are exit 2
with nothing read from outside the folder; those run without transformers too."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file

from bnfold.cli import run as cli

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import hf_folders  # noqa: E402

try:
    import transformers
except ImportError:  # the hostile-folder tests below need no transformers
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="transformers (bnfold[hf]) is not installed")
RESNET_BNS = 8


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """The model, its folder in every layout, and its logits on a fixed input."""
    model = hf_folders.build("resnet")
    base = tmp_path_factory.mktemp("hf")
    folders = {layout: hf_folders.save(model, base / f"resnet-{layout}", layout) for layout in hf_folders.LAYOUTS}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x).logits
    return folders, x, logits


def load_back(folder: Path):
    """The folder as transformers loads it, strictly: no key missing, unexpected or mismatched."""
    model, info = transformers.AutoModelForImageClassification.from_pretrained(folder, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    return model.eval()


def folder_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each weight file's tensors, by file."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {p.name: load_file(p) if p.suffix == ".safetensors" else torch.load(p, weights_only=True) for p in files}


@needs_hf
@pytest.mark.parametrize("layout", hf_folders.LAYOUTS)
def test_fused_folder_loads_strictly_and_computes_the_same(resnet, layout, tmp_path, capsys):
    folders, x, expected = resnet
    src, out = folders[layout], tmp_path / "out"
    before = digest(src)
    assert cli(["fuse", str(src), "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["folded"]) == RESNET_BNS and report["skipped"] == [] and report["identity_bns"] == RESNET_BNS
    assert any("from_pretrained rebuilds the original architecture" in n for n in report["notes"])
    assert digest(src) == before  # the input is never written
    # same files; everything but the weights byte for byte; each weight file the same keys, order, dtypes
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    after = digest(out)
    assert {n: h for n, h in after.items() if n.endswith(".json")} == \
        {n: h for n, h in before.items() if n.endswith(".json")}
    theirs, ours = folder_tensors(src), folder_tensors(out)
    assert {f: [(k, t.dtype, t.shape) for k, t in ts.items()] for f, ts in ours.items()} == \
        {f: [(k, t.dtype, t.shape) for k, t in ts.items()] for f, ts in theirs.items()}
    model = load_back(out)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == RESNET_BNS and all(torch.equal(b.weight, torch.ones_like(b.weight)) for b in bns)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-4, atol=1e-5)


@needs_hf
def test_onnx_output_has_no_bn_and_matches_in_onnxruntime(resnet, tmp_path):
    folders, x, expected = resnet
    dst = tmp_path / "resnet.onnx"
    assert cli(["fuse", str(folders["safetensors"]), "-o", str(dst)]) == 0
    model = onnx.load(str(dst))
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)


@needs_hf
def test_default_output_is_replaced_on_a_rerun_and_verifies(resnet, tmp_path):
    src = tmp_path / "resnet"
    shutil.copytree(resnet[0]["sharded"], src)
    assert cli(["fuse", str(src)]) == 0
    assert cli(["fuse", str(src)]) == 0  # an earlier run's output holds only files this one writes
    assert cli(["verify", str(src), str(tmp_path / "resnet.fused")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet", "resnet.fused"]  # no staging debris


@needs_hf
def test_output_folder_with_other_files_is_refused(resnet, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli(["fuse", str(resnet[0]["safetensors"]), "-o", str(out)]) == 2
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@needs_hf
def test_the_python_route_removes_every_bn(resnet):
    """README: bnfold.fuse_module on what from_pretrained returns is the eager model without BNs."""
    import bnfold

    folders, x, expected = resnet
    model = transformers.AutoModelForImageClassification.from_pretrained(folders["safetensors"]).eval()
    folded, report = bnfold.fuse_module(model)
    assert len(report.folded) == RESNET_BNS
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x).logits, expected, rtol=1e-4, atol=1e-5)


@needs_hf
def test_calibrated_folder_loads_strictly(resnet, tmp_path):
    folders, x, _ = resnet
    data = tmp_path / "calib.npz"
    np.savez(data, pixel_values=np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "calibrated"
    args = ["calibrate", str(folders["safetensors"]), "--data", str(data), "--batch-size", "4", "-o", str(out)]
    assert cli(args) == 0
    model, original = load_back(out), load_back(folders["safetensors"])
    stats = [(a.running_mean, b.running_mean) for a, b in zip(model.modules(), original.modules())
             if isinstance(a, torch.nn.BatchNorm2d)]
    assert len(stats) == RESNET_BNS and not any(torch.equal(a, b) for a, b in stats)


@needs_hf
def test_hugging_face_cache_snapshot_links_into_its_blobs(resnet, tmp_path):
    """The cache keeps a snapshot's files as links to ../../blobs/HASH: read, not refused."""
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for i, p in enumerate(sorted(resnet[0]["safetensors"].iterdir())):
        shutil.copyfile(p, repo / "blobs" / f"{i:040d}")
        os.symlink(f"../../blobs/{i:040d}", snapshot / p.name)
    out = tmp_path / "out"
    assert cli(["fuse", str(snapshot), "-o", str(out)]) == 0
    load_back(out)


@needs_hf
def test_remote_code_is_refused_and_never_run(resnet, tmp_path, capsys):
    src = tmp_path / "custom"
    shutil.copytree(resnet[0]["safetensors"], src)
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="tinynet", architectures=["TinyNetForImageClassification"],
                  auto_map={"AutoModelForImageClassification": "modeling_tinynet.TinyNetForImageClassification"})
    (src / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (src / "modeling_tinynet.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    assert cli(["fuse", str(src), "-o", str(tmp_path / "out")]) == 2
    assert "auto_map" in capsys.readouterr().err and not marker.exists()


@needs_hf
@pytest.mark.slow
def test_mobilenet_v2_folder(tmp_path):
    """MobileNetV2's TF-style padding defeats torch.fx: its BNs are found in the torch.export graph."""
    model = hf_folders.build("mobilenet_v2")
    src = hf_folders.save(model, tmp_path / "mobilenet", "safetensors")
    out = tmp_path / "out"
    assert cli(["fuse", str(src), "-o", str(out)]) == 0
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(load_back(out)(x).logits, model(x).logits, rtol=1e-4, atol=1e-5)


# -- hostile or unusable folders: no transformers needed ------------------------------------------


def plain_folder(path: Path, shards: int = 1) -> Path:
    """A folder as save_pretrained writes one, made without transformers (its weights never load)."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "resnet", "architectures": ["ResNetModel"]}))
    tensors = {f"w{i}": torch.ones(2) for i in range(shards)}
    if shards == 1:
        save_file(tensors, path / "model.safetensors")
        return path
    names = {k: f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i, k in enumerate(tensors)}
    for key, name in names.items():
        save_file({key: tensors[key]}, path / name)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": names}))
    return path


def index_pointing_to(folder: Path, key: str, name: str) -> None:
    index = folder / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"][key] = name
    index.write_text(json.dumps(doc))


def test_missing_transformers_names_the_extra(tmp_path, monkeypatch, capsys):
    src = plain_folder(tmp_path / "m")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers → ImportError
    assert cli(["fuse", str(src)]) == 2
    assert "pip install 'bnfold[hf]'" in capsys.readouterr().err
    assert not (tmp_path / "m.fused").exists()


@pytest.mark.parametrize("case", ["dotdot", "absolute", "link_out", "wrong_keys", "deep_config"])
def test_hostile_folder_is_refused(tmp_path, capsys, case):
    secret = tmp_path / "secret.safetensors"
    save_file({"w1": torch.full((2,), 7.0)}, secret)
    src = plain_folder(tmp_path / "m", shards=2)
    if case == "dotdot":
        index_pointing_to(src, "w1", "../secret.safetensors")
    elif case == "absolute":
        index_pointing_to(src, "w1", str(secret))
    elif case == "link_out":
        (src / "model-00002-of-00002.safetensors").unlink()
        os.symlink(secret, src / "model-00002-of-00002.safetensors")
    elif case == "wrong_keys":
        index_pointing_to(src, "w1", "model-00001-of-00002.safetensors")
    else:
        (src / "config.json").write_text("[" * 10000 + "]" * 10000)
    before = digest(src)
    assert cli(["fuse", str(src), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and digest(src) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bnfold")] == []


def test_folder_usage_errors(tmp_path, capsys):
    src = plain_folder(tmp_path / "m")
    assert cli(["fuse", str(src), "--in-place"]) == 2
    assert cli(["fuse", str(src), "-o", str(src / "inside")]) == 2
    assert cli(["fuse", str(src), "--arch", "x:y"]) == 2
    assert cli(["fuse", str(src / "model.safetensors")]) == 2  # the weights alone: pass the folder
    assert cli(["fuse", str(src), "-o", str(src / "model.onnx")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "never rewritten in place" in err[0] and "inside it" in err[1] and "--arch is not used" in err[2]
    assert "pass the folder" in err[3] and "inside the input folder" in err[4]
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "model.safetensors"]


def test_a_timm_folder_is_told_apart_and_given_its_arch(tmp_path, capsys):
    """timm's hub folders hold config.json too ({"architecture": NAME}): no transformers needed,
    and the message names the --arch that builds it."""
    src = tmp_path / "timm"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architecture": "resnet50", "num_classes": 1000}))
    save_file({"w": torch.ones(2)}, src / "model.safetensors")
    assert cli(["fuse", str(src)]) == 2
    assert cli(["fuse", str(src / "model.safetensors")]) == 2
    err = capsys.readouterr().err.splitlines()
    arch = """--arch timm:create_model --arch-kwargs '{"model_name": "resnet50"}'"""
    assert "not a transformers folder" in err[0] and arch in err[0] and arch in err[1]
