"""Issue 22 §1: what folding BN into a quantized graph buys, measured.

    .venv/bin/python benchmarks/qdq_fold.py [--quick] [--seconds S] [--out BENCHMARKS.md]

A ResNet-18-shaped CNN (examples/zoo.py, random weights, real BN statistics) is exported with its
BNs kept and quantized by onnxruntime's `quantize_static` (QDQ, per channel, calibrated on random
inputs), in the layouts a user meets:
  kept        BN left out of the quantizer's op types and Conv outputs not quantized: each
              DequantizeLinear → Conv feeds its BN directly (the QAT-export layout);
  bnfold      `kept` folded by bnfold into its DequantizeLinear scales;
  fold first  the float model folded by bnfold, then quantized (the usual pipeline);
  default     quantize_static's own defaults, BN quantized too: a Q/DQ pair sits between each
              Conv and its BN, which bnfold keeps (no exact fold).
For each: onnxruntime at its default optimization level, batch 1: latency against `kept` by
`bnfold bench` (its block method: median of per-block ratios, 95 % interval), the max and mean
abs error of the output against the float model (unfused, optimizations off) on random inputs,
and how many Convs onnxruntime turned into QLinearConv. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))
from sections import write_section  # noqa: E402


def has_vnni() -> bool:
    """onnxruntime's x86 int8 kernels without VNNI multiply u8·s8 pairs into int16 sums that can
    saturate; its documentation's remedy is 7-bit weights (reduce_range)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return True
    return "vnni" in flags or platform.machine() not in ("x86_64", "AMD64")


def build(out: Path, quick: bool, reduce_range: bool) -> tuple[dict[str, Path], tuple[int, ...], dict]:
    import onnx
    import torch

    import zoo
    from bnfold import fuse_onnx

    net, shape = zoo.build("resnet18", small=quick)
    src = zoo.export_onnx(net, torch.randn(1, *shape), out / "float.onnx")
    float_folded = out / "float.folded.onnx"
    onnx.save(fuse_onnx(onnx.load(str(src)))[0], str(float_folded))
    files = {"float": src,
             "kept": quantize(src, out / "kept.onnx", shape, reduce_range, bn_quantized=False),
             "default": quantize(src, out / "default.onnx", shape, reduce_range, bn_quantized=True),
             "fold first": quantize(float_folded, out / "fold_first.onnx", shape, reduce_range, bn_quantized=True)}
    kept = onnx.load(str(files["kept"]))
    fused, report = fuse_onnx(copy.deepcopy(kept))
    files["bnfold"] = out / "kept.bnfold.onnx"
    onnx.save(fused, str(files["bnfold"]))
    _, default_report = fuse_onnx(onnx.load(str(files["default"])))
    print(f"bnfold on kept: folded {len(report.folded)}, kept {len(report.skipped)}; on default: folded "
          f"{len(default_report.folded)}, kept {len(default_report.skipped)}", file=sys.stderr)
    return files, shape, {"kept": (len(report.folded), len(report.skipped)),
                          "default": (len(default_report.folded), len(default_report.skipped))}


