"""Issue 20, item 5: how long `bnfold fuse` takes, against a plain torch load+save of the same file.

    .venv/bin/python benchmarks/fuse_speed.py [--rounds 6] [--models yolo,repvgg,hrnet]
                                              [--forms pickle,torchscript,pt2] [--quick] [--no-profile]
                                              [--ultralytics-python PY] [--section BENCHMARKS.md]

Models (examples/lookalikes.py, random weights with real BN statistics, nothing downloaded):
  yolo    lookalikes.yolo(w=16, nc=80): YOLOv8n's width (16 = 64 × 0.25) and classes, input 1×3×640×640
  repvgg  lookalikes.RepVgg(w=48, depths=(2, 4, 14, 1)): repvgg_a0's depths and first width, train-time
          branches, input 1×3×224×224
  hrnet   lookalikes.dla_hrnet(w=32): a DLA tree and an HRNet two-branch fuse stage, input 1×3×224×224
Forms: pickle (torch.save(model), fused with --trust-pickle), torchscript (torch.jit.trace), pt2
(torch.export.save). --quick: test widths, half-size inputs, 3 rounds, to check the script runs.

Every measurement is one fresh process, timed from spawn to exit (so each includes interpreter start
and `import torch`), writing to a new temp file; bnfold's bytecode is compiled first, as an install
leaves it:
  plain   the loader bnfold uses for that form (torch.load(weights_only=False) / torch.jit.load /
          torch.export.load), then the matching saver (torch.save / torch.jit.save / torch.export.save)
  bnfold  the console script next to sys.executable: `bnfold fuse IN -o OUT` (+ --trust-pickle)
  hand    (yolo pickle) load, fuse the way ultralytics' DetectionModel.fuse() does — every Conv block's
          conv+bn through torch.nn.utils.fusion.fuse_conv_bn_eval, its bn dropped — and save; the
          look-alike's Conv has no forward_fuse, so the bn becomes nn.Identity instead of being deleted
With --ultralytics-python PY (an interpreter that imports ultralytics), a
yolov8n.yaml DetectionModel is built there (no weights) and pickled, and plain, bnfold (`PY -m bnfold`,
this checkout on PYTHONPATH, so PY needs bnfold's dependencies) and ultralytics' own
load → DetectionModel.fuse() → save are timed in PY. ultralytics needs torchvision, whose wheels pin a
torch of their own, so PY is best a throwaway venv:
    python -m venv /tmp/ul && /tmp/ul/bin/pip install ultralytics onnx onnxruntime typer rich safetensors

Each round runs every process once, the cases in a random order and each case's processes in a random
order (A, B, A, B … interleaved). The ratio is median(bnfold) / median(baseline) over the rounds; its
interval is the order-statistic interval for the median of the per-round ratios, 95 % from 6 rounds
on (fewer rounds: [min, max] with its exact coverage, printed beside it).
CPU (user+sys of the process) is beside it: on a shared machine it moves less than wall time. Foreign
load: cores busy with processes not ours, per round, from /proc/stat.

Where the time goes (one more bnfold run per case, after the timed rounds, same interpreter and
arguments): timers around every module import and around the functions in PHASE_ANCHORS (today's
names; one that is gone is skipped and its time shows in the phase around it), so the phases add up
to the run's wall time at no profiler overhead; `-X importtime` names the slowest imports.
The markdown goes to benchmarks/out/fuse_speed.md and, with --section FILE, between FILE's
fuse-speed markers (benchmarks/sections.py).
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from sections import write_section  # noqa: E402

from bnfold.check.timing import coverage, order_statistic_rank  # noqa: E402

FORMS = ("pickle", "torchscript", "pt2")
SUFFIX = {"pickle": ".pt", "torchscript": ".ts.pt", "pt2": ".pt2"}
TARGET = {"plain": 1.5, "hand": 1.3, "ultralytics": 1.3}
BASELINE_NAME = {"plain": "plain load+save", "hand": "hand-written fuse (ultralytics-style)",
                 "ultralytics": "ultralytics DetectionModel.fuse()"}

PLAIN = """
import sys, torch
form, src, dst = sys.argv[1:]
if form == "torchscript":
    torch.jit.save(torch.jit.load(src, map_location="cpu"), dst)
elif form == "pt2":
    torch.export.save(torch.export.load(src), dst)
else:
    torch.save(torch.load(src, map_location="cpu", weights_only=False), dst)
