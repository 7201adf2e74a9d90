"""Why two sessions of the same ONNX file time differently: the experiment behind bench's method.

    .venv/bin/python benchmarks/bench_sessions.py [--trials 3] [--seconds 1] [--out BENCHMARKS.md]

Four sessions of one file, used in rotation (each runs once per round, the starting one
rotating), for `--seconds` in each of two halves. Per session: the median run time in each half.
If sessions differed only by chance, their medians would not agree between halves; if each has
a speed of its own, they correlate. With 2 threads each session has one intra-op worker thread
(spinning off, as bench makes them): its run-queue wait per wake-up, from
/proc/self/task/*/schedstat, shows where the time goes. No competitor ("idle") and one
CPU-bound competitor (`python3 -c "while True: pass"`, killed afterwards); the foreign load
(everything else on the machine) is measured and printed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_noise import ForeignLoad, build_models, competitor  # noqa: E402
from sections import write_section  # noqa: E402



def thread_stats() -> dict[int, tuple[int, int]]:
    """tid → (run-queue wait ns, time slices) for every thread of this process."""
    stats = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            _, wait, slices = map(int, open(f"/proc/self/task/{tid}/schedstat").read().split())
            stats[int(tid)] = (wait, slices)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    return stats


def trial(path: Path, feeds: dict, threads: int, seconds: float, k: int = 4) -> dict:
    from bnfold.check.runtime import session

    sessions, workers = [], []
    for _ in range(k):
        before = set(thread_stats())
        sessions.append(session(path, "cpu", "disabled", threads, spinning=False))
        workers.append([t for t in thread_stats() if t not in before])
    for _ in range(5):
        for s in sessions:
            s.run(None, feeds)
    start_stats = thread_stats()
    halves: dict[str, list[np.ndarray]] = {"wall": [], "thread cpu": []}
    for _ in range(2):
        wall: list[list[float]] = [[] for _ in sessions]
        cpu: list[list[float]] = [[] for _ in sessions]
        began, r = time.perf_counter(), 0
        while time.perf_counter() - began < seconds:
            for i in [(j + r) % k for j in range(k)]:
                t0, c0 = time.perf_counter(), time.thread_time()
                sessions[i].run(None, feeds)
                c1, t1 = time.thread_time(), time.perf_counter()
                wall[i].append(t1 - t0)
                cpu[i].append(c1 - c0)
            r += 1
        halves["wall"].append(np.array([np.median(t) for t in wall]) * 1e6)
        halves["thread cpu"].append(np.array([np.median(t) for t in cpu]) * 1e6)
    end_stats = thread_stats()
    waits = []
    for tids in workers:
        w = [(end_stats[t][0] - start_stats[t][0]) / max(1, end_stats[t][1] - start_stats[t][1]) / 1e3
             for t in tids if t in end_stats and t in start_stats]
        waits.append(max(w) if w else float("nan"))
    result = {"waits": waits}
    for clock, (first, second) in halves.items():
        both = (first + second) / 2
        result[clock] = {"medians": both, "spread": both.max() / both.min(),
                         "corr": float(np.corrcoef(first, second)[0, 1])}
    return result


def _joined(values, digits: int = 3) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--configs", default="mlp:8,cnn:8")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from bnfold.check.inputs import make_inputs
    from bnfold.onnxfold.io import read_signature

    command = "python benchmarks/bench_sessions.py " + " ".join(sys.argv[1:])
    lines = [f"Command: `{command.strip()}`", "",
             "| config | setting | threads | clock | session medians µs, trial 1 | slowest / fastest session, per trial "
             "| corr(1st half, 2nd half), per trial | worker run-queue wait per wake-up µs, trial 1 | foreign cores |",
             "|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="bnfold-sessions-") as tmp:
        models = build_models(Path(tmp))
        for config in args.configs.split(","):
            name, batch = config.split(":")
            feeds = make_inputs(read_signature(models[name]), batch_size=int(batch), seed=0)
            for load in (False, True):
                for threads in (2, 1):
                    with competitor(load) as pids:
                        foreign = ForeignLoad(pids)
                        trials = [trial(models[name], feeds, threads, args.seconds) for _ in range(args.trials)]
                        cores = foreign.cores()
                    waits = ", ".join("-" if np.isnan(w) else f"{w:.1f}" for w in trials[0]["waits"]) \
                        if threads > 1 else "no worker"
                    # the calling thread's CPU time is the whole run only when there is no worker
                    for clock in ("wall", "thread cpu") if threads == 1 else ("wall",):
                        runs = [t[clock] for t in trials]
                        row = (f"| {name} b{batch} | {'competitor' if load else 'idle'} | {threads} | {clock} | "
                               f"{', '.join(f'{m:.1f}' for m in runs[0]['medians'])} | "
                               f"{_joined(t['spread'] for t in runs)} | {_joined((t['corr'] for t in runs), 2)} | "
                               f"{waits} | {cores:.2f} |")
                        lines.append(row)
                        print(row, file=sys.stderr, flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_section(args.out, text, "sessions")


if __name__ == "__main__":
    main()
