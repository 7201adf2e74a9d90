"""bnfold's benchmark suite: what folding buys, how it compares with peers, how it scales.

    .venv/bin/pip install -e .[bench]          # the peers; never runtime dependencies
    .venv/bin/python benchmarks/run_suite.py [--quick] [--out BENCHMARKS.md]

1. latency  unfused vs bnfold-fused vs the no-BN twin (the same network built without BN:
            the limit of what folding can reach), one interleaved run per model and ORT level.
2. peers    onnxoptimizer, onnxslim, onnxsim, onnxscript's rewriter and ORT's offline
            optimizer (basic level) on the same files: BNs left, nodes after, wall time,
            peak RSS and the max error against the unfused model.
3. scale    fold time and peak RSS for models of 10 MB … > 2 GB, against onnx.load + onnx.save.
Each tool runs in its own process so its time and peak RSS are its own. Tables are written
between the suite's markers in --out, with the command and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from sections import write_section  # noqa: E402 — beside this script

LATENCY_MODELS = ("cnn", "mlp", "resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "mlp_6x1024")
PEER_MODELS = ("resnet18", "mobilenet_v2", "efficientnet_b0", "mlp_6x1024", "dcgan")
PEERS = ("bnfold", "onnxoptimizer", "onnxslim", "onnxsim", "onnxscript", "ort_basic")


# ---------------------------------------------------------------------------------------------
# Models


def export_models(names, out: Path, small: bool) -> dict[str, dict[str, Path]]:
    """name → {"original", "twin"} ONNX files, plus the input shape."""
    import torch

    import make_examples
    import zoo

    result = {}
    for name in names:
        if name in make_examples.EXAMPLES:
            build, shape = make_examples.EXAMPLES[name]
            net = make_examples.train(build(), shape, steps=10)
        else:
            net, shape = zoo.build(name, small=small)
        example = torch.randn(2, *shape)
        result[name] = {"original": zoo.export_onnx(net, example, out / f"{name}.onnx"),
                        "twin": zoo.export_onnx(zoo.no_bn_twin(net), example, out / f"{name}.twin.onnx"),
                        "shape": shape}
    return result


def batch_for(name: str) -> int:
    return 8 if name.startswith("mlp") else 1


# ---------------------------------------------------------------------------------------------
# 1. Latency


def latency(models, runs: int, threads: int) -> list[dict]:
    from bnfold import fuse_file
    from bnfold.check.inputs import make_inputs
    from bnfold.check.timing import Plan, block_ratios, median, speedup_of, time_blocks, use_thread_clock
    from bnfold.onnxfold.bench import SessionMaker
    from bnfold.onnxfold.io import read_signature

    rows = []
    for name, files in models.items():
        fused = Path(fuse_file(files["original"], files["original"].with_suffix(".fused.onnx")).output)
        feeds = make_inputs(read_signature(files["original"]), batch_size=batch_for(name), seed=0)
        for level in ("disabled", "default"):
            paths = [files["original"], fused, files["twin"]]
            makers = [SessionMaker(p, feeds, "cpu", level, threads) for p in paths]
            times = time_blocks(makers, Plan(blocks=20, runs=runs, cpu_clock=use_thread_clock(threads, True)))
            unfused, folded, twin = (median(np.concatenate(t)) * 1e3 for t in times.runs)
            speedup = speedup_of(block_ratios(times.runs[0], times.runs[1]))
            vs_twin = speedup_of(block_ratios(times.runs[1], times.runs[2]))
            rows.append({"model": name, "level": level, "batch": batch_for(name), "unfused_ms": unfused,
                         "fused_ms": folded, "twin_ms": twin, "speedup": speedup.estimate,
                         "speedup_ci": (speedup.low, speedup.high), "fused_vs_twin": vs_twin.estimate,
                         "fused_vs_twin_ci": (vs_twin.low, vs_twin.high)})
            print(f"latency {name} {level}: {unfused:.3f} / {folded:.3f} / {twin:.3f} ms", file=sys.stderr)
    return rows


def self_check(model: Path, runs: int, threads: int) -> dict:
    """A model against itself must read 1.00 inside its own interval."""
    from bnfold import BenchOptions, bench

    report = bench(model, model, BenchOptions(levels=("default",), runs=runs, threads=threads))
    r = report.results[0]
    return {"model": model.stem, "speedup": r.speedup, "ci": r.speedup_ci, "verdict": r.verdict}


# ---------------------------------------------------------------------------------------------
# 2. Peers (each run in a child process: `run_suite.py --tool NAME SRC DST`)


def run_tool(tool: str, src: str, dst: str) -> None:
    import onnx

    from bnfold import fuse_file  # imported before the clock starts, like every peer's module

    _import_peer(tool)
    start = time.perf_counter()
    if tool == "bnfold":
        fuse_file(src, dst)
    elif tool == "load_save":
        onnx.save(onnx.load(src), dst, save_as_external_data=_external(src), location=Path(dst).name + ".data")
    elif tool == "ort_basic":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = dst
        ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    else:
        model = onnx.load(src)
        if tool == "onnxoptimizer":
            import onnxoptimizer

            out = onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])
        elif tool == "onnxslim":
            import onnxslim

            out = onnxslim.slim(model)
        elif tool == "onnxsim":
            import onnxsim

            out, _ = onnxsim.simplify(model)
        elif tool == "onnxscript":
            from onnxscript import rewriter
            from onnxscript.rewriter.rules.common import (fuse_batchnorm_into_conv_rule,
                                                          fuse_batchnorm_into_conv_transpose_rule,
                                                          fuse_batchnorm_into_gemm_rule)

            out = rewriter.rewrite(model, pattern_rewrite_rules=[
                fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule])
        else:
            raise SystemExit(f"unknown tool {tool}")
        onnx.save(out, dst)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss()}))


def _import_peer(tool: str) -> None:
    modules = {"onnxoptimizer": "onnxoptimizer", "onnxslim": "onnxslim", "onnxsim": "onnxsim",
               "onnxscript": "onnxscript.rewriter", "ort_basic": "onnxruntime"}
    if tool in modules:
        __import__(modules[tool])


def peak_rss() -> int:
    """This process's peak resident set (VmHWM): unlike ru_maxrss it starts afresh at exec,
    so a child does not report its parent's memory."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _external(path: str) -> bool:
    import onnx

    from bnfold.onnxfold.io import iter_tensors

    m = onnx.load(path, load_external_data=False)
    return any(onnx.external_data_helper.uses_external_data(t) for t in iter_tensors(m))


