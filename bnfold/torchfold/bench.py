"""Time the original against the folded module in torch, where torch users deploy: eager,
TorchScript, or torch.export's module; on the CPU, or CUDA when torch sees a GPU.

Same blocks, clock and statistics as onnxruntime (check.timing): each block times fresh
copies of both modules (new memory for every weight), in random order per round. B is made
the way `bnfold fuse` makes it (fuse_module on a copy; the fused program for a .pt2), unless
it is given. A form other than the checkpoint's own is made from A and B alike: TorchScript by
tracing — never torch.jit.freeze, which folds BNs itself and would time B against B — and
export by torch.export.export.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from ..check.inputs import describe_inputs
from ..check.timing import Plan, ab_makers, batch_of, bench_result, offset_progress, time_blocks, use_thread_clock
from ..detect import stored_size
from ..errors import BadInput, MissingProvider, UsageError
from ..options import BenchOptions, FuseOptions, LoadOptions
from ..report import BenchResult, InputInfo, ModelInfo
from .fuse import fuse_module, fuse_torch_file
from .inputs import check_fixed_batch, example_for, fixed_batch
from .io import EXPORT, HF_FOLDER, PICKLE, STATE_DICT, TORCHSCRIPT, TorchSource, load_torch, runnable

EAGER, SCRIPT, EXPORTED = "eager", "torchscript", "export"
# The forms a checkpoint of each kind can be timed in; the first is its own.
FORMS = {PICKLE: (EAGER, SCRIPT, EXPORTED), STATE_DICT: (EAGER, SCRIPT, EXPORTED), TORCHSCRIPT: (SCRIPT,),
         EXPORT: (EXPORTED,), HF_FOLDER: (EAGER, SCRIPT, EXPORTED)}
CUDA_HINT = "a CUDA build of torch (https://pytorch.org/get-started/locally/) and an NVIDIA driver"


def torch_devices(providers) -> list[str]:
    """--provider as torch devices: cpu, cuda ("all": cuda too when torch sees a GPU)."""
    names = [p.lower() for p in providers]
    if "all" in names:
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    devices = []
    for name in names:
        if name in ("cuda", "cudaexecutionprovider") and not torch.cuda.is_available():
            raise MissingProvider(f"torch sees no CUDA GPU here (torch {torch.__version__}); it needs {CUDA_HINT}")
        if name not in ("cpu", "cpuexecutionprovider", "cuda", "cudaexecutionprovider"):
            raise UsageError(f"the torch runtime runs on cpu or cuda, not {name!r}; time other providers with "
                             "--runtime onnxruntime")
        devices.append("cuda" if name.startswith("cuda") else "cpu")
    return devices


def bench_torch(original: Path, fused: Path | None, options: BenchOptions, load: LoadOptions, threads: int,
                scratch: Path, busy: float | None = None, progress=None
                ) -> tuple[list[BenchResult], ModelInfo, ModelInfo, list[InputInfo], list[str]]:
    """Time A (`original`) against B (`fused`, or A folded here) in torch: the results, both
    modules' facts, the inputs and notes."""
    devices = torch_devices(options.providers)
    source = load_torch(original, load)
    if source.kind == EXPORT and (source.module.example_inputs or ((), {}))[1]:
        raise BadInput(f"the program takes keyword inputs ({', '.join(source.module.example_inputs[1])}); bnfold "
                       "feeds a model its inputs by position", original)
    a = _eval(runnable(source))
    example = tuple(example_for(source, load, a))  # --data arrives as load.example_input
    b, b_kind, notes = _fused(source, a, fused, load, scratch, example)
    forms = _forms(options.torch_forms, source.kind, b_kind)
    given = bool(load.example_input or load.shapes)  # the inputs' shapes are the user's: no batch sizes
    if source.kind == EXPORT and not given:
        check_fixed_batch(fixed_batch(source.module), options.batch_sizes, original)
    configs = [(d, n, f) for d in devices for n in options.batch_sizes for f in forms]
    results, previous = [], torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k, (device, batch, form) in enumerate(configs):
            inputs = _batch_of(example, batch, given)
            plan = Plan(options.blocks, options.timed_seconds, options.runs, options.warmup,
                        cpu_clock=use_thread_clock(threads, device == "cpu"))
            with torch.no_grad():
                makers = ab_makers(*(ModuleMaker(as_form(m, form, inputs), inputs, device, original) for m in (a, b)),
                                   options.checks_aa)
                times = time_blocks(makers, plan, options.seed, offset_progress(progress, k, len(configs)))
            results.append(bench_result(times, plan, device, form, batch_of(inputs, batch), busy, runtime="torch"))
            notes += [n for m in makers for n in m.notes if n not in notes]
    finally:
        torch.set_num_threads(previous)
    first = _batch_of(example, options.batch_sizes[0], given)
    inputs = describe_inputs({f"input{i}" if i else "input": t.numpy() for i, t in enumerate(first)})
    return results, module_info(original, a, source.kind), module_info(fused, b, b_kind), inputs, notes


def _eval(module):
    if isinstance(module, nn.Module) and not isinstance(module, torch.fx.GraphModule):
        module.eval()
    return module


