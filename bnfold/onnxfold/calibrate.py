"""`calibrate` on ONNX: run the training network on data and collect each BN's batch moments.

The model runs in onnxruntime with each BN's input exposed as an output. In "batch" mode
(Alg. 2's N_BN^tr) every BN is first replaced by ReduceMean/Sub/Sqrt ops that normalize
with the batch's own μ_B and σ²_B; in "population" mode the BNs keep their stored
statistics. The batch moments are combined by bnfold.population, in float64, as the
batches stream by, so memory does not grow with the data set.
"""
from __future__ import annotations

import copy
import time
from functools import partial
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..check import arrays
from ..check.inputs import expected_inputs
from ..check.runtime import run_session, session
from ..errors import BadInput
from ..fold_math import cast_exact
from ..options import CalibrateOptions, VarianceOptions
from ..population import BatchAccumulator, PopulationStats, finish_report, require_storable, statistics_row
from ..report import CalibrationReport
from .affine import BN, is_standard
from .index import ModelIndex, NotConstant
from .io import input_also_invalid, model_from, save_onnx
from .variance import correct_biased_variance


@dataclass
class _Site:
    name: str
    node: onnx.NodeProto
    index: int  # position in the main graph
    rank: int


def calibrate(model_or_path: onnx.ModelProto | str | Path, options: CalibrateOptions,
              variance: VarianceOptions | None = None, progress: Callable[[int, int], None] | None = None,
              base_dir: Path | None = None) -> tuple[onnx.ModelProto, CalibrationReport]:
    """New E[x] and Var[x] for every BN of the main graph, written into the returned model
    (an in-memory model is changed in place).

    A biased stored variance is corrected by m/(m−1) first: with upstream="population" the
    BNs normalize with it while the others are measured.
    """
    start = time.perf_counter()
    model, name, base = model_from(model_or_path, base_dir)
    report = CalibrationReport(name, None, options.upstream, options.batch_size)
    if variance is not None and variance.biased:
        report.variance = correct_biased_variance(model, base, variance, path=name)
    index = ModelIndex(model, base)
    sites = _sites(index, report)
    if not sites:
        raise BadInput("no BatchNormalization with constant parameters to calibrate", name)
    probe = _probe(model, index, sites, options.upstream)
    sess = session(probe.SerializeToString(), "cpu", "disabled")
    outputs = [f"{s.name}__bnfold_x" for s in sites]
    totals = BatchAccumulator.for_sites(len(sites))
    for batch in arrays.batches(options.data, expected_inputs(model), options.batch_size):
        totals.add(list(run_session(sess, batch, Path(name), outputs).values()))
        report.samples += len(next(iter(batch.values())))
        if progress is not None:
            progress(totals.batches + totals.dropped, 0)
    finish_report(report, totals, options.data)
    _write(index, sites, totals.stats, report)
    index.apply()
    report.seconds = time.perf_counter() - start
    return model, report


def _sites(index: ModelIndex, report: CalibrationReport) -> list[_Site]:
    sites = []
    for depth, scope in enumerate(index.scopes):
        for k, node in enumerate(scope.nodes):
            if not is_standard(node, BN):
                continue
            if len(node.input) < 5:
                raise BadInput(f"BatchNormalization {node.name or node.output[0]!r} has {len(node.input)} inputs, "
                               "not 5")
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


def _write(index: ModelIndex, sites: list[_Site], stats: list[PopulationStats],
           report: CalibrationReport) -> None:
    scope = index.scopes[0]
    for site, stat in zip(sites, stats):
        old_mean, old_var = (index.constant(scope, site.node.input[i]) for i in (3, 4))
        require_storable(site.name, stat, old_var.dtype)
        index.replace_input(scope, site.node, 3, cast_exact(stat.mean, old_mean.dtype, "mean"), f"{site.name}_mean")
        index.replace_input(scope, site.node, 4, cast_exact(stat.var, old_var.dtype, "variance"), f"{site.name}_var")
        report.bns.append(statistics_row(site.name, stat, old_mean, old_var))


def calibrate_onnx_file(src: Path, target: Path, options: CalibrateOptions, variance: VarianceOptions,
                        progress: Callable[[int, int], None] | None = None,
                        data_name: str | None = None) -> CalibrationReport:
    model, report = calibrate(src, options, variance, progress)
    save_onnx(model, target, base_dir=src.resolve().parent, data_name=data_name,
              accept_invalid=partial(input_also_invalid, src, report.warnings))
    return report
