"""Model inputs for verify, bench and calibrate: user shapes, seeded random data, .npz files.

Dynamic dimensions are filled in this order: a `--shape NAME=…` for that input; the batch
size for the first dimension (default 2); 32 for the other dimensions of an input of rank
3 or more (spatial or sequence axes); 1 otherwise.
"""
from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from ..errors import BadInput, UsageError
from ..options import check_elements, check_shapes
from ..report import InputInfo
from .arrays import check_array, read_file

if TYPE_CHECKING:  # a torch command parses --shape with this module and never reads an ONNX graph
    import onnx

DEFAULT_BATCH = 2
DEFAULT_SPATIAL = 32


def parse_shapes(specs: list[str] | None) -> dict[str, list[int]]:
    """`NAME=D0,D1,…` (repeatable) → {NAME: [D0, D1, …]}."""
    shapes: dict[str, list[int]] = {}
    for spec in specs or []:
        name, sep, dims = spec.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            raise UsageError(f"--shape expects NAME=D0,D1,… with integer dims, got {spec!r}") from None
    check_shapes(shapes)
    return shapes


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller feeds: graph inputs that are not initializers."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def input_dtype(value: onnx.ValueInfoProto) -> np.dtype:
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))


def resolve_shape(value: onnx.ValueInfoProto, shapes: dict[str, list[int]], batch_size: int | None) -> list[int]:
    dims = value.type.tensor_type.shape.dim
    if value.name in shapes:
        shape = shapes[value.name]
        fixed = [(i, d.dim_value) for i, d in enumerate(dims) if d.HasField("dim_value") and d.dim_value > 0]
        if len(shape) != len(dims) or any(shape[i] != v for i, v in fixed):
            want = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
            raise UsageError(f"--shape {value.name}={','.join(map(str, shape))} does not match the graph's {want}")
        return list(shape)
    out = []
    for i, d in enumerate(dims):
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(d.dim_value)
        elif i == 0:
            out.append(batch_size or DEFAULT_BATCH)
        else:
            out.append(DEFAULT_SPATIAL if len(dims) >= 3 else 1)
    check_elements(f"input {value.name!r} of shape", out)  # the model's own dims times --batch-size
    return out


def make_inputs(model: onnx.ModelProto, *, shapes: dict[str, list[int]] | None = None,
                batch_size: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random data for every graph input: floats N(0, 1), integers in [0, 4), bools."""
    shapes = shapes or {}
    known = {i.name for i in graph_inputs(model)}
    unknown = sorted(set(shapes) - known)
    if unknown:
        raise UsageError(f"--shape names unknown input(s) {unknown}; the graph's inputs are {sorted(known)}")
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in graph_inputs(model):
        shape, dtype = resolve_shape(value, shapes, batch_size), input_dtype(value)
        feeds[value.name] = random_array(rng, shape, dtype)
    return feeds


def random_array(rng: np.random.Generator, shape: list[int], dtype: np.dtype) -> np.ndarray:
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 4, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def load_inputs(path: str | Path, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """A user's inputs: `.npz` with one array per input name, or `.npy` for a one-input model."""
    path = Path(path)
    arrays = read_file(path, [i.name for i in graph_inputs(model)])
    check_inputs(arrays, model, path)
    return arrays


def input_dims(value: onnx.ValueInfoProto) -> list:
    """A graph input's dims: ints where fixed, the symbol (or None) where dynamic."""
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
            for d in value.type.tensor_type.shape.dim]


def expected_inputs(model: onnx.ModelProto) -> dict[str, tuple[np.dtype, list]]:
    return {v.name: (input_dtype(v), input_dims(v)) for v in graph_inputs(model)}


def check_inputs(arrays: dict[str, np.ndarray], model: onnx.ModelProto, path: Path | None = None) -> None:
    """Names, ranks, fixed dimensions and dtypes must match the graph's inputs."""
    expected = expected_inputs(model)
    if set(arrays) != set(expected):
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        raise BadInput(f"inputs do not match the graph: missing {missing}, unexpected {extra}", path)
    for name, array in arrays.items():
        check_array(name, array, *expected[name], path)


def describe_inputs(feeds: dict[str, np.ndarray]) -> list[InputInfo]:
    return [InputInfo(name, list(a.shape), str(a.dtype)) for name, a in feeds.items()]
