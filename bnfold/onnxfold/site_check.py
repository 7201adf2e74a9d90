"""verify's per-site check for ONNX: each fold site of the fused model against the original's
layer(s) and BN, both in float64 on the original's own activation at the layer's input, against
the bound one rounding of the fused weights allows (the math is in check.sites).

The activations come from the original model run in onnxruntime (optimizations off) with each
site's input added as a graph output, on the inputs the output comparison uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..check import float64 as k
from ..check import sites as bounds
from ..errors import Skip
from ..report import SiteComparison, SkippedSite
from .io import PROTOBUF_LIMIT, tensor_to_array
from .site_eval import Bound, Context, as64, bound, conv_geometry, evaluate, stored_bound, transpose_geometry
from .site_find import Site, find_sites, node_name


@dataclass
class SiteCheck:
    """A site ready to run: where its constants are (read for each batch, then let go: a large
    model's weights are never all in memory twice) and its running result."""

    site: Site
    original: dict[str, onnx.TensorProto]
    fused: dict[str, onnx.TensorProto]
    folders: tuple[Path, Path]  # where each model's payloads are read from
    result: SiteComparison
    cannot: str | None = None  # why the float64 evaluation could not follow it: skipped, not judged
    # while it runs: the constants as stored, in float64, and as bounds
    raw: dict[str, np.ndarray] = field(default_factory=dict)
    original64: dict[str, np.ndarray] = field(default_factory=dict)
    fused64: dict[str, np.ndarray] = field(default_factory=dict)
    original_start: dict[str, Bound] = field(default_factory=dict)
    fused_start: dict[str, Bound] = field(default_factory=dict)

    def load(self) -> None:
        mine = {n: tensor_to_array(t, self.folders[0]) for n, t in self.original.items()}
        theirs = {n: tensor_to_array(t, self.folders[1]) for n, t in self.fused.items()}
        self.raw = {**mine, **theirs}
        self.original64 = {n: as64(v) for n, v in mine.items()}
        self.fused64 = {n: as64(v) for n, v in theirs.items()}
        self.original_start = {n: Bound(np.abs(v)) for n, v in self.original64.items()}
        self.fused_start = {n: stored_bound(v, bounds.stored_rounding) for n, v in theirs.items()}

    def release(self) -> None:
        self.raw, self.original64, self.fused64, self.original_start, self.fused_start = {}, {}, {}, {}, {}


def prepare(original: onnx.ModelProto, original_dir: Path, fused: onnx.ModelProto, fused_dir: Path
            ) -> tuple[list[SiteCheck], list[SkippedSite]]:
    """The sites both models name alike, with the constants each side's nodes read."""
    sites, skipped = find_sites(original.graph, fused.graph)
    checks = []
    for site in sites:
        try:
            mine = _constants(original.graph, site.original, site.input)
            theirs = _constants(fused.graph, site.fused, site.input)
        except Skip as why:
            skipped.append(SkippedSite(site.name, str(why)))
            continue
        result = SiteComparison(site.name, node_name(site.layer), site.layer.op_type, [], site.input, site.output,
                                "", True)
        checks.append(SiteCheck(site, mine, theirs, (original_dir, fused_dir), result))
    return checks, skipped


def _constants(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], x: str) -> dict[str, onnx.TensorProto]:
    produced = {o for n in nodes for o in n.output}
    wanted = {i for n in nodes for i in n.input if i and i != x and i not in produced}
    out: dict[str, onnx.TensorProto] = {}
    for t in graph.initializer:
        if t.name in wanted and t.name not in out:
            out[t.name] = t
    missing = wanted - set(out)
    if missing:
        raise Skip(f"no value for {sorted(missing)[0]!r}")
    return out


def with_site_inputs(model: onnx.ModelProto, checks: list[SiteCheck]) -> bytes | None:
    """The original model with every site's input as an extra output, serialized for onnxruntime;
    None when it cannot be (over protobuf's 2 GiB)."""
    model = _copy_shallow(model)
    have = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    for name in dict.fromkeys(c.site.input for c in checks):
        if name not in have:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    if model.ByteSize() > PROTOBUF_LIMIT:
        return None
    return model.SerializeToString()


