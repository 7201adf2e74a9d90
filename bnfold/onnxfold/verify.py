"""verify for ONNX: both models in onnxruntime with graph optimizations disabled (ORT's own
optimizer would fold the original's BNs too and could hide a wrong fold), on the same
seeded random (or given) inputs, every output compared by name (a sequence's tensors, an
optional's value, a map's entries, each by its path under that name)."""
from __future__ import annotations

from pathlib import Path

import onnx

from ..check.compare import compare_outputs, conclude
from ..check.inputs import describe_inputs, graph_inputs, load_inputs, make_inputs
from ..check.runtime import run_session, session
from ..errors import BadInput
from ..options import VerifyOptions
from ..report import VerifyReport
from .io import read_signature


def verify_onnx(original: Path, fused: Path, options: VerifyOptions) -> VerifyReport:
    signature = read_signature(original)
    check_same_inputs(signature, read_signature(fused), fused)
    sess_a, sess_b = session(original, options.provider), session(fused, options.provider)
    seed = None if options.data is not None else options.seed
    batches = 1 if options.data is not None else options.batches  # the user's data is one fixed set
    report = VerifyReport(str(original), str(fused), False, "onnxruntime", options.provider, options.atol,
                          options.rtol, seed, batches)
    runs = []
    for k in range(batches):
        if options.data is not None:
            feeds = load_inputs(options.data, signature)
        else:
            feeds = make_inputs(signature, shapes=options.shapes, batch_size=options.batch_size,
                                seed=options.seed + k)
        if k == 0:
            report.inputs = describe_inputs(feeds)
        runs.append(compare_outputs(outputs_of(sess_a, feeds, original), outputs_of(sess_b, feeds, fused),
                                    options.atol, options.rtol))
    conclude(report, runs)
    return report


def outputs_of(sess, feeds: dict, path: Path) -> dict:
    """Every output by name; none for a model without outputs (onnxruntime refuses to run it,
    and such a model has nothing to compare, which the caller reports)."""
    return run_session(sess, feeds, path) if sess.get_outputs() else {}


def input_signature(model: onnx.ModelProto) -> dict[str, tuple[int, list]]:
    """Each fed input's element type and dims (ints, symbols or None)."""
    return {v.name: (v.type.tensor_type.elem_type,
                     [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                      for d in v.type.tensor_type.shape.dim])
            for v in graph_inputs(model)}


def _type_name(elem_type: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return str(elem_type)


def check_same_inputs(a: onnx.ModelProto, b: onnx.ModelProto, path: Path) -> None:
    """Names and element types must match; fixed dims must not contradict each other."""
    sig_a, sig_b = input_signature(a), input_signature(b)
    if sorted(sig_a) != sorted(sig_b):
        raise BadInput(f"inputs differ from the original's: {sorted(sig_b)} vs {sorted(sig_a)}", path)
    for name, (dtype_a, _) in sig_a.items():
        if sig_b[name][0] != dtype_a:
            raise BadInput(f"input {name!r} has element type {_type_name(sig_b[name][0])}, the original's is "
                           f"{_type_name(dtype_a)}", path)
    for name, (_, dims_a) in sig_a.items():
        dims_b = sig_b[name][1]
        if len(dims_a) != len(dims_b) or any(isinstance(x, int) and isinstance(y, int) and x and y and x != y
                                             for x, y in zip(dims_a, dims_b)):
            raise BadInput(f"input {name!r} has shape {dims_b}, the original's is {dims_a}", path)
