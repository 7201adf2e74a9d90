"""Measure what `bnfold verify`'s per-site check accepts and rejects, against the outputs alone.

For standard CNNs (random init, real BN statistics) in fp16 and fp32, each original model is
folded and verified (default options: seed 0, one batch of 2):
  honest             bnfold's fold of that model (float64 arithmetic, rounded once);
  honest, fp32 math  s = γ/√(σ²+ε), W·s and (b − μ)·s + β computed in float32 numpy from the
                     original's parameters, then rounded to the model's dtype;
  weight ×1.005      one output channel of one folded layer scaled by 1.005 (bnfold's fold otherwise);
  bias +0.01         one channel's folded bias shifted by 0.01;
in the first, a middle and the last folded layer (the layers a BN was folded into). For fp16 also
  converted apart   the fp16 copy of the fp32 model's fold, against the fp16 copy of the fp32 model:
                     not a fold of that fp16 model (each copy rounds its own fp32 weights), shown
                     for what it is.
"before" is the verdict of the output comparison alone (verify before the site check), "after"
the verdict of both. The site columns give the failing (or, passing, the closest) site, its test
and its worst |error| / bound.

    .venv/bin/python benchmarks/measure_site_verify.py [--size full|small] [--out FILE]

Its table is the "Verify per fold site" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import zoo  # noqa: E402
from measure_tolerances import sabotage, to_fp16  # noqa: E402

from bnfold import fuse_onnx  # noqa: E402
from bnfold.onnxfold import site_check  # noqa: E402
from bnfold.options import VerifyOptions  # noqa: E402
from bnfold.stages.verify import verify  # noqa: E402

MODELS = ("resnet50", "mobilenet_v2", "efficientnet_b0", "resnet18")
SITE_SECONDS = [0.0]


def _timed_check(original_check):
    def check(checks, activations):
        start = time.perf_counter()
        original_check(checks, activations)
        SITE_SECONDS[0] += time.perf_counter() - start
    return check


site_check.check = _timed_check(site_check.check)


def fold_in_float32(original: onnx.ModelProto, fused: onnx.ModelProto, report) -> onnx.ModelProto:
    """bnfold's fused model with every Conv+BN fold recomputed in float32 arithmetic from the
    original's parameters, then rounded to the model's dtype."""
    out = copy.deepcopy(fused)
    mine = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    theirs = {t.name: t for t in out.graph.initializer}
    bns = {n.name: n for n in original.graph.node}
    layers = {n.name: n for n in original.graph.node}
    for folded in report.folded:
        assert folded.pattern == "Conv", folded.pattern
        bn, conv = bns[folded.bn], layers[folded.producer]
        target = next(n for n in out.graph.node if n.name == folded.producer)
        gamma, beta, mean, var = (mine[i].astype(np.float32) for i in bn.input[1:5])
        eps = np.float32(next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5))
        s = gamma / np.sqrt(var + eps)
        w = mine[conv.input[1]]
        b = mine[conv.input[2]].astype(np.float32) if len(conv.input) > 2 and conv.input[2] else np.zeros_like(s)
        new_w = (w.astype(np.float32) * s.reshape(-1, *[1] * (w.ndim - 1))).astype(w.dtype)
        new_b = ((b - mean) * s + beta).astype(w.dtype)
        for name, value in ((target.input[1], new_w), (target.input[2], new_b)):
            theirs[name].CopyFrom(numpy_helper.from_array(value, name))
    return out


def run(original: Path, fused: Path) -> tuple[object, float]:
    SITE_SECONDS[0] = 0.0
    start = time.perf_counter()
    report = verify(original, fused, VerifyOptions())
    return report, time.perf_counter() - start


def row(model: str, dtype: str, case: str, layer: str, report, seconds: float, target: str | None = None) -> dict:
    failed = report.failed_sites
    shown = max(failed or report.sites, key=lambda s: s.ratio) if report.sites else None
    return {"model": model, "dtype": dtype, "case": case, "layer": layer, "before": report.outputs_passed,
            "after": report.passed, "decided": report.decided_by, "sites": len(report.sites),
            "skipped": len(report.skipped_sites), "site": shown.layer if shown else "-",
            "test": shown.test if shown else "-", "ratio": shown.ratio if shown else 0.0,
            "named": target is None or [s.layer for s in failed] == [target],
            "seconds": seconds, "site_seconds": SITE_SECONDS[0]}


def measure(name: str, small: bool, dtype: str, tmp: Path) -> list[dict]:
    net, shape = zoo.build(name, small=small)
    path32 = zoo.export_onnx(net, torch.randn(2, *shape), tmp / f"{name}.onnx")
    original32 = onnx.load(str(path32))
    original = to_fp16(original32) if dtype == "float16" else original32
    fused, report = fuse_onnx(copy.deepcopy(original))
    paths = {k: tmp / f"{name}.{dtype}.{k}.onnx" for k in ("original", "fused", "fp32math", "bad", "apart")}
    onnx.save(original, str(paths["original"]))
    onnx.save(fused, str(paths["fused"]))
    onnx.save(fold_in_float32(original, fused, report), str(paths["fp32math"]))
    rows = [row(name, dtype, "honest", "-", *run(paths["original"], paths["fused"])),
            row(name, dtype, "honest, fp32 math", "-", *run(paths["original"], paths["fp32math"]))]
    layers = [f.producer for f in report.folded]
    picks = {"first": layers[0], "middle": layers[len(layers) // 2], "last": layers[-1]}
    for where, layer in picks.items():
        node = next(n for n in fused.graph.node if n.name == layer)
        for case, tensor in (("weight ×1.005", node.input[1]), ("bias +0.01", node.input[2])):
            onnx.save(sabotage(fused, tensor, case.split()[0]), str(paths["bad"]))
            rows.append(row(name, dtype, case, where, *run(paths["original"], paths["bad"]), target=layer))
    if dtype == "float16":
        apart, _ = fuse_onnx(copy.deepcopy(original32))
        onnx.save(to_fp16(apart), str(paths["apart"]))
        rows.append(row(name, dtype, "converted apart", "-", *run(paths["original"], paths["apart"])))
    return rows


def _verdict(passed: bool, sabotaged: bool) -> str:
    if passed:
        return "pass (missed)" if sabotaged else "pass"
    return "FAIL (flagged)" if sabotaged else "FAIL"


def table(rows: list[dict], size: str) -> str:
    lines = [f"Command: `.venv/bin/python benchmarks/measure_site_verify.py --size {size}`  ",
             f"Machine: {platform.machine()}, {platform.processor() or platform.platform()}, onnxruntime CPU, "
             "optimizations off; verify's defaults (seed 0, one batch of 2). `before`: the outputs alone (verify "
             "without the site check); `after`: outputs and fold sites. `site`: the failing site (the closest to its "
             "bound where all pass), its test and |error| / bound; `named`: the failing site is the sabotaged layer "
             "and only it. `s`: seconds of the whole verify, of which the site check.", "",
             "| model | dtype | case | layer | before | after | decided by | sites | site | test | error / bound "
             "| named | s (sites) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sabotaged = r["case"].startswith(("weight", "bias"))
        named = ("yes" if r["named"] else "NO") if sabotaged else "-"
        lines.append(f"| {r['model']} | {r['dtype']} | {r['case']} | {r['layer']} | "
                     f"{_verdict(r['before'], sabotaged)} | {_verdict(r['after'], sabotaged)} | {r['decided']} | "
                     f"{r['sites']} | `{r['site'][-40:]}` | {r['test']} | {r['ratio']:.3g} | {named} | "
                     f"{r['seconds']:.1f} ({r['site_seconds']:.1f}) |")
    lines.append("")
    for dtype in ("float16", "float32"):
        mine = [r for r in rows if r["dtype"] == dtype]
        honest = [r for r in mine if r["case"].startswith("honest")]
        bad = [r for r in mine if r["case"].startswith(("weight", "bias"))]
        lines.append(f"{dtype}: honest folds failing, before → after: {sum(not r['before'] for r in honest)} → "
                     f"{sum(not r['after'] for r in honest)} of {len(honest)}; sabotaged folds flagged, before → "
                     f"after: {sum(not r['before'] for r in bad)} → {sum(not r['after'] for r in bad)} of {len(bad)}, "
                     f"the sabotaged layer named alone in {sum(r['named'] and not r['after'] for r in bad)}.")
    apart = [r for r in rows if r["case"] == "converted apart"]
    if apart:
        lines.append(f"float16 converted apart (not a fold of the fp16 model): failing before → after: "
                     f"{sum(not r['before'] for r in apart)} → {sum(not r['after'] for r in apart)} of {len(apart)}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("full", "small"), default="full")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float16", "float32"):
            for name in args.models:
                rows.extend(measure(name, args.size == "small", dtype, Path(tmp)))
                print(f"{name} {dtype} done", file=sys.stderr)
    text = table(rows, args.size)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