"""

HAND = """
import sys, torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
import lookalikes
model = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
for m in model.modules():
    if isinstance(m, lookalikes.Conv) and isinstance(m.bn, nn.BatchNorm2d):
        m.conv = fuse_conv_bn_eval(m.conv, m.bn)
        m.bn = nn.Identity()
torch.save(model, sys.argv[2])
"""

ULTRALYTICS_FUSE = """
import sys, torch
model = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
model.fuse(verbose=False)
torch.save(model, sys.argv[2])
"""

ULTRALYTICS_BUILD = """
import sys, torch
from ultralytics.nn.tasks import DetectionModel
model = DetectionModel("yolov8n.yaml", nc=80, verbose=False).eval()
torch.save(model, sys.argv[1])
print(sum(p.numel() for p in model.parameters()), sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()),
      torch.__version__)
"""

# bnfold's CLI with timers: every import (the first load of a module, outermost only) and every
# PHASE_ANCHORS function. Time goes to the innermost phase running; an import outside any phase is
# `import`, one inside a phase stays that phase's time and is also summed as `lazy imports`; the
# INCLUSIVE timers count everything under them, imports included.
# The anchors are patched into their module as it is first imported, before anyone binds them.
TIMED = """
import json, sys, time
from collections import defaultdict
import _frozen_importlib as bootstrap
now = time.perf_counter
START, START_WALL = now(), time.time()
PHASES, INCLUSIVE = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out, sys.argv = sys.argv[3], ["bnfold", *sys.argv[4:]]
spent, inclusive, depth, stack = defaultdict(float), defaultdict(float), defaultdict(int), [["other", START]]
by_module = defaultdict(list)
for category, anchors in {**PHASES, **INCLUSIVE}.items():
    for module, name in anchors:
        by_module[module].append((name, category, category in INCLUSIVE))

def enter(category):
    t = now(); spent[stack[-1][0]] += t - stack[-1][1]; stack.append([category, t])

def leave():
    t = now(); category, since = stack.pop(); spent[category] += t - since; stack[-1][1] = t

def timed(fn, category, whole):
    def wrapper(*args, **kwargs):
        if whole:
            depth[category] += 1; t = now()
        else:
            enter(category)
        try:
            return fn(*args, **kwargs)
        finally:
            if whole:
                depth[category] -= 1
                if depth[category] == 0:
                    inclusive[category] += now() - t
            else:
                leave()
    wrapper.__wrapped__ = fn
    return wrapper

def patch(module):
    for name, category, whole in by_module.get(module.__name__, ()):
        owner, _, attr = name.rpartition(".")
        holder = getattr(module, owner) if owner else module
        if hasattr(holder, attr):
            setattr(holder, attr, timed(getattr(holder, attr), category, whole))

find_and_load = bootstrap._find_and_load
def timed_find_and_load(name, import_):
    top = stack[-1][0] == "other"  # an import inside a phase stays that phase's time; also counted as lazy
    outer = depth["import"] == 0
    depth["import"] += 1
    if top:
        enter("import")
    t = now()
    try:
        module = find_and_load(name, import_)
    finally:
        depth["import"] -= 1
        if outer and not top and stack[-1][0] != "import":
            inclusive["lazy imports"] += now() - t
        if top:
            leave()
    patch(module)
    return module
bootstrap._find_and_load = timed_find_and_load

for loaded in list(sys.modules.values()):
    patch(loaded)
code = 0
try:
    from bnfold.cli import main
    main()
except SystemExit as stop:
    code = stop.code or 0
leave_all = now()
spent[stack[-1][0]] += leave_all - stack[-1][1]
with open(out, "w") as fh:
    json.dump({"spent": spent, "inclusive": inclusive, "start": START_WALL, "end": time.time()}, fh)