def measure_tool(tool: str, src: Path, dst: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--tool", tool, str(src), str(dst)], capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": last[:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peers(models, out: Path) -> list[dict]:
    import onnx

    from bnfold.check.compare import compare_outputs
    from bnfold.check.inputs import make_inputs
    from bnfold.onnxfold.fold_pass import count_nodes
    from bnfold.check.runtime import session
    from bnfold.onnxfold.io import read_signature

    rows = []
    for name, files in models.items():
        src = files["original"]
        feeds = make_inputs(read_signature(src), batch_size=batch_for(name), seed=0)
        expected = _run(session(src), feeds)
        for tool in PEERS:
            dst = out / f"{name}.{tool}.onnx"
            row = {"model": name, "tool": tool, **measure_tool(tool, src, dst)}
            if "error" not in row:
                nodes, bns = count_nodes(onnx.load(str(dst)))
                got = _run(session(dst), feeds)
                cmp = compare_outputs(expected, got)[0]
                row.update(nodes_before=count_nodes(onnx.load(str(src)))[0], nodes=nodes, bn_left=bns,
                           max_abs=cmp.max_abs_error, verify=cmp.passed)
            rows.append(row)
            print(f"peer {name} {tool}: {row}", file=sys.stderr)
    return rows


def _run(sess, feeds):
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def installed_peers() -> dict[str, str]:
    status = {}
    for module in ("onnxoptimizer", "onnxslim", "onnxsim", "onnxscript"):
        try:
            __import__(module)
            status[module] = "installed"
        except Exception as exc:  # noqa: BLE001 — any import failure means "cannot install/run here"
            status[module] = f"not available: {type(exc).__name__}"
    return status


# ---------------------------------------------------------------------------------------------
# 3. Scale


def synthetic(path: Path, megabytes: int, external: bool) -> Path:
    """A chain of Conv(C×C×3×3) + BN with about `megabytes` of weights."""
    import onnx
    from onnx import helper, numpy_helper

    channels = 512 if megabytes < 500 else 1024
    per_layer = channels * channels * 9 * 4
    layers = max(1, round(megabytes * 2**20 / per_layer))
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array(rng.standard_normal((channels, channels, 3, 3), dtype=np.float32) * 0.05,
                                             f"W{i}"))
        for p, v in (("s", rng.uniform(0.5, 1.5, channels)), ("b", rng.normal(0, 0.5, channels)),
                     ("m", rng.normal(0, 0.5, channels)), ("v", rng.uniform(0.3, 2, channels))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"{p}{i}"))
        nodes.append(helper.make_node("Conv", [x, f"W{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"], [f"y{i}"]))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "scale", [helper.make_tensor_value_info("x", 1, [1, channels, 4, 4])],
                              [helper.make_tensor_value_info(x, 1, [1, channels, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(model, str(path), save_as_external_data=external, location=path.name + ".data" if external else None)
    return path


def scale(sizes, out: Path) -> list[dict]:
    from bnfold.onnxfold.io import file_size

    rows = []
    for mb in sizes:
        external = mb > 1800  # a single protobuf cannot exceed 2 GB
        src = synthetic(out / f"scale_{mb}.onnx", mb, external)
        size = file_size(src)
        fold = measure_tool("bnfold", src, out / f"scale_{mb}.fused.onnx")
        base = measure_tool("load_save", src, out / f"scale_{mb}.resaved.onnx")
        rows.append({"size": size, "external": external, "fold_s": fold.get("seconds"),
                     "fold_rss": fold.get("peak_rss"), "load_save_s": base.get("seconds"),
                     "load_save_rss": base.get("peak_rss")})
        print(f"scale {mb} MB: {rows[-1]}", file=sys.stderr)
        for p in out.glob(f"scale_{mb}*"):
            p.unlink()
    return rows


# ---------------------------------------------------------------------------------------------
# Report


def machine(threads: int) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?") \
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    import onnxruntime

    return (f"Machine: {platform.machine()} {cpu}, {os.cpu_count()} cores, {threads} ORT thread(s), "
            f"onnxruntime {onnxruntime.__version__} CPU, Python {platform.python_version()}.")


def latency_markdown(lat, check) -> list[str]:
    lines = ["### 1. Latency: unfused vs fused vs the no-BN twin", "",
             "Medians over 20 blocks of fresh sessions of the three models (`bnfold bench`'s method); speed-up = "
             "unfused / fused (95% interval over blocks); "
             "fused/twin = 1.00 means folding reached the limit.", "",
             "| model | ORT level | batch | unfused ms | fused ms | no-BN twin ms | speed-up | fused / twin |",
             "|---|---|---|---|---|---|---|---|"]
    for r in lat:
        lines.append(f"| {r['model']} | {r['level']} | {r['batch']} | {r['unfused_ms']:.3f} | {r['fused_ms']:.3f} | "
                     f"{r['twin_ms']:.3f} | {r['speedup']:.3f} ({r['speedup_ci'][0]:.3f}–{r['speedup_ci'][1]:.3f}) | "
                     f"{r['fused_vs_twin']:.3f} ({r['fused_vs_twin_ci'][0]:.3f}–{r['fused_vs_twin_ci'][1]:.3f}) |")
    return lines + ["", f"Self-check: {check['model']} benched against itself reads {check['speedup']:.3f} "
                        f"(95% interval {check['ci'][0]:.3f}–{check['ci'][1]:.3f}; {check['verdict']})."]


def peers_markdown(peer_rows, peer_status) -> list[str]:
    lines = ["### 2. Against peers", "",
             "Peers: " + ", ".join(f"{k} {v}" for k, v in peer_status.items()) + ". "
             "`verify` is bnfold's default-tolerance check of the tool's output against the unfused model.", "",
             "| model | tool | BN left | nodes (before → after) | wall s | peak RSS | max abs error | verify |",
             "|---|---|---|---|---|---|---|---|"]
    for r in peer_rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['tool']} | - | - | - | - | - | failed: {r['error']} |")
            continue
        lines.append(f"| {r['model']} | {r['tool']} | {r['bn_left']} | {r['nodes_before']} → {r['nodes']} | "
                     f"{r['seconds']:.2f} | {_mb(r['peak_rss'])} | {r['max_abs']:.2e} | "
                     f"{'pass' if r['verify'] else 'FAIL'} |")
    return lines


def scale_markdown(scale_rows) -> list[str]:
    lines = ["### 3. Scale: fold time and peak memory", "",
             "Chains of Conv(C×C×3×3)+BN; the > 2 GB model uses external data. Each run is its own process.", "",
             "| model size | bnfold fuse s | onnx.load+save s | time ratio | bnfold peak RSS | load+save peak RSS | "
             "bnfold RSS / model size |", "|---|---|---|---|---|---|---|"]
    for r in scale_rows:
        ratio = r["fold_s"] / r["load_save_s"] if r["fold_s"] and r["load_save_s"] else float("nan")
        lines.append(f"| {_mb(r['size'])}{' (external)' if r['external'] else ''} | {r['fold_s']:.2f} | "
                     f"{r['load_save_s']:.2f} | {ratio:.2f} | {_mb(r['fold_rss'])} | {_mb(r['load_save_rss'])} | "
                     f"{r['fold_rss'] / r['size']:.2f} |")
    return lines


def _mb(b) -> str:
    return f"{b / 2**20:,.0f} MB" if b is not None else "-"


PARTS = ("latency", "peers", "scale")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--tool":
        run_tool(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, few runs, sizes up to 100 MB")
    parser.add_argument("--out", type=Path, default=None, help="markdown file to update (e.g. BENCHMARKS.md)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="which parts to run, comma-separated; each has its own section in --out")
    args = parser.parse_args()
    parts = list(dict.fromkeys(args.parts.split(",")))
    if not set(parts) <= set(PARTS):
        parser.error(f"--parts takes {', '.join(PARTS)}, not {', '.join(p for p in parts if p not in PARTS)}")
    command = "python benchmarks/run_suite.py " + " ".join(sys.argv[1:])
    runs = 10 if args.quick else 60
    sections = {}
    with tempfile.TemporaryDirectory(prefix="bnfold-suite-") as tmp:
        out = Path(tmp)
        if "latency" in parts or "peers" in parts:
            models = export_models(LATENCY_MODELS if not args.quick else ("cnn", "mlp", "resnet18"), out, args.quick)
        if "latency" in parts:
            lat = latency(models, runs, args.threads)
            check = self_check(models["resnet18"]["original"], runs, args.threads)
            sections["latency"] = latency_markdown(lat, check)
        if "peers" in parts:
            peer_models = {k: v for k, v in models.items() if k in PEER_MODELS}
            if not args.quick:
                peer_models.update(export_models([m for m in PEER_MODELS if m not in models], out, False))
            sections["peers"] = peers_markdown(peers(peer_models, out), installed_peers())
        if "scale" in parts:
            sections["scale"] = scale_markdown(scale((10, 100) if args.quick else (10, 100, 1024, 2300), out))
    for part, lines in sections.items():
        text = "\n".join([f"Command: `{command.strip()}`  ", machine(args.threads), "", *lines])
        print(text + "\n")
        if args.out:
            write_section(args.out, text, f"suite-{part}")

if __name__ == "__main__":
    main()
