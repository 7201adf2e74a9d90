"""Write a torch module in the format it came in, or as ONNX / torch.export / TorchScript."""
from __future__ import annotations

import inspect
import io
import re
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from ..check.arrays import read_file
from ..check.runtime import session
from ..errors import BadInput, BnfoldError, UsageError
from ..onnxfold.io import save_onnx
from ..options import LoadOptions
from .checkpoint import container_out, state_out
from .fx import guess_example
from .io import (EXPORT, PICKLE, SAFETENSORS, TORCHSCRIPT, TorchSource, atomic_write, load_torch,
                 save_bytes, sniff, torch_bytes)

SUFFIX = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}


def runnable(source: TorchSource):
    """A callable module: an exported program is unlifted into a GraphModule (a new one per call)."""
    return source.module.module() if source.kind == EXPORT else source.module


def input_names(module) -> list[str] | None:
    """The names `--shape` may use for a module's inputs: its forward's parameters, and the
    names bnfold's ONNX export gives them (input, input1, …); None where forward takes *args."""
    params = forward_params(module)
    if params is None:
        return None
    return params + ["input"] + [f"input{i}" for i in range(1, max(1, len(params)))]


POSITIONAL_KEY = re.compile(r"(arr_\d+|input\d*)")  # np.savez's and bnfold's own names: by position


def data_inputs(path: Path, module) -> tuple[torch.Tensor, ...]:
    """--data (or --example-input) for a torch model: arrays named like the forward's parameters
    go to those, whatever their order in the file; unnamed ones (a .npy, np.savez's arr_0 …,
    input, input1 …) by position; any other name is a usage error naming the model's inputs."""
    arrays = read_file(Path(path), ["input"])
    if all(POSITIONAL_KEY.fullmatch(k) for k in arrays):
        return tuple(torch.from_numpy(a) for a in arrays.values())
    params = forward_params(module)
    unknown = sorted(set(arrays) - set(params or ()))
    if params is None or unknown:
        known = f"the model's inputs are {params}" if params is not None else "the model takes *args: name them arr_0 …"
        raise UsageError(f"--data names {unknown or sorted(arrays)}; {known}", path)
    return tuple(torch.from_numpy(arrays[n]) for n in params if n in arrays)


def forward_params(module) -> list[str] | None:
    """The forward's parameter names, in order; None where it takes *args or cannot be read."""
    try:
        if isinstance(module, torch.jit.ScriptModule):
            params = [a.name for a in module.forward.schema.arguments[1:]]
        else:
            signature = inspect.signature(module.forward)
            if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
                return None
            params = list(signature.parameters)
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return None
    return params


def check_shape_names(shapes: dict, module, path=None) -> None:
    names = input_names(module)
    unknown = sorted(set(shapes) - set(names)) if names is not None else []
    if unknown:
        raise UsageError(f"--shape names unknown input(s) {unknown}; the model's inputs are "
                         f"{[n for n in names if not n.startswith('input')] or names[:1]}", path)


def example_inputs(options: LoadOptions, module) -> tuple[torch.Tensor, ...] | None:
    """--example-input, else --shape (one per input, in order), else a guess from the first layer."""
    if options.example_input:
        return data_inputs(options.example_input, module)
    if options.shapes:
        check_shape_names(options.shapes, module)
        dtype = next((p.dtype for p in module.parameters()), torch.float32) if isinstance(module, nn.Module) \
            else torch.float32
        g = torch.Generator().manual_seed(0)
        return tuple(torch.randn(*dims, generator=g, dtype=dtype) for dims in options.shapes.values())
    return guess_example(module) if isinstance(module, nn.Module) else None


def write_module(source: TorchSource, folded: list, to: str, dst: Path, options: LoadOptions) -> list[str]:
    """The folded weight sets to `dst`: in the source's format ("same"), or the first converted.
    Returns notes on the conversion."""
    notes: list[str] = []
    if to == "same" or (to, source.kind) in (("pt2", EXPORT), ("torchscript", TORCHSCRIPT)):
        write_same(source, folded, dst)
        return notes
    module = folded[0]
    example = example_for(source, options, module)
    if to == "onnx":
        write_onnx(module, example, dst, onnx_dynamic_axes(source), notes, source.path)
    elif to == "torchscript":
        traced = torch.jit.trace(module, example) if not isinstance(module, torch.jit.ScriptModule) else module
        atomic_write(dst, lambda p: torch.jit.save(traced, str(p)))
    else:
        program = export_program(module, example, {})
        atomic_write(dst, lambda p: torch.export.save(program, str(p)))
    return notes