sys.exit(code)
"""

# Phase → (module, function or Class.method) whose time it is, as today's code names them: `find
# sites` is bnfold's fold step less apply and merge. An anchor that no longer exists is skipped (its
# time then shows in the phase around it).
PHASE_ANCHORS = {
    "load": [("bnfold.torchfold.io", "load_torch")],
    "find sites": [("bnfold.torchfold.fuse", "fold_source")],
    "find sites (eager)": [("bnfold.torchfold.find", "find_sites")],
    "apply": [("bnfold.torchfold.apply", "_write"), ("bnfold.torchfold.apply", "_remains"),
              ("bnfold.torchfold.export", "_rewrite"), ("bnfold.torchfold.export", "_remove_bn"),
              ("bnfold.torchfold.script", "Plan.apply"), ("bnfold.torchfold.script_graph", "reload")],
    "merge": [("bnfold.torchfold.branches", "merge_module"), ("bnfold.torchfold.branches", "merge_exported")],
    "save": [("bnfold.torchfold.fuse", "write_module")],
}
INCLUSIVE = {"torch.export": [("torch.export", "export")], "fx trace": [("torch.fx._symbolic_trace", "Tracer.trace")]}
PHASES = ("start", "import", "load", "find sites", "apply", "merge", "save", "other", "exit")


# -- models ------------------------------------------------------------------------------------


@dataclass
class Model:
    name: str
    what: str
    shape: tuple[int, ...]
    params: int
    bns: int
    files: dict[str, Path] = field(default_factory=dict)


def build_net(name: str, quick: bool):
    """The module, its input shape and a description."""
    import lookalikes as la

    size = 320 if quick else 640
    if name == "yolo":
        w, nc = (8, 4) if quick else (16, 80)
        net = la.yolo(w, nc)
        net.args["imgsz"] = size  # what bnfold reads for an input size, as from an ultralytics checkpoint
        return net, (1, 3, size, size), f"lookalikes.yolo(w={w}, nc={nc})"
    side = 112 if quick else 224
    if name == "repvgg":
        w, depths = (16, (1, 2, 2)) if quick else (48, (2, 4, 14, 1))
        net = la.RepVgg(w, depths, num_classes=1000)
        what = f"lookalikes.RepVgg(w={w}, depths={depths}), train-time branches"
    elif name == "hrnet":
        w = 16 if quick else 32
        net = la.dla_hrnet(w, num_classes=1000)
        what = f"lookalikes.dla_hrnet(w={w})"
    else:
        raise SystemExit(f"unknown model {name!r}: yolo, repvgg, hrnet")
    net.pretrained_cfg["input_size"] = (3, side, side)
    return net, (1, 3, side, side), what


def build_model(name: str, forms: list[str], folder: Path, quick: bool) -> Model:
    import warnings

    import torch
    import zoo

    torch.manual_seed(0)
    net, shape, what = build_net(name, quick)
    zoo.fill_bn_stats(net, (3, 64, 64), steps=2, batch=4)  # statistics only; small inputs are enough
    x = torch.randn(*shape)
    with torch.no_grad():
        net(x)  # the Detect head caches its anchors for this shape, so the trace sees no shape change
    model = Model(name, what, shape, sum(p.numel() for p in net.parameters()),
                  sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for form in forms:
            path = folder / f"{name}{SUFFIX[form]}"
            if form == "pickle":
                torch.save(net, path)
            elif form == "torchscript":
                torch.jit.save(torch.jit.trace(net, x, check_trace=False), str(path))
            else:
                torch.export.save(torch.export.export(net, (x,)), str(path))
            model.files[form] = path
    print(f"built {name}: {model.params / 1e6:.2f} M parameters, {model.bns} BNs, {forms}", file=sys.stderr)
    return model


# -- processes ---------------------------------------------------------------------------------


@dataclass
class Case:
    """One file and the processes timed on it; `argv[tool]` has {out} where the output goes."""

    model: str
    form: str
    python: str  # the interpreter bnfold runs on (profiled the same way)
    argv: dict[str, list[str]]
    baselines: tuple[str, ...]
    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def bnfold_argv(python: str, src: Path, form: str) -> list[str]:
    script = Path(python).with_name("bnfold")
    head = [str(script)] if script.exists() else [python, "-m", "bnfold"]
    return [*head, "fuse", str(src), "-o", "{out}", *(["--trust-pickle"] if form == "pickle" else [])]


def lookalike_cases(models: list[Model]) -> list[Case]:
    cases = []
    for model in models:
        for form, src in model.files.items():
            argv = {"plain": [sys.executable, "-c", PLAIN, form, str(src), "{out}"],
                    "bnfold": bnfold_argv(sys.executable, src, form)}
            if model.name == "yolo" and form == "pickle":
                argv["hand"] = [sys.executable, "-c", HAND, str(src), "{out}"]
            cases.append(Case(model.name, form, sys.executable, argv, tuple(k for k in argv if k != "bnfold")))
    return cases


def ultralytics_case(python: str, folder: Path, env: dict) -> tuple[Case, str]:
    src = folder / "yolov8n_ultralytics.pt"
    done = subprocess.run([python, "-c", ULTRALYTICS_BUILD, str(src)], env=env, cwd=folder, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"{python} cannot build ultralytics' yolov8n.yaml: {done.stderr.strip()[-400:]}")
    params, bns, version = done.stdout.split()[-3:]
    what = f"ultralytics DetectionModel('yolov8n.yaml'): {int(params) / 1e6:.2f} M parameters, {bns} BNs, " \
           f"torch {version} in {python}"
    argv = {"plain": [python, "-c", PLAIN, "pickle", str(src), "{out}"],
            "ultralytics": [python, "-c", ULTRALYTICS_FUSE, str(src), "{out}"],
            "bnfold": bnfold_argv(python, src, "pickle")}
    return Case("yolov8n (ultralytics)", "pickle", python, argv, ("plain", "ultralytics")), what


def imports_ultralytics(python: str, env: dict) -> bool:
    return subprocess.run([python, "-c", "import ultralytics"], env=env, capture_output=True).returncode == 0


def child_env(folder: Path) -> dict:
    """This checkout's bnfold and the look-alikes' module (the pickles name it) for every process;
    ultralytics' settings in the temp folder, not the user's."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "examples"), env.get("PYTHONPATH")) if p)
    env["YOLO_CONFIG_DIR"] = str(folder / "ultralytics-settings")
    env["YOLO_OFFLINE"] = "1"
    return env


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(case: Case, tool: str, folder: Path, env: dict) -> None:
    out = folder / f"out-{os.getpid()}-{time.monotonic_ns()}{SUFFIX[case.form]}"
    argv = [a.replace("{out}", str(out)) for a in case.argv[tool]]
    cpu0, t0 = children_cpu(), time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall, cpu = time.perf_counter() - t0, children_cpu() - cpu0
    if done.returncode or not out.exists():
        case.failed.setdefault(tool, f"exit {done.returncode}: {done.stderr.strip()[-300:]}")
    else:
        case.wall.setdefault(tool, []).append(wall)
        case.cpu.setdefault(tool, []).append(cpu)
    out.unlink(missing_ok=True)


