"""A torch module as ONNX, BNs and all: the legacy (TorchScript-based) exporter, in eval mode,
without constant folding, keeping an exported program's dynamic dimensions where it can."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import onnx
import torch

from ..check.runtime import session
from ..errors import BadInput, BnfoldError
from ..onnxfold.io import save_onnx
from ..options import LoadOptions
from .inputs import check_fixed_batch, dynamic_dims, example_for, export_name, fixed_batch, shape_hint
from .io import EXPORT, TorchSource, load_torch, runnable


def export_unfused_onnx(src: Path, dst: Path, options: LoadOptions, batch_sizes: tuple[int, ...] = ()) -> Path:
    """The torch model as it is (BNs and all) in ONNX, for onnxruntime benchmarks. A program
    exported with a fixed batch is refused up front for any other of `batch_sizes`."""
    source = load_torch(src, options)
    if source.kind == EXPORT and not options.shapes:
        check_fixed_batch(fixed_batch(source.module), batch_sizes, src)
    module = runnable(source)
    return write_onnx(module, example_for(source, options, module), dst, onnx_dynamic_axes(source), path=src)


def onnx_dynamic_axes(source: TorchSource) -> list[set[int]] | None:
    """The ONNX inputs' dynamic axes: an exported program's own dynamic dimensions (the others
    were specialized, and the graph may have baked them in); None (the batch axis) otherwise."""
    if source.kind != EXPORT:
        return None
    return [set(dims or ()) for dims in dynamic_dims(source.module) or ()] or []


def write_onnx(module, example, dst: Path, dynamic: list[set[int]] | None = None,
               notes: list[str] | None = None, path: Path | None = None) -> Path:
    """The torch exporter's ONNX, checked and saved; a model it cannot convert is bad input
    (`path`: the checkpoint the message names)."""
    try:
        data = _program_onnx(module, example, dynamic, notes) if refuses_train(module) and dynamic else \
            onnx_bytes(module, example, dynamic)
        return save_onnx(onnx.load_from_string(data), dst)
    except (BnfoldError, OSError):  # OSError: a full disk, said as such
        raise
    except Exception as exc:  # noqa: BLE001 — the exporter and the checker fail in many ways
        raise BadInput(f"cannot be written as ONNX ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}); "
                       f"{shape_hint(example)}", path) from None


def _program_onnx(module, example, dynamic: list[set[int]], notes: list[str] | None) -> bytes:
    """An exported program with dynamic dimensions: dynamic in the ONNX where the exporter
    keeps them so (a run at doubled sizes says), else with the program's example shapes fixed."""
    try:
        data = onnx_bytes(module, example, dynamic)
        if runs_at_other_sizes(data, example, dynamic):
            return data
    except Exception:  # noqa: BLE001 — the traced sizes did not export: try the shapes fixed
        pass
    if notes is not None:
        notes.append("the ONNX keeps the program's input shapes fixed "
                     f"({', '.join(str(list(t.shape)) for t in example)}): the exporter turned one of its "
                     "dynamic sizes into a constant")
    return onnx_bytes(module, example, [])


def onnx_bytes(module, example, dynamic: list[set[int]] | None = None) -> bytes:
    buffer = io.BytesIO()
    to_onnx(module, example, buffer, dynamic)
    return buffer.getvalue()


def runs_at_other_sizes(data: bytes, example, dynamic: list[set[int]]) -> bool:
    """Whether the ONNX of an exported program runs with every dynamic dimension doubled: the
    tracer keeps most sizes symbolic (see traced_sizes), but an op that reads a size as a
    plain int bakes it in, and the model would then fail at any other size."""
    feeds = {}
    for i, (t, dims) in enumerate(zip(example, list(dynamic) + [set()] * len(example))):
        shape = [2 * n if d in dims else n for d, n in enumerate(t.shape)]
        feeds[f"input{i}" if i else "input"] = torch.zeros(shape, dtype=t.dtype).numpy()
    try:
        sess = session(data)  # logs nothing: the failure is the answer, not an error to print
        sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})
    except Exception:  # noqa: BLE001 — any failure means: not dynamic after all
        return False
    return True


def to_onnx(module, example, target, dynamic: list[set[int]] | None = None) -> None:
    """Legacy (TorchScript-based) exporter, eval mode, no constant folding: unfolded BNs stay BNs.
    `dynamic`: each input's dynamic axes (None: axis 0 of every input)."""
    names = [export_name(i) for i in range(len(example))]
    dynamic = [{0}] * len(names) if dynamic is None else dynamic
    axes = {name: {d: f"{name}_dim{d}" if d else "batch" for d in sorted(dims)}
            for name, dims in zip(names, dynamic) if dims}
    mode, outputs = torch.onnx.TrainingMode.EVAL, None
    if refuses_train(module):
        mode, outputs = torch.onnx.TrainingMode.PRESERVE, graph_output_names(module)
        traced_sizes(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(example), target, dynamo=False, do_constant_folding=False,
                          training=mode, opset_version=17, input_names=names, output_names=outputs,
                          dynamic_axes=axes)


def refuses_train(module) -> bool:
    """torch.export's unlifted module (ExportedProgram.module()) raises on train()/eval(), which
    the exporter's EVAL mode calls. Its graph is already the inference graph (BNs are
    _native_batch_norm_legit_no_training), so it is exported as it is, its flags set by hand."""
    if not isinstance(module, torch.fx.GraphModule):
        return False
    try:
        module.train(module.training)
    except NotImplementedError:
        for sub in module.modules():
            sub.training = False
        return True
    return False


# The ATen calls that take sizes, as the Tensor methods through which the tracer follows a
# traced size (called as ATen ops, they read it as a plain int).
SIZE_TAKERS = {torch.ops.aten.view.default: "view", torch.ops.aten.reshape.default: "reshape",
               torch.ops.aten._unsafe_view.default: "view", torch.ops.aten.expand.default: "expand"}


def traced_sizes(module: torch.fx.GraphModule) -> None:
    """In place: aten.sym_size calls read only by ops that take sizes become Tensor.size, and
    those ops their Tensor methods, so the tracer records Shape ops where the export has
    symbolic sizes, as it does for an eager module, instead of baking in the example's (a
    Reshape to [2, 144]). A size read by anything else (arange, arithmetic) stays an int: a
    traced size there would not export at all."""
    graph, changed = module.graph, False
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.sym_size.int:
            if not all(user.op == "call_function" and user.target in SIZE_TAKERS for user in node.users):
                continue
            with graph.inserting_before(node):
                replacement = graph.call_method("size", node.args)
        elif node.target in SIZE_TAKERS and not node.kwargs:
            with graph.inserting_before(node):
                replacement = graph.call_method(SIZE_TAKERS[node.target], node.args)
        else:
            continue
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        changed = True
    if changed:
        module.recompile()


def graph_output_names(module: torch.fx.GraphModule) -> list[str]:
    """Names for every output of an fx graph: the legacy exporter reads a GraphModule's `.graph`
    as a TorchScript graph when it has to name the outputs itself, and fails."""
    leaves: list = []
    for node in module.graph.find_nodes(op="output"):
        torch.fx.node.map_arg(node.args[0], leaves.append)
    return [f"output{i}" if i else "output" for i in range(max(1, len(leaves)))]
