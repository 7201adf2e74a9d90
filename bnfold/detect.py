"""What kind of model a file holds, read from its content, not its suffix."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

from .errors import BadInput

ONNX = "onnx"
TORCH = "torch"  # any PyTorch checkpoint: pickle, TorchScript, torch.export, state_dict, safetensors,
# or a Hugging Face save_pretrained folder (a directory with config.json)
CONFIG_NAME = "config.json"

_PICKLE_PROTOCOL_2_PLUS = b"\x80"


def check_readable(path: Path) -> Path:
    """A regular, non-empty file, or BadInput saying what it is instead."""
    path = Path(path)
    if not path.exists():
        raise BadInput("no such file", path)
    if path.is_dir():
        raise BadInput(f"is a directory, not a model file (nor a Hugging Face folder: no {CONFIG_NAME} in it)", path)
    if not path.is_file():
        raise BadInput("is not a regular file", path)
    if path.stat().st_size == 0:
        raise BadInput("file is empty", path)
    return path


def is_hf_folder(path: str | Path) -> bool:
    """A Hugging Face save_pretrained folder: a directory holding config.json."""
    path = Path(path)
    return path.is_dir() and os.path.lexists(path / CONFIG_NAME)


def stored_size(path: str | Path) -> int:
    """A file's size, or the total of a folder's top-level files."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def detect_format(path: str | Path) -> str:
    if is_hf_folder(path):
        return TORCH
    path = check_readable(Path(path))
    with open(path, "rb") as fh:
        head = fh.read(64)
    if zipfile.is_zipfile(path) or head[:1] == _PICKLE_PROTOCOL_2_PLUS:
        return TORCH
    if looks_like_safetensors(head, path.stat().st_size):  # before ONNX: a length's first byte may be 0x08
        return TORCH
    if _looks_like_onnx(head):
        return ONNX
    if path.suffix.lower() in (".onnx",):
        return ONNX  # let the ONNX loader say precisely what is wrong
    if path.suffix.lower() == ".safetensors":
        return TORCH  # let the safetensors reader say precisely what is wrong
    raise BadInput("not an ONNX model or PyTorch checkpoint (unrecognised content)", path)


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """safetensors: an 8-byte little-endian header length that fits the file, then a JSON object."""
    if len(head) < 10:
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= size - 8 and head[8:9] == b"{" and head[9:10] in (b'"', b"}", b" ", b"\n")


def _looks_like_onnx(head: bytes) -> bool:
    # A ModelProto starts with a protobuf field tag; ir_version (field 1, varint) is first in
    # every file written by onnx.save. Text and random bytes almost never start with 0x08 + a small int.
    return len(head) >= 2 and head[0] == 0x08 and head[1] < 0x20
