"""Hostile and unlucky input, round two: JSON from files and options, what libraries print,
full disks, sizes and arrays from the user, text reaching the terminal, files the output does
not own. Each case ends in exit 0 with a correct output or exit 2 with one line; never exit 3,
a traceback, a second line, a damaged input or a file left behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnfold.cli import run as cli
from test_trust import EXE, conv_bn_model

DEEP = "[" * 100_000 + "]" * 100_000
LONG_INT = "9" * 5000


def cli_result(args: list[str], capsys) -> tuple[int, list[str], str]:
    """Exit code, stderr lines and stdout of one in-process run."""
    code = cli(args)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


def subprocess_result(args: list[str], cwd: Path | None = None, debug: bool = False, program: str = str(EXE),
                      **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BNFOLD_DEBUG"}
    if debug:
        env["BNFOLD_DEBUG"] = "1"
    return subprocess.run([program, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300, **kwargs)


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("BNFOLD_DEBUG", raising=False)


ARCH = "from torch import nn\n\ndef build(**kwargs):\n    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16))\n"


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory) -> Path:
    """A folder with a safetensors state_dict and the --arch module it fits, a pickled module,
    and a .pt2 of the same network."""
    import torch
    from safetensors.torch import save_file
    from torch import nn

    folder = tmp_path_factory.mktemp("torch")
    (folder / "arch.py").write_text(ARCH)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16)).eval()
    save_file(model.state_dict(), folder / "m.safetensors")
    torch.save(model, folder / "m.pt")
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 8, 8),)), folder / "m.pt2")
    return folder


def with_header(src: Path, dst: Path, header: str) -> Path:
    """`src` (safetensors) with its JSON header replaced by `header`, data unchanged."""
    blob = src.read_bytes()
    data = blob[8 + int.from_bytes(blob[:8], "little"):]
    raw = header.encode()
    dst.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return dst


def with_entry(src: Path, dst: Path, suffix: str, payload: bytes) -> Path:
    """`src` (a zip archive) with the entry whose name ends in `suffix` replaced by `payload`."""
    with zipfile.ZipFile(src) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(dst, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, payload if name.endswith(suffix) else data)
    return dst


# -- 1. JSON from files and options ---------------------------------------------------------

def _header_with(src: Path, extra: str) -> str:
    blob = src.read_bytes()
    header = blob[8:8 + int.from_bytes(blob[:8], "little")].decode().rstrip()  # padded with spaces
    return header[:-1] + f', "__x__": {extra}}}'


JSON_CASES = {
    "safetensors_deep": ("safetensors", DEEP, "levels deep"),
    "safetensors_deep_in_a_value": ("safetensors_value", DEEP, "levels deep"),
    "safetensors_long_integer": ("safetensors_value", LONG_INT, "5000 digits"),
    "pt2_model_json_deep": ("pt2:models/model.json", DEEP, "levels deep"),
    "pt2_weights_config_deep": ("pt2:model_weights_config.json", DEEP, "levels deep"),
    "pt2_constants_config_long_integer": ("pt2:model_constants_config.json", '{"config": {"a": %s}}' % LONG_INT,
                                          "5000 digits"),
    "arch_kwargs_deep": ("arch_kwargs", DEEP, "levels deep"),
    "arch_kwargs_long_integer": ("arch_kwargs", '{"n": %s}' % LONG_INT, "5000 digits"),
}


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_deep_or_huge_json_is_one_line_exit_2(torch_files, tmp_path, monkeypatch, capsys, case):
    where, text, expected = JSON_CASES[case]
    monkeypatch.chdir(torch_files)  # --arch imports arch.py from the working folder
    args = ["--arch", "arch:build", "-o", str(tmp_path / "out.safetensors")]
    if where == "safetensors":
        src = with_header(torch_files / "m.safetensors", tmp_path / "m.safetensors", text)
    elif where == "safetensors_value":
        src = with_header(torch_files / "m.safetensors", tmp_path / "m.safetensors",
                          _header_with(torch_files / "m.safetensors", text))
    elif where == "arch_kwargs":
        src = torch_files / "m.safetensors"
        args += ["--arch-kwargs", text]
    else:
        src = with_entry(torch_files / "m.pt2", tmp_path / "m.pt2", where.split(":")[1], text.encode())
        args = ["-o", str(tmp_path / "out.pt2")]
    code, err, _ = cli_result(["fuse", str(src), *args], capsys)
    assert code == 2 and len(err) == 1 and expected in err[0], (code, err)
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "out.pt2").exists()


def test_bounded_json_still_reads_what_torch_writes(torch_files, tmp_path, capsys):
    """The bounds leave real archives alone: the .pt2 fuses, and the result verifies."""
    out = tmp_path / "f.pt2"
    code, err, _ = cli_result(["fuse", str(torch_files / "m.pt2"), "-o", str(out)], capsys)
    assert code == 0, err
    assert cli(["verify", str(torch_files / "m.pt2"), str(out)]) == 0


# -- 2. Nothing a library logs or prints reaches stderr ----------------------------------------

def _schema_mismatch(torch_files: Path, tmp_path: Path) -> Path:
    """A .pt2 whose model.json says a schema version torch does not read: torch.export.load
    logs its own traceback, then raises."""
    with zipfile.ZipFile(torch_files / "m.pt2") as archive:
        name = next(n for n in archive.namelist() if n.endswith("models/model.json"))
        model = json.loads(archive.read(name))
    model["schema_version"]["major"] = 999
    return with_entry(torch_files / "m.pt2", tmp_path / "bad.pt2", "models/model.json", json.dumps(model).encode())


def test_torch_logs_reach_stderr_only_with_debug(torch_files, tmp_path):
    src = _schema_mismatch(torch_files, tmp_path)
    quiet = subprocess_result(["fuse", str(src)])
    lines = quiet.stderr.strip().splitlines()
    assert quiet.returncode == 2 and len(lines) == 1 and "cannot load" in lines[0], quiet.stderr
    loud = subprocess_result(["fuse", str(src)], debug=True)
    assert loud.returncode == 2 and "Ran into the following error when deserializing" in loud.stderr


DATA_DEPENDENT = """import torch
from torch import nn


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:  # neither torch.fx nor torch.export can trace this
            return y * 2
        return y
