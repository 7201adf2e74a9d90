"""Measure what `bnfold verify`'s default tolerances must accept and must reject.

For standard CNNs (random init, real BN statistics) in fp32 and fp16:
  honest   the bnfold-fused model against the original: the errors a correct fold makes;
  weight   one output channel of one folded layer scaled by 1.005 (a 0.5 % error);
  bias     one channel's folded bias shifted by 0.01.
Sabotage is applied to the first, a middle and the last folded layer in turn. The table
gives, per case, the smallest atol (at the default rtol) and rtol (at the default atol) that
would pass: honest folds must sit below the defaults, every sabotage above.

    .venv/bin/python benchmarks/measure_tolerances.py [--size full|small] [--out FILE]

Its table is the "Verify tolerances" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import zoo  # noqa: E402

from bnfold import fuse_onnx  # noqa: E402
from bnfold.check.compare import compare_outputs, default_tolerance  # noqa: E402
from bnfold.check.inputs import make_inputs  # noqa: E402
from bnfold.check.runtime import session  # noqa: E402

MODELS = ("resnet50", "mobilenet_v2", "efficientnet_b0", "resnet18")


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every float tensor and value to float16 (inputs and outputs too)."""
    m = copy.deepcopy(model)
    for t in m.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT:
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float16), t.name))
    for node in m.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == onnx.TensorProto.FLOAT:
                attr.t.CopyFrom(onnx.numpy_helper.from_array(
                    onnx.numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
    for v in (*m.graph.input, *m.graph.output, *m.graph.value_info):
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    return m


def folded_layers(fused: onnx.ModelProto) -> list[tuple[str, str]]:
    """(weight, bias) initializer names of every Conv/Gemm that has a bias, in graph order."""
    out = []
    for node in fused.graph.node:
        if node.op_type in ("Conv", "Gemm", "ConvTranspose") and len(node.input) > 2:
            out.append((node.input[1], node.input[2]))
    return out


def sabotage(fused: onnx.ModelProto, tensor: str, kind: str) -> onnx.ModelProto:
    m = copy.deepcopy(fused)
    t = next(t for t in m.graph.initializer if t.name == tensor)
    a = onnx.numpy_helper.to_array(t).copy()
    channel = a.shape[0] // 2
    if kind == "weight":
        a[channel] = (a[channel].astype(np.float64) * 1.005).astype(a.dtype)
    else:
        a[channel] = a[channel] + a.dtype.type(0.01)
    t.CopyFrom(onnx.numpy_helper.from_array(a, t.name))
    return m


def run(model: onnx.ModelProto, feeds):
    sess = session(model.SerializeToString(), "cpu", "disabled")
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def measure(name: str, small: bool, dtype: str, tmp: Path) -> list[dict]:
    net, shape = zoo.build(name, small=small)
    path = zoo.export_onnx(net, torch.randn(2, *shape), tmp / f"{name}.onnx")
    original = onnx.load(str(path))
    fused, _ = fuse_onnx(copy.deepcopy(original))
    if dtype == "float16":
        original, fused = to_fp16(original), to_fp16(fused)
    feeds = make_inputs(original, batch_size=4, seed=0)
    expected = run(original, feeds)
    layers = folded_layers(fused)
    picks = {"first": layers[0], "middle": layers[len(layers) // 2], "last": layers[-1]}
    reference = next(iter(expected.values()))
    rms = float(np.sqrt(np.mean(reference.astype(np.float64) ** 2)))
    rows = [row(name, dtype, "honest", "-", compare_outputs(expected, run(fused, feeds)), rms)]
    for where, (weight, bias) in picks.items():
        for kind, tensor in (("weight ×1.005", weight), ("bias +0.01", bias)):
            bad = sabotage(fused, tensor, kind.split()[0])
            rows.append(row(name, dtype, kind, where, compare_outputs(expected, run(bad, feeds)), rms))
    return rows


def row(model: str, dtype: str, case: str, layer: str, comparisons, rms: float) -> dict:
    c = comparisons[0]
    return {"model": model, "dtype": dtype, "case": case, "layer": layer, "passed": c.passed,
            "max_abs": c.max_abs_error, "max_rel": c.max_rel_error, "min_k": c.min_atol_to_pass / rms,
            "min_rtol": c.min_rtol_to_pass, "cos": c.cosine_similarity}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("full", "small"), default="full")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "float16"):
            for name in MODELS:
                rows.extend(measure(name, args.size == "small", dtype, Path(tmp)))
    lines = [f"Command: `.venv/bin/python benchmarks/measure_tolerances.py --size {args.size}`  ",
             f"Machine: {platform.machine()}, {platform.processor() or platform.platform()}, "
             f"onnxruntime CPU, optimizations disabled. Defaults (k, rtol) with atol = k·RMS(output): fp32 "
             f"{default_tolerance(np.float32)}, fp16 {default_tolerance(np.float16)}. "
             "The last two columns give the smallest k (at the default rtol) and the smallest rtol "
             "(at the default atol) that would pass.", "",
             "| model | dtype | case | layer | verdict | max abs | max rel | cosine | min k to pass | min rtol to pass |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = "pass" if r["passed"] else "FAIL (flagged)"
        lines.append(f"| {r['model']} | {r['dtype']} | {r['case']} | {r['layer']} | {verdict} | {r['max_abs']:.2e} | "
                     f"{r['max_rel']:.2e} | {r['cos']:.8f} | {r['min_k']:.2e} | {r['min_rtol']:.2e} |")
    honest = [r for r in rows if r["case"] == "honest"]
    missed = [r for r in rows if r["case"] != "honest" and r["passed"]]
    lines += ["", f"Honest folds failing the defaults: {sum(not r['passed'] for r in honest)} of {len(honest)}. "
              f"Sabotaged copies passing the defaults: {len(missed)} of {len(rows) - len(honest)}."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
