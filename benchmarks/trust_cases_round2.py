"""The hostile and unlucky cases of issue 19 ("round two"), run against a bnfold source tree (a
checkout of any commit): one JSON line per case with the exit code, the number of stderr lines,
whether a traceback or a C++ stack was printed, the last stderr line, and what happened to files.

    .venv/bin/python benchmarks/trust_cases_round2.py .            # this tree
    .venv/bin/python benchmarks/trust_cases_round2.py /path/to/old  # an older checkout, for a before/after
"""
import hashlib, json, os, resource, subprocess, sys, tempfile, zipfile
from pathlib import Path

import numpy as np, onnx, torch
from onnx import helper, numpy_helper
from safetensors.torch import save_file
from torch import nn

TREE = Path(sys.argv[1]).resolve()
ONLY = sys.argv[2] if len(sys.argv) > 2 else ""
HUGE = str(10**30)
EVIL = "\x1b[31mred\x1b]8;;http://x/\x1b\\link\x1b]8;;\x1b\\\nline [bold]b[/bold] :fire: \u202e"
ARCH = "from torch import nn\n\ndef build(**kw):\n    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16))\n"


def bnfold(args, cwd, limit=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(TREE)}
    env.pop("BNFOLD_DEBUG", None)
    pre = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))) if limit else None
    p = subprocess.run([sys.executable, "-m", "bnfold", *args], capture_output=True, text=True, env=env, cwd=cwd,
                       timeout=timeout, preexec_fn=pre, errors="replace")
    lines = p.stderr.strip().splitlines()
    return {"exit": p.returncode, "stderr_lines": len(lines),
            "traceback": "Traceback" in p.stderr or "frame #" in p.stderr,
            "last": (lines[-1] if lines else "")[:160], "stdout": p.stdout}