"""


def test_torch_export_failure_dump_stays_off_stderr(tmp_path, monkeypatch):
    """torch.export prints the partial graph of a failed export to sys.stderr itself."""
    import importlib

    import torch

    (tmp_path / "branchy.py").write_text(DATA_DEPENDENT)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    torch.save(importlib.import_module("branchy").Branchy().eval(), tmp_path / "b.pt")
    proc = subprocess_result(["fuse", "b.pt", "--trust-pickle", "-o", "out.pt"], cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) <= 1 and "def forward" not in proc.stderr, proc.stderr
    if proc.returncode == 2:
        assert lines[0].startswith("bnfold: error:"), lines
    else:
        assert proc.returncode == 0 and (tmp_path / "out.pt").is_file(), proc.stderr


# -- 6. Text from files reaching the terminal ---------------------------------------------------

EVIL = "\x1b[31mred\x1b[0m\x1b]8;;http://evil.example/\x1b\\link\x1b]8;;\x1b\\\nline two [bold]B[/bold] :fire: \u202eRLO"
UNSAFE_CHARS = ("\x1b", "\u202e", "\x07", "\U0001f525")  # ESC, RLO, BEL, and :fire: as an emoji


def evil_model() -> onnx.ModelProto:
    """Every name a report shows carries control characters and rich markup."""
    model = conv_bn_model()
    graph = model.graph
    for node in graph.node:
        node.name += EVIL
    for value in (graph.input[0], graph.output[0]):
        old = value.name
        value.name += EVIL
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = value.name
            for i, name in enumerate(node.output):
                if name == old:
                    node.output[i] = value.name
    return model


def _shown_safely(text: str) -> None:
    assert not any(c in text for c in UNSAFE_CHARS), repr(text)
    assert "[bold]B[/bold]" in text and ":fire:" in text and "\\x1b" in text  # shown, not interpreted


@pytest.mark.parametrize("command", ["fuse", "verify"])
def test_names_with_control_characters_are_escaped_in_reports(tmp_path, capsys, command):
    src = tmp_path / "m.onnx"
    onnx.save(evil_model(), str(src))
    args = ["fuse", str(src)] if command == "fuse" else ["verify", str(src), str(src)]
    code, _, out = cli_result(args, capsys)
    assert code == 0
    _shown_safely(out)
    code, _, out = cli_result([*args, "--json"], capsys)
    data = json.loads(out)  # JSON escapes by itself and keeps the names exact
    assert code == 0 and (data["folded"][0]["bn"] if command == "fuse" else data["inputs"][0]["name"]).endswith(EVIL)


def test_an_error_naming_a_file_with_a_newline_stays_one_line(tmp_path, capsys):
    src = tmp_path / f"m{EVIL.replace('/', '|')}.onnx"
    src.write_bytes(b"not a model")
    code, err, _ = cli_result(["fuse", str(src)], capsys)
    assert code == 2 and len(err) == 1, err
    assert not any(c in err[0] for c in UNSAFE_CHARS) and "\\x1b[31mred" in err[0] and "\\nline two" in err[0], err


def test_an_error_naming_an_input_with_control_characters_is_escaped(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(evil_model(), str(src))
    code, err, _ = cli_result(["verify", str(src), str(src), "--shape", f"q{EVIL}=1,3,6,6"], capsys)
    assert code == 2 and len(err) == 1, err
    assert not any(c in err[0] for c in UNSAFE_CHARS), repr(err[0])


# -- 3. Full disk while writing every output format, and signals while staging ----------------

def _fsize_limit(limit: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


WRITERS = {
    "onnx": ("m.onnx", []),
    "onnx_external_data": ("ext.onnx", []),
    "state_dict": ("m.safetensors", ["--arch", "arch:build"]),
    "pickle": ("m.pt", ["--trust-pickle"]),
    "torchscript": ("ts.pt", []),
    "pt2": ("m.pt2", []),
    "pickle_to_onnx": ("m.pt", ["--trust-pickle", "--to", "onnx", "--shape", "input=1,3,8,8"]),
    "pickle_to_torchscript": ("m.pt", ["--trust-pickle", "--to", "torchscript", "--shape", "input=1,3,8,8"]),
    "pickle_to_pt2": ("m.pt", ["--trust-pickle", "--to", "pt2", "--shape", "input=1,3,8,8"]),
}


@pytest.fixture(scope="module")
def writer_inputs(torch_files, tmp_path_factory) -> Path:
    """Every input format, each large enough that its output cannot be written under 1 KB."""
    import shutil

    import torch
    from torch import nn

    folder = tmp_path_factory.mktemp("writers")
    for name in ("arch.py", "m.safetensors", "m.pt", "m.pt2"):
        shutil.copy(torch_files / name, folder / name)
    model = torch.load(folder / "m.pt", weights_only=False)
    torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 8, 8)), folder / "ts.pt")
    big = conv_bn_model(channels=16)
    onnx.save(big, str(folder / "m.onnx"))
    onnx.save(big, str(folder / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    assert isinstance(model, nn.Module)
    return folder


# Runs every case in one process (one torch import), under the limit, each in-process.
WRITE_ALL = """
import contextlib, io, json, sys
from bnfold.cli import run
results = {}
for case, args in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run(args)
    results[case] = [code, err.getvalue()]
