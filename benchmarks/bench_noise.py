"""A model benched against itself (A = B, the same file) must read 1.00 inside its interval.

    .venv/bin/python benchmarks/bench_noise.py [--n 10] [--configs mlp:1,mlp:8,cnn:8] [--seconds 1,2,4]
                                               [--methods before,after] [--out BENCHMARKS.md]

For every model config and method: `--n` self-benchmarks with no competitor started ("idle")
and `--n` beside one CPU-bound competitor (`python3 -c "while True: pass"`, always killed
afterwards). "after" is `bnfold.bench` with its defaults (blocks of fresh sessions, threads
from the load); "before" is the method bnfold used until issue 14, re-implemented here (one
session pair, all cores, AB BA AB …, a bootstrap over run pairs); "after+aa" is "after" with
`--aa-check` (a second copy of A in every block; its verdict is bench's own). The table gives
how often the 95 % interval contains 1.00, its half-width, the ratio, and how often the verdict
rule would have claimed a difference. Other processes on the machine are not ours: their CPU use
("foreign cores", from /proc/stat minus ours and the competitor's) is measured during each
setting and printed beside it. `--seconds 1,2,4` sweeps the duration (the default's reason).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sections import write_section



# -- models ------------------------------------------------------------------------------------


def build_models(folder: Path) -> dict[str, Path]:
    """The research's two models (mlp: 64-128-128-10 with BN1d; cnn: three Conv-BN on 32×32)."""
    import warnings

    import torch
    from torch import nn

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
                        nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))
    cnn = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    paths = {}
    for name, model, shape in (("mlp", mlp, (1, 64)), ("cnn", cnn, (1, 3, 32, 32))):
        model.eval()
        paths[name] = folder / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, torch.randn(*shape), str(paths[name]), dynamo=False, do_constant_folding=False,
                              training=torch.onnx.TrainingMode.EVAL, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return paths


# -- the two methods ---------------------------------------------------------------------------


def before(path: Path, batch: int, seconds: float | None, seed: int) -> tuple:
    """bnfold until issue 14: one session per model, threads = all cores, warm-up 5, rounds AB,
    BA, AB … for `seconds`, ratio of medians, 2.5/97.5 percentiles of 2000 pair resamples."""
    from bnfold.check.inputs import make_inputs
    from bnfold.check.runtime import session
    from bnfold.onnxfold.io import read_signature

    threads, seconds = os.cpu_count() or 1, seconds or 2.0  # its defaults
    feeds = make_inputs(read_signature(path), batch_size=batch, seed=0)
    sessions = [session(path, "cpu", "disabled", threads, spinning=False) for _ in range(2)]
    for _ in range(5):
        for s in sessions:
            s.run(None, feeds)
    times: list[list[float]] = [[], []]
    began, r = time.perf_counter(), 0
    while r < 5 or time.perf_counter() - began < seconds:
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            sessions[i].run(None, feeds)
            times[i].append(time.perf_counter() - start)
        r += 1
    a, b = np.asarray(times[0]), np.asarray(times[1])
    idx = np.random.default_rng(seed).integers(0, a.size, size=(2000, a.size))
    resampled = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    return float(np.median(a) / np.median(b)), float(np.percentile(resampled, 2.5)), \
        float(np.percentile(resampled, 97.5)), threads, None, None


THREADS: list[int | None] = [None]  # --threads for "after"; None: bnfold's default (from the load)


def after(path: Path, batch: int, seconds: float | None, seed: int, aa_check: bool = False) -> tuple:
    """`bnfold bench A A --level disabled` with everything else at its default; with the A/A
    check, its verdict too (a failed check turns a claimed difference into cannot tell)."""
    from bnfold import BenchOptions, bench

    report = bench(path, path, BenchOptions(batch_sizes=(batch,), levels=("disabled",), seconds=seconds, seed=seed,
                                            threads=THREADS[0], aa_check=aa_check))
    r = report.results[0]
    return r.speedup, r.speedup_ci[0], r.speedup_ci[1], report.threads, r.verdict if aa_check else None, r.aa_check


def after_aa(path: Path, batch: int, seconds: float | None, seed: int) -> tuple:
    """`bnfold bench A A --level disabled --aa-check`."""
    return after(path, batch, seconds, seed, aa_check=True)


METHODS = {"before": before, "after": after, "after+aa": after_aa}


# -- load: the competitor, and everyone else ---------------------------------------------------


class ForeignLoad:
    """Mean cores used over an interval by processes that are neither this script nor its
    competitor: busy jiffies in /proc/stat minus ours."""

    HZ = os.sysconf("SC_CLK_TCK")

    def __init__(self, pids: list[int]):
        self.pids = [os.getpid(), *pids]
        self.t0, self.busy0, self.own0 = time.monotonic(), self._busy(), self._own()

    @staticmethod
    def _busy() -> int:
        fields = list(map(int, open("/proc/stat").readline().split()[1:]))
        return sum(fields[:3]) + sum(fields[5:8])  # user nice system, irq softirq steal

    def _own(self) -> int:
        total = 0
        for pid in self.pids:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                text = open(f"/proc/{pid}/stat").read()
                fields = text[text.rindex(")") + 2:].split()
                total += int(fields[11]) + int(fields[12])
        return total

    def cores(self) -> float:
        spent = (self._busy() - self.busy0) - (self._own() - self.own0)
        return max(0.0, spent / self.HZ / max(1e-9, time.monotonic() - self.t0))


