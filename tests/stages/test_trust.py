"""Hostile and malformed files (README, "Security"): nothing outside the model's folder is read, nothing of
the input is touched, no device is replaced, nothing is left behind, and every refusal is one
line with exit 2 (a bug would be exit 3, never a traceback)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.cli import run as cli
from onnx_builders import bn_inits, bn_node, make_model, run, vi

SECRET = b"TOP-SECRET-" * 200  # 2200 bytes: as large as the weight it poses as
EXE = Path(sys.executable).with_name("bnfold")


def conv_bn_model(channels=4, size=6) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(channels, 3, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), *bn_inits("bn", channels, rng)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["z"], name="conv"), bn_node("z", "y")]
    return make_model(nodes, [vi("x", [1, 3, size, size])], [vi("y", None)], inits)


def external_model(folder: Path, name="m.onnx", data="m.onnx.data", size_threshold=0, channels=4) -> Path:
    """conv_bn_model with every initializer in one external file (at 16 channels or more the
    weight is large enough to stay external in the output too)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save(conv_bn_model(channels), str(path), save_as_external_data=True, location=data,
              size_threshold=size_threshold, all_tensors_to_one_file=True)
    return path


def set_entry(model: onnx.ModelProto, tensor: str, key: str, value: str) -> None:
    t = next(t for t in model.graph.initializer if t.name == tensor)
    for e in t.external_data:
        if e.key == key:
            e.value = value
            return
    t.external_data.add(key=key, value=value)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def one_line_exit_2(run, args: list[str]) -> str:
    """`run` is the bnfold_run fixture (in this process) or `in_a_child` (the console script)."""
    proc = run(args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, (proc.returncode,
                                                                                       proc.stderr)
    return lines[0]


def in_a_child(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BNFOLD_DEBUG"}
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, env=env, timeout=300)


def hostile(tmp_path: Path, how: str) -> tuple[Path, Path]:
    """A model whose weight W points at a secret file outside its folder; returns (model, secret)."""
    secret_dir = tmp_path / "elsewhere"
    secret_dir.mkdir()
    secret = secret_dir / "secret.bin"
    secret.write_bytes(SECRET[: 4 * 3 * 3 * 3 * 4])  # exactly W's bytes: only the folder rule stops it
    src = external_model(tmp_path / "model")
    model = onnx.load(str(src), load_external_data=False)
    if how == "absolute":
        set_entry(model, "W", "location", str(secret))
    elif how == "dotdot":
        set_entry(model, "W", "location", "../elsewhere/secret.bin")
    else:  # a symlink inside the folder to the file outside
        (src.parent / "link.bin").symlink_to(secret)
        set_entry(model, "W", "location", "link.bin")
    set_entry(model, "W", "offset", "0")
    set_entry(model, "W", "length", str(secret.stat().st_size))
    onnx.save(model, str(src))
    return src, secret


COMMANDS = {
    "fuse": lambda src, tmp: ["fuse", str(src)],
    "verify": lambda src, tmp: ["verify", str(src), str(src)],
    "bench": lambda src, tmp: ["bench", str(src), "--runs", "2", "--warmup", "0"],
    "calibrate": lambda src, tmp: ["calibrate", str(src), "--data", str(tmp / "d.npy"), "--batch-size", "2"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_external_data_outside_the_folder_is_never_read(bnfold_run, tmp_path, how, command):
    src, secret = hostile(tmp_path, how)
    np.save(tmp_path / "d.npy", np.zeros((4, 3, 6, 6), np.float32))
    before = snapshot(tmp_path)
    line = one_line_exit_2(bnfold_run, COMMANDS[command](src, tmp_path))
    assert "'W'" in line and ("outside" in line or "absolute" in line), line
    assert snapshot(tmp_path) == before  # nothing written, nothing touched
    for path in tmp_path.rglob("*"):
        if path.is_file() and path != secret and not path.is_symlink():
            assert SECRET[:40] not in path.read_bytes()


def test_the_python_api_keeps_the_same_rule(tmp_path):
    from bnfold import BadInput, fuse_onnx

    src, _ = hostile(tmp_path, "dotdot")
    with pytest.raises(BadInput, match="outside"):
        fuse_onnx(src)
    with pytest.raises(BadInput, match="outside"):
        fuse_onnx(onnx.load(str(src), load_external_data=False), base_dir=src.parent)


MALFORMED = {
    "offset_negative": ("offset", "-8"),
    "offset_not_a_number": ("offset", "eight"),
    "length_negative": ("length", "-1"),
    "length_past_end": ("length", "999999"),
    "length_too_short": ("length", "16"),
    "offset_past_end": ("offset", "999999"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_external_entries(bnfold_run, tmp_path, case):
    src = external_model(tmp_path)
    model = onnx.load(str(src), load_external_data=False)
    set_entry(model, "W", *MALFORMED[case])
    onnx.save(model, str(src))
    before = snapshot(tmp_path)
    line = one_line_exit_2(bnfold_run, ["fuse", str(src)])
    assert "'W'" in line, line
    assert snapshot(tmp_path) == before


def _inline_with(tmp_path, mutate) -> Path:
    model = conv_bn_model()
    mutate(next(t for t in model.graph.initializer if t.name == "W"))
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("case", ["raw_data_short", "raw_data_long", "dims_absurd", "dims_negative",
                                  "float_data_count"])
def test_payloads_must_match_their_dims(bnfold_run, tmp_path, case):
    def mutate(t):
        if case == "raw_data_short":
            t.raw_data = t.raw_data[:-4]
        elif case == "raw_data_long":
            t.raw_data = t.raw_data + b"\0" * 8
        elif case == "dims_absurd":
            del t.dims[:]
            t.dims.extend([2**20, 2**20])  # 2^40 elements
        elif case == "dims_negative":
            t.dims[0] = -4
        else:
            values = numpy_helper.to_array(t).ravel().tolist()
            t.ClearField("raw_data")
            t.float_data.extend(values[:-1])

    src = _inline_with(tmp_path, mutate)
    for args in (["fuse", str(src)], ["verify", str(src), str(src)]):
        assert "'W'" in one_line_exit_2(bnfold_run, args)


def test_output_data_never_overwrites_what_the_input_reads(tmp_path, capsys):
    """orig.onnx keeps its weights in model.onnx.data; `-o model.onnx` must not write over it."""
    src = external_model(tmp_path, "orig.onnx", "model.onnx.data", channels=16)
    before = snapshot(tmp_path)
    assert cli(["fuse", str(src), "-o", str(tmp_path / "model.onnx"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert any("model.onnx.1.data" in n for n in report["notes"])
    after = snapshot(tmp_path)
    assert {k: after[k] for k in before} == before  # the input and its data are untouched
    x = {"x": np.random.default_rng(1).normal(size=(1, 3, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(run(onnx.load(str(tmp_path / "model.onnx")), x)[0],
                               run(onnx.load(str(src)), x)[0], rtol=1e-4, atol=1e-5)
    assert cli(["fuse", str(src), "-o", str(tmp_path / "model.onnx.data")]) == 2  # the data file itself


def test_in_place_removes_the_replaced_data_after_the_new_model_is_in_place(tmp_path, capsys):
    src = external_model(tmp_path, channels=16)
    x = {"x": np.random.default_rng(2).normal(size=(1, 3, 6, 6)).astype(np.float32)}
    expected = run(onnx.load(str(src)), x)[0]
    assert cli(["fuse", str(src), "--in-place", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.1.data"]
    assert any("removed m.onnx.data" in n for n in report["notes"])
    np.testing.assert_allclose(run(onnx.load(str(src)), x)[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["char_device", "fifo"])
def test_an_output_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), str(src))
    if kind == "char_device":
        target = Path("/dev/null")
    else:
        target = tmp_path / "pipe"
        os.mkfifo(target)
    mode = target.stat().st_mode
    # in a child process: a fuse that opened the FIFO would block, and the child's timeout ends it
    assert "not a regular file" in one_line_exit_2(in_a_child, ["fuse", str(src), "-o", str(target)])
    assert target.stat().st_mode == mode and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode))


def test_sigterm_leaves_nothing_behind(tmp_path):
    """A model large enough that the fuse is still working when SIGTERM arrives."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(24):
        inits += [numpy_helper.from_array(rng.normal(size=(256, 256, 3, 3)).astype(np.float32), f"W{i}"),
                  *bn_inits(f"bn{i}", 256, rng)]
        nodes += [helper.make_node("Conv", [x, f"W{i}"], [f"z{i}"], pads=[1, 1, 1, 1]), bn_node(f"z{i}", f"y{i}", f"bn{i}")]
        x = f"y{i}"
    src = tmp_path / "in" / "big.onnx"
    src.parent.mkdir()
    onnx.save(make_model(nodes, [vi("x", [1, 256, 4, 4])], [vi(x, None)], inits), str(src),
              save_as_external_data=True, location="big.bin")
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(tmp_path)
    proc = subprocess.Popen([str(EXE), "fuse", str(src), "-o", str(out / "big.fused.onnx")],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(out.iterdir()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the fuse finished before the signal arrived")
    assert proc.returncode == 128 + signal.SIGTERM and "interrupted" in err and "Traceback" not in err, err
    assert list(out.iterdir()) == [] and snapshot(tmp_path) == before


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES], ids=["disk_full", "permission"])
def test_os_errors_on_write_are_exit_2_with_the_reason(tmp_path, monkeypatch, capsys, error):
    import bnfold.onnxfold.io as io

    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), str(src))

    def fail(*args, **kwargs):
        raise OSError(error, os.strerror(error), str(tmp_path / "m.fused.onnx"))

    monkeypatch.setattr(io.wire, "write_inline", fail)
    monkeypatch.delenv("BNFOLD_DEBUG", raising=False)
    assert cli(["fuse", str(src)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and os.strerror(error) in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_bug_is_exit_3_in_one_line(tmp_path, monkeypatch, capsys):
    import bnfold.onnxfold.fold_pass as fold_pass

    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), str(src))
    monkeypatch.setattr(fold_pass, "count_nodes", lambda model: 1 / 0)
    monkeypatch.delenv("BNFOLD_DEBUG", raising=False)
    assert cli(["fuse", str(src)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error" in err[0] and "ZeroDivisionError" in err[0] and "BNFOLD_DEBUG" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


BAD_OPTIONS = {
    "bench_seconds_0": ["bench", "{m}", "--seconds", "0"],
    "bench_seconds_negative": ["bench", "{m}", "--seconds", "-1"],
    "bench_threads_negative": ["bench", "{m}", "--threads", "-1"],
    "bench_warmup_negative": ["bench", "{m}", "--warmup", "-1"],
    "bench_runs_0": ["bench", "{m}", "--runs", "0"],
    "bench_batch_0": ["bench", "{m}", "--batch-size", "0"],
    "bench_fail_below_nan": ["bench", "{m}", "--fail-below", "nan"],
    "bench_fail_below_0": ["bench", "{m}", "--fail-below", "0"],
    "verify_atol_nan": ["verify", "{m}", "{m}", "--atol", "nan"],
    "verify_rtol_negative": ["verify", "{m}", "{m}", "--rtol", "-1e-3"],
    "verify_atol_inf": ["verify", "{m}", "{m}", "--atol", "inf"],
    "verify_batch_negative": ["verify", "{m}", "{m}", "--batch-size", "-1"],
    "verify_batches_0": ["verify", "{m}", "{m}", "--batches", "0"],
    "calibrate_batch_1": ["calibrate", "{m}", "--data", "{d}", "--batch-size", "1"],
    "fuse_train_batch_0": ["fuse", "{m}", "--variance", "biased", "--train-batch-size", "0"],
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_options_are_refused_before_any_work(tmp_path, case, monkeypatch, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), str(src))
    np.save(tmp_path / "d.npy", np.zeros((4, 3, 6, 6), np.float32))
    import bnfold.detect as detect

    monkeypatch.setattr(detect, "detect_format", lambda path: pytest.fail("work started before the check"))
    args = [a.format(m=src, d=tmp_path / "d.npy") for a in BAD_OPTIONS[case]]
    assert cli(args) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_bench_of_models_with_different_inputs_is_exit_2(bnfold_run, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(conv_bn_model(), str(a))
    other = conv_bn_model()
    other.graph.input[0].name = "image"
    other.graph.node[0].input[0] = "image"
    onnx.save(other, str(b))
    assert "inputs differ" in one_line_exit_2(bnfold_run, ["bench", str(a), str(b), "--runs", "2", "--warmup", "0"])


def test_calibration_data_with_nan_names_the_sample(bnfold_run, tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), str(src))
    data = np.random.default_rng(0).normal(size=(8, 3, 6, 6)).astype(np.float32)
    data[5, 1, 2, 3] = np.nan
    np.save(tmp_path / "d.npy", data)
    line = one_line_exit_2(bnfold_run, ["calibrate", str(src), "--data", str(tmp_path / "d.npy"), "--batch-size", "4"])
    assert "sample 5" in line and "NaN" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npy", "m.onnx"]