print(json.dumps(results))
"""


def test_every_writer_survives_a_file_size_limit(writer_inputs, tmp_path):
    """RLIMIT_FSIZE makes every write past 1 KB fail as a full disk does (EFBIG); TorchScript and
    .pt2 used to abort in C++ (exit 134, a C++ stack, a staging folder left behind)."""
    from test_trust import snapshot

    before = snapshot(writer_inputs)
    cases = {}
    for case, (name, options) in WRITERS.items():
        out = tmp_path / case
        out.mkdir()
        suffix = ".onnx" if "onnx" in case else ".pt2" if "pt2" in case else Path(name).suffix
        cases[case] = ["fuse", name, *options, "-o", str(out / f"f{suffix}")]
    proc = subprocess_result(["-c", WRITE_ALL, json.dumps(cases)], cwd=writer_inputs, program=sys.executable,
                             preexec_fn=_fsize_limit(1024))
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)
    wrong = {case: (code, err) for case, (code, err) in results.items()
             if code != 2 or len(err.strip().splitlines()) != 1 or "File too large" not in err}
    assert not wrong, wrong
    assert all(list((tmp_path / case).iterdir()) == [] for case in WRITERS)  # no staging folder, no half file
    assert snapshot(writer_inputs) == before


@pytest.mark.parametrize("step", ["mkdtemp", "rmtree"])
def test_a_signal_while_the_staging_folder_is_made_or_removed_leaves_nothing(tmp_path, monkeypatch, capsys, step):
    """SIGTERM right after the staging folder exists but before Staging remembers it (or while
    it is being removed) used to leave a .bnfold-stage-* folder behind."""
    import signal

    import bnfold.stages.staging as staging

    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), str(src))
    out = tmp_path / "out"
    out.mkdir()
    module = staging.tempfile if step == "mkdtemp" else staging.shutil
    real = getattr(module, step)
    sent = []

    def then_signal(*args, **kwargs):
        made = real(*args, **kwargs) if step == "mkdtemp" else None  # the folder exists, not yet remembered
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))  # handled at the next bytecode, inside this step
        return made if step == "mkdtemp" else real(*args, **kwargs)

    monkeypatch.setattr(module, step, then_signal)
    assert cli(["fuse", str(src), "-o", str(out / "f.onnx")]) == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM" in capsys.readouterr().err
    assert not [p for p in out.iterdir() if p.name.startswith(".bnfold")]


# -- 4. Sizes from the user --------------------------------------------------------------------

HUGE = str(10**30)
SIZE_OPTIONS = {
    "verify_batch_huge": ["verify", "{m}", "{m}", "--batch-size", HUGE],
    "verify_shape_huge": ["verify", "{m}", "{m}", "--shape", f"x={HUGE},3,6,6"],
    "verify_shape_product_huge": ["verify", "{m}", "{m}", "--shape", "x=1,3,10000000000,10000000000"],
    "verify_seed_negative": ["verify", "{m}", "{m}", "--seed", "-1"],
    "verify_seed_huge": ["verify", "{m}", "{m}", "--seed", HUGE],
    "fuse_verify_batch_huge": ["fuse", "{m}", "--verify", "--batch-size", HUGE],
    "fuse_to_onnx_shape_huge": ["fuse", "{m}", "--shape", f"x={HUGE},3,6,6"],
    "bench_batch_huge": ["bench", "{m}", "--batch-size", HUGE],
    "bench_threads_huge": ["bench", "{m}", "--threads", HUGE],
    "calibrate_batch_huge": ["calibrate", "{m}", "--data", "{m}", "--batch-size", HUGE],
    "fuse_values_per_channel_huge": ["fuse", "{m}", "--variance", "biased", "--values-per-channel", HUGE],
}


@pytest.mark.parametrize("case", list(SIZE_OPTIONS))
def test_sizes_numpy_cannot_take_are_refused_before_any_work(tmp_path, monkeypatch, capsys, case):
    import bnfold.detect as detect

    monkeypatch.setattr(detect, "detect_format", lambda path: pytest.fail("work started before the check"))
    args = [a.format(m=tmp_path / "m.onnx") for a in SIZE_OPTIONS[case]]
    code, err, _ = cli_result(args, capsys)
    assert code == 2 and len(err) == 1, (code, err)


def dynamic_model(dims: list) -> onnx.ModelProto:
    """conv_bn_model with the input's dims replaced (ints fixed, strings dynamic)."""
    model = conv_bn_model()
    shape = model.graph.input[0].type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        shape.dim.add(**({"dim_param": d} if isinstance(d, str) else {"dim_value": d}))
    return model