def write_same(source: TorchSource, folded: list, dst: Path) -> None:
    """The file as it came, with each weight set folded: a checkpoint dict keeps its other keys,
    a state_dict its keys, prefix, dtypes and _metadata, a safetensors file its metadata."""
    module = folded[0]
    if source.kind == TORCHSCRIPT:
        atomic_write(dst, lambda p: torch.jit.save(module, str(p)))
    elif source.kind == EXPORT:
        args, kwargs = source.module.example_inputs or ((), {})
        program = export_program(module, args, kwargs, dynamic_dims(source.module))
        atomic_write(dst, lambda p: torch.export.save(program, str(p)))
    elif source.kind == SAFETENSORS:
        from .safetensors_io import safetensors_bytes

        save_bytes(dst, safetensors_bytes(state_out(source.sets[0].layout, module), source.file_metadata))
    elif source.container is not None:
        save_bytes(dst, torch_bytes(container_out(source.container, source.sets, folded)))
    elif source.kind == PICKLE:
        save_bytes(dst, torch_bytes(module))
    else:
        save_bytes(dst, torch_bytes(state_out(source.sets[0].layout, module)))


def example_for(source: TorchSource, options: LoadOptions, module) -> tuple[torch.Tensor, ...]:
    if source.kind == EXPORT and not options.shapes and not options.example_input:
        return tuple(source.module.example_inputs[0])
    example = example_inputs(options, module)
    if example is None:
        raise UsageError("cannot tell the model's input shape: pass --shape NAME=D0,D1,… or --example-input")
    return example


def dynamic_dims(program) -> tuple | None:
    """The original program's dynamic dimensions, so that the re-export keeps them."""
    user_inputs = [s.arg.name for s in program.graph_signature.input_specs
                   if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    shapes = []
    for name in user_inputs:
        val = nodes[name].meta.get("val")
        dims = {i: torch.export.Dim.AUTO for i, d in enumerate(getattr(val, "shape", ())) if not isinstance(d, int)}
        shapes.append(dims or None)
    return tuple(shapes) if any(shapes) else None


def program_batch(path: Path, options: LoadOptions) -> int | None:
    """The batch size a .pt2 fixes, None for anything else (only a .pt2 is loaded to see)."""
    if sniff(path) != EXPORT:
        return None
    return fixed_batch(load_torch(path, options).module)


def fixed_batch(program) -> int | None:
    """The first input's batch size where the exported program fixed it, else None."""
    user_inputs = [s.arg.name for s in program.graph_signature.input_specs
                   if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    shape = getattr(nodes[user_inputs[0]].meta.get("val"), "shape", ()) if user_inputs else ()
    return shape[0] if len(shape) and isinstance(shape[0], int) else None


def export_program(module, args, kwargs, dynamic_shapes=None):
    try:
        return torch.export.export(module, tuple(args), kwargs or {}, dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # noqa: BLE001 — export failures are many and varied
        raise BadInput(f"torch.export cannot export the fused model ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:160]})") from None


def export_unfused_onnx(src: Path, dst: Path, options: LoadOptions, batch_sizes: tuple[int, ...] = ()) -> Path:
    """The torch model as it is (BNs and all) in ONNX, for onnxruntime benchmarks. A program
    exported with a fixed batch is refused up front for any other of `batch_sizes`."""
    source = load_torch(src, options)
    if source.kind == EXPORT and not options.shapes:
        check_fixed_batch(fixed_batch(source.module), batch_sizes, src)
    module = runnable(source)
    return write_onnx(module, example_for(source, options, module), dst, onnx_dynamic_axes(source), path=src)


def check_fixed_batch(fixed: int | None, batch_sizes: tuple[int, ...], path: Path) -> None:
    """An exported program with a fixed batch dimension runs at that batch size only (its
    guards refuse any other), as an ONNX model with a fixed batch does."""
    other = next((n for n in batch_sizes if fixed is not None and n != fixed), None)
    if other is not None:
        raise UsageError(f"the program's first input has a fixed batch size {fixed}; --batch-size {other} cannot "
                         f"be used (pass --batch-size {fixed}, or export with a dynamic batch dimension)", path)


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
    except BnfoldError:
        raise
    except Exception as exc:  # noqa: BLE001 — the exporter and the checker fail in many ways
        raise BadInput(f"cannot be written as ONNX ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})",
                       path) from None


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
    names = [f"input{i}" if i else "input" for i in range(len(example))]
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