@contextlib.contextmanager
def competitor(on: bool):
    """One CPU-bound process while the block runs; killed on the way out, whatever happens."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])] if on else []
    if on:
        time.sleep(0.3)
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _stop(signum, _frame):
    raise KeyboardInterrupt  # unwinds through competitor(): the competitor is killed


# -- the table ---------------------------------------------------------------------------------


def verdict(low: float, high: float, estimate: float) -> str:
    from bnfold.check.timing import judge

    return judge(low, high, (high - low) / 2 / estimate)[0]


def run_setting(method: str, path: Path, batch: int, seconds: float | None, load: bool, n: int, verbose: bool) -> dict:
    runs = []
    with competitor(load) as pids:
        foreign = ForeignLoad(pids)
        loadavg = os.getloadavg()[0]
        for k in range(n):
            ratio, low, high, threads, said, aa = METHODS[method](path, batch, seconds, k)
            runs.append((ratio, low, high, threads, said or verdict(low, high, ratio), aa))
            if verbose:
                check = f", A/A check {aa}" if aa else ""
                print(f"  {method} {path.stem} b{batch} {'competitor' if load else 'idle'} {seconds or 'default'} s "
                      f"run {k}: {ratio:.4f} [{low:.4f}, {high:.4f}] threads={threads} → {runs[-1][4]}{check}",
                      file=sys.stderr, flush=True)
        cores = foreign.cores()
    ratios = np.array([r[0] for r in runs])
    half = np.array([(r[2] - r[1]) / 2 / r[0] * 100 for r in runs])
    return {"config": f"{path.stem} b{batch}", "setting": "competitor" if load else "idle", "method": method,
            "seconds": seconds if seconds is not None else _default_seconds(method),
            "hits": sum(r[1] <= 1.0 <= r[2] for r in runs), "n": n,
            "wrong": sum(r[4] in ("B faster", "B slower") for r in runs),
            "cannot": sum(r[4] == "cannot tell" for r in runs),
            "aa_biased": f"{sum(r[5] == 'biased' for r in runs)}/{n}" if runs[0][5] else "–",
            "half": f"±{np.median(half):.2f} % (max ±{half.max():.2f} %)",
            "ratio": f"{np.median(ratios):.3f} ({ratios.min():.3f}–{ratios.max():.3f})",
            "threads": ",".join(sorted({str(r[3]) for r in runs})), "foreign": cores, "loadavg": loadavg}


def _default_seconds(method: str) -> float:
    from bnfold.options import DEFAULT_SECONDS

    return 2.0 if method == "before" else DEFAULT_SECONDS  # after+aa: A and B get as many rounds as after's


def markdown(rows: list[dict], command: str) -> str:
    import onnxruntime

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    lines = [f"Command: `{command}`  ",
             f"Machine: {platform.machine()} {cpu}, {len(os.sched_getaffinity(0))} cores, onnxruntime "
             f"{onnxruntime.__version__}, level disabled, A = B = the same file.", "",
             "| config | setting | method | seconds | interval ∋ 1.00 | half-width median (max) | ratio median (range) "
             "| claimed a difference | cannot tell | A/A′ interval missed 1.00 | threads | foreign cores | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['setting']} | {r['method']} | {r['seconds']:g} | {r['hits']}/{r['n']} | "
                     f"{r['half']} | {r['ratio']} | {r['wrong']}/{r['n']} | {r['cannot']}/{r['n']} | {r['aa_biased']} | "
                     f"{r['threads']} | "
                     f"{r['foreign']:.2f} | {r['loadavg']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10, help="self-benchmarks per config, method and setting")
    parser.add_argument("--configs", default="mlp:1,mlp:8,cnn:8", help="model:batch, comma-separated")
    parser.add_argument("--seconds", default="default",
                        help="timed seconds per benchmark, comma-separated to sweep (default: each method's own)")
    parser.add_argument("--methods", default="before,after", help="before, after, after+aa (with --aa-check)")
    parser.add_argument("--settings", default="idle,competitor")
    parser.add_argument("--out", type=Path, help="markdown file whose section (--section) is replaced")
    parser.add_argument("--section", default="noise", help="marker name of that section, e.g. noise-duration")
    parser.add_argument("--threads", type=int, help="'after' with this many threads instead of its default")
    parser.add_argument("--verbose", action="store_true", help="every run on stderr")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop)
    THREADS[0] = args.threads
    command = "python benchmarks/bench_noise.py " + " ".join(sys.argv[1:])
    rows = []
    with tempfile.TemporaryDirectory(prefix="bnfold-noise-") as tmp:
        models = build_models(Path(tmp))
        for config in args.configs.split(","):
            name, batch = config.split(":")
            for seconds in (None if s == "default" else float(s) for s in args.seconds.split(",")):
                for method in args.methods.split(","):
                    for setting in args.settings.split(","):
                        rows.append(run_setting(method, models[name], int(batch), seconds, setting == "competitor",
                                                args.n, args.verbose))
                        print(markdown(rows[-1:], command).splitlines()[-1], file=sys.stderr, flush=True)
    text = markdown(rows, command.strip())
    print(text)
    if args.out:
        write_section(args.out, text, args.section)


if __name__ == "__main__":
    main()