@pytest.mark.parametrize("dims,args", [
    (["N", 3, 6, 6], ["--batch-size", str(2**40)]),  # allowed alone, too many elements with the model's dims
    (["N", 3, 2**31, 2**31], []),  # a hostile model's own dims
], ids=["batch_times_model_dims", "model_dims"])
def test_an_input_too_large_to_make_is_exit_2(tmp_path, capsys, dims, args):
    src = tmp_path / "m.onnx"
    onnx.save(dynamic_model(dims), str(src))
    code, err, _ = cli_result(["verify", str(src), str(src), *args], capsys)
    assert code == 2 and len(err) == 1 and "2^40" in err[0], (code, err)


# -- 5. Arrays from the user -------------------------------------------------------------------

NOT_NUMBERS = {
    "text": np.full((2, 3, 8, 8), "x"),
    "bytes": np.full((2, 3, 8, 8), b"x"),
    "structured": np.zeros((2, 3, 8, 8), dtype=[("a", "f4"), ("b", "i4")]),
    "raw": np.zeros((2, 3, 8, 8), dtype="V4"),
    "dates": np.zeros((2, 3, 8, 8), dtype="datetime64[s]"),
    "time_spans": np.zeros((2, 3, 8, 8), dtype="timedelta64[s]"),
}
NOT_TORCH_INPUTS = {"complex": np.zeros((2, 3, 8, 8), dtype="complex64"), "single_number": np.array(1.0, "float32")}
ARRAY_COMMANDS = {
    "onnx_verify": ["verify", "{onnx}", "{onnx}", "--data", "{d}"],
    "torch_verify": ["verify", "m.pt", "m.pt", "--trust-pickle", "--data", "{d}"],
    "torch_example_input": ["fuse", "m.pt", "--trust-pickle", "--to", "onnx", "--example-input", "{d}", "-o",
                            "{out}"],
    "torch_calibrate": ["calibrate", "m.pt", "--trust-pickle", "--data", "{d}", "--batch-size", "2", "-o", "{out}"],
}


