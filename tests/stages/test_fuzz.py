"""Fuzzing every command with mutated inputs: ONNX models, torch checkpoints, safetensors
headers, TorchScript and torch.export archives (their entries and JSON configs), and option
values (absurd sizes, hostile JSON). Each run must end in exit 0 with a valid output, or exit 2
with one line; never a traceback, never exit 1 or 3, never a crash, never a change to the
input. Bounded for CI; `python benchmarks/fuzz.py --examples N` runs longer."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
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
    run_one(["fuse", str(src), "--arch", "fuzzarch:build", "-o", str(folder / "out.pt")], cwd=torch_state_dict.parent)
    assert {k: v for k, v in _digest(folder).items() if k != "out.pt"} == before


# -- torch archives, safetensors headers and option values ----------------------------------------
# Fewer examples in the suite (each torch run costs up to a second or two); benchmarks/fuzz.py
# scales them with the others.
TORCH_SETTINGS = settings(SETTINGS, max_examples=max(4, EXAMPLES // 6))
ARCH_SOURCE = "from torch import nn\n\ndef build(**kwargs):\n    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))\n"


@pytest.fixture(scope="module")
def torch_seeds(tmp_path_factory) -> Path:
    """One network as a safetensors state_dict (with its --arch module), a TorchScript archive
    and a torch.export archive."""
    import torch
    from safetensors.torch import save_file
    from torch import nn

    folder = tmp_path_factory.mktemp("torch_seeds")
    (folder / "fuzzarch.py").write_text(ARCH_SOURCE)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    save_file(model.state_dict(), folder / "m.safetensors", metadata={"format": "pt"})
    example = torch.randn(1, 3, 8, 8)
    torch.jit.save(torch.jit.trace(model, example), folder / "ts.pt")
    torch.export.save(torch.export.export(model, (example,)), folder / "m.pt2")
    return folder


def hostile_json(max_leaves: int = 6):
    """JSON values an attacker would write: huge and negative integers, floats, strings, and
    nesting far deeper than any real header."""
    leaves = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([0, -1, 2**63, 10**400]), st.floats(),
                       st.text(max_size=8), st.booleans(), st.none())
    shallow = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4),
                                                                                             inner, max_size=3),
                           max_leaves=max_leaves)
    deep = st.integers(100, 5000).map(lambda n: "[" * n + "]" * n)
    return st.one_of(shallow.map(lambda v: json.dumps(v, allow_nan=True)), deep)


def run_one(args: list[str], cwd: Path | None = None) -> tuple[int, str]:
    """Exit code and stderr of one in-process run; asserts the outcome a fuzz case may have."""
    err = io.StringIO()
    previous = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)  # --arch imports fuzzarch from the working folder
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli(args)
    finally:
        os.chdir(previous)
    lines = err.getvalue().strip().splitlines()
    assert code in (0, 2), (args, code, err.getvalue())
    if code == 2:
        assert len(lines) == 1 and "Traceback" not in err.getvalue(), (args, err.getvalue())
    return code, err.getvalue()


def _replace_value(document, path_pick: int, text: str) -> str:
    """`document` (parsed JSON) with one value, chosen by `path_pick`, replaced by the JSON `text`."""
    marker = "\u0000MARK\u0000"
    slots = []
    stack = [(document, None, None)]
    while stack:
        value, parent, key = stack.pop()
        if parent is not None:
            slots.append((parent, key))
        if isinstance(value, dict):
            stack += [(v, value, k) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, value, i) for i, v in enumerate(value)]
    if not slots:
        return text
    parent, key = slots[path_pick % len(slots)]
    parent[key] = marker
    return json.dumps(document).replace(json.dumps(marker), text)


@TORCH_SETTINGS
@given(data=st.data())
def test_safetensors_header_mutations(tmp_path_factory, torch_seeds, data):
    """The header's bytes, its length field, or one of its values replaced by a hostile one."""
    blob = (torch_seeds / "m.safetensors").read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header, payload = blob[8:8 + n], blob[8 + n:]
    how = data.draw(st.sampled_from(("header_bytes", "length", "value")))
    if how == "header_bytes":
        header = mutate_bytes(header, data.draw(byte_mutation(len(header))))
        length = len(header)
    elif how == "length":
        length = data.draw(st.sampled_from([0, 1, n - 1, n + 1, 2**31, 2**64 - 1]))
    else:
        header = _replace_value(json.loads(header), data.draw(st.integers(0, 100)), data.draw(hostile_json())).encode()
        length = len(header)
    folder = tmp_path_factory.mktemp("st")
    src = folder / "m.safetensors"
    src.write_bytes(length.to_bytes(8, "little") + header + payload)
    before = _digest(folder)
    run_one(["fuse", str(src), "--arch", "fuzzarch:build", "-o", str(folder / "out.safetensors")], cwd=torch_seeds)
    assert {k: v for k, v in _digest(folder).items() if k != "out.safetensors"} == before


