"""What a torch model is fed: its inputs' names, arrays from --data / --example-input matched
to them, example inputs from --shape or a guess, and the batch size an exported program fixes."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..check.arrays import read_file, require_real_batch
from ..errors import UsageError
from ..options import LoadOptions
from .guess import guess_example
from .io import EXPORT, TorchSource, load_torch, runnable, sniff


def input_names(module) -> list[str] | None:
    """The names `--shape` may use for a module's inputs: its forward's parameters, and the
    names bnfold's ONNX export gives them (input, input1, …); None where forward takes *args."""
    params = forward_params(module)
    if params is None:
        return None
    return params + [export_name(i) for i in range(max(1, len(params)))]


POSITIONAL_KEY = re.compile(r"(arr_\d+|input\d*)")  # np.savez's and bnfold's own names: by position
POSITIONAL_EXPORT_NAME = re.compile(r"input(\d*)")


def data_inputs(path: Path, module) -> tuple[torch.Tensor, ...]:
    """--data (or --example-input) for a torch model: arrays named like the forward's parameters
    go to those, whatever their order in the file; unnamed ones (a .npy, np.savez's arr_0 …,
    input, input1 …) by position; any other name is a usage error naming the model's inputs."""
    arrays = read_file(Path(path), ["input"])
    for name, array in arrays.items():
        require_real_batch(name, array, path)
    if all(POSITIONAL_KEY.fullmatch(k) for k in arrays):
        return tuple(torch.from_numpy(a) for a in arrays.values())
    params = forward_params(module)
    unknown = sorted(set(arrays) - set(params or ()))
    if params is None or unknown:
        known = f"the model's inputs are {params}" if params is not None else "the model takes *args: name them arr_0 …"
        raise UsageError(f"--data names {unknown or sorted(arrays)}; {known}", path)
    return tuple(torch.from_numpy(arrays[n]) for n in params if n in arrays)


def forward_params(module) -> list[str] | None:
    """The forward's positional parameter names, in order (a `**kwargs` after them, as Hugging
    Face models have, changes nothing: bnfold feeds by position); None where it takes *args or
    cannot be read."""
    try:
        if isinstance(module, torch.jit.ScriptModule):
            params = [a.name for a in module.forward.schema.arguments[1:]]
        else:
            signature = inspect.signature(module.forward)
            kinds = [p.kind for p in signature.parameters.values()]
            if inspect.Parameter.VAR_POSITIONAL in kinds:
                return None
            params = [name for name, p in signature.parameters.items()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return None
    return params


def export_name(position: int) -> str:
    """The name bnfold's ONNX export gives the forward's input at `position`: input, input1, …"""
    return f"input{position}" if position else "input"


def check_shape_names(shapes: dict, module, path=None) -> None:
    names = input_names(module)
    unknown = sorted(set(shapes) - set(names)) if names is not None else []
    if unknown:
        raise UsageError(f"--shape names unknown input(s) {unknown}; the model's inputs are "
                         f"{[n for n in names if not n.startswith('input')] or names[:1]}", path)


def ordered_shapes(shapes: dict[str, list[int]], module, path=None) -> list[list[int]]:
    """--shape for a torch model, one per input in the forward's order. One input has two
    names: its forward parameter and the ONNX export's name for its position (x and input);
    either may be given, in any order, but not both, and no input before a given one may be
    left out."""
    check_shape_names(shapes, module, path)
    params = forward_params(module) or []
    by_position: dict[int, tuple[str, list[int]]] = {}
    for k, (name, dims) in enumerate(shapes.items()):
        positional = POSITIONAL_EXPORT_NAME.fullmatch(name)
        position = params.index(name) if name in params else \
            int(positional.group(1) or 0) if positional else k  # forward(*args): in the order given
        if position in by_position:
            raise UsageError(f"--shape gives input {position} twice ({by_position[position][0]} and {name})", path)
        by_position[position] = (name, dims)
    missing = [p for p in range(len(by_position)) if p not in by_position]
    if missing:
        what = params[missing[0]] if missing[0] < len(params) else export_name(missing[0])
        raise UsageError(f"--shape gives no shape for input {missing[0]} ({what}), which comes before "
                         f"{', '.join(n for n, _ in by_position.values())}", path)
    return [by_position[p][1] for p in range(len(by_position))]


def export_shapes(shapes: dict[str, list[int]], module, path=None) -> dict[str, list[int]]:
    """--shape under the names bnfold's ONNX export gives the inputs (what onnxruntime is fed)."""
    return {export_name(i): dims for i, dims in enumerate(ordered_shapes(shapes, module, path))}


def example_inputs(options: LoadOptions, module) -> tuple[torch.Tensor, ...] | None:
    """--example-input, else --shape (one per input, in order), else a guess from the first layer."""
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32) \
        if isinstance(module, nn.Module) else torch.float32
    if options.example_input:  # floats in the model's own float dtype, as verify feeds them
        return tuple(t.to(dtype) if t.is_floating_point() else t for t in data_inputs(options.example_input, module))
    if options.shapes:
        g = torch.Generator().manual_seed(0)
        return tuple(torch.randn(*dims, generator=g, dtype=dtype) for dims in ordered_shapes(options.shapes, module))
    return guess_example(module) if isinstance(module, nn.Module) else None