# A graph declares its inputs' dtype and rank, so only torch needs the second group refused.
ARRAY_CASES = [(kind, command) for command in ARRAY_COMMANDS for kind in NOT_NUMBERS] + \
    [(kind, command) for command in ARRAY_COMMANDS if command != "onnx_verify" for kind in NOT_TORCH_INPUTS]


@pytest.mark.parametrize("kind,command", ARRAY_CASES)
def test_arrays_a_model_input_cannot_be_are_refused_naming_file_and_input(torch_files, tmp_path, monkeypatch,
                                                                          capsys, kind, command):
    monkeypatch.chdir(torch_files)
    np.save(tmp_path / "d.npy", {**NOT_NUMBERS, **NOT_TORCH_INPUTS}[kind])
    onnx.save(dynamic_model(["N", 3, 6, 6]), str(tmp_path / "m.onnx"))
    out = tmp_path / ("o.onnx" if command == "torch_example_input" else "o.pt")
    args = [a.format(onnx=tmp_path / "m.onnx", d=tmp_path / "d.npy", out=out) for a in ARRAY_COMMANDS[command]]
    code, err, _ = cli_result(args, capsys)
    assert code == 2 and len(err) == 1 and "d.npy" in err[0] and "input '" in err[0], (code, err)
    assert not out.exists()


