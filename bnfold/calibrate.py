"""`calibrate`: population statistics recomputed from data exactly as Algorithm 2 says.

Alg. 2 (Ioffe & Szegedy 2015) runs mini-batches B through the *training* network N_BN^tr,
in which every BN normalizes with its own batch's μ_B and biased σ²_B, and sets

    E[x] = E_B[μ_B],    Var[x] = m/(m−1) · E_B[σ²_B],

m being the values per channel in one batch (N, or N·p·q for feature maps). A last batch of
another size n_b is weighted by its size, which reduces to Alg. 2 for equal batches:

    E[x] = Σ n_b μ_b / Σ n_b,    Var[x] = Σ n_b · n_b/(n_b−1) · σ²_b / Σ n_b.

Batches with n_b = 1 have no variance and are dropped. The model runs in onnxruntime with
each BN's input exposed as an output; μ_b and σ²_b are taken from it in float64 and summed
as batches stream by, so memory does not grow with the data set. With upstream="population"
the BNs keep normalizing with their stored statistics while theirs are measured.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import dataset
from .errors import BadInput, UsageError
from .fold_math import cast_exact
from .inputs import expected_inputs
from .onnx_graph import ModelIndex, NotConstant
from .onnx_io import load_onnx
from .report import to_plain
from .runtime import session


@dataclass
class BNStatistics:
    bn: str
    values_per_channel: int  # n_b of a full batch
    mean_old: float  # channel average, for the eye; the file holds every channel
    mean_new: float
    var_old: float
    var_new: float
    mean_max_change: float  # max over channels of |new − old| / max(|old|, 1e-12)
    var_max_change: float


@dataclass
class CalibrationReport:
    input: str
    output: str | None
    upstream: str
    batch_size: int
    batches: int = 0
    samples: int = 0
    dropped_batches: int = 0
    bns: list[BNStatistics] = field(default_factory=list)
    variance: list = field(default_factory=list)  # m/(m−1) applied to stored variances first
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


@dataclass
class _Site:
    name: str
    node: onnx.NodeProto
    index: int  # position in the main graph
    rank: int
    sums: dict = field(default_factory=lambda: {"n": 0.0, "mean": 0.0, "var": 0.0})


def calibrate(model_or_path: onnx.ModelProto | str | Path, data: str | Path, batch_size: int, *,
              upstream: str = "batch", progress: Callable[[int, int], None] | None = None,
              variance: str = "unbiased", train_batch_size: int | None = None,
              values_per_channel: int | None = None) -> tuple[onnx.ModelProto, CalibrationReport]:
    """New E[x] and Var[x] for every BN of the main graph, written into the returned model.

    variance="biased" first corrects the stored variances by m/(m−1) (m from the training
    batch size or values_per_channel): with upstream="population" the BNs normalize with them.
    """
    start = time.perf_counter()
    if upstream not in ("batch", "population"):
        raise UsageError(f"--upstream must be 'batch' or 'population', not {upstream!r}")
    if isinstance(model_or_path, onnx.ModelProto):
        model, name, base = model_or_path, "<memory>", Path(".")
    else:
        source = load_onnx(model_or_path, lazy=False)
        model, name, base = source.model, str(source.path), source.base_dir
    report = CalibrationReport(name, None, upstream, batch_size)
    if variance == "biased":
        from .variance import correct_biased_variance

        report.variance = correct_biased_variance(model, base, batch_size=train_batch_size,
                                                  values_per_channel=values_per_channel, path=name)
    elif variance != "unbiased":
        raise UsageError(f"--variance must be 'unbiased' or 'biased', not {variance!r}")
    index = ModelIndex(model, base)
    sites = _sites(index, report)
    if not sites:
        raise BadInput("no BatchNormalization with constant parameters to calibrate", name)
    probe = _probe(model, index, sites, upstream)
    sess = session(probe.SerializeToString(), "cpu", "disabled")
    expected = expected_inputs(model)
    outputs = [f"{s.name}__bnfold_x" for s in sites]
    for batch in dataset.batches(data, expected, batch_size):
        values = sess.run(outputs, batch)
        n = len(next(iter(batch.values())))
        report.samples += n
        used = _accumulate(sites, values)
        report.batches += int(used)
        report.dropped_batches += int(not used)
        if progress is not None:
            progress(report.batches + report.dropped_batches, 0)
    if report.dropped_batches:
        report.warnings.append(f"{report.dropped_batches} batch(es) of one value per channel dropped: "
                               "a single value has no variance")
    if report.batches == 0:
        raise BadInput("no batch with at least 2 values per channel", data)
    _write(index, sites, report)
    index.apply()
    report.seconds = time.perf_counter() - start
    return model, report


def _sites(index: ModelIndex, report: CalibrationReport) -> list[_Site]:
    sites = []
    for depth, scope in enumerate(index.scopes):
        for k, node in enumerate(scope.nodes):
            if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
                continue
            name = node.name or node.output[0]
            if depth > 0:
                report.warnings.append(f"BN {name!r} in subgraph {scope.path} is not calibrated")
                continue
            try:
                for i in (1, 2, 3, 4):
                    index.constant(scope, node.input[i])
            except NotConstant as exc:
                report.warnings.append(f"BN {name!r} not calibrated: {exc}")
                continue
            rank = index.rank(node.input[0])
            if rank is None or rank < 2:
                raise BadInput(f"BN {name!r}: the rank of its input is unknown; calibration needs it")
            sites.append(_Site(name, node, k, rank))
    return sites


def _probe(model: onnx.ModelProto, index: ModelIndex, sites: list[_Site], upstream: str) -> onnx.ModelProto:
    """A copy whose outputs are every BN's input; in "batch" mode each BN normalizes with
    its own batch statistics (the training network of Alg. 2)."""
    probe = copy.deepcopy(model)
    graph = probe.graph
    for site in sites:
        x = site.node.input[0]
        graph.output.append(helper.make_empty_tensor_value_info(f"{site.name}__bnfold_x"))
        expose = helper.make_node("Identity", [x], [f"{site.name}__bnfold_x"], name=f"{site.name}__bnfold_probe")
        graph.node.append(expose)
    if upstream == "batch":
        replaced = {site.index: _training_bn(index, site) for site in sites}
        nodes = []
        for k, node in enumerate(graph.node):
            nodes.extend(replaced.get(k, ([node], []))[0])
        for _, inits in replaced.values():
            graph.initializer.extend(inits)
        del graph.node[:]
        graph.node.extend(nodes)
    return probe


def _training_bn(index: ModelIndex, site: _Site) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """y = (x − μ_B) / sqrt(σ²_B + ε) · γ + β over axes (0, 2, 3, …): BN as in training."""
    bn, scope = site.node, index.scopes[0]
    p = f"{site.name}__bnfold_train"
    elem = index.elem_type(bn.input[0]) or onnx.TensorProto.FLOAT
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    shape = (-1,) + (1,) * (site.rank - 2)
    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    inits = [numpy_helper.from_array(index.constant(scope, bn.input[1]).astype(dtype).reshape(shape), f"{p}_gamma"),
             numpy_helper.from_array(index.constant(scope, bn.input[2]).astype(dtype).reshape(shape), f"{p}_beta"),
             numpy_helper.from_array(np.array(eps, dtype=dtype), f"{p}_eps")]
    axes = [0] + list(range(2, site.rank))
    x, y = bn.input[0], bn.output[0]
    nodes = [*_reduce_mean(index.opset, x, f"{p}_mean", axes, p, inits),
             helper.make_node("Sub", [x, f"{p}_mean"], [f"{p}_d"]),
             helper.make_node("Mul", [f"{p}_d", f"{p}_d"], [f"{p}_d2"]),
             *_reduce_mean(index.opset, f"{p}_d2", f"{p}_var", axes, p + "_v", inits),
             helper.make_node("Add", [f"{p}_var", f"{p}_eps"], [f"{p}_vareps"]),
             helper.make_node("Sqrt", [f"{p}_vareps"], [f"{p}_std"]),
             helper.make_node("Div", [f"{p}_d", f"{p}_std"], [f"{p}_norm"]),
             helper.make_node("Mul", [f"{p}_norm", f"{p}_gamma"], [f"{p}_scaled"]),
             helper.make_node("Add", [f"{p}_scaled", f"{p}_beta"], [y])]
    return nodes, inits


def _reduce_mean(opset: int, x: str, out: str, axes: list[int], prefix: str, inits: list) -> list[onnx.NodeProto]:
    if opset >= 18:  # axes became an input
        inits.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), f"{prefix}_axes"))
        return [helper.make_node("ReduceMean", [x, f"{prefix}_axes"], [out], keepdims=1)]
    return [helper.make_node("ReduceMean", [x], [out], axes=axes, keepdims=1)]


def _accumulate(sites: list[_Site], values: list[np.ndarray]) -> bool:
    """Add one batch; False (and nothing added) when a channel has a single value."""
    stats = []
    for site, x in zip(sites, values):
        x64 = np.asarray(x, dtype=np.float64)
        axes = (0, *range(2, x64.ndim))
        n_b = x64.size // x64.shape[1]
        if n_b < 2:
            return False
        stats.append((n_b, x64.mean(axis=axes), x64.var(axis=axes)))
    for site, (n_b, mu, var) in zip(sites, stats):
        site.sums["n"] += n_b
        site.sums["mean"] = site.sums["mean"] + n_b * mu
        site.sums["var"] = site.sums["var"] + n_b * (n_b / (n_b - 1)) * var
        site.sums.setdefault("m", n_b)
    return True


def _write(index: ModelIndex, sites: list[_Site], report: CalibrationReport) -> None:
    scope = index.scopes[0]
    for site in sites:
        n = site.sums["n"]
        mean, var = site.sums["mean"] / n, site.sums["var"] / n
        old_mean, old_var = (index.constant(scope, site.node.input[i]) for i in (3, 4))
        index.replace_input(scope, site.node, 3, cast_exact(mean, old_mean.dtype, "mean"), f"{site.name}_mean")
        index.replace_input(scope, site.node, 4, cast_exact(var, old_var.dtype, "variance"), f"{site.name}_var")
        report.bns.append(BNStatistics(
            site.name, int(site.sums["m"]), float(old_mean.mean()), float(mean.mean()), float(old_var.mean()),
            float(var.mean()), _max_change(old_mean, mean), _max_change(old_var, var)))


def _max_change(old: np.ndarray, new: np.ndarray) -> float:
    old64 = old.astype(np.float64)
    return float(np.max(np.abs(new - old64) / np.maximum(np.abs(old64), 1e-12)))


def calibrate_torch(module, data: str | Path, batch_size: int, *, upstream: str = "batch",
                    progress: Callable[[int, int], None] | None = None) -> CalibrationReport:
    """The same for a torch module, in place. BN modules run in training mode (batch
    statistics) with momentum 0 so their stored statistics do not move while we measure."""
    import torch
    from torch import nn

    if upstream not in ("batch", "population"):
        raise UsageError(f"--upstream must be 'batch' or 'population', not {upstream!r}")
    module.eval()
    bns = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and m.running_mean is not None]
    if not bns:
        raise BadInput("no BatchNorm module with running statistics to calibrate")
    report = CalibrationReport(type(module).__name__, None, upstream, batch_size)
    sites = [_Site(name, None, k, 0) for k, (name, _) in enumerate(bns)]
    captured: dict[int, np.ndarray] = {}
    hooks = [m.register_forward_pre_hook(_Capture(captured, k)) for k, (_, m) in enumerate(bns)]
    saved = [(m.momentum, m.training) for _, m in bns]
    try:
        for _, m in bns:
            m.momentum = 0.0
            m.train(upstream == "batch")
        for batch in _torch_batches(data, batch_size):
            with torch.no_grad():
                module(*(torch.from_numpy(a) for a in batch))
            used = _accumulate(sites, [captured[k] for k in range(len(sites))])
            report.samples += len(batch[0])
            report.batches += int(used)
            report.dropped_batches += int(not used)
            if progress is not None:
                progress(report.batches + report.dropped_batches, 0)
    finally:
        for h in hooks:
            h.remove()
        for (_, m), (momentum, training) in zip(bns, saved):
            m.momentum, m.training = momentum, training
    if report.batches == 0:
        raise BadInput("no batch with at least 2 values per channel", data)
    for site, (_, m) in zip(sites, bns):
        n = site.sums["n"]
        mean, var = site.sums["mean"] / n, site.sums["var"] / n
        old_mean, old_var = m.running_mean.double().numpy().copy(), m.running_var.double().numpy().copy()
        with torch.no_grad():
            m.running_mean.copy_(torch.from_numpy(mean).to(m.running_mean.dtype))
            m.running_var.copy_(torch.from_numpy(var).to(m.running_var.dtype))
        report.bns.append(BNStatistics(site.name, int(site.sums["m"]), float(old_mean.mean()), float(mean.mean()),
                                       float(old_var.mean()), float(var.mean()), _max_change(old_mean, mean),
                                       _max_change(old_var, var)))
    return report


class _Capture:
    """Forward pre-hook keeping the input a BN module sees, for its batch statistics."""

    def __init__(self, store: dict, key: int):
        self.store, self.key = store, key

    def __call__(self, _module, args) -> None:
        self.store[self.key] = args[0].detach().cpu().numpy()


def _torch_batches(data, batch_size: int):
    """Batches as positional inputs: one array per input, in the file's order."""
    names = None
    for file in dataset.data_files(data):
        arrays = dataset.read_file(file, ["input"])
        names = names or list(arrays)
        break
    dummy = {name: (None, None) for name in names}
    for batch in dataset.batches(data, dummy, batch_size):
        yield [batch[name] for name in names]


