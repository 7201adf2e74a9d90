"""The hostile and malformed cases of issue 11, run against a bnfold source tree (a checkout of any
commit): one JSON line per case with the exit code, whether a traceback was printed, and what
happened to the files.

    .venv/bin/python benchmarks/trust_cases.py .            # this tree
    .venv/bin/python benchmarks/trust_cases.py /path/to/old  # an older checkout, for a before/after
"""
import hashlib, json, os, signal, subprocess, sys, tempfile, time
from pathlib import Path
import numpy as np, onnx
from onnx import helper, numpy_helper

TREE = Path(sys.argv[1]).resolve()
PY = sys.executable

def bnfold(args, cwd=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(TREE)}
    env.pop("BNFOLD_DEBUG", None)
    p = subprocess.run([PY, "-m", "bnfold", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    tb = "Traceback" in p.stderr
    return p.returncode, tb, p.stderr.strip().splitlines()[-1][:100] if p.stderr.strip() else ""

def model(channels=4):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(channels, 3, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")] + [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
             (("s", rng.uniform(.5, 1.5, channels)), ("B", rng.normal(size=channels)), ("m", rng.normal(size=channels)), ("v", rng.uniform(.5, 2, channels)))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["z"]), helper.make_node("BatchNormalization", ["z", "s", "B", "m", "v"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 3, 6, 6])], [helper.make_tensor_value_info("y", 1, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)

def ext(folder, name="m.onnx", data="m.onnx.data"):
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model(), str(folder / name), save_as_external_data=True, location=data, size_threshold=0)
    return folder / name

def set_entry(path, key, value, tensor="W"):
    m = onnx.load(str(path), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.name == tensor)
    for e in t.external_data:
        if e.key == key:
            e.value = value
    onnx.save(m, str(path))

def secret_case(tmp, how):
    sec = tmp / "elsewhere" / "secret.bin"; sec.parent.mkdir()
    sec.write_bytes(b"TOP-SECRET-" * 100)
    src = ext(tmp / "model")
    loc = {"absolute": str(sec), "dotdot": "../elsewhere/secret.bin", "symlink": "link.bin"}[how]
    if how == "symlink":
        (src.parent / "link.bin").symlink_to(sec)
    # A second, unused weight of the secret's size, so its bytes would be copied verbatim.
    m = onnx.load(str(src), load_external_data=False)
    k = onnx.TensorProto(name="K", dims=[275], data_type=1)
    for key, value in (("location", loc), ("offset", "0"), ("length", "1100")):
        k.external_data.add(key=key, value=value)
    k.data_location = onnx.TensorProto.EXTERNAL
    m.graph.initializer.append(k)
    onnx.save(m, str(src))
    code, tb, line = bnfold(["fuse", str(src)])
    leaked = any(b"TOP-SECRET" in p.read_bytes() for p in src.parent.iterdir() if p.is_file() and p.name.startswith("m.fused"))
    return code, tb, f"secret copied into output: {leaked}"

def run_case(name, fn):
    with tempfile.TemporaryDirectory() as d:
        try:
            code, tb, note = fn(Path(d))
        except subprocess.TimeoutExpired:
            code, tb, note = "timeout", False, ""
        print(json.dumps({"case": name, "exit": code, "traceback": tb, "note": note}), flush=True)

def malformed(key, value):
    def fn(tmp):
        src = ext(tmp); set_entry(src, key, value)
        return bnfold(["fuse", str(src)])
    return fn

def rawdata(mut):
    def fn(tmp):
        m = model(); t = m.graph.initializer[0]
        if mut == "short": t.raw_data = t.raw_data[:-4]
        elif mut == "long": t.raw_data = t.raw_data + b"\0" * 8
        else:
            del t.dims[:]; t.dims.extend([2 ** 20, 2 ** 20])
        p = tmp / "m.onnx"; p.write_bytes(m.SerializeToString())
        return bnfold(["fuse", str(p)])
    return fn

def collide(tmp):
    src = ext(tmp, "orig.onnx", "model.onnx.data")
    before = hashlib.sha256((tmp / "model.onnx.data").read_bytes()).hexdigest()
    code, tb, line = bnfold(["fuse", str(src), "-o", str(tmp / "model.onnx")])
    after = hashlib.sha256((tmp / "model.onnx.data").read_bytes()).hexdigest()
    return code, tb, f"input's data overwritten: {before != after}"

def inplace(tmp):
    src = ext(tmp)
    code, tb, line = bnfold(["fuse", str(src), "--in-place"])
    return code, tb, "files after: " + ",".join(sorted(p.name for p in tmp.iterdir()))

def devnull(tmp):
    p = tmp / "m.onnx"; onnx.save(model(), str(p))
    fifo = tmp / "pipe"; os.mkfifo(fifo)
    code, tb, line = bnfold(["fuse", str(p), "-o", str(fifo)])
    return code, tb, f"fifo still a fifo: {fifo.is_fifo()}"

def sigterm(tmp):
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(24):
        inits += [numpy_helper.from_array(rng.normal(size=(256, 256, 3, 3)).astype(np.float32), f"W{i}")] + \
            [numpy_helper.from_array(rng.uniform(.5, 1.5, 256).astype(np.float32), f"{k}{i}") for k in "sBmv"]
        nodes += [helper.make_node("Conv", [x, f"W{i}"], [f"z{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", [f"z{i}", f"s{i}", f"B{i}", f"m{i}", f"v{i}"], [f"y{i}"])]
        x = f"y{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 256, 4, 4])], [helper.make_tensor_value_info(x, 1, None)], inits)
    src = tmp / "in" / "big.onnx"; src.parent.mkdir()
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(src), save_as_external_data=True, location="big.bin")
    out = tmp / "out"; out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(TREE)}
    p = subprocess.Popen([PY, "-m", "bnfold", "fuse", str(src), "-o", str(out / "big.fused.onnx")], stderr=subprocess.PIPE, text=True, env=env)
    t0 = time.monotonic()
    while p.poll() is None and time.monotonic() - t0 < 60:
        if any(out.rglob("*.bin")) or any(out.rglob("*.onnx*")):
            break
        time.sleep(0.005)
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM); _, err = p.communicate(timeout=60)
    left = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return p.returncode, "Traceback" in err, f"left in output folder: {left} bytes in {len(list(out.rglob('*')))} entries"