class ForeignLoad:
    """Cores busy over an interval with processes that are neither this script nor its children."""

    HZ = os.sysconf("SC_CLK_TCK")

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.monotonic(), self._busy(), self._own()

    @classmethod
    def _busy(cls) -> float:
        with open("/proc/stat") as fh:
            fields = list(map(int, fh.readline().split()[1:]))
        return (sum(fields[:3]) + sum(fields[5:8])) / cls.HZ  # user nice system, irq softirq steal

    @staticmethod
    def _own() -> float:
        me = resource.getrusage(resource.RUSAGE_SELF)
        return me.ru_utime + me.ru_stime + children_cpu()

    def cores(self) -> float:
        spent = (self._busy() - self.busy0) - (self._own() - self.own0)
        return max(0.0, spent / max(time.monotonic() - self.t0, 1e-9))


def time_rounds(cases: list[Case], rounds: int, folder: Path, env: dict, seed: int = 0) -> list[float]:
    """Every case's processes once per round, cases and processes in a fresh random order each
    round. Returns the foreign load of each round."""
    rng, foreign = random.Random(seed), []
    for k in range(rounds):
        load, start = ForeignLoad(), time.perf_counter()
        for case in rng.sample(cases, len(cases)):
            for tool in rng.sample(list(case.argv), len(case.argv)):
                run_once(case, tool, folder, env)
        foreign.append(load.cores())
        print(f"round {k + 1}/{rounds}: {time.perf_counter() - start:.0f} s, foreign load {foreign[-1]:.2f} cores",
              file=sys.stderr, flush=True)
    return foreign


# -- statistics --------------------------------------------------------------------------------


@dataclass
class Ratio:
    case: Case
    baseline: str
    base_s: float
    bnfold_s: float
    ratio: float
    low: float | None
    high: float | None
    coverage: float | None
    base_cpu: float
    bnfold_cpu: float


def ratios(case: Case) -> list[Ratio]:
    if "bnfold" not in case.wall:
        return []
    rows = []
    for base in case.baselines:
        if base not in case.wall:
            continue
        a, b = case.wall["bnfold"], case.wall[base]
        paired = [x / y for x, y in zip(a, b)] if len(a) == len(b) else []
        low, high, covered = ratio_interval(paired)
        rows.append(Ratio(case, base, float(np.median(b)), float(np.median(a)), float(np.median(a) / np.median(b)),
                          low, high, covered, float(np.median(case.cpu[base])), float(np.median(case.cpu["bnfold"]))))
    return rows


