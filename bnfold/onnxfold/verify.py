"""verify for ONNX: both models in onnxruntime with graph optimizations disabled (ORT's own
optimizer would fold the original's BNs too and could hide a wrong fold), on the same
seeded random (or given) inputs, every output compared by name (a sequence's tensors, an
optional's value, a map's entries, each by its path under that name).

Each fold site is checked on its own as well (site_check): the original run also returns the
activation at every folded layer's input, and the site passes only within the bound one rounding
of its fused weights allows. The verdict needs both; the report says which decided."""
from __future__ import annotations

from pathlib import Path

import onnx

from ..check.compare import compare_outputs, conclude
from ..check.sites import conclude_sites
from ..check.inputs import describe_inputs, graph_inputs, load_inputs, make_inputs
from ..check.runtime import run_session, session
from ..errors import BadInput
from ..options import VerifyOptions
from ..report import VerifyReport
from . import site_check
from .io import read_signature


def verify_onnx(original: Path, fused: Path, options: VerifyOptions) -> VerifyReport:
    signature, fused_signature = read_signature(original), read_signature(fused)
    check_same_inputs(signature, fused_signature, fused)
    checks, skipped = site_check.prepare(signature, _folder(original), fused_signature, _folder(fused))
    sess_a = _original_session(original, signature, checks, options)
    sess_b = session(fused, options.provider)
    seed = None if options.data is not None else options.seed
    batches = 1 if options.data is not None else options.batches  # the user's data is one fixed set
    report = VerifyReport(str(original), str(fused), False, "onnxruntime", options.provider, options.atol,
                          options.rtol, seed, batches)
    outputs = [o.name for o in signature.graph.output]
    runs = []
    for k in range(batches):
        if options.data is not None:
            feeds = load_inputs(options.data, signature)
        else:
            feeds = make_inputs(signature, shapes=options.shapes, batch_size=options.batch_size,
                                seed=options.seed + k)
        if k == 0:
            report.inputs = describe_inputs(feeds)
        values = outputs_of(sess_a, feeds, original)
        runs.append(compare_outputs({n: values[n] for n in outputs if n in values}, outputs_of(sess_b, feeds, fused),
                                    options.atol, options.rtol))
        site_check.check(checks, {**feeds, **values})
    conclude(report, runs)
    report.sites, cannot = site_check.split_skipped(checks)
    report.skipped_sites = skipped + cannot
    conclude_sites(report)
    return report


def _folder(path: Path) -> Path:
    """Where a model's payloads are read from: beside the file a symlink points to."""
    return Path(path).resolve().parent


def _original_session(original: Path, signature: onnx.ModelProto, checks: list, options: VerifyOptions):
    """The original's session; with fold sites, one that also returns each site's input (if
    onnxruntime will not load that, the sites are skipped saying why, and the outputs decide)."""
    augmented = site_check.with_site_inputs(signature, checks) if checks else None
    if augmented is not None:
        try:
            return session(augmented, options.provider, data_dir=_folder(original))
        except BadInput as why:
            site_check.cannot_capture(checks, why.problem)
    return session(original, options.provider)


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