def _copy_shallow(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def cannot_capture(checks: list[SiteCheck], why: str) -> None:
    for c in checks:
        c.cannot = f"cannot read the original's activations: {why}"


def check(checks: list[SiteCheck], activations: dict[str, np.ndarray]) -> None:
    """Run every site on one batch's activations, folding the results into each site's worst."""
    for c in checks:
        x = activations.get(c.site.input)
        if x is None or c.cannot is not None:
            continue
        try:
            c.load()
            results, axis = _run(c, np.asarray(x))
        except (Skip, ValueError, IndexError) as why:
            # a site the float64 evaluation cannot follow proves nothing either way
            c.cannot = f"cannot compute it in float64: {why}"
            continue
        finally:
            c.release()
        bounds.judge(c.result, results, axis)


def split_skipped(checks: list[SiteCheck]) -> tuple[list[SiteComparison], list[SkippedSite]]:
    """Checked sites, and the ones that turned out not computable, as skipped."""
    done, skipped = [], []
    for c in checks:
        if c.cannot is not None:
            skipped.append(SkippedSite(c.result.name, c.cannot))
        elif c.result.test:
            c.result.folded = c.site.folded
            done.append(c.result)
    return done, skipped


def _run(c: SiteCheck, x: np.ndarray) -> tuple[dict[str, bounds.TestResult], int]:
    site = c.site
    c.result.dtype = str(x.dtype)
    u_arith = bounds.arithmetic_roundoff(x.dtype)
    ctx = Context(dtypes={site.input: x.dtype})
    at_zero = _evaluate(c, np.zeros(x.shape, np.float64), ctx, original_bound=True)
    at_x = _evaluate(c, as64(x), ctx)
    at_x.original_magnitude = _original_magnitude(at_x, at_zero, site.output, x.dtype)
    at_zero.original_magnitude = at_zero.original_bound[site.output].magnitude
    if site.branches:
        for at in (at_x, at_zero):
            at.allowance = _branch_allowance(c, at, ctx, x.dtype)
    results = {"elementwise": bounds.elementwise(*at_x.sides(site.output), u_arith, ctx.terms),
               "bias": bounds.elementwise(*at_zero.sides(site.output), u_arith, ctx.terms)}
    axis = _channel_axis(site)
    layer = _single_layer(site)
    if layer is not None and _bias_per_channel(c, layer, at_x.fused[site.output].shape[axis]):
        results["channel"] = _channel_test(c, layer, at_x, at_zero, axis, u_arith, ctx)
    return results, axis


def _bias_per_channel(c: SiteCheck, layer: onnx.NodeProto, channels: int) -> bool:
    """The channel test lets the bias cancel against the centred output: it must be one number
    per output channel (a Gemm's C may be a whole matrix)."""
    nodes = [n for n in c.site.fused if n.op_type != "Constant"]
    names = list(layer.input[2:]) if len(nodes) == 1 else [i for i in nodes[1].input if i != layer.output[0]]
    return all(np.asarray(c.fused64[n]).size in (1, channels) for n in names if n in c.fused64)


def _branch_allowance(c: SiteCheck, at: "Evaluation", ctx: Context, dtype) -> np.ndarray:
    """A sum of branches may be merged from branches each folded and rounded first (a fold, then
    a merge): one more rounding of every branch's folded magnitude, r·Σ_i (|W'_i|⋆|x| + |b'_i|)."""
    site = c.site
    x = at.original[site.input]
    folded = ctx.sibling(folded=True, magnitudes_only=True)
    magnitudes = bound(site.original, at.original, {**c.original_start, site.input: Bound(np.abs(x))}, folded,
                       lambda d: None)
    r = (bounds.stored_rounding(dtype) or (0.0, 0.0))[0]
    return magnitudes[site.output].magnitude * r


def _original_magnitude(at_x: "Evaluation", at_zero: "Evaluation", y: str, dtype) -> np.ndarray:
    """The magnitudes the original computes with at x, for the arithmetic and float64 terms: the
    folded weights' on |x| (they are the original's, scaled: |W'| ≤ |W'_stored|·(1 + 2r)) plus the
    original's own at x = 0 (its bias, mean and shift), without a second pass over x."""
    r = (bounds.stored_rounding(dtype) or (0.0, 0.0))[0]
    return at_x.fused_bound[y].magnitude * (1 + 2 * r) + at_zero.original_bound[y].magnitude


@dataclass
class Evaluation:
    """Both sides at one input: values, bounds of the fused side (magnitudes and errors), and of
    the original's magnitudes where they were computed."""

    original: dict[str, np.ndarray]
    fused: dict[str, np.ndarray]
    fused_bound: dict[str, Bound]
    original_bound: dict[str, Bound] | None = None
    original_magnitude: np.ndarray | None = None
    allowance: np.ndarray | None = None  # a merge's per-branch rounding, added to the fused error

    def sides(self, y: str) -> tuple[bounds.Evaluated, bounds.Evaluated]:
        fb = self.fused_bound[y]
        err = fb.err
        if self.allowance is not None:
            err = self.allowance if err is None else err + self.allowance
        return (bounds.Evaluated(self.original[y], self.original_magnitude),
                bounds.Evaluated(self.fused[y], fb.magnitude, err))


def _evaluate(c: SiteCheck, x: np.ndarray, ctx: Context, original_bound: bool = False) -> Evaluation:
    site = c.site
    ctx.dtypes.update({n: v.dtype for n, v in c.raw.items()})
    mine = evaluate(site.original, {**c.original64, site.input: x}, ctx)
    theirs = evaluate(site.fused, {**c.fused64, site.input: x}, ctx)
    start = Bound(np.abs(x))
    theirs_b = bound(site.fused, theirs, {**c.fused_start, site.input: start}, ctx, bounds.stored_rounding)
    mine_b = None
    if original_bound:
        mine_b = bound(site.original, mine, {**c.original_start, site.input: start}, ctx.sibling(magnitudes_only=True),
                       lambda dtype: None)
    return Evaluation(mine, theirs, theirs_b, mine_b)


def _channel_axis(site: Site) -> int:
    return 1 if site.layer.op_type in ("Conv", "ConvTranspose") else -1


def _single_layer(site: Site) -> onnx.NodeProto | None:
    """The fused layer, where the fused side is that layer alone (and a bias Add after it): the
    channel test needs the output to be the layer's, per channel."""
    nodes = [n for n in site.fused if n.op_type != "Constant"]
    layer = site.layer
    if nodes[0] is not layer or len(nodes) > 2:
        return None
    if len(nodes) == 2 and not (nodes[1].op_type == "Add" and layer.output[0] in nodes[1].input
                                and nodes[1].output[0] == site.output):
        return None
    if len(nodes) == 1 and layer.output[0] != site.output:
        return None
    if layer.op_type == "MatMul" and layer.input[0] != site.input:
        return None  # the weight on the left: its channels are not the output's last axis
    return layer


def _channel_test(c: SiteCheck, layer: onnx.NodeProto, at_x: Evaluation, at_zero: Evaluation, axis: int,
                  u_arith: float, ctx: Context) -> bounds.TestResult:
    site = c.site
    y = at_x.fused[site.output]
    x = at_x.fused[site.input]
    positions = tuple(i for i in range(y.ndim) if i != axis % y.ndim)
    centred = y - y.mean(axis=positions, keepdims=True)
    w_name = layer.input[1]
    w = at_x.fused[w_name]
    wb = at_x.fused_bound[w_name]
    r = (bounds.stored_rounding(c.result.dtype) or (0.0, 0.0))[0]
    arithmetic = u_arith * (1 + 2 * r) * wb.magnitude  # of the exact folded weights, at most (1 + 2r)·|W'|
    per_weight = arithmetic if wb.err is None else wb.err + arithmetic
    grad = _weight_grad(layer, x, centred, w, ctx)
    weight_bound = _per_channel(layer, per_weight * np.abs(grad), w.shape)
    original0, fused0 = at_zero.sides(site.output)
    zero_bound = u_arith * original0.magnitude + (fused0.error if fused0.error is not None else 0.0)
    bias_bound = np.moveaxis(np.broadcast_to(zero_bound, original0.value.shape), axis, -1)
    bias_bound = bias_bound.reshape(-1, bias_bound.shape[-1]).max(axis=0)
    delta = y - at_x.original[site.output]
    magnitudes = at_x.original_magnitude + at_x.fused_bound[site.output].magnitude
    if at_x.allowance is not None:  # per-branch roundings, bounded element by element
        weight_bound = weight_bound + (np.abs(centred) * at_x.allowance).sum(axis=positions)
    return bounds.channel(delta, centred, axis, weight_bound, bias_bound, magnitudes, ctx.terms)


def _weight_grad(layer: onnx.NodeProto, x: np.ndarray, a: np.ndarray, w: np.ndarray, ctx: Context) -> np.ndarray:
    """Σ_p a_p · ∂y_p/∂W: the layer's weight gradient for output gradient a."""
    if layer.op_type == "Conv":
        geo = conv_geometry(layer, x.shape, w.shape)
        return k.conv_weight_grad(ctx.patches_of(x, geo, k.patches), a, w.shape, geo)
    if layer.op_type == "ConvTranspose":
        geo = transpose_geometry(layer, x.shape, w.shape)
        return k.conv_transpose_weight_grad(ctx.patches_of(x, geo, k.conv_transpose_patches), a, w.shape, geo)
    if layer.op_type == "Gemm":
        attrs = {at.name: onnx.helper.get_attribute_value(at) for at in layer.attribute}
        data = x.T if attrs.get("transA", 0) else x
        grad = float(attrs.get("alpha", 1.0)) * (data.T @ a)  # by B' = B or Bᵀ: [K, N]
        return grad.T if attrs.get("transB", 0) else grad
    if w.ndim != 2:
        raise Skip("MatMul with a batched weight")
    return x.reshape(-1, x.shape[-1]).T @ a.reshape(-1, a.shape[-1])


def _per_channel(layer: onnx.NodeProto, terms: np.ndarray, w_shape: tuple[int, ...]) -> np.ndarray:
    """Sum a weight-shaped array over everything but the output channel."""
    if layer.op_type == "Conv":
        return terms.reshape(w_shape[0], -1).sum(axis=1)
    if layer.op_type == "ConvTranspose":
        group = int(next((onnx.helper.get_attribute_value(a) for a in layer.attribute if a.name == "group"), 1))
        c_in, c_out_g = w_shape[:2]
        return terms.reshape(group, c_in // group, c_out_g, -1).sum(axis=(1, 3)).reshape(-1)
    if layer.op_type == "Gemm":
        trans_b = int(next((onnx.helper.get_attribute_value(a) for a in layer.attribute if a.name == "transB"), 0))
        return terms.sum(axis=1) if trans_b else terms.sum(axis=0)
    return terms.sum(axis=0)