def test_big_endian_arrays_are_read_as_the_numbers_they_hold(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(dynamic_model(["N", 3, 6, 6]), str(src))
    x = np.random.default_rng(0).normal(size=(2, 3, 6, 6)).astype(">f4")
    np.save(tmp_path / "d.npy", x)
    code, err, out = cli_result(["verify", str(src), str(src), "--data", str(tmp_path / "d.npy"), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["inputs"][0]["dtype"] == "float32"


# -- 7. Files the output does not own ------------------------------------------------------------

def _external(folder: Path, name: str, data: str, channels: int) -> Path:
    """conv_bn_model with its weight (over the 1 KB inline threshold at 16 channels) in `data`."""
    onnx.save(conv_bn_model(channels=channels), str(folder / name), save_as_external_data=True, location=data,
              size_threshold=0)
    return folder / name


def test_an_output_never_replaces_another_models_data(tmp_path, capsys):
    """other.onnx reads b.onnx.data and something else sits in b.onnx.1.data: `-o b.onnx` must
    leave both alone, take the next free name and say so; run again, it reuses its own."""
    from test_trust import snapshot

    src = _external(tmp_path, "m.onnx", "m.onnx.data", 16)
    other = _external(tmp_path, "other.onnx", "b.onnx.data", 5)
    (tmp_path / "b.onnx.1.data").write_bytes(b"not ours either")
    before = snapshot(tmp_path)
    for _ in range(2):
        code, err, out = cli_result(["fuse", str(src), "-o", str(tmp_path / "b.onnx"), "--json"], capsys)
        assert code == 0, err
        assert any("b.onnx.2.data" in n and "b.onnx.data" in n for n in json.loads(out)["notes"])
        after = snapshot(tmp_path)
        assert {k: after[k] for k in before} == before
        assert sorted(set(after) - set(before)) == ["b.onnx", "b.onnx.2.data"]
    x = {"x": np.random.default_rng(0).normal(size=(1, 3, 6, 6)).astype(np.float32)}
    from onnx_builders import run

    np.testing.assert_allclose(run(onnx.load(str(tmp_path / "b.onnx")), x)[0], run(onnx.load(str(src)), x)[0],
                               rtol=1e-4, atol=1e-5)
    assert cli(["verify", str(other), str(other)]) == 0  # the other model still reads its data


def test_a_model_whose_weights_stay_inline_writes_no_data_file(tmp_path, capsys):
    """An input with external data whose output keeps every tensor inline used to write an
    empty b.onnx.data over another model's data."""
    from test_trust import snapshot

    src = _external(tmp_path, "m.onnx", "m.onnx.data", 4)  # 432-byte weight: inline in the output
    _external(tmp_path, "other.onnx", "b.onnx.data", 5)
    before = snapshot(tmp_path)
    code, err, _ = cli_result(["fuse", str(src), "-o", str(tmp_path / "b.onnx")], capsys)
    assert code == 0, err
    after = snapshot(tmp_path)
    assert {k: after[k] for k in before} == before and sorted(set(after) - set(before)) == ["b.onnx"]


@pytest.mark.parametrize("how", ["trailing_slash", "existing_folder"])
def test_an_output_naming_a_folder_writes_inside_it(tmp_path, capsys, how):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), str(src))
    (tmp_path / "out").mkdir()
    target = str(tmp_path / "out") + ("/" if how == "trailing_slash" else "")
    code, err, _ = cli_result(["fuse", str(src), "-o", target], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.fused.onnx"]


@pytest.mark.parametrize("command", ["fuse", "calibrate"])
def test_an_output_folder_that_does_not_exist_is_refused(tmp_path, capsys, command):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), str(src))
    np.save(tmp_path / "d.npy", np.random.default_rng(0).normal(size=(4, 3, 6, 6)).astype(np.float32))
    extra = ["--data", str(tmp_path / "d.npy"), "--batch-size", "2"] if command == "calibrate" else []
    code, err, _ = cli_result([command, str(src), *extra, "-o", str(tmp_path / "newdir") + "/"], capsys)
    assert code == 2 and len(err) == 1 and "newdir" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npy", "m.onnx"]  # no file named newdir


