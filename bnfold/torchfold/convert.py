"""Write a torch module in the format it came in, or as ONNX / torch.export / TorchScript."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import BadInput
from ..options import LoadOptions
from .checkpoint import container_out, state_out
from .inputs import dynamic_dims, example_for, shape_hint
from .io import (EXPORT, HF_FOLDER, PICKLE, SAFETENSORS, TORCHSCRIPT, TorchSource, program_bytes, save_bytes,
                 script_bytes, torch_bytes)


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
        from .onnx_export import onnx_dynamic_axes, write_onnx  # onnx and onnxruntime: only for --to onnx

        write_onnx(module, example, dst, onnx_dynamic_axes(source), notes, source.path)
    elif to == "torchscript":
        traced = module if isinstance(module, torch.jit.ScriptModule) else trace_script(module, example, source.path)
        save_bytes(dst, script_bytes(traced))
    else:
        save_bytes(dst, program_bytes(export_program(module, example, {}, path=source.path)))
    return notes


def write_same(source: TorchSource, folded: list, dst: Path) -> None:
    """The file as it came, with each weight set folded: a checkpoint dict keeps its other keys,
    a state_dict its keys, prefix, dtypes and _metadata, a safetensors file its metadata, a
    Hugging Face folder its files and sharding (`dst` is then a folder)."""
    module = folded[0]
    if source.kind == TORCHSCRIPT:
        save_bytes(dst, script_bytes(module))
    elif source.kind == EXPORT and isinstance(module, torch.export.ExportedProgram):  # edited in its own graph
        save_bytes(dst, program_bytes(module))
    elif source.kind == EXPORT:
        args, kwargs = source.module.example_inputs or ((), {})
        save_bytes(dst, program_bytes(export_program(module, args, kwargs, dynamic_dims(source.module),
                                                     source.path)))
    elif source.kind == HF_FOLDER:
        from .hf import write_folder

        write_folder(source.folder, source.sets[0].layout, module, dst)
    elif source.kind == SAFETENSORS:
        from .safetensors_io import safetensors_bytes

        save_bytes(dst, safetensors_bytes(state_out(source.sets[0].layout, module), source.file_metadata))
    elif source.container is not None:
        save_bytes(dst, torch_bytes(container_out(source.container, source.sets, folded)))
    elif source.kind == PICKLE:
        save_bytes(dst, torch_bytes(module))
    else:
        save_bytes(dst, torch_bytes(state_out(source.sets[0].layout, module)))


def trace_script(module, example, path: Path | None = None):
    try:
        return torch.jit.trace(module, tuple(example))
    except Exception as exc:  # noqa: BLE001 — tracing runs the model: anything it raises
        raise BadInput(f"torch.jit.trace cannot trace the fused model ({type(exc).__name__}: "
                       f"{(str(exc).splitlines() or [''])[0][:160]}); {shape_hint(example)}", path) from None


def export_program(module, args, kwargs, dynamic_shapes=None, path: Path | None = None):
    try:
        return torch.export.export(module, tuple(args), kwargs or {}, dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # noqa: BLE001 — export failures are many and varied
        raise BadInput(f"torch.export cannot export the fused model ({type(exc).__name__}: "
                       f"{(str(exc).splitlines() or [''])[0][:160]}); {shape_hint(args)}", path) from None