def mutate_archive(src: Path, dst: Path, data) -> None:
    """A zip archive with one entry's bytes mutated, one entry dropped, or one value of a JSON
    entry replaced by a hostile one."""
    with zipfile.ZipFile(src) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    victim = data.draw(st.sampled_from(sorted(entries)))
    choices = ("bytes", "drop", "json") if victim.endswith(".json") else ("bytes", "drop")
    how = data.draw(st.sampled_from(choices))
    if how == "bytes":
        entries[victim] = mutate_bytes(entries[victim], data.draw(byte_mutation(max(1, len(entries[victim])))))
    elif how == "drop":
        del entries[victim]
    else:
        entries[victim] = _replace_value(json.loads(entries[victim]), data.draw(st.integers(0, 10**6)),
                                         data.draw(hostile_json())).encode()
    with zipfile.ZipFile(dst, "w") as archive:
        for name, payload in entries.items():
            archive.writestr(name, payload)


@TORCH_SETTINGS
@given(data=st.data(), kind=st.sampled_from(["ts.pt", "m.pt2"]))
def test_torch_archive_mutations(tmp_path_factory, torch_seeds, data, kind):
    """TorchScript and torch.export archives: an entry mutated or dropped, a JSON value (model.json,
    the weight and constant configs) replaced by a hostile one."""
    folder = tmp_path_factory.mktemp("archive")
    src = folder / kind
    mutate_archive(torch_seeds / kind, src, data)
    before = _digest(folder)
    run_one(["fuse", str(src), "-o", str(folder / f"out{src.suffix}")])
    assert {k: v for k, v in _digest(folder).items() if not k.startswith("out")} == before
    assert not [p for p in folder.iterdir() if p.name.startswith(".bnfold")]


SIZES = st.sampled_from([1, 2, 0, -1, 2**40 + 1, 2**63, 10**30, -10**30])
OPTION_CASES = {
    "verify_batch": lambda m, v: ["verify", m, m, "--batch-size", str(v)],
    "verify_seed": lambda m, v: ["verify", m, m, "--seed", str(v)],
    "verify_shape": lambda m, v: ["verify", m, m, "--shape", f"x={v},3,6,6"],
    "bench_threads": lambda m, v: ["bench", m, "--threads", str(v), "--runs", "2", "--warmup", "0", "--blocks", "6",
                                   "--level", "disabled"],
    "bench_batch": lambda m, v: ["bench", m, "--batch-size", str(v), "--runs", "2", "--warmup", "0", "--blocks", "6",
                                 "--level", "disabled"],
    "fuse_values_per_channel": lambda m, v: ["fuse", m, "--variance", "biased", "--values-per-channel", str(v), "-o",
                                             m.replace(".onnx", ".out.onnx")],
}


@SETTINGS
@given(case=st.sampled_from(sorted(OPTION_CASES)), value=SIZES)
def test_option_values(tmp_path_factory, case, value):
    """Sizes, counts and seeds from the command line, absurd ones included."""
    folder = tmp_path_factory.mktemp("options")
    src = folder / "m.onnx"
    src.write_bytes(SEED_BYTES)
    run_one(OPTION_CASES[case](str(src), value))


@TORCH_SETTINGS
@given(text=hostile_json(max_leaves=10))
def test_arch_kwargs_values(tmp_path_factory, torch_seeds, text):
    """--arch-kwargs: any JSON text, hostile or not, is keyword arguments or one line, exit 2."""
    out = tmp_path_factory.mktemp("kwargs") / "out.safetensors"
    run_one(["fuse", str(torch_seeds / "m.safetensors"), "--arch", "fuzzarch:build", "--arch-kwargs", text, "-o",
             str(out)], cwd=torch_seeds)