def _fused(source: TorchSource, a, fused: Path | None, load: LoadOptions, scratch: Path, example):
    """B, its checkpoint kind, and notes. Folded here when not given."""
    if fused is not None:
        b_source = load_torch(fused, load)
        return _eval(runnable(b_source)), b_source.kind, []
    if source.kind == EXPORT:  # an exported graph folds at the ATen level, then is exported again
        report = fuse_torch_file(source.path, scratch / "fused.pt2", FuseOptions(load=load))
        return runnable(load_torch(scratch / "fused.pt2", load)), EXPORT, [_folded_note(report)]
    module = a if source.kind == TORCHSCRIPT else copy.deepcopy(a)  # fuse_module copies a ScriptModule itself
    folded, report = fuse_module(module, None if source.kind == TORCHSCRIPT else example)
    return _eval(folded), source.kind, [_folded_note(report)]


def _folded_note(report) -> str:
    return f"torch: B is A folded here, {len(report.folded)} BN(s) folded, {len(report.skipped)} left"


def _forms(asked: tuple[str, ...] | None, a_kind: str, b_kind: str) -> tuple[str, ...]:
    """The forms asked for, each one A and B can both run in; by default A's own form, or the
    first one both can take (an eager A against a TorchScript B: both as TorchScript)."""
    if not asked:
        common = [f for f in FORMS[a_kind] if f in FORMS[b_kind]]
        if not common:
            raise UsageError(f"A ({a_kind}) and B ({b_kind}) cannot run in one torch form; time them in "
                             "onnxruntime (--runtime onnxruntime)")
        return (common[0],)
    for form in asked:
        if form not in FORMS[a_kind] or form not in FORMS[b_kind]:
            kinds = a_kind if form not in FORMS[a_kind] else b_kind
            raise UsageError(f"--torch-form {form}: a {kinds} checkpoint runs only as {', '.join(FORMS[kinds])}")
    return asked


def _batch_of(example: tuple[torch.Tensor, ...], batch: int, given: bool) -> tuple[torch.Tensor, ...]:
    """The example with `batch` samples (seeded); shapes from --shape or --data stay as given."""
    if given:
        return example
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(batch, *t.shape[1:], generator=g, dtype=t.dtype) if t.is_floating_point()
                 else torch.zeros(batch, *t.shape[1:], dtype=t.dtype) for t in example)


def as_form(module, form: str, inputs: tuple[torch.Tensor, ...]):
    """`module` in `form`: itself when it is in that form already, else traced or exported."""
    if form == SCRIPT and not isinstance(module, torch.jit.ScriptModule):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _converted(torch.jit.trace, module, inputs, check_trace=False)
    if form == EXPORTED and not isinstance(module, torch.fx.GraphModule):
        return _converted(torch.export.export, module, inputs).module()
    return module


def _converted(convert, module, inputs, **kwargs):
    try:
        return convert(module, tuple(inputs), **kwargs)
    except Exception as exc:  # noqa: BLE001 — tracing and export fail in many ways
        name = "torch.jit.trace" if convert is torch.jit.trace else "torch.export"
        raise BadInput(f"{name} cannot convert the model ({type(exc).__name__}: "
                       f"{(str(exc).splitlines() or [''])[0][:160]})") from None


class ModuleMaker:
    """Makes a fresh copy of a module on its device for each block (as onnxruntime gets a
    fresh session); the first one is run once, so inputs it cannot take are bad input."""

    def __init__(self, module, inputs: tuple[torch.Tensor, ...], device: str, path: Path):
        self.module, self.inputs, self.device, self.path = module, inputs, device, path
        self.checked, self.notes = False, []

    def __call__(self):
        module = self._copy().to(self.device)
        inputs = tuple(t.to(self.device) for t in self.inputs)
        if not self.checked:
            try:
                module(*inputs)
            except Exception as exc:  # noqa: BLE001 — a forward can raise anything
                shapes = ", ".join(str(list(t.shape)) for t in inputs)
                raise BadInput(f"torch cannot run the model on inputs of shape {shapes} ({type(exc).__name__}: "
                               f"{(str(exc).splitlines() or [''])[0][:160]}); pass the --batch-size or --shape "
                               "it takes", self.path) from None
            self.checked = True
        return ModuleRun(module, inputs, self.device.startswith("cuda"))

    def _copy(self):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return copy.deepcopy(self.module)
        except Exception:  # noqa: BLE001 — some modules cannot be deep-copied: time the one we have
            note = "a module could not be copied: every block timed the same copy"
            if note not in self.notes:
                self.notes.append(note)
            return self.module


class ModuleRun:
    """One forward pass: the runner the timing core calls (CUDA: until the GPU is done)."""

    def __init__(self, module, inputs: tuple[torch.Tensor, ...], cuda: bool):
        self.module, self.inputs, self.cuda = module, inputs, cuda

    def __call__(self):
        out = self.module(*self.inputs)
        if self.cuda:
            torch.cuda.synchronize()
        return out


def module_info(path: Path | None, module, kind: str) -> ModelInfo:
    """The checkpoint's size (None: made here), and its layers and BNs as torch runs them: leaf
    modules (eager), ATen calls (TorchScript, inlined), graph calls (export)."""
    nodes, bns = count_layers(module)
    return ModelInfo(str(path or ""), stored_size(path) if path else None, nodes, bns, kind)


def count_layers(module) -> tuple[int | None, int | None]:
    if isinstance(module, torch.jit.ScriptModule):
        try:
            calls = [n.kind() for n in module.inlined_graph.nodes() if n.kind().startswith("aten::")]
        except RuntimeError:
            return None, None
        return len(calls), sum(k == "aten::batch_norm" for k in calls)
    if isinstance(module, torch.fx.GraphModule):
        calls = [n for n in module.graph.nodes if n.op == "call_function"]
        return len(calls), sum("batch_norm" in str(n.target) for n in calls)
    leaves = [m for m in module.modules() if next(m.children(), None) is None]
    return len(leaves), sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in leaves)