def test_a_torch_output_folder_gets_the_default_name(torch_files, tmp_path, capsys):
    code, err, _ = cli_result(["fuse", str(torch_files / "m.pt"), "--trust-pickle", "-o", f"{tmp_path}/"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.fused.pt"]


# -- 9. Bad input reported as a bug --------------------------------------------------------------

def _layer_with_bad_bias(layer: str) -> onnx.ModelProto:
    """A layer whose bias does not fit its output (5 values for 8 channels), next to a BN."""
    from onnx import helper, numpy_helper
    from onnx_builders import bn_inits, bn_node, make_model, vi

    rng = np.random.default_rng(0)
    f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(f32(5), "b"), *bn_inits("bn", 8, rng)]
    if layer == "conv":
        inits.append(numpy_helper.from_array(f32(8, 3, 3, 3), "W"))
        nodes, x = [helper.make_node("Conv", ["x", "W", "b"], ["z"], name="layer"), bn_node("z", "y")], [1, 3, 6, 6]
    elif layer == "conv_transpose":
        inits.append(numpy_helper.from_array(f32(3, 8, 3, 3), "W"))
        nodes, x = [helper.make_node("ConvTranspose", ["x", "W", "b"], ["z"], name="layer"), bn_node("z", "y")], \
            [1, 3, 6, 6]
    elif layer == "gemm":
        inits.append(numpy_helper.from_array(f32(4, 8), "W"))
        nodes, x = [helper.make_node("Gemm", ["x", "W", "b"], ["z"], name="layer"), bn_node("z", "y")], [2, 4]
    elif layer == "matmul_add":
        inits.append(numpy_helper.from_array(f32(4, 8), "W"))
        nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
                 helper.make_node("Add", ["m", "b"], ["z"], name="layer"), bn_node("z", "y")]
        x = [2, 4]
    else:  # BN, then a Conv whose bias does not fit: the fold into the next layer reads it
        inits = [numpy_helper.from_array(f32(5), "b"), *bn_inits("bn", 3, rng),
                 numpy_helper.from_array(f32(8, 3, 1, 1), "W")]
        nodes, x = [bn_node("x", "n"), helper.make_node("Conv", ["n", "W", "b"], ["y"], name="layer")], [1, 3, 6, 6]
    y = [2, 8] if layer == "matmul_add" else None  # onnxruntime cannot run it to find out
    return make_model(nodes, [vi("x", x)], [vi("y", y)], inits)


@pytest.mark.parametrize("layer", ["conv", "conv_transpose", "gemm", "matmul_add", "next_conv"])
def test_a_bias_that_does_not_fit_its_layer_is_bad_input(tmp_path, capsys, layer):
    src = tmp_path / "m.onnx"
    onnx.save(_layer_with_bad_bias(layer), str(src))
    code, err, _ = cli_result(["fuse", str(src)], capsys)
    assert code == 2 and len(err) == 1 and "m.onnx" in err[0] and "'layer'" in err[0] and "[5]" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.fixture(scope="module")
def long_kernel(tmp_path_factory) -> Path:
    """A Conv1d whose kernel (64) is longer than the input bnfold guesses (32)."""
    import torch
    from torch import nn

    path = tmp_path_factory.mktemp("long") / "long.pt"
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Conv1d(3, 4, 64), nn.BatchNorm1d(4)).eval(), path)
    return path


@pytest.mark.parametrize("to", ["onnx", "pt2", "torchscript"])
def test_a_guessed_input_the_model_cannot_take_says_what_to_pass(long_kernel, tmp_path, capsys, to):
    out = tmp_path / f"f.{'pt' if to == 'torchscript' else to}"
    code, err, _ = cli_result(["fuse", str(long_kernel), "--trust-pickle", "--to", to, "-o", str(out)], capsys)
    assert code == 2 and len(err) == 1 and "long.pt" in err[0] and "--shape" in err[0], err
    code, err, _ = cli_result(["fuse", str(long_kernel), "--trust-pickle", "--to", to, "-o", str(out),
                               "--shape", "input=2,3,80"], capsys)
    assert code == 0 and out.is_file(), err
