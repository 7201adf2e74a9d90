"""`calibrate` on a torch module: BN modules run in training mode (batch statistics, Alg. 2's
N_BN^tr) with momentum 0, so their stored statistics do not move while they are measured;
forward pre-hooks record each BN's input, and bnfold.population combines the moments."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..check import arrays
from ..errors import BadInput
from ..options import CalibrateOptions, LoadOptions, VarianceOptions
from ..population import BatchAccumulator, finish_report, require_storable, statistics_row
from ..report import CalibrationReport
from .hooks import recording_inputs
from .io import EAGER, load_torch
from .variance import correct_torch_variance, tracked_bns


def calibrate_torch(module: nn.Module, options: CalibrateOptions,
                    progress: Callable[[int, int], None] | None = None) -> CalibrationReport:
    """New running_mean and running_var for every BN of `module`, in place."""
    module.eval()
    bns = tracked_bns(module)
    if not bns:
        raise BadInput("no BatchNorm module with running statistics to calibrate")
    report = CalibrationReport(type(module).__name__, None, options.upstream, options.batch_size)
    saved = [(m.momentum, m.training) for _, m in bns]
    totals = BatchAccumulator.for_sites(len(bns))
    try:
        with recording_inputs(((k, m) for k, (_, m) in enumerate(bns)), _as_numpy) as captured:
            _measure(module, bns, options, totals, captured, report, progress)
    finally:
        for (_, m), (momentum, training) in zip(bns, saved):
            m.momentum, m.training = momentum, training
    finish_report(report, totals, options.data)
    for (name, m), stat in zip(bns, totals.stats):
        old_mean, old_var = m.running_mean.double().numpy().copy(), m.running_var.double().numpy().copy()
        require_storable(name, stat, np.float32 if m.running_var.dtype == torch.bfloat16 else
                         m.running_var.detach().cpu().numpy().dtype)
        with torch.no_grad():
            m.running_mean.copy_(torch.from_numpy(stat.mean).to(m.running_mean.dtype))
            m.running_var.copy_(torch.from_numpy(stat.var).to(m.running_var.dtype))
        report.bns.append(statistics_row(name, stat, old_mean, old_var))
    return report


def _measure(module: nn.Module, bns, options: CalibrateOptions, totals: BatchAccumulator, captured: dict,
             report: CalibrationReport, progress) -> None:
    """Every batch through the model, BNs in the mode Algorithm 2 asks for (momentum 0: their
    stored statistics stay put), each BN's input added to the sums."""
    for _, m in bns:
        m.momentum = 0.0
        m.train(options.upstream == "batch")
    for batch in positional_batches(options):
        with torch.no_grad():
            _run_on_data(module, batch, options.data)
        totals.add([captured[k] for k in range(len(bns))])
        report.samples += len(batch[0])
        if progress is not None:
            progress(totals.batches + totals.dropped, 0)


def _run_on_data(module, batch: list[np.ndarray], data: Path) -> None:
    """One forward pass on the user's arrays; arrays the model cannot take are bad data."""
    try:
        module(*(torch.from_numpy(a) for a in batch))
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        shapes = ", ".join(f"{a.dtype}{list(a.shape)}" for a in batch)
        raise BadInput(f"torch cannot run the model on these arrays ({shapes}): {type(exc).__name__}: "
                       f"{(str(exc).splitlines() or [''])[0][:160]}", data) from None


def _as_numpy(args: tuple) -> np.ndarray:
    return args[0].detach().cpu().numpy()


def positional_batches(options: CalibrateOptions) -> Iterator[list[np.ndarray]]:
    """Batches as positional inputs: one array per input, in the first file's order."""
    first = arrays.data_files(options.data)[0]
    names = list(arrays.read_file(first, ["input"]))
    untyped = {name: (None, None) for name in names}
    for batch in arrays.batches(options.data, untyped, options.batch_size):
        yield [batch[name] for name in names]


def calibrate_torch_file(src: Path, target: Path, options: CalibrateOptions, variance: VarianceOptions,
                         load: LoadOptions, progress: Callable[[int, int], None] | None = None) -> CalibrationReport:
    """Calibrate an eager checkpoint and write it in its own format to `target`."""
    from .convert import write_same

    source = load_torch(src, load)
    if source.kind not in EAGER or len(source.sets) != 1:
        what = source.kind if len(source.sets) == 1 else f"{len(source.sets)} weight sets"
        raise BadInput(f"calibrate needs one eager module (a pickle, or a state_dict with --arch), not {what}", src)
    corrections = []
    if variance.biased:
        example = tuple(torch.from_numpy(a) for a in next(iter(positional_batches(options))))
        corrections = correct_torch_variance(source.module, variance, example)
    report = calibrate_torch(source.module, options, progress)
    report.variance = corrections
    write_same(source, [source.module], target)
    return report
