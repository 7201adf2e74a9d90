"""What folding buys where torch users deploy: `bnfold bench --runtime torch` on full-size
models from examples/zoo.py (random weights, real BN statistics), eager and TorchScript.

    .venv/bin/python benchmarks/bench_torch_runtime.py [--models resnet18,mobilenet_v2,mlp,mlp_6x1024]
                                                       [--batches 1,8] [--seconds S] [--out BENCHMARKS.md]

Each model is saved with torch.save (a pickle, loaded with --trust-pickle) and benched as
A = the module, B = bnfold's fold of it, in the forms asked for (TorchScript by tracing both),
with bnfold's defaults otherwise (threads from the load; 20 blocks of fresh module copies).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_noise import ForeignLoad  # noqa: E402
from sections import write_section  # noqa: E402



def bench_model(name: str, batches: list[int], forms: tuple[str, ...], seconds: float | None, folder: Path) -> list[dict]:
    import torch

    import zoo
    from bnfold import BenchOptions, LoadOptions, bench

    model, shape = zoo.build(name, small=False)
    path = folder / f"{name}.pt"
    torch.save(model, path)
    rows = []
    for batch in batches:
        options = BenchOptions(runtimes=("torch",), torch_forms=forms, seconds=seconds)
        load = LoadOptions(trust_pickle=True, shapes={"input": [batch, *shape]})
        foreign = ForeignLoad([])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = bench(path, None, options, load)
        cores = foreign.cores()
        for r in report.results:
            rows.append({"model": name, "form": r.level, "batch": batch, "a": r.a.median_ms, "b": r.b.median_ms,
                         "speedup": r.speedup, "ci": r.speedup_ci, "verdict": r.verdict, "threads": report.threads,
                         "clock": r.clock, "bn": report.original.bn_nodes, "foreign": cores})
            print(f"{name} {r.level} ×{batch}: {r.speedup:.3f} ({r.speedup_ci[0]:.3f}–{r.speedup_ci[1]:.3f}) "
                  f"{r.verdict}, threads {report.threads}, foreign {cores:.2f}", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict], command: str) -> str:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    lines = [f"Command: `{command}`  ",
             f"Machine: {platform.machine()} {cpu}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__} "
             "CPU. A = the module as saved, B = bnfold's fold; latency is the median per run on the result's clock.",
             "",
             "| model | BNs | form | batch | A ms | B ms | speed-up A/B (95 % interval) | verdict | threads | clock "
             "| foreign cores |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['bn']} | {r['form']} | {r['batch']} | {r['a']:.3f} | {r['b']:.3f} | "
                     f"{r['speedup']:.3f} ({r['ci'][0]:.3f}–{r['ci'][1]:.3f}) | {r['verdict']} | {r['threads']} | "
                     f"{r['clock']} | {r['foreign']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2,mlp,mlp_6x1024")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--forms", default="eager,torchscript")
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per configuration (bnfold's default)")
    parser.add_argument("--out", type=Path, help="markdown file whose torch-runtime section is replaced")
    args = parser.parse_args()
    command = "python benchmarks/bench_torch_runtime.py " + " ".join(sys.argv[1:])
    rows = []
    with tempfile.TemporaryDirectory(prefix="bnfold-torch-bench-") as tmp:
        for name in args.models.split(","):
            rows += bench_model(name, [int(b) for b in args.batches.split(",")], tuple(args.forms.split(",")),
                                args.seconds, Path(tmp))
    text = markdown(rows, command.strip())
    print(text)
    if args.out:
        write_section(args.out, text, "torch-runtime")


if __name__ == "__main__":
    main()
