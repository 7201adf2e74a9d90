"""A fold site's ONNX nodes in float64: their values, and bounds on magnitudes and on rounding.

`evaluate` runs a site's few nodes (a layer, a BN, a bias Add, shape-only ops) on float64 inputs,
with the kernels of check.float64. `bound` runs them again on magnitudes: each value is replaced
by an upper bound of its magnitude and carries an upper bound of its error, where every stored
float constant of the fused side is off by one rounding to its dtype (check.sites.stored_rounding)
and the site's input is exact. For a product the error is e_a·|b| + |a|·e_b + e_a·e_b, for a sum
e_a + e_b; a shape-only op moves errors as it moves values. A node this module cannot evaluate
declines the site with Skip, naming the op.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..check import float64 as k
from ..check.sites import rounding_error, stored_rounding, unit_roundoff
from ..errors import Skip

Array = np.ndarray
Stored = Callable[[np.dtype], "tuple[float, float] | None"]  # a stored dtype's (relative, floor) rounding, or None


@dataclass
class Context:
    """What one site's evaluations share: im2col patches per (input, geometry), and the longest
    float64 sum computed so far (for float64's own error)."""

    patches: dict = field(default_factory=dict)
    terms: int = 0
    dtypes: dict = field(default_factory=dict)  # each tensor's dtype in the model (the values here are float64)
    folded: bool = False  # a BN's magnitude as folded, |s|·|x| + |β − s·μ|, not as computed
    magnitudes_only: bool = False  # the original's side: its own roundings are what it computes

    def sibling(self, **flags) -> "Context":
        """The same patches and dtypes, other flags."""
        return Context(self.patches, self.terms, self.dtypes, **flags)

    def patches_of(self, x: Array, geo, make) -> k.Patches:
        key = (id(x), geo)
        if key not in self.patches:
            self.patches[key] = (x, make(x, geo))  # the array is kept so its id is not reused
        return self.patches[key][1]


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def constant_value(node: onnx.NodeProto) -> Array:
    """A Constant node's value, in its stored dtype."""
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_floats"):
            return np.asarray(helper.get_attribute_value(a), np.float32)
        if a.name in ("value_int", "value_ints"):
            return np.asarray(helper.get_attribute_value(a), np.int64)
    raise Skip(f"Constant {node.name or node.output[0]!r} holds no numeric value")


def as64(a: Array) -> Array:
    return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16" else a


# -- geometry ---------------------------------------------------------------------------------


def _pads(a: dict, spatial: list[int], kernel: list[int], strides: list[int], dilations: list[int]):
    dims = len(spatial)
    mode = a.get("auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for n, kk, s, d in zip(spatial, kernel, strides, dilations):
            total = max(0, (-(-n // s) - 1) * s + d * (kk - 1) + 1 - n)
            small, big = total // 2, total - total // 2
            begin.append(small if mode == "SAME_UPPER" else big)
            end.append(big if mode == "SAME_UPPER" else small)
        return tuple(begin), tuple(end)
    if mode == "VALID":
        return (0,) * dims, (0,) * dims
    pads = list(a.get("pads", [0] * 2 * dims))
    return tuple(pads[:dims]), tuple(pads[dims:])


def conv_geometry(node: onnx.NodeProto, x_shape, w_shape) -> k.ConvGeometry:
    a = attrs(node)
    dims = len(x_shape) - 2
    kernel = list(a.get("kernel_shape", w_shape[2:]))
    strides, dilations = list(a.get("strides", [1] * dims)), list(a.get("dilations", [1] * dims))
    begin, end = _pads(a, list(x_shape[2:]), kernel, strides, dilations)
    return k.ConvGeometry(tuple(kernel), tuple(strides), tuple(dilations), begin, end, int(a.get("group", 1)))


def transpose_geometry(node: onnx.NodeProto, x_shape, w_shape) -> k.TransposeGeometry:
    a = attrs(node)
    dims = len(x_shape) - 2
    kernel = list(a.get("kernel_shape", w_shape[2:]))
    strides, dilations = list(a.get("strides", [1] * dims)), list(a.get("dilations", [1] * dims))
    extra = list(a.get("output_padding", [0] * dims))
    mode = a.get("auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    wanted = a.get("output_shape")
    if wanted is None and mode in ("SAME_UPPER", "SAME_LOWER"):
        wanted = [n * s for n, s in zip(x_shape[2:], strides)]
    if wanted is not None:  # pads follow from the output shape asked for
        wanted = list(wanted)[-dims:]
        begin, end = [], []
        for n, kk, s, d, o, want in zip(x_shape[2:], kernel, strides, dilations, extra, wanted):
            total = max(0, s * (n - 1) + o + d * (kk - 1) + 1 - want)
            small, big = total // 2, total - total // 2
            begin.append(small if mode == "SAME_UPPER" else big)
            end.append(big if mode == "SAME_UPPER" else small)
        pads = (tuple(begin), tuple(end))
    elif mode == "VALID":
        pads = ((0,) * dims, (0,) * dims)
    else:
        p = list(a.get("pads", [0] * 2 * dims))
        pads = (tuple(p[:dims]), tuple(p[dims:]))
    return k.TransposeGeometry(tuple(kernel), tuple(strides), tuple(dilations), *pads, tuple(extra),
                               int(a.get("group", 1)))


# -- values -----------------------------------------------------------------------------------


def _channel(v: Array, rank: int) -> Array:
    return v.reshape([1, -1] + [1] * (rank - 2))


def _conv(node, ins, ctx: Context) -> Array:
    x, w = ins[0], ins[1]
    geo = conv_geometry(node, x.shape, w.shape)
    p = ctx.patches_of(x, geo, k.patches)
    ctx.terms = max(ctx.terms, w.size // max(w.shape[0], 1))
    y = k.conv(p, w, geo)
    return y + _channel(ins[2], y.ndim) if len(ins) > 2 and ins[2] is not None else y


def _conv_transpose(node, ins, ctx: Context) -> Array:
    x, w = ins[0], ins[1]
    geo = transpose_geometry(node, x.shape, w.shape)
    p = ctx.patches_of(x, geo, k.conv_transpose_patches)
    ctx.terms = max(ctx.terms, w.size // max(w.shape[1], 1))
    y = k.conv_transpose(p, w, geo)
    return y + _channel(ins[2], y.ndim) if len(ins) > 2 and ins[2] is not None else y


def _gemm_operands(node, a: Array, b: Array) -> tuple[Array, Array, float, float]:
    at = attrs(node)
    a = a.T if at.get("transA", 0) else a
    b = b.T if at.get("transB", 0) else b
    return a, b, float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))


def _gemm(node, ins, ctx: Context) -> Array:
    a, b, alpha, beta = _gemm_operands(node, ins[0], ins[1])
    ctx.terms = max(ctx.terms, a.shape[-1])
    y = alpha * (a @ b)
    return y + beta * ins[2] if len(ins) > 2 and ins[2] is not None else y


def _matmul(node, ins, ctx: Context) -> Array:
    ctx.terms = max(ctx.terms, ins[0].shape[-1])
    return np.matmul(ins[0], ins[1])


def _bn(node, ins, ctx: Context) -> Array:
    x, scale, bias, mean, var = ins[:5]
    eps = float(np.float32(attrs(node).get("epsilon", 1e-5)))  # ε as the runtime stores it
    if int(attrs(node).get("training_mode", 0)):
        raise Skip("BatchNormalization in training mode")
    s = scale / np.sqrt(var + eps)
    return _channel(s, x.ndim) * (x - _channel(mean, x.ndim)) + _channel(bias, x.ndim)


def _axes(node, ins) -> list[int] | None:
    if len(ins) > 1 and ins[1] is not None:
        return [int(i) for i in np.asarray(ins[1]).reshape(-1)]
    axes = attrs(node).get("axes")
    return None if axes is None else list(axes)


def _reshape(node, ins, ctx) -> Array:
    shape = [int(d) for d in np.asarray(ins[1]).reshape(-1)]
    if not attrs(node).get("allowzero", 0):
        shape = [ins[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return ins[0].reshape(shape)


def _flatten(node, ins, ctx) -> Array:
    axis = int(attrs(node).get("axis", 1))
    x = ins[0]
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


def _transpose(node, ins, ctx) -> Array:
    perm = attrs(node).get("perm")
    return np.transpose(ins[0], perm)


def _squeeze(node, ins, ctx) -> Array:
    axes = _axes(node, ins)
    return np.squeeze(ins[0], axis=None if axes is None else tuple(axes))


def _unsqueeze(node, ins, ctx) -> Array:
    axes = sorted(a + ins[0].ndim + len(_axes(node, ins)) if a < 0 else a for a in _axes(node, ins))
    out = ins[0]
    for a in axes:
        out = np.expand_dims(out, a)
    return out


def cast_target(node: onnx.NodeProto, ctx: Context) -> np.dtype:
    """What a Cast or CastLike converts to, in the model's dtypes."""
    if node.op_type == "CastLike":
        return np.dtype(ctx.dtypes.get(node.input[1], np.float64))
    return np.dtype(helper.tensor_dtype_to_np_dtype(int(attrs(node)["to"])))


def _cast(node, ins, ctx) -> Array:
    to = cast_target(node, ctx)
    x = ins[0]
    if np.issubdtype(np.dtype(to), np.floating):
        return x.astype(to).astype(np.float64)  # the original rounds here; so do we
    return x.astype(to)


def _dequantize(node, ins, ctx) -> Array:
    q, scale = ins[0], ins[1]
    zero = ins[2] if len(ins) > 2 and ins[2] is not None else np.zeros((), q.dtype)
    axis = int(attrs(node).get("axis", 1))
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (q.astype(np.float64) - zero.astype(np.float64)) * scale


def _binary(op):
    return lambda node, ins, ctx: op(ins[0], ins[1])


def _shape(node, ins, ctx) -> Array:
    a = attrs(node)
    dims = ins[0].shape
    return np.asarray(dims[a.get("start", 0):a.get("end", len(dims))], np.int64)


def _expand(node, ins, ctx) -> Array:
    shape = tuple(int(d) for d in np.asarray(ins[1]).reshape(-1))
    return np.broadcast_to(ins[0], np.broadcast_shapes(ins[0].shape, shape))


def _concat(node, ins, ctx) -> Array:
    return np.concatenate([np.atleast_1d(i) for i in ins], axis=int(attrs(node)["axis"]))


def _gather(node, ins, ctx) -> Array:
    return np.take(ins[0], np.asarray(ins[1], np.int64), axis=int(attrs(node).get("axis", 0)))


def _slice(node, ins, ctx) -> Array:
    x = ins[0]
    starts, ends = (np.asarray(v, np.int64).reshape(-1) for v in ins[1:3])
    axes = np.asarray(ins[3], np.int64).reshape(-1) if len(ins) > 3 and ins[3] is not None else range(len(starts))
    steps = np.asarray(ins[4], np.int64).reshape(-1) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[int(axis)] = slice(int(start), int(end), int(step))
    return x[tuple(index)]


SHAPE_OPS: dict[str, Callable] = {
    "Reshape": _reshape, "Flatten": _flatten, "Transpose": _transpose, "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze, "Identity": lambda node, ins, ctx: ins[0], "Expand": _expand,
    "Gather": _gather, "Slice": _slice,
}
VALUE_OPS: dict[str, Callable] = {
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _matmul,
    "BatchNormalization": _bn, "Add": _binary(np.add), "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply), "Div": _binary(np.divide), "Neg": lambda node, ins, ctx: -ins[0],
    "Cast": _cast, "CastLike": _cast, "DequantizeLinear": _dequantize, "Shape": _shape, "Concat": _concat,
    **SHAPE_OPS,
}


def _check_op(node: onnx.NodeProto) -> None:
    if node.domain not in ("", "ai.onnx") or (node.op_type not in VALUE_OPS and node.op_type != "Constant"):
        raise Skip(f"the site holds {node.op_type} {node.name or node.output[0]!r}, which the float64 check "
                   "does not compute")


def evaluate(nodes: list[onnx.NodeProto], env: dict[str, Array], ctx: Context) -> dict[str, Array]:
    """Every node's first output, in float64 (integers stay integers), into `env`."""
    for node in nodes:
        _check_op(node)
        if node.op_type == "Constant":
            raw = constant_value(node)
            env[node.output[0]], ctx.dtypes[node.output[0]] = as64(raw), raw.dtype
            continue
        ins = [env[i] if i else None for i in node.input]
        with np.errstate(all="ignore"):  # an overflow is a difference the comparison reports
            out = env[node.output[0]] = VALUE_OPS[node.op_type](node, ins, ctx)
        ctx.dtypes[node.output[0]] = _output_dtype(node, ctx, out)
    return env


def _output_dtype(node: onnx.NodeProto, ctx: Context, value: Array) -> np.dtype:
    if node.op_type in ("Cast", "CastLike"):
        return cast_target(node, ctx)
    if not np.issubdtype(value.dtype, np.floating):
        return value.dtype
    return next((ctx.dtypes[i] for i in node.input if i in ctx.dtypes
                 and np.issubdtype(np.dtype(ctx.dtypes[i]), np.floating)), value.dtype)


# -- bounds -----------------------------------------------------------------------------------


@dataclass
class Bound:
    """An upper bound of a value's magnitude and one of its error: `error` (None: exact), or for a
    stored constant and what only moves it, relative·magnitude + floor exactly."""

    magnitude: Array
    error: Array | None = None
    relative: float | None = None
    floor: float = 0.0

    @property
    def err(self) -> Array | None:
        if self.relative is not None:
            return self.magnitude * self.relative + self.floor
        return self.error

    def moved(self, op: Callable[[Array], Array]) -> "Bound":
        """The bound of a value a shape-only op moved."""
        if self.relative is not None:
            return Bound(op(self.magnitude), None, self.relative, self.floor)
        return Bound(op(self.magnitude), None if self.error is None else op(self.error))


def stored_bound(raw: Array, stored: Stored) -> Bound:
    rounding = stored(raw.dtype)
    magnitude = np.abs(as64(raw))
    return Bound(magnitude) if rounding is None else Bound(magnitude, None, *rounding)


def _add(a, b):
    if a is None:
        return b
    return a if b is None else a + b


def _bilinear(f: Callable[[Array, Array], Array], a: Bound, b: Bound,
              ones: Callable[[Array], Array] | None = None) -> Bound:
    """f linear in each argument, with non-negative results on non-negative arguments. With b a
    stored weight and a exact (the usual layer), the error is relative·f(|a|, |b|) + floor·f(|a|, 1),
    and `ones` computes f(|a|, 1) without a second product."""
    magnitude = f(a.magnitude, b.magnitude)
    if a.err is None and b.relative is not None:
        err = magnitude * b.relative
        if b.floor:
            err = err + b.floor * (ones(a.magnitude) if ones is not None else f(a.magnitude, np.ones_like(b.magnitude)))
        return Bound(magnitude, err)
    ea, eb = a.err, b.err
    err = None
    if ea is not None:
        err = _add(err, f(ea, b.magnitude))
    if eb is not None:
        err = _add(err, f(a.magnitude, eb))
    if ea is not None and eb is not None:
        err = _add(err, f(ea, eb))
    return Bound(magnitude, err)


def _bias(out: Bound, bias: Bound | None, shape: Callable[[Array], Array], factor: float = 1.0) -> Bound:
    if bias is None:
        return out
    e = None if bias.err is None else shape(bias.err) * factor
    return Bound(out.magnitude + shape(bias.magnitude) * factor, _add(out.error, e))


def _b_conv(node, ins: list, values: list, ctx: Context) -> Bound:
    x, w = values[0], values[1]
    geo = conv_geometry(node, x.shape, w.shape)
    of = lambda a: ctx.patches_of(a, geo, k.patches)  # noqa: E731
    out = _bilinear(lambda a, b: k.conv(of(a), b, geo), ins[0], ins[1],
                    lambda a: k.patch_sums(of(a), geo, w.shape[0]))
    rank = out.magnitude.ndim
    return _bias(out, ins[2] if len(ins) > 2 else None, lambda v: _channel(v, rank))


def _b_conv_transpose(node, ins: list, values: list, ctx: Context) -> Bound:
    x, w = values[0], values[1]
    geo = transpose_geometry(node, x.shape, w.shape)
    of = lambda a: ctx.patches_of(a, geo, k.conv_transpose_patches)  # noqa: E731
    out = _bilinear(lambda a, b: k.conv_transpose(of(a), b, geo), ins[0], ins[1],
                    lambda a: k.patch_sums(of(a), geo.as_conv(), w.shape[1] * geo.group))
    rank = out.magnitude.ndim
    return _bias(out, ins[2] if len(ins) > 2 else None, lambda v: _channel(v, rank))


def _b_gemm(node, ins: list, values: list, ctx: Context) -> Bound:
    at = attrs(node)
    ta, tb = bool(at.get("transA", 0)), bool(at.get("transB", 0))
    alpha, beta = abs(float(at.get("alpha", 1.0))), abs(float(at.get("beta", 1.0)))
    n = values[1].shape[0 if tb else 1]
    out = _bilinear(lambda a, b: alpha * ((a.T if ta else a) @ (b.T if tb else b)), ins[0], ins[1],
                    lambda a: np.repeat(alpha * (a.T if ta else a).sum(axis=1, keepdims=True), n, axis=1))
    return _bias(out, ins[2] if len(ins) > 2 else None, lambda v: v, beta)


def _b_matmul(node, ins: list, values: list, ctx: Context) -> Bound:
    n = values[1].shape[-1]
    return _bilinear(np.matmul, ins[0], ins[1], lambda a: np.repeat(a.sum(axis=-1, keepdims=True), n, axis=-1))


def _b_sum(node, ins: list, values: list, ctx: Context) -> Bound:
    a, b = ins[0], ins[1]
    return Bound(a.magnitude + b.magnitude, _add(a.err, b.err))


def _b_div(node, ins: list, values: list, ctx: Context) -> Bound:
    a, b = ins[0], ins[1]
    if b.err is not None:
        raise Skip(f"Div {node.name or node.output[0]!r} divides by a rounded value")
    with np.errstate(divide="ignore", invalid="ignore"):
        return Bound(a.magnitude / b.magnitude, None if a.err is None else a.err / b.magnitude)


def _b_bn(node, ins: list, values: list, ctx: Context) -> Bound:
    if any(b.err is not None for b in ins[:5]):
        raise Skip(f"BatchNormalization {node.name or node.output[0]!r} is in the fused layer")
    x, scale, bias, mean = (b.magnitude for b in ins[:4])
    var = values[4]
    eps = float(np.float32(attrs(node).get("epsilon", 1e-5)))
    s = scale / np.sqrt(var + eps)
    if ctx.folded:
        shift = np.abs(values[2] - values[1] / np.sqrt(var + eps) * values[3])
        return Bound(_channel(s, x.ndim) * x + _channel(shift, x.ndim))
    return Bound(_channel(s, x.ndim) * (x + _channel(mean, x.ndim)) + _channel(bias, x.ndim))


def _b_cast(node, ins: list, values: list, ctx: Context) -> Bound:
    to = cast_target(node, ctx)
    a = ins[0]
    if ctx.magnitudes_only:
        return Bound(a.magnitude)
    if not np.issubdtype(np.dtype(to), np.floating):
        if a.err is not None:
            raise Skip(f"Cast {node.name or node.output[0]!r} turns a rounded value into integers")
        return a
    rounding = stored_rounding(to)
    if rounding is None or unit_roundoff(to) <= unit_roundoff(np.float64):
        return a
    if a.relative is not None:  # a stored constant rounded once more
        return Bound(a.magnitude, None, a.relative + rounding[0], a.floor + rounding[1])
    return Bound(a.magnitude, _add(a.err, rounding_error(values[0], a.magnitude, to)))


def _b_dequantize(node, ins: list, values: list, ctx: Context) -> Bound:
    if ins[0].err is not None:
        raise Skip(f"DequantizeLinear {node.name or node.output[0]!r} reads a rounded value")
    q, scale = values[0], ins[1]
    zero = values[2] if len(values) > 2 and values[2] is not None else np.zeros((), q.dtype)
    steps = np.abs(_dequantize(node, [q, np.ones_like(values[1], np.float64), zero], ctx))
    magnitude = np.abs(_dequantize(node, [q, scale.magnitude, zero], ctx))
    err = scale.err
    return Bound(magnitude, None if err is None else steps * _per_axis(node, err, q.ndim))


def _per_axis(node, v: Array, rank: int) -> Array:
    if v.ndim == 1 and v.size > 1:
        shape = [1] * rank
        shape[int(attrs(node).get("axis", 1))] = -1
        return v.reshape(shape)
    return v


def _b_shape(op: Callable):
    def bound_of(node, ins: list, values: list, ctx: Context) -> Bound:
        rest = values[1:]
        return ins[0].moved(lambda a: op(node, [a, *rest], ctx))
    return bound_of


def _b_concat(node, ins: list, values: list, ctx: Context) -> Bound:
    axis = int(attrs(node)["axis"])
    magnitude = np.concatenate([np.atleast_1d(b.magnitude) for b in ins], axis=axis)
    if all(b.err is None for b in ins):
        return Bound(magnitude)
    errors = [np.atleast_1d(b.err) if b.err is not None else np.zeros(np.atleast_1d(b.magnitude).shape) for b in ins]
    return Bound(magnitude, np.concatenate(errors, axis=axis))


BOUND_OPS: dict[str, Callable] = {
    "Conv": _b_conv, "ConvTranspose": _b_conv_transpose, "Gemm": _b_gemm, "MatMul": _b_matmul,
    "Mul": lambda node, ins, values, ctx: _bilinear(np.multiply, ins[0], ins[1]),
    "Add": _b_sum, "Sub": _b_sum, "Div": _b_div, "Neg": lambda node, ins, values, ctx: ins[0],
    "BatchNormalization": _b_bn, "Cast": _b_cast, "CastLike": _b_cast, "DequantizeLinear": _b_dequantize,
    "Shape": lambda node, ins, values, ctx: Bound(np.abs(_shape(node, values, ctx))), "Concat": _b_concat,
    **{name: _b_shape(op) for name, op in SHAPE_OPS.items()},
}


def bound(nodes: list[onnx.NodeProto], values: dict[str, Array], start: dict[str, Bound], ctx: Context,
          stored: Stored) -> dict[str, Bound]:
    """Magnitudes and errors of every node's first output, from `start` (the site's input and its
    stored constants); `values` are evaluate()'s, for the integer inputs of shape-only ops."""
    env = dict(start)
    for node in nodes:
        if node.op_type == "Constant":
            env[node.output[0]] = stored_bound(constant_value(node), stored)
            continue
        ins = [env.get(i) if i else None for i in node.input]
        ins = [b if b is not None or not name else Bound(np.abs(values[name])) for b, name in zip(ins, node.input)]
        vals = [values.get(i) if i else None for i in node.input]
        with np.errstate(all="ignore"):
            env[node.output[0]] = BOUND_OPS[node.op_type](node, ins, vals, ctx)
    return env
