"""`bnfold fuse` through the command line: trained example models, files, bad input."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnfold.cli import run as cli
from onnx_builders import bn_count, run

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import make_examples  # noqa: E402


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    out = tmp_path_factory.mktemp("examples")
    paths = {}
    for name, (build, shape) in make_examples.EXAMPLES.items():
        model = make_examples.train(build(), shape, steps=5)
        paths[name] = (make_examples.export(model, shape, out / f"{name}.onnx"), shape)
    return paths


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bns(path: Path) -> int:
    return bn_count(onnx.load(str(path)))


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_examples_fuse_end_to_end(examples, name, tmp_path, capsys):
    src, shape = examples[name]
    dst = tmp_path / f"{name}.out.onnx"
    digest = _digest(src)
    assert cli(["fuse", str(src), "-o", str(dst), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["output"] == str(dst) and len(report["folded"]) == _bns(src) > 0
    assert report["skipped"] == [] and report["nodes_after"] == report["nodes_before"] - len(report["folded"])
    assert _bns(dst) == 0 and _digest(src) == digest
    onnx.checker.check_model(str(dst), full_check=True)
    x = np.random.default_rng(0).normal(0, 1, (4, *shape)).astype(np.float32)
    expected, got = run(onnx.load(str(src)), {"input": x})[0], run(onnx.load(str(dst)), {"input": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_console_script_default_output_and_human_report(examples, tmp_path):
    src = tmp_path / "cnn.onnx"
    src.write_bytes(examples["cnn"][0].read_bytes())
    exe = Path(sys.executable).with_name("bnfold")
    proc = subprocess.run([str(exe), "fuse", str(src)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cnn.fused.onnx").exists()
    assert "folded 5 BatchNormalization" in proc.stdout and "ConvTranspose" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.fused.onnx", "cnn.onnx"]


def test_refuses_to_overwrite_input_unless_in_place(examples, tmp_path, capsys):
    src = tmp_path / "m.onnx"
    src.write_bytes(examples["mlp"][0].read_bytes())
    digest = _digest(src)
    assert cli(["fuse", str(src), "-o", str(src)]) == 2
    assert "--in-place" in capsys.readouterr().err and _digest(src) == digest
    assert cli(["fuse", str(src), "--in-place", "--json"]) == 0
    capsys.readouterr()
    assert _bns(src) == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_external_data_stays_external(examples, tmp_path, capsys):
    model = onnx.load(str(examples["cnn"][0]))
    src = tmp_path / "ext.onnx"
    onnx.save(onnx.load(str(examples["cnn"][0])), str(src), save_as_external_data=True, location="ext.weights",
              size_threshold=0)
    assert cli(["fuse", str(src), "--json"]) == 0
    capsys.readouterr()
    dst = tmp_path / "ext.fused.onnx"
    assert (tmp_path / "ext.fused.onnx.data").exists()
    assert dst.stat().st_size < 20_000  # weights are not inline
    onnx.checker.check_model(str(dst))
    x = np.random.default_rng(1).normal(0, 1, (2, 3, 32, 32)).astype(np.float32)
    fused = onnx.load(str(dst))  # loads external data from beside the file
    np.testing.assert_allclose(run(fused, {"input": x})[0], run(model, {"input": x})[0], rtol=1e-4, atol=1e-5)


def _bad_inputs(tmp: Path, good: Path) -> dict[str, Path]:
    data = good.read_bytes()
    cases = {
        "empty": (tmp / "empty.onnx", b""),
        "random": (tmp / "random.onnx", np.random.default_rng(0).bytes(4096)),
        "truncated": (tmp / "truncated.onnx", data[: len(data) // 3]),
        "text": (tmp / "notes.onnx", b"this is not a model\n" * 20),
        "unknown_suffix": (tmp / "weights.bin", b"\x00\x01garbage" * 50),
    }
    paths = {}
    for key, (path, payload) in cases.items():
        path.write_bytes(payload)
        paths[key] = path
    paths["directory"] = tmp / "adir"
    paths["directory"].mkdir()
    paths["missing"] = tmp / "missing.onnx"
    ext = tmp / "ext_missing.onnx"
    onnx.save(onnx.load(str(good)), str(ext), save_as_external_data=True, location="gone.data", size_threshold=0)
    (tmp / "gone.data").unlink()
    paths["external_data_missing"] = ext
    return paths


BAD = ["empty", "random", "truncated", "text", "unknown_suffix", "directory", "missing", "external_data_missing"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_one_line_exit_2_no_output(examples, tmp_path, kind, bnfold_run):
    path = _bad_inputs(tmp_path, examples["mlp"][0])[kind]
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = bnfold_run(["fuse", str(path)])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_debug_env_shows_traceback_and_keeps_the_exit_code(tmp_path):
    """A CI job with debugging on must not read bad input (2) as a failed gate (1)."""
    exe = Path(sys.executable).with_name("bnfold")
    proc = subprocess.run([str(exe), "fuse", str(tmp_path / "nope.onnx")], capture_output=True, text=True,
                          env={**os.environ, "BNFOLD_DEBUG": "1"}, timeout=120)
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "nope.onnx" in proc.stderr.splitlines()[-1]


@pytest.mark.parametrize("error, code, needle", [
    (RuntimeError("boom"), 3, "internal error"), (MemoryError(), 2, "out of memory"),
])
def test_internal_errors_and_memory_keep_their_codes_with_or_without_debug(monkeypatch, capsys, tmp_path, error,
                                                                         code, needle):
    def explode(*args, **kwargs):
        raise error

    monkeypatch.setattr("bnfold.cli.fuse.fuse_file", explode)
    (tmp_path / "m.onnx").write_bytes(b"not read: fuse_file raises first")
    for debug in (False, True):
        if debug:
            monkeypatch.setenv("BNFOLD_DEBUG", "1")
        else:
            monkeypatch.delenv("BNFOLD_DEBUG", raising=False)
        assert cli(["fuse", str(tmp_path / "m.onnx")]) == code
        err = capsys.readouterr().err
        assert needle in err.strip().splitlines()[-1] and ("Traceback" in err) == debug


def test_output_keeps_opset_ir_metadata_and_io_names(examples, tmp_path, capsys):
    model = onnx.load(str(examples["cnn"][0]))
    onnx.helper.set_model_props(model, {"author": "bnfold-test", "license": "MIT"})
    model.doc_string = "trained example"
    src, dst = tmp_path / "meta.onnx", tmp_path / "meta.fused.onnx"
    onnx.save(model, str(src))
    assert cli(["fuse", str(src), "--json"]) == 0
    capsys.readouterr()
    out = onnx.load(str(dst))
    assert {p.key: p.value for p in out.metadata_props} == {"author": "bnfold-test", "license": "MIT"}
    assert out.doc_string == "trained example" and out.producer_name == model.producer_name
    assert out.ir_version == model.ir_version and list(out.opset_import) == list(model.opset_import)
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