def ratio_interval(paired: list[float]) -> tuple[float | None, float | None, float | None]:
    """The order-statistic interval for the median of the per-round ratios: 95 % from 6 rounds on;
    with fewer, the widest one there is, [min, max], and its exact coverage (5 rounds: 94 %, 4: 88 %)."""
    if len(paired) < 2:
        return None, None, None
    x = sorted(paired)
    k = max(order_statistic_rank(len(x)), 1)
    return x[k - 1], x[len(x) - k], coverage(len(x), k)


# -- profile -----------------------------------------------------------------------------------


@dataclass
class Profile:
    case: Case
    wall: float  # the timed run, spawn to exit
    phases: dict[str, float]  # PHASES, exclusive: they add up to `wall`
    inclusive: dict[str, float]
    largest_imports: list[tuple[str, float]]


def profile_case(case: Case, folder: Path, env: dict) -> Profile | None:
    """One more bnfold run, on the interpreter and arguments of the timed ones, with timers."""
    import json

    record, out = folder / "phases.json", folder / f"profiled{SUFFIX[case.form]}"
    argv = [a.replace("{out}", str(out)) for a in case.argv["bnfold"]]
    spawn = time.time()
    done = subprocess.run([case.python, "-X", "importtime", "-c", TIMED, json.dumps(PHASE_ANCHORS),
                           json.dumps(INCLUSIVE), str(record), *argv[argv.index("fuse"):]],
                          env=env, cwd=folder, capture_output=True, text=True)
    end = time.time()
    out.unlink(missing_ok=True)
    if done.returncode or not record.exists():
        print(f"profile of {case.model} {case.form} failed: {done.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    data = json.loads(record.read_text())
    record.unlink()
    phases = {k: data["spent"].get(k, 0.0) for k in PHASES}
    phases["start"] = data["start"] - spawn  # interpreter start-up, before the runner's first line
    phases["exit"] = end - data["end"]  # interpreter shutdown, after main() returned
    return Profile(case, end - spawn, phases, data["inclusive"], largest_imports(done.stderr))


def largest_imports(stderr: str, n: int = 3) -> list[tuple[str, float]]:
    """The packages whose modules took longest to import, wherever imported from: -X importtime's
    self time summed per top-level package name (µs → s)."""
    totals: dict[str, float] = {}
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            self_us, _, name = line[len("import time:"):].split("|")
            if self_us.strip().isdigit():
                top = name.strip().split(".")[0]
                totals[top] = totals.get(top, 0.0) + int(self_us) / 1e6
    return sorted(totals.items(), key=lambda kv: -kv[1])[:n]


# -- report ------------------------------------------------------------------------------------


def markdown(rows: list[Ratio], profiles: list[Profile], models: list[Model], extra: str | None, foreign: list[float],
             rounds: int, failures: list[str], command: str) -> str:
    lines = header(models, extra, foreign, rounds, command) + [""] + ratio_table(rows)
    lines += [f"- failed: {f}" for f in failures]
    if profiles:
        lines += [""] + profile_table(profiles)
    return "\n".join(lines)


def header(models: list[Model], extra: str | None, foreign: list[float], rounds: int, command: str) -> list[str]:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    described = [f"{m.name} = {m.what}, {m.params / 1e6:.2f} M parameters, {m.bns} BNs, input "
                 f"{'×'.join(map(str, m.shape))}" for m in models]
    return [f"Command: `{command}`  ",
            f"Machine: {platform.machine()} {cpu}, {len(os.sched_getaffinity(0))} cores, Python "
            f"{platform.python_version()}, torch {torch.__version__}; {rounds} rounds; foreign load (cores busy with "
            f"other people's processes) median {np.median(foreign):.2f}, max {max(foreign):.2f} per round.  ",
            "Models: " + "; ".join(described + ([extra] if extra else []))]


def verdict(r: Ratio) -> str:
    """Met when the whole interval is at or under the target, not met when all of it is over."""
    target = TARGET[r.baseline]
    low, high = (r.low, r.high) if r.low is not None else (r.ratio, r.ratio)
    return f"≤ {target}×: " + ("met" if high <= target else "not met" if low > target else "unclear")


def ratio_table(rows: list[Ratio]) -> list[str]:
    lines = ["| model | form | baseline | baseline s | bnfold s | bnfold / baseline (interval, its coverage) | target "
             "| CPU s baseline → bnfold |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        interval = f" ({r.low:.2f}–{r.high:.2f}, {r.coverage:.0%})" if r.low is not None else ""
        lines.append(f"| {r.case.model} | {r.case.form} | {BASELINE_NAME[r.baseline]} | {r.base_s:.2f} | "
                     f"{r.bnfold_s:.2f} | **{r.ratio:.2f}×**{interval} | {verdict(r)} | "
                     f"{r.base_cpu:.2f} → {r.bnfold_cpu:.2f} |")
    return lines


def profile_table(profiles: list[Profile]) -> list[str]:
    lines = ["Where bnfold's time goes: one more run per case with timers, in seconds that add up to its wall time. "
             "start = interpreter start-up; import = imports before and between phases (the CLI's); a phase's own "
             "imports stay in it and are summed under lazy imports; find sites = bnfold's fold step less apply and "
             "merge; exit = interpreter shutdown; torch.export and fx trace = all time inside torch.export.export and "
             "torch.fx tracing wherever called, their imports included; slowest imports = import time per package "
             "(-X importtime, self time).", "",
             "| model | form | wall | " + " | ".join(PHASES) + " | lazy imports | torch.export | fx trace | largest | "
             "slowest imports |", "|---" * (len(PHASES) + 8) + "|"]
    for p in profiles:
        largest = max(p.phases, key=p.phases.get)
        extra = [p.inclusive.get(k, 0.0) for k in ("lazy imports", "torch.export", "fx trace")]
        imports = ", ".join(f"{name} {s:.1f}" for name, s in p.largest_imports)
        cells = [p.case.model, p.case.form, f"{p.wall:.2f}", *(f"{p.phases[k]:.2f}" for k in PHASES),
                 *(f"{v:.2f}" for v in extra), f"{largest} ({p.phases[largest] / p.wall:.0%})", imports]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def compile_bytecode() -> None:
    """bnfold's and the look-alikes' bytecode, as `pip install` leaves it: a checkout run with
    PYTHONDONTWRITEBYTECODE set would otherwise compile bnfold's sources in every timed process
    (the plain baseline imports only torch, whose bytecode its install wrote)."""
    import compileall

    for folder in (ROOT / "bnfold", ROOT / "examples"):
        compileall.compile_dir(str(folder), quiet=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="timed rounds (default 6, --quick 3)")
    parser.add_argument("--models", default="yolo,repvgg,hrnet")
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument("--quick", action="store_true", help="test widths, half-size inputs, 3 rounds")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled run per case")
    parser.add_argument("--ultralytics-python", help="an interpreter with ultralytics: also time its fuse()")
    parser.add_argument("--seed", type=int, default=0, help="seed of the run order")
    parser.add_argument("--section", type=Path, help="markdown file whose fuse-speed section is replaced")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 6)
    forms = args.forms.split(",")
    if set(forms) - set(FORMS):
        raise SystemExit(f"unknown form(s) {sorted(set(forms) - set(FORMS))}: {', '.join(FORMS)}")
    command = " ".join(["python benchmarks/fuse_speed.py", *map(shlex.quote, sys.argv[1:])])
    start = time.perf_counter()
    compile_bytecode()
    with tempfile.TemporaryDirectory(prefix="bnfold-fuse-speed-") as tmp:
        folder = Path(tmp)
        env = child_env(folder)
        models = [build_model(name, forms, folder, args.quick) for name in args.models.split(",")]
        cases, extra = lookalike_cases(models), None
        if args.ultralytics_python:
            if not imports_ultralytics(args.ultralytics_python, env):
                raise SystemExit(f"{args.ultralytics_python} cannot import ultralytics")
            case, extra = ultralytics_case(args.ultralytics_python, folder, env)
            cases.append(case)
        foreign = time_rounds(cases, rounds, folder, env, args.seed)
        profiles = [] if args.no_profile else [p for p in (profile_case(c, folder, env) for c in cases) if p]
    rows = [r for c in cases for r in ratios(c)]
    failures = [f"{c.model} {c.form} {tool}: {why}" for c in cases for tool, why in c.failed.items()]
    text = markdown(rows, profiles, models, extra, foreign, rounds, failures, command)
    print(text)
    print(f"total {time.perf_counter() - start:.0f} s", file=sys.stderr)
    out = ROOT / "benchmarks" / "out" / "fuse_speed.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + "\n")
    if args.section:
        write_section(args.section, text, "fuse-speed")


if __name__ == "__main__":
    main()