def opt(args):
    def fn(tmp):
        p = tmp / "m.onnx"; onnx.save(model(), str(p))
        np.save(tmp / "d.npy", np.random.default_rng(0).normal(size=(8, 3, 6, 6)).astype(np.float32))
        return bnfold([a.format(m=p, d=tmp / "d.npy") for a in args])
    return fn

def nan_data(tmp):
    p = tmp / "m.onnx"; onnx.save(model(), str(p))
    d = np.random.default_rng(0).normal(size=(8, 3, 6, 6)).astype(np.float32); d[5, 0, 0, 0] = np.nan
    np.save(tmp / "d.npy", d)
    code, tb, line = bnfold(["calibrate", str(p), "--data", str(tmp / "d.npy"), "--batch-size", "4"])
    return code, tb, line[-60:]

def diff_inputs(tmp):
    a, b = tmp / "a.onnx", tmp / "b.onnx"; onnx.save(model(), str(a))
    m = model(); m.graph.input[0].name = "image"; m.graph.node[0].input[0] = "image"; onnx.save(m, str(b))
    return bnfold(["bench", str(a), str(b), "--runs", "2"])

def verify_nan_tol(tmp):
    a = tmp / "a.onnx"; onnx.save(model(), str(a))
    m = model(); m.graph.initializer[0].raw_data = (numpy_helper.to_array(m.graph.initializer[0]) * 2).tobytes()
    b = tmp / "b.onnx"; onnx.save(m, str(b))
    code, tb, line = bnfold(["verify", str(a), str(b), "--atol", "nan", "--rtol", "nan"])
    return code, tb, "broken model vs original"

CASES = {
    "external data: absolute location": lambda t: secret_case(t, "absolute"),
    "external data: ../ location": lambda t: secret_case(t, "dotdot"),
    "external data: symlink out of the folder": lambda t: secret_case(t, "symlink"),
    "external data: offset negative": malformed("offset", "-8"),
    "external data: offset not a number": malformed("offset", "eight"),
    "external data: length negative": malformed("length", "-1"),
    "raw_data shorter than dims": rawdata("short"),
    "raw_data longer than dims": rawdata("long"),
    "dims of 2^40 elements": rawdata("absurd"),
    "-o over the input's data file name": collide,
    "--in-place with external data": inplace,
    "-o a FIFO": devnull,
    "SIGTERM during a large fuse": sigterm,
    "bench --seconds 0": opt(["bench", "{m}", "--seconds", "0"]),
    "bench --threads -1": opt(["bench", "{m}", "--threads", "-1", "--runs", "2"]),
    "bench --warmup -1": opt(["bench", "{m}", "--warmup", "-1", "--runs", "2"]),
    "bench --fail-below nan": opt(["bench", "{m}", "--fail-below", "nan", "--runs", "2"]),
    "bench A B with different inputs": diff_inputs,
    "verify --batch-size -1": opt(["verify", "{m}", "{m}", "--batch-size", "-1"]),
    "verify --atol nan --rtol nan (broken model)": verify_nan_tol,
    "calibrate data with a NaN sample": nan_data,
}
for name, fn in CASES.items():
    run_case(name, fn)