def calibrate_file(src: str | Path, data: str | Path, batch_size: int, output: str | Path | None = None,
                   in_place: bool = False, upstream: str = "batch", options: Any = None,
                   progress: Callable[[int, int], None] | None = None) -> CalibrationReport:
    """`options` may carry trust_pickle/arch/arch_kwargs (torch) and variance/train_batch_size/
    values_per_channel (the stored-variance correction)."""
    """Calibrate the model in `src` and write it in its own format (NAME.calibrated.EXT)."""
    from . import formats
    from .onnx_io import resolve_output, save_onnx

    start = time.perf_counter()
    src = Path(src)
    dst = resolve_output(src, Path(output) if output else None, in_place, tag="calibrated")
    if formats.detect_format(src) == formats.ONNX:
        model, report = calibrate(src, data, batch_size, upstream=upstream, progress=progress,
                                  variance=getattr(options, "variance", "unbiased"),
                                  train_batch_size=getattr(options, "train_batch_size", None),
                                  values_per_channel=getattr(options, "values_per_channel", None))
        save_onnx(model, dst, base_dir=src.parent)
    else:
        report = _calibrate_torch_file(src, data, batch_size, dst, upstream, options, progress)
    report.input, report.output = str(src), str(dst)
    report.seconds = time.perf_counter() - start
    return report


