"""Issue 15: folding where other tools stop, measured.

    .venv/bin/pip install onnxoptimizer onnxslim onnxsim onnxscript torch==2.13.0   # peers only
    .venv/bin/python benchmarks/reparam_bench.py [--quick] [--runs N] [--out BENCHMARKS.md]

1. counts   LeViT-128-like (TorchScript export: BN behind Flatten, weights behind Transpose),
            repvgg_a0-like in its train-time form (TorchScript export: parallel branches) and a
            ResNet-18 exported by the dynamo exporter with optimize=False (biases computed at run
            time): BNs, Convs and nodes before and after, for bnfold and each peer
            (run_suite.PEERS, each in its own process), with the max abs error of the tool's
            output against the unfused model (onnxruntime, optimizations off).
2. latency  repvgg_a0: unfused, a peer's output, bnfold's output and the deploy form
            (re-parameterized by hand in torch, tests/onnxfold/onnx_lookalikes.py, then exported), in
            interleaved rounds, ORT levels disabled and default, batch 1 and 8.
The models are built in code (tests/onnxfold/onnx_lookalikes.py, examples/zoo.py); nothing is downloaded.
The markdown section goes between its own markers in --out, with the command that made it.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "onnxfold"))
from sections import write_section  # noqa: E402

LATENCY_PEER = "onnxoptimizer"


def build_models(out: Path, quick: bool) -> dict[str, dict]:
    import torch

    import onnx_lookalikes as la

    specs = {
        "LeViT-128": (lambda: la.levit(la.LEVIT_TINY if quick else la.LEVIT_128), la.export_legacy),
        "repvgg_a0 (train form)": (lambda: la.repvgg(la.REPVGG_TINY if quick else la.REPVGG_A0), la.export_legacy),
        "ResNet-18 (dynamo)": (lambda: la.zoo.build("resnet18", small=quick), la.export_dynamo),
    }
    models = {}
    for k, (name, (build, export)) in enumerate(specs.items()):
        net, shape = build()
        example = torch.randn(1, *shape)
        path = export(net, example, out / f"model{k}.onnx")
        models[name] = {"net": net, "shape": shape, "path": path}
        print(f"exported {name}", file=sys.stderr)
    return models


# -- 1. counts -------------------------------------------------------------------------------------


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    from bnfold.onnxfold.io import iter_graphs

    graphs = list(iter_graphs(onnx.load(str(path), load_external_data=False).graph))
    nodes = [n for g in graphs for n in g.node]
    return {"bn": sum(n.op_type == "BatchNormalization" for n in nodes), "conv": sum(n.op_type == "Conv" for n in nodes),
            "nodes": len(nodes)}


def counts(models: dict, out: Path) -> list[dict]:
    from bnfold.check.compare import compare_outputs
    from bnfold.check.inputs import make_inputs
    from bnfold.check.runtime import session
    from bnfold.onnxfold.io import read_signature
    from run_suite import PEERS, measure_tool

    rows = []
    for name, model in models.items():
        src = model["path"]
        feeds = make_inputs(read_signature(src), batch_size=1, seed=0)
        expected = _outputs(session(src), feeds)
        before = op_counts(src)
        for tool in PEERS:
            dst = out / f"{src.stem}.{tool}.onnx"
            row = {"model": name, "tool": tool, "before": before, **measure_tool(tool, src, dst)}
            if "error" not in row:
                cmp = compare_outputs(expected, _outputs(session(dst), feeds))[0]
                row.update(after=op_counts(dst), max_abs=cmp.max_abs_error, verify=cmp.passed)
                model.setdefault("outputs", {})[tool] = dst
            rows.append(row)
            print(f"{name} {tool}: {row.get('after', row.get('error'))}", file=sys.stderr)
    return rows


def _outputs(sess, feeds) -> dict:
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


# -- 2. latency ------------------------------------------------------------------------------------


def deploy_form(model: dict, out: Path) -> Path:
    import onnx_lookalikes as la
    import torch

    return la.export_legacy(la.reparameterize_model(model["net"]), torch.randn(1, *model["shape"]), out / "deploy.onnx")


def latency(model: dict, deploy: Path, runs: int, threads: int) -> list[dict]:
    from bnfold.check.inputs import make_inputs
    from bnfold.check.timing import bootstrap_ratio_ci, median, time_interleaved
    from bnfold.onnxfold.io import read_signature

    files = {"unfused": model["path"]}
    if LATENCY_PEER in model.get("outputs", {}):
        files[LATENCY_PEER] = model["outputs"][LATENCY_PEER]
    files["bnfold"] = model["outputs"]["bnfold"]
    files["deploy"] = deploy
    rows = []
    for level in ("disabled", "default"):
        for batch in (1, 8):
            feeds = make_inputs(read_signature(files["unfused"]), batch_size=batch, seed=0)
            times, _ = time_interleaved(list(files.values()), feeds, "cpu", level, threads, warmup=5, runs=runs,
                                        seconds=None)
            by_name = dict(zip(files, times))
            row = {"level": level, "batch": batch, **{f"{k}_ms": median(t) * 1e3 for k, t in by_name.items()},
                   "bnfold_vs_deploy": median(by_name["bnfold"]) / median(by_name["deploy"]),
                   "bnfold_vs_deploy_ci": bootstrap_ratio_ci(by_name["bnfold"], by_name["deploy"]),
                   "unfused_vs_bnfold": median(by_name["unfused"]) / median(by_name["bnfold"])}
            rows.append(row)
            print(f"latency {level} b{batch}: {row}", file=sys.stderr)
    return rows


def compare_structure(a: Path, b: Path) -> dict:
    """Are two graphs the same network node for node (ops, attributes, weight shapes), and how
    far apart are their weights? Timing cannot tell 2 % apart on a loaded machine; this can."""
    import onnx
    from onnx import helper, numpy_helper

    ma, mb = onnx.load(str(a)), onnx.load(str(b))
    weights = [{t.name: numpy_helper.to_array(t) for t in m.graph.initializer} for m in (ma, mb)]
    same, worst = len(ma.graph.node) == len(mb.graph.node), 0.0
    for na, nb in zip(ma.graph.node, mb.graph.node):
        attrs = [{x.name: helper.get_attribute_value(x) for x in n.attribute} for n in (na, nb)]
        same &= na.op_type == nb.op_type and attrs[0] == attrs[1] and len(na.input) == len(nb.input)
        for ia, ib in zip(na.input, nb.input):
            wa, wb = weights[0].get(ia), weights[1].get(ib)
            if (wa is None) != (wb is None) or (wa is not None and wa.shape != wb.shape):
                same = False
            elif wa is not None:
                worst = max(worst, float(np.max(np.abs(wa.astype(np.float64) - wb)))) if wa.size else worst
    return {"same": bool(same), "nodes": len(ma.graph.node), "max_weight_diff": worst}


def torch_version() -> str:
    import torch

    return torch.__version__


def peer_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("onnxoptimizer", "onnxslim", "onnxsim", "onnxscript"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed (its rows say failed)"
    return found


# -- report ----------------------------------------------------------------------------------------


def markdown(command: str, count_rows, peer_status, lat_rows, structure: dict, load: tuple, threads: int,
             runs: int) -> str:
    import onnxruntime

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?") \
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    lines = ["## Where other tools stop (issue 15)", "",
             f"Command: `{command}`  ",
             f"Machine: {platform.machine()} {cpu}, {os.cpu_count()} cores, {threads} ORT thread(s), "
             f"onnxruntime {onnxruntime.__version__} CPU, Python {platform.python_version()}.", "",
             "Models built in code (`tests/onnxfold/onnx_lookalikes.py`, `examples/zoo.py`), random weights, real BN "
             "statistics. LeViT-128 and repvgg_a0 exported with the TorchScript exporter (BN kept), ResNet-18 with the "
             "dynamo exporter and `optimize=False` (torch " + torch_version() + "). Peers: "
             + ", ".join(f"{k} {v}" for k, v in peer_status.items())
             + "; `ort_basic` is onnxruntime's own offline optimizer at the basic level.", "",
             "### BNs, Convs and nodes before → after", "",
             "| model | tool | BN | Conv | nodes | max abs error | verify |", "|---|---|---|---|---|---|---|"]
    for r in count_rows:
        b = r["before"]
        if "error" in r:
            lines.append(f"| {r['model']} | {r['tool']} | {b['bn']} → - | {b['conv']} → - | {b['nodes']} → - | - | "
                         f"failed: {r['error']} |")
            continue
        a = r["after"]
        lines.append(f"| {r['model']} | {r['tool']} | {b['bn']} → {a['bn']} | {b['conv']} → {a['conv']} | "
                     f"{b['nodes']} → {a['nodes']} | {r['max_abs']:.2e} | {'pass' if r['verify'] else 'FAIL'} |")
    peer = LATENCY_PEER if lat_rows and f"{LATENCY_PEER}_ms" in lat_rows[0] else None
    lines += ["", "### Latency: repvgg_a0 unfused vs fused vs the deploy form", "",
              f"Medians (ms) of {runs} interleaved rounds per row. The deploy form is the network re-parameterized "
              "by hand in torch (what timm's `reparameterize_model` does) and exported: the physical limit. "
              "bnfold / deploy = 1.00 means bnfold reached it (95% bootstrap CI).", "",
              "| ORT level | batch | unfused | " + (f"{peer} | " if peer else "") + "bnfold | deploy form | "
              "unfused / bnfold | bnfold / deploy |",
              "|---|---|---|" + ("---|" if peer else "") + "---|---|---|---|"]
    for r in lat_rows:
        ci = r["bnfold_vs_deploy_ci"]
        lines.append(f"| {r['level']} | {r['batch']} | {r['unfused_ms']:.2f} | "
                     + (f"{r[f'{peer}_ms']:.2f} | " if peer else "")
                     + f"{r['bnfold_ms']:.2f} | {r['deploy_ms']:.2f} | {r['unfused_vs_bnfold']:.2f} | "
                     f"{r['bnfold_vs_deploy']:.3f} ({ci[0]:.3f}–{ci[1]:.3f}) |")
    verdict = "the same" if structure["same"] else "NOT the same"
    lines += ["", f"bnfold's output and the deploy form are {verdict} graph: {structure['nodes']} nodes, op for op, "
              f"attribute for attribute and weight shape for weight shape; weights differ by at most "
              f"{structure['max_weight_diff']:.1e} (both summed in float64 and cast once; bnfold uses ε as ONNX stores it, in float32). "
              f"Load average during the latency runs: {load[0]:.1f} → {load[1]:.1f} on {os.cpu_count()} cores "
              "(other work on the machine widens the intervals)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and few runs (a smoke test)")
    parser.add_argument("--runs", type=int, default=None, help="interleaved rounds per latency row")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=None, help="markdown file to update (e.g. BENCHMARKS.md)")
    args = parser.parse_args()
    runs = args.runs or (5 if args.quick else 40)
    command = "python benchmarks/reparam_bench.py" + (" --quick" if args.quick else "") + \
        (f" --runs {args.runs}" if args.runs else "") + (f" --out {args.out}" if args.out else "")
    with tempfile.TemporaryDirectory(prefix="bnfold-reparam-") as tmp:
        out = Path(tmp)
        models = build_models(out, args.quick)
        count_rows = counts(models, out)
        repvgg = models["repvgg_a0 (train form)"]
        deploy = deploy_form(repvgg, out)
        structure = compare_structure(repvgg["outputs"]["bnfold"], deploy)
        load_before = os.getloadavg()[0]
        lat_rows = latency(repvgg, deploy, runs, args.threads)
        load = (load_before, os.getloadavg()[0])
    text = markdown(command, count_rows, peer_versions(), lat_rows, structure, load, args.threads, runs)
    print(text)
    if args.out:
        write_section(args.out, text, "reparam")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