def conv_bn(channels=4, dims=(1, 3, 6, 6), names=None):
    rng = np.random.default_rng(0)
    n = names or {}
    inits = [numpy_helper.from_array(rng.normal(size=(channels, 3, 3, 3)).astype(np.float32), "W")] + [
        numpy_helper.from_array(a.astype(np.float32), k) for k, a in (
            ("s", rng.uniform(.5, 1.5, channels)), ("B", rng.normal(size=channels)), ("m", rng.normal(size=channels)),
            ("v", rng.uniform(.5, 2, channels)))]
    x, y = n.get("x", "x"), n.get("y", "y")
    nodes = [helper.make_node("Conv", [x, "W"], ["z"], name=n.get("conv", "conv")),
             helper.make_node("BatchNormalization", ["z", "s", "B", "m", "v"], [y], name=n.get("bn", "bn"))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(x, 1, list(dims))],
                          [helper.make_tensor_value_info(y, 1, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def torch_files(d):
    (d / "arch.py").write_text(ARCH)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16)).eval()
    save_file(model.state_dict(), d / "m.safetensors")
    torch.save(model.state_dict(), d / "sd.pt")
    torch.save(model, d / "m.pt")
    torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 8, 8)), d / "ts.pt")
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 8, 8),)), d / "m.pt2")
    onnx.save(conv_bn(16), str(d / "m.onnx"))
    onnx.save(conv_bn(16), str(d / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    onnx.save(conv_bn(4, ("N", 3, 6, 6)), str(d / "dyn.onnx"))
    return d


def header(src, dst, text):
    blob = src.read_bytes()
    data = blob[8 + int.from_bytes(blob[:8], "little"):]
    dst.write_bytes(len(text.encode()).to_bytes(8, "little") + text.encode() + data)
    return dst.name


def entry(src, dst, suffix, mutate):
    with zipfile.ZipFile(src) as z:
        entries = {k: z.read(k) for k in z.namelist()}
    key = next(k for k in entries if k.endswith(suffix))
    with zipfile.ZipFile(dst, "w") as z:
        for k, v in entries.items():
            z.writestr(k, mutate(v) if k == key else v)
    return dst.name


def pt2_config(d, change):
    def mutate(raw):
        doc = json.loads(raw)
        change(doc)
        return json.dumps(doc).encode()
    return entry(d / "m.pt2", d / "c.pt2", "model_weights_config.json", mutate)


def first_weight(doc):
    return next(iter(doc["config"].values()))["tensor_meta"]


def json_case(make):
    def fn(d):
        name = make(d)
        args = ["fuse", name, "-o", "out" + Path(name).suffix]
        if name.endswith(".safetensors") or name == "kwargs":
            args = ["fuse", "m.safetensors", "--arch", "arch:build", "-o", "out.safetensors"] + (
                ["--arch-kwargs", make.text] if name == "kwargs" else [])
            if name != "kwargs":
                args[1] = name
        return bnfold(args, d)
    return fn


def kwargs(text):
    make = lambda d: "kwargs"  # noqa: E731
    make.text = text
    return make


def writer(name, *options):
    def fn(d):
        out = d / "out"
        out.mkdir()
        suffix = ".onnx" if "onnx" in options or name.endswith("onnx") else (
            ".pt2" if "pt2" in options or name.endswith("pt2") else Path(name).suffix)
        r = bnfold(["fuse", name, *options, "-o", f"out/f{suffix}"], d, limit=1024)
        r["left_in_output_folder"] = sorted(p.name for p in out.iterdir())
        return r
    return fn


def cmd(*args):
    return lambda d: bnfold([a.format(huge=HUGE) for a in args], d)


def arrays(array, *args):
    def fn(d):
        np.save(d / "a.npy", array)
        return bnfold(list(args), d)
    return fn


def evil_names(command):
    def fn(d):
        onnx.save(conv_bn(4, names={"x": "x" + EVIL, "y": "y" + EVIL, "conv": "conv" + EVIL, "bn": "bn" + EVIL}),
                  str(d / "e.onnx"))
        r = bnfold(["fuse", "e.onnx"] if command == "fuse" else ["verify", "e.onnx", "e.onnx"], d)
        r["raw_ESC_or_RLO_on_stdout"] = "\x1b" in r["stdout"] or "\u202e" in r["stdout"]
        return r
    return fn


def newline_file(d):
    name = "m\x1b[31m\nx.onnx"
    (d / name).write_bytes(b"junk")
    return bnfold(["fuse", name], d)


def others_data(d):
    onnx.save(conv_bn(5), str(d / "other.onnx"), save_as_external_data=True, location="b.onnx.data", size_threshold=0)
    (d / "b.onnx.1.data").write_bytes(b"someone else's")
    before = {p: hashlib.sha256((d / p).read_bytes()).hexdigest() for p in ("b.onnx.data", "b.onnx.1.data")}
    r = bnfold(["fuse", "ext.onnx", "-o", "b.onnx"], d)
    r["others_files_changed"] = [p for p, h in before.items() if hashlib.sha256((d / p).read_bytes()).hexdigest() != h]
    r["other_model_still_verifies"] = bnfold(["verify", "other.onnx", "other.onnx"], d)["exit"] == 0
    return r


def new_dir(d):
    r = bnfold(["fuse", "m.onnx", "-o", "newdir/"], d)
    r["file_named_newdir"] = (d / "newdir").is_file()
    return r


def bad_bias(layer):
    def fn(d):
        rng = np.random.default_rng(0)
        w = {"Conv": (8, 3, 3, 3), "ConvTranspose": (3, 8, 3, 3), "Gemm": (4, 8)}[layer]
        x = [1, 3, 6, 6] if layer != "Gemm" else [2, 4]
        inits = [numpy_helper.from_array(rng.normal(size=w).astype(np.float32), "W"),
                 numpy_helper.from_array(np.ones(5, np.float32), "b")] + [
            numpy_helper.from_array(np.ones(8, np.float32), k) for k in "sBmv"]
        nodes = [helper.make_node(layer, ["x", "W", "b"], ["z"], name="layer"),
                 helper.make_node("BatchNormalization", ["z", "s", "B", "m", "v"], ["y"])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, x)],
                              [helper.make_tensor_value_info("y", 1, None)], inits)
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(d / "b.onnx"))
        return bnfold(["fuse", "b.onnx"], d)
    return fn


def long_kernel(*args):
    def fn(d):
        torch.manual_seed(0)
        torch.save(nn.Sequential(nn.Conv1d(3, 4, 64), nn.BatchNorm1d(4)).eval(), d / "long.pt")
        return bnfold(["fuse", "long.pt", "--trust-pickle", *args], d) if args[0] != "verify" else \
            bnfold(["verify", "long.pt", "long.pt", "--trust-pickle"], d)
    return fn


def truncated_script_record(d):
    return bnfold(["fuse", entry(d / "ts.pt", d / "t.pt", "data/0", lambda v: v[:1000]), "-o", "o.pt"], d)


