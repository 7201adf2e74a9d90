"""Time two ONNX files in onnxruntime, per provider × batch size × optimization level.

Each block of the timing core (check.timing) gets new sessions for A and B with the same
options: pinned threads, idle-thread spinning off (a spinning pool would steal the cores the
other session is timed on). For a provider other than the CPU, one profiled run of each
model counts the nodes each provider ran, so a GPU number with CPU fallback says so.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..check.inputs import describe_inputs, load_inputs, make_inputs
from ..check.runtime import PROVIDERS, available_providers, node_placement, provider_name, run_session, session
from ..check.timing import Plan, ab_makers, batch_of, bench_result, offset_progress, time_blocks, use_thread_clock
from ..errors import UsageError
from ..options import BenchOptions
from ..report import BenchResult, InputInfo, ModelInfo
from .fold_pass import count_nodes
from .io import file_size, read_signature
from .verify import check_same_inputs



def model_info(path: Path, model=None) -> ModelInfo:
    model = model if model is not None else read_signature(path)
    nodes, bns = count_nodes(model)
    return ModelInfo(str(path), file_size(path, model), nodes, bns)


def resolve_providers(providers) -> list[str]:
    """Short names of the providers to time; "all" is every installed one. A provider this
    onnxruntime lacks is MissingProvider (exit 2) naming what to install."""
    if any(p.lower() == "all" for p in providers):
        return available_providers()
    for p in providers:
        provider_name(p)
    return [p.lower() for p in providers]


class SessionMaker:
    """Makes a fresh session of one model for each block; the first one is run once through
    run_session, so inputs the graph cannot take are bad input, not a crash mid-benchmark."""

    def __init__(self, path: Path, feeds: dict[str, np.ndarray], provider: str, level: str, threads: int):
        self.path, self.feeds, self.provider, self.level, self.threads = path, feeds, provider, level, threads
        self.checked = False

    def __call__(self):
        sess = session(self.path, self.provider, self.level, self.threads, spinning=False)
        if not self.checked:
            run_session(sess, self.feeds, self.path)
            self.checked = True
        return SessionRun(sess, [o.name for o in sess.get_outputs()], self.feeds)


class SessionRun:
    """One run of a session: the runner the timing core calls."""

    def __init__(self, sess, names: list[str], feeds: dict[str, np.ndarray]):
        self.sess, self.names, self.feeds = sess, names, feeds

    def __call__(self):
        return self.sess.run(self.names, self.feeds)


def bench_onnx(original: Path, fused: Path, options: BenchOptions, threads: int, busy: float | None = None,
               progress=None) -> tuple[list[BenchResult], ModelInfo, ModelInfo, list[InputInfo]]:
    """Time `original` (A) against `fused` (B): the results, both models' facts, the inputs."""
    providers = resolve_providers(options.providers)
    signature, fused_signature = read_signature(original), read_signature(fused)
    check_same_inputs(signature, fused_signature, fused)
    configs = [(p, lvl, n) for p in providers for n in options.batch_sizes for lvl in options.levels]
    results, inputs = [], []
    for k, (provider, level, batch) in enumerate(configs):
        feeds = _feeds(signature, options, batch)
        if k == 0:
            inputs = describe_inputs(feeds)
        cpu = provider_name(provider) == PROVIDERS["cpu"]
        plan = Plan(options.blocks, options.timed_seconds, options.runs, options.warmup,
                    cpu_clock=use_thread_clock(threads, cpu))
        makers = ab_makers(SessionMaker(original, feeds, provider, level, threads),
                           SessionMaker(fused, feeds, provider, level, threads), options.checks_aa)
        times = time_blocks(makers, plan, options.seed, offset_progress(progress, k, len(configs)))
        result = bench_result(times, plan, provider, level, batch_of(feeds.values(), batch), busy)
        if not cpu:
            result.placement = {"A": node_placement(original, provider, level, feeds, threads),
                                "B": node_placement(fused, provider, level, feeds, threads)}
        results.append(result)
    return results, model_info(original, signature), model_info(fused, fused_signature), inputs


def _feeds(signature, options: BenchOptions, batch: int) -> dict[str, np.ndarray]:
    if options.data:
        return load_inputs(options.data, signature)
    feeds = make_inputs(signature, shapes=options.shapes, batch_size=batch, seed=options.seed)
    _check_batch(feeds, batch, bool(options.shapes))
    return feeds


def _check_batch(feeds: dict[str, np.ndarray], batch: int, given: bool) -> None:
    """A model with a fixed batch dimension cannot be timed at another batch size."""
    first = next(iter(feeds.values()), None)
    if given or first is None or first.ndim == 0 or first.shape[0] == batch:
        return
    raise UsageError(f"the model's first input has a fixed batch size {first.shape[0]}; "
                     f"--batch-size {batch} cannot be used (pass --batch-size {first.shape[0]})")


def cpu_fallback(result: BenchResult) -> str | None:
    """A warning when a non-CPU provider ran some nodes on the CPU: its time is partly CPU time."""
    if not result.placement:
        return None
    parts = []
    for who, counts in result.placement.items():
        on_cpu = counts.get(PROVIDERS["cpu"], 0)
        if on_cpu:
            parts.append(f"{on_cpu} of {sum(counts.values())} nodes of {who}")
    if not parts:
        return None
    return (f"{result.provider} {result.level} ×{result.batch_size}: {' and '.join(parts)} ran on the CPU "
            f"(fallback), so this time is not all {result.provider}")