def _calibrate_torch_file(src: Path, data, batch_size: int, dst: Path, upstream: str, options, progress):
    import torch

    from .torch_io import PICKLE, STATE_DICT, atomic_write, load_torch, save_state_dict

    source = load_torch(src, trust_pickle=getattr(options, "trust_pickle", False), arch=getattr(options, "arch", None),
                        arch_kwargs=getattr(options, "arch_kwargs", {}))
    if source.kind not in (PICKLE, STATE_DICT):
        raise BadInput(f"calibrate needs an eager module (a pickle, or a state_dict with --arch), not {source.kind}",
                       src)
    corrections = _torch_variance_first(source.module, data, batch_size, options)
    report = calibrate_torch(source.module, data, batch_size, upstream=upstream, progress=progress)
    report.variance = corrections
    if source.kind == STATE_DICT:
        save_state_dict(source, source.module.state_dict(), dst)
    else:
        atomic_write(dst, lambda p: torch.save(source.module, str(p)))
    return report


def _torch_variance_first(module, data, batch_size: int, options) -> list:
    if getattr(options, "variance", "unbiased") != "biased":
        return []
    import torch
    from types import SimpleNamespace

    from .variance import correct_torch_variance

    example = tuple(torch.from_numpy(a) for a in next(iter(_torch_batches(data, batch_size))))
    return correct_torch_variance(module, SimpleNamespace(batch_size=options.train_batch_size,
                                                          values_per_channel=options.values_per_channel), example)