def broken_debug_info(d):
    return bnfold(["fuse", entry(d / "ts.pt", d / "t.pt", "conv.py.debug_pkl", lambda v: v[:len(v) // 2]),
                   "-o", "o.pt"], d)


def constant_eval(d):
    nodes = [helper.make_node("ConstantOfShape", ["size"], ["v0"], value=helper.make_tensor("v", 1, [1], [0.5]))]
    nodes += [helper.make_node("Add", [f"v{i}", "q"], [f"v{i + 1}"]) for i in range(61)]
    nodes += [helper.make_node("Slice", ["v61", "s0", "s4"], ["b"]), helper.make_node("Conv", ["x", "W", "b"], ["z"]),
              helper.make_node("BatchNormalization", ["z", "s", "B", "m", "v"], ["y"])]
    base = conv_bn(4)
    inits = list(base.graph.initializer) + [numpy_helper.from_array(np.array(a), n) for n, a in (
        ("size", np.array([1 << 24], np.int64)), ("q", np.float32(0.25)), ("s0", np.array([0], np.int64)),
        ("s4", np.array([4], np.int64)))]
    g = helper.make_graph(nodes, "g", list(base.graph.input), list(base.graph.output), inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(d / "c.onnx"))
    import time
    start = time.perf_counter()
    r = bnfold(["fuse", "c.onnx"], d)
    r["seconds"] = round(time.perf_counter() - start, 1)
    return r


CASES = {
    "1 safetensors header nested 100000 deep": json_case(lambda d: header(d / "m.safetensors", d / "h.safetensors",
                                                                          "[" * 100000 + "]" * 100000)),
    "1 safetensors header with a 5000-digit integer": json_case(lambda d: header(
        d / "m.safetensors", d / "h.safetensors", '{"__metadata__": {}, "x": %s}' % ("9" * 5000))),
    "1 .pt2 model.json nested 100000 deep": json_case(lambda d: entry(d / "m.pt2", d / "j.pt2", "models/model.json",
                                                                      lambda v: b"[" * 100000 + b"]" * 100000)),
    "1 .pt2 weights config nested 100000 deep": json_case(lambda d: entry(
        d / "m.pt2", d / "j.pt2", "model_weights_config.json", lambda v: b"[" * 100000 + b"]" * 100000)),
    "1 .pt2 constants config with a 5000-digit integer": json_case(lambda d: entry(
        d / "m.pt2", d / "j.pt2", "model_constants_config.json", lambda v: b'{"config": {"a": ' + b"9" * 5000 + b"}}")),
    "1 --arch-kwargs nested 50000 deep": json_case(kwargs("[" * 50000 + "]" * 50000)),  # one argument: < 128 KiB
    "1 --arch-kwargs with a 5000-digit integer": json_case(kwargs('{"n": %s}' % ("9" * 5000))),
    "2 .pt2 with a schema version torch does not read": json_case(lambda d: entry(
        d / "m.pt2", d / "s.pt2", "models/model.json",
        lambda v: json.dumps({**json.loads(v), "schema_version": {"major": 999, "minor": 0}}).encode())),
    "3 file-size limit: ONNX": writer("m.onnx"),
    "3 file-size limit: ONNX with external data": writer("ext.onnx"),
    "3 file-size limit: state_dict": writer("sd.pt", "--arch", "arch:build"),
    "3 file-size limit: safetensors": writer("m.safetensors", "--arch", "arch:build"),
    "3 file-size limit: pickle": writer("m.pt", "--trust-pickle"),
    "3 file-size limit: TorchScript": writer("ts.pt"),
    "3 file-size limit: .pt2": writer("m.pt2"),
    "3 file-size limit: --to torchscript": writer("m.pt", "--trust-pickle", "--to", "torchscript", "--shape",
                                                  "input=1,3,8,8"),
    "3 file-size limit: --to pt2": writer("m.pt", "--trust-pickle", "--to", "pt2", "--shape", "input=1,3,8,8"),
    "3 file-size limit: --to onnx": writer("m.pt", "--trust-pickle", "--to", "onnx", "--shape", "input=1,3,8,8"),
    "4 verify --batch-size 10**30": cmd("verify", "dyn.onnx", "dyn.onnx", "--batch-size", "{huge}"),
    "4 verify --shape x=10**30,3,6,6": cmd("verify", "dyn.onnx", "dyn.onnx", "--shape", "x={huge},3,6,6"),
    "4 verify --shape x=1,3,1e10,1e10": cmd("verify", "dyn.onnx", "dyn.onnx", "--shape", "x=1,3,10000000000,10000000000"),
    "4 bench --batch-size 10**30": cmd("bench", "dyn.onnx", "--batch-size", "{huge}", "--runs", "2"),
    "4 fuse --verify --batch-size 10**30 (torch)": cmd("fuse", "m.pt", "--trust-pickle", "--verify", "--batch-size",
                                                       "{huge}"),
    "4 fuse --to onnx --shape input=10**30,3,8,8": cmd("fuse", "m.pt", "--trust-pickle", "--to", "onnx", "--shape",
                                                       "input={huge},3,8,8"),
    "4 verify --seed -1": cmd("verify", "dyn.onnx", "dyn.onnx", "--seed", "-1"),
    "4 verify --seed 10**30 (torch)": cmd("verify", "m.pt", "m.pt", "--trust-pickle", "--seed", "{huge}"),
    "4 bench --threads 10**30": cmd("bench", "dyn.onnx", "--threads", "{huge}", "--runs", "2"),
    "4 verify --batch-size 2**40 (torch)": cmd("verify", "m.pt", "m.pt", "--trust-pickle", "--batch-size",
                                               str(2**40)),
    "5 torch verify --data of text": arrays(np.full((2, 3, 8, 8), "x"), "verify", "m.pt", "m.pt", "--trust-pickle",
                                            "--data", "a.npy"),
    "5 torch verify --data of records": arrays(np.zeros((2, 3, 8, 8), [("a", "f4"), ("b", "i4")]), "verify", "m.pt",
                                               "m.pt", "--trust-pickle", "--data", "a.npy"),
    "5 torch verify --data of dates": arrays(np.zeros((2, 3, 8, 8), "datetime64[s]"), "verify", "m.pt", "m.pt",
                                             "--trust-pickle", "--data", "a.npy"),
    "5 torch verify --data complex": arrays(np.zeros((2, 3, 8, 8), "complex64"), "verify", "m.pt", "m.pt",
                                            "--trust-pickle", "--data", "a.npy"),
    "5 torch verify --data 0-d": arrays(np.array(1.0, "float32"), "verify", "m.pt", "m.pt", "--trust-pickle",
                                        "--data", "a.npy"),
    "5 torch fuse --example-input of text": arrays(np.full((2, 3, 8, 8), "x"), "fuse", "m.pt", "--trust-pickle",
                                                   "--to", "onnx", "--example-input", "a.npy"),
    "5 torch calibrate with float16 data": arrays(np.zeros((4, 3, 8, 8), "float16"), "calibrate", "m.pt",
                                                  "--trust-pickle", "--data", "a.npy", "--batch-size", "2"),
    "6 fuse: names with ESC, OSC 8, newline, RLO, markup": evil_names("fuse"),
    "6 verify: names with ESC, OSC 8, newline, RLO, markup": evil_names("verify"),
    "6 error naming a file with ESC and a newline": newline_file,
    "7 -o b.onnx beside another model's b.onnx.data and b.onnx.1.data": others_data,
    "7 -o newdir/ (folder missing)": new_dir,
    "8 2.5 KB model: bias computed by 63 nodes of 2^24 elements": constant_eval,
    "9 Conv bias of 5 for 8 channels": bad_bias("Conv"),
    "9 ConvTranspose bias of 5 for 8 channels": bad_bias("ConvTranspose"),
    "9 Gemm C of 5 for 8 outputs": bad_bias("Gemm"),
    "9 Conv1d kernel 64 > guessed 32: --to onnx": long_kernel("--to", "onnx"),
    "9 Conv1d kernel 64 > guessed 32: --to torchscript": long_kernel("--to", "torchscript"),
    "9 Conv1d kernel 64 > guessed 32: --to pt2": long_kernel("--to", "pt2"),
    "9 Conv1d kernel 64 > guessed 32: verify": long_kernel("verify"),
    "11 TorchScript with a truncated tensor record": truncated_script_record,
    "11 TorchScript with truncated debug info": broken_debug_info,
    "11 safetensors dtype that is a list": json_case(lambda d: header(
        d / "m.safetensors", d / "h.safetensors", json.dumps({k: ({**v, "dtype": []} if k != "__metadata__" else v)
                                                              for k, v in json.loads(
            (d / "m.safetensors").read_bytes()[8:8 + int.from_bytes((d / "m.safetensors").read_bytes()[:8], "little")]
        ).items()}))),
    "11 .pt2 weight config with another shape": json_case(lambda d: pt2_config(
        d, lambda doc: first_weight(doc).__setitem__("sizes", [{"as_int": 2}]))),
    "11 .pt2 weight config with stride 0": json_case(lambda d: pt2_config(
        d, lambda doc: first_weight(doc).__setitem__("strides", [{"as_int": 0}] * 4))),
    "openvino provider hint": cmd("bench", "dyn.onnx", "--provider", "openvino", "--runs", "2"),
}

with tempfile.TemporaryDirectory() as seed:
    torch_files(Path(seed))
    for name, fn in CASES.items():
        if ONLY not in name:
            continue
        with tempfile.TemporaryDirectory() as d:
            for p in Path(seed).iterdir():
                (Path(d) / p.name).write_bytes(p.read_bytes())
            try:
                result = fn(Path(d))
            except subprocess.TimeoutExpired:
                result = {"exit": "timeout"}
            result.pop("stdout", None)
            print(json.dumps({"case": name, **result}, ensure_ascii=True), flush=True)