def shape_hint(example) -> str:
    """What to pass when the model could not run on `example` (a guess, or the user's)."""
    shapes = ", ".join(str(list(t.shape)) for t in example if isinstance(t, torch.Tensor))
    return (f"it ran on inputs of shape {shapes}: if the model takes another, pass --shape NAME=D0,D1,… "
            "or --example-input")


def example_for(source: TorchSource, options: LoadOptions, module) -> tuple[torch.Tensor, ...]:
    if source.kind == EXPORT and not options.shapes and not options.example_input:
        return tuple(source.module.example_inputs[0])
    example = example_inputs(options, module)
    if example is None:
        raise UsageError("cannot tell the model's input shape: pass --shape NAME=D0,D1,… or --example-input")
    return example


def user_input_shapes(program) -> list[tuple]:
    """Each user input's shape as the program traced it: ints where fixed, symbols where dynamic."""
    names = [s.arg.name for s in program.graph_signature.input_specs
             if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    return [tuple(getattr(nodes[name].meta.get("val"), "shape", ())) for name in names]


def dynamic_dims(program) -> tuple | None:
    """The original program's dynamic dimensions, so that the re-export keeps them."""
    shapes = [{i: torch.export.Dim.AUTO for i, d in enumerate(shape) if not isinstance(d, int)} or None
              for shape in user_input_shapes(program)]
    return tuple(shapes) if any(shapes) else None


def for_the_export(path: Path, options: LoadOptions, data: Path | None, scratch: Path
                   ) -> tuple[dict[str, list[int]], Path | None]:
    """A checkpoint's --shape and --data under its ONNX export's input names, the ones
    onnxruntime is fed (the checkpoint is loaded to read its forward); --data is rewritten
    into `scratch` when its names are the forward's."""
    module = runnable(load_torch(path, options))
    shapes = export_shapes(options.shapes, module, path) if options.shapes else {}
    if data is not None:
        arrays = {export_name(i): t.numpy() for i, t in enumerate(data_inputs(data, module))}
        data = scratch / "inputs.npz"
        np.savez(data, **arrays)
    return shapes, data


def program_batch(path: Path, options: LoadOptions) -> int | None:
    """The batch size a .pt2 fixes, None for anything else (only a .pt2 is loaded to see)."""
    if sniff(path) != EXPORT:
        return None
    return fixed_batch(load_torch(path, options).module)


def fixed_batch(program) -> int | None:
    """The first input's batch size where the exported program fixed it, else None."""
    shapes = user_input_shapes(program)
    return shapes[0][0] if shapes and shapes[0] and isinstance(shapes[0][0], int) else None


def check_fixed_batch(fixed: int | None, batch_sizes: tuple[int, ...], path: Path) -> None:
    """An exported program with a fixed batch dimension runs at that batch size only (its
    guards refuse any other), as an ONNX model with a fixed batch does."""
    other = next((n for n in batch_sizes if fixed is not None and n != fixed), None)
    if other is not None:
        raise UsageError(f"the program's first input has a fixed batch size {fixed}; --batch-size {other} cannot "
                         f"be used (pass --batch-size {fixed}, or export with a dynamic batch dimension)", path)