def quantize(src: Path, dst: Path, shape, reduce_range: bool, bn_quantized: bool) -> Path:
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry

    class Random(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": np.random.default_rng(k).normal(0, 1, (1, *shape)).astype(np.float32)}
                                 for k in range(8)])

        def get_next(self):
            return next(self.batches, None)

    logging.getLogger().setLevel(logging.ERROR)
    ops = None if bn_quantized else [op for op in QDQRegistry if op != "BatchNormalization"]
    extra = {} if bn_quantized else {"OpTypesToExcludeOutputQuantization": ["Conv"]}
    quantize_static(str(src), str(dst), Random(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=reduce_range, op_types_to_quantize=ops, extra_options=extra)
    return dst


def errors(files: dict[str, Path], shape, samples: int) -> dict[str, dict]:
    import onnxruntime as ort

    feeds = {"input": np.random.default_rng(1234).normal(0, 1, (samples, *shape)).astype(np.float32)}

    def run(path, level):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.log_severity_level = 3
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    reference = run(files["float"], ort.GraphOptimizationLevel.ORT_DISABLE_ALL).astype(np.float64)
    out = {}
    for name, path in files.items():
        got = run(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).astype(np.float64)
        out[name] = {"max_abs": float(np.abs(got - reference).max()), "mean_abs": float(np.abs(got - reference).mean()),
                     "argmax": float(np.mean(got.argmax(1) == reference.argmax(1))),
                     "range": float(np.abs(reference).max())}
    return out


def fused_ops(path: Path) -> dict[str, int]:
    """What onnxruntime's default level makes of the graph: int8 convolutions (QLinearConv), float
    ones (Conv, and FusedConv: a Conv with its Add or activation), BatchNormalization."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    return {"int8": ops.get("QLinearConv", 0), "float": ops.get("Conv", 0) + ops.get("FusedConv", 0),
            "bn": ops.get("BatchNormalization", 0)}


def bench(a: Path, b: Path, seconds: float) -> dict:
    """`bnfold bench A B` at onnxruntime's default level, batch 1."""
    cmd = [sys.executable, "-m", "bnfold", "bench", str(a), str(b), "--level", "default", "--batch-size", "1",
           "--seconds", str(seconds), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode not in (0, 1):
        raise SystemExit(f"bench failed: {proc.stderr.strip()}")
    report = json.loads(proc.stdout)
    result = report["results"][0]
    print(f"bench {a.name} vs {b.name}: {result['speedup']:.2f} {result['speedup_ci']}", file=sys.stderr)
    return {"a_ms": result["a"]["median_ms"], "b_ms": result["b"]["median_ms"], "speedup": result["speedup"],
            "ci": result["speedup_ci"], "threads": report["threads"], "verdict": result["verdict"]}


ROWS = {
    "kept": "QDQ, BN kept (BN not quantized, Conv → BN)",
    "bnfold": "kept, folded by bnfold",
    "fold first": "float folded by bnfold, then quantized",
    "default": "QDQ with quantize_static's defaults (Q/DQ between Conv and BN)",
}


def markdown(command: str, shape, reduce_range: bool, counts: dict, errs: dict, ops: dict, timing: dict,
             load: tuple[float, float]) -> str:
    import onnxruntime
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?") \
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    threads = next(iter(timing.values()))["threads"]
    lines = ["## BN in quantized graphs (issue 22 §1)", "",
             f"Command: `{command}`  ",
             f"Machine: {platform.machine()} {cpu}, {os.cpu_count()} cores, {threads} ORT thread(s) (bench's choice), "
             f"onnxruntime {onnxruntime.__version__} CPU, torch {torch.__version__}, Python {platform.python_version()}.",
             "",
             f"ResNet-18-shaped CNN (`examples/zoo.py`, input {list(shape)}, random weights, real BN statistics), "
             "exported with BN kept, quantized by `quantize_static` (QDQ, per channel, int8 weights, uint8 "
             "activations, 8 random calibration images" + (", `reduce_range=True`: this CPU has no VNNI, and "
             "onnxruntime's u8·s8 kernels without it saturate on 8-bit weights" if reduce_range else "") + "). "
             f"bnfold folded {counts['kept'][0]} of the {sum(counts['kept'])} BNs of `kept` and "
             f"{counts['default'][0]} of the {sum(counts['default'])} of `default` (each kept with its reason). "
             "Latency: `bnfold bench` at onnxruntime's default level, batch 1, each model against `kept` (A) in "
             "its own run; speed-up = median over blocks of median(A)/median(B), 95 % interval. Error: max and "
             "mean abs difference of the logits from the float model (unfused, optimizations off), onnxruntime "
             "default level, 16 random images; argmax = top-1 agreement with it.", "",
             "| model | int8 / float Conv, BN after ORT | median ms | speed-up vs kept (95 % CI) | max abs error | "
             "mean abs error | argmax |",
             "|---|---|---|---|---|---|---|"]
    for key, label in ROWS.items():
        o, e = ops[key], errs[key]
        if key == "kept":
            t = next(iter(timing.values()))
            speed = "1 (A)"
            ms = t["a_ms"]
        else:
            t = timing[key]
            speed = f"{t['speedup']:.2f} ({t['ci'][0]:.2f}–{t['ci'][1]:.2f})"
            ms = t["b_ms"]
        lines.append(f"| {label} | {o['int8']} / {o['float']}, {o['bn']} | {ms:.2f} | {speed} | "
                     f"{e['max_abs']:.3f} | {e['mean_abs']:.4f} | {e['argmax']:.2f} |")
    lines += ["", f"Float model's logits span ±{errs['kept']['range']:.2f}. Load average during the timing: "
              f"{load[0]:.1f} → {load[1]:.1f} on {os.cpu_count()} cores."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small ResNet (width 8, 64×64): a smoke test")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per bench (bnfold bench --seconds)")
    parser.add_argument("--out", type=Path, default=None, help="markdown file to update (e.g. BENCHMARKS.md)")
    args = parser.parse_args()
    command = "python benchmarks/qdq_fold.py" + (" --quick" if args.quick else "") + \
        (f" --seconds {args.seconds:g}" if args.seconds != 4.0 else "") + (f" --out {args.out}" if args.out else "")
    reduce_range = not has_vnni()
    with tempfile.TemporaryDirectory(prefix="bnfold-qdq-") as tmp:
        files, shape, counts = build(Path(tmp), args.quick, reduce_range)
        errs = errors(files, shape, samples=16)
        ops = {k: fused_ops(files[k]) for k in ROWS}
        load_before = os.getloadavg()[0]
        timing = {k: bench(files["kept"], files[k], args.seconds) for k in ROWS if k != "kept"}
        load = (load_before, os.getloadavg()[0])
    text = markdown(command, shape, reduce_range, counts, errs, ops, timing, load)
    print(text)
    if args.out:
        write_section(args.out, text, "qdq-fold")


if __name__ == "__main__":
    main()
