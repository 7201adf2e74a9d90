"""Fuzzing every command with mutated models (SPEC §7): each run must end in exit 0 with a
valid output, or exit 2 with one line; never a traceback, never exit 1 or 3, never a change
to the input. Bounded for CI; `python benchmarks/fuzz.py --examples N` runs longer."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from bnfold.cli import run as cli
from onnx_builders import bn_inits, bn_node, make_model, vi

EXAMPLES = int(os.environ.get("BNFOLD_FUZZ_EXAMPLES", "30"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize="BNFOLD_FUZZ_SEED" not in os.environ,
                    suppress_health_check=list(HealthCheck))


def seed_model() -> onnx.ModelProto:
    """Conv → BN → Relu → Gemm-free head: small, but every path (fold, verify, calibrate) runs."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "b"), *bn_inits("bn", 8, rng)]
    nodes = [helper.make_node("Conv", ["x", "W", "b"], ["z"], name="conv", pads=[1, 1, 1, 1]),
             bn_node("z", "n"), helper.make_node("Relu", ["n"], ["y"])]
    return make_model(nodes, [vi("x", ["N", 3, 6, 6])], [vi("y", None)], inits)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def run_every_command(src: Path, data: Path) -> None:
    folder = src.parent
    before = _digest(folder)
    out = folder / "out"
    out.mkdir(exist_ok=True)
    commands = {
        "fuse": ["fuse", str(src), "-o", str(out / "f.onnx")],
        "verify": ["verify", str(src), str(src)],
        "bench": ["bench", str(src), "--runs", "2", "--warmup", "0", "--level", "disabled", "--threads", "1"],
        "calibrate": ["calibrate", str(src), "--data", str(data), "--batch-size", "2", "-o", str(out / "c.onnx")],
    }
    for name, args in commands.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli(args)
        lines = err.getvalue().strip().splitlines()
        assert code in (0, 2), (name, code, err.getvalue())
        if code == 2:
            assert len(lines) == 1 and "Traceback" not in err.getvalue(), (name, err.getvalue())
        elif name in ("fuse", "calibrate"):
            written = out / ("f.onnx" if name == "fuse" else "c.onnx")
            onnx.load(str(written))  # a complete model, not a half-written one
        assert _digest(folder) == before, name
    assert not [p for p in out.iterdir() if p.name.startswith(".bnfold")]
    shutil.rmtree(out)


MUTATIONS = ("truncate", "flip", "insert")


@st.composite
def byte_mutation(draw, size: int):
    kind = draw(st.sampled_from(MUTATIONS))
    pos = draw(st.integers(0, size - 1))
    return kind, pos, draw(st.binary(min_size=1, max_size=8))


def mutate_bytes(blob: bytes, mutation) -> bytes:
    kind, pos, noise = mutation
    if kind == "truncate":
        return blob[:pos]
    if kind == "flip":
        return blob[:pos] + bytes(b ^ 0xFF for b in noise[: len(blob) - pos]) + blob[pos + len(noise):]
    return blob[:pos] + noise + blob[pos:]


SEED_BYTES = seed_model().SerializeToString()


@pytest.fixture
def calibration_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "d.npy"
    np.save(path, np.random.default_rng(0).normal(size=(4, 3, 6, 6)).astype(np.float32))
    return path


@SETTINGS
@given(data=st.data())
def test_byte_mutations(tmp_path_factory, calibration_data, data):
    mutation = data.draw(byte_mutation(len(SEED_BYTES)))
    folder = tmp_path_factory.mktemp("bytes")
    src = folder / "m.onnx"
    src.write_bytes(mutate_bytes(SEED_BYTES, mutation))
    run_every_command(src, calibration_data)


FIELD_EDITS = ("dims", "dtype", "attribute", "external_key", "drop_input", "rename_edge", "epsilon", "group")


def apply_edit(model: onnx.ModelProto, folder: Path, edit: str, pick: int, value: int, text: str) -> None:
    inits = model.graph.initializer
    tensor = inits[pick % len(inits)]
    node = model.graph.node[pick % len(model.graph.node)]
    if edit == "dims":
        dims = list(tensor.dims) or [1]
        dims[pick % len(dims)] = value
        del tensor.dims[:]
        tensor.dims.extend(dims)
    elif edit == "dtype":
        tensor.data_type = abs(value) % 26
    elif edit == "attribute":
        node.attribute.append(helper.make_attribute(text or "axis", value))
    elif edit == "external_key":
        onnx.external_data_helper.convert_model_to_external_data(model, location="w.bin", size_threshold=0)
        onnx.external_data_helper.write_external_data_tensors(model, str(folder))
        tensor.external_data[pick % len(tensor.external_data)].value = text
    elif edit == "drop_input":
        if node.input:
            del node.input[pick % len(node.input)]
    elif edit == "rename_edge":
        if node.output:
            node.output[0] = text or "dangling"
    elif edit == "epsilon":
        bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
        bn.attribute.append(helper.make_attribute("epsilon", float(value)))
    else:
        conv = model.graph.node[0]
        conv.attribute.append(helper.make_attribute("group", value))


@SETTINGS
@given(edit=st.sampled_from(FIELD_EDITS), pick=st.integers(0, 50), value=st.integers(-2**40, 2**40),
       text=st.text(alphabet="abc./-0123456789 ", max_size=12))
def test_field_mutations(tmp_path_factory, calibration_data, edit, pick, value, text):
    model = seed_model()
    folder = tmp_path_factory.mktemp("fields")
    apply_edit(model, folder, edit, pick, value, text)
    src = folder / "m.onnx"
    src.write_bytes(model.SerializeToString())
    run_every_command(src, calibration_data)


@pytest.fixture(scope="module")
def torch_state_dict(tmp_path_factory) -> Path:
    import torch
    from torch import nn

    folder = tmp_path_factory.mktemp("torch")
    torch.manual_seed(0)
    path = folder / "sd.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).state_dict(), path)
    (folder / "fuzzarch.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))\n")
    return path


@SETTINGS
@given(data=st.data())
def test_torch_checkpoint_mutations(tmp_path_factory, torch_state_dict, data):
    """Zip entries of a state_dict checkpoint: bytes flipped, entries dropped or truncated."""
    blob = torch_state_dict.read_bytes()
    with zipfile.ZipFile(torch_state_dict) as zf:
        names = zf.namelist()
        entries = {n: zf.read(n) for n in names}
    folder = tmp_path_factory.mktemp("tsd")
    src = folder / "sd.pt"
    how = data.draw(st.sampled_from(("bytes", "drop_entry", "edit_entry")))
    if how == "bytes":
        src.write_bytes(mutate_bytes(blob, data.draw(byte_mutation(len(blob)))))
    else:
        victim = data.draw(st.sampled_from(names))
        with zipfile.ZipFile(src, "w") as zf:
            for name in names:
                if name == victim and how == "drop_entry":
                    continue
                payload = entries[name]
                if name == victim:
                    payload = mutate_bytes(payload, data.draw(byte_mutation(max(1, len(payload)))))
                zf.writestr(name, payload)
    before = _digest(folder)
    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(torch_state_dict.parent)  # --arch imports fuzzarch from the working folder
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli(["fuse", str(src), "--arch", "fuzzarch:build", "-o", str(folder / "out.pt")])
    finally:
        os.chdir(cwd)
    assert code in (0, 2), err.getvalue()
    if code == 2:
        assert len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
    assert {k: v for k, v in _digest(folder).items() if k != "out.pt"} == before
