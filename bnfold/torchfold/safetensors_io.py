"""safetensors in and out (the weights format of Hugging Face and timm).

The header is checked before the `safetensors` package reads anything: an 8-byte little-endian
length that fits the file, a JSON object (read within json_reader's bounds) whose every tensor has a known dtype, a shape, and data
offsets inside the file's data section that hold exactly shape × item size bytes. The file's
`__metadata__` (string → string) is written back unchanged.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import BadInput
from ..json_reader import read_json

ITEM_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
HEADER_LIMIT = 100 * 2 ** 20  # the safetensors format's own cap


def read_header(path: Path) -> dict:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        if size < 8 or length < 2 or length > HEADER_LIMIT or 8 + length > size:
            raise BadInput(f"safetensors header length {length} does not fit the file ({size} bytes)", path)
        raw = fh.read(length)
    header = read_json(raw, "safetensors header", path, max_bytes=HEADER_LIMIT)
    if not isinstance(header, dict):
        raise BadInput("safetensors header is not a JSON object", path)
    data_size = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise BadInput("safetensors __metadata__ is not a map of strings", path)
            continue
        _check_entry(name, entry, data_size, path)
    return header


def _check_entry(name: str, entry, data_size: int, path: Path) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str) or entry["dtype"] not in ITEM_SIZE:
        raise BadInput(f"safetensors tensor {name!r} has no known dtype", path)
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise BadInput(f"safetensors tensor {name!r} has a bad shape {shape!r}", path)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size):
        raise BadInput(f"safetensors tensor {name!r}: data offsets {offsets!r} do not fit the file's "
                       f"{data_size} data bytes", path)
    if offsets[1] - offsets[0] != math.prod(shape) * ITEM_SIZE[entry["dtype"]]:
        raise BadInput(f"safetensors tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} "
                       f"of {entry['dtype']}", path)


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """The tensors in the file's order, and its metadata."""
    header = read_header(path)
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 — the package's own checks (overlaps, gaps)
        raise BadInput(f"cannot read safetensors ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})",
                       path) from None
    order = [k for k in header if k != "__metadata__"]
    return {k: tensors[k] for k in order}, header.get("__metadata__")


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    from safetensors.torch import save

    # safetensors refuses tensors that share memory (tied weights): each gets its own copy
    return save({k: v.detach().clone().contiguous() for k, v in tensors.items()}, metadata=metadata)
