"""Load and save ONNX models: external data, atomic writes, never the input by accident.

Weights stay where they are while we work: a model with external data is parsed without
its data, tensors are read one at a time when a fold needs them, and on save every
external tensor is streamed into the new data file. Peak memory stays near one copy of the
model (or less), which is what lets a 3 GB model fuse on a small machine.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, numpy_helper

from .errors import BadInput, OutputExists, UsageError

# Protobuf cannot serialize a message over 2 GiB; stay clear of the limit.
PROTOBUF_LIMIT = 2**31 - 2**20
# Tensors smaller than this stay inline when we write external data (shapes, scalars).
EXTERNAL_THRESHOLD = 1024


@dataclass
class OnnxSource:
    """A parsed model and where its external data (if any) lives."""

    model: onnx.ModelProto
    path: Path
    base_dir: Path
    has_external_data: bool


def check_readable(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise BadInput("no such file", path)
    if path.is_dir():
        raise BadInput("is a directory, not a model file", path)
    if path.stat().st_size == 0:
        raise BadInput("file is empty", path)
    return path


def load_onnx(path: str | Path) -> OnnxSource:
    """Parse an ONNX file without loading external data."""
    path = check_readable(Path(path))
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"not a valid ONNX model ({type(exc).__name__}: {str(exc)[:120] or 'cannot parse'})", path)
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise BadInput("not a valid ONNX model (no graph)", path)
    if not model.opset_import:
        raise BadInput("not a valid ONNX model (no opset_import)", path)
    external = any(external_data_helper.uses_external_data(t) for t in iter_tensors(model))
    source = OnnxSource(model, path, path.parent, external)
    if external:
        check_external_files(source)
    return source


def check_external_files(source: OnnxSource) -> None:
    for tensor in iter_tensors(source.model):
        if external_data_helper.uses_external_data(tensor):
            info = external_data_helper.ExternalDataInfo(tensor)
            data_path = source.base_dir / info.location
            if not data_path.is_file():
                raise BadInput(f"external data file {info.location!r} of tensor {tensor.name!r} is missing", source.path)
            if info.length and info.offset + info.length > data_path.stat().st_size:
                raise BadInput(f"external data file {info.location!r} is truncated", source.path)


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g)


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Initializers and Constant-node tensors of every graph."""
    for graph in iter_graphs(model.graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t


def tensor_to_array(tensor: onnx.TensorProto, base_dir: Path | str) -> np.ndarray:
    """Read one tensor, from the proto or its external file."""
    return numpy_helper.to_array(tensor, base_dir=str(base_dir))


def _external_bytes(tensor: onnx.TensorProto, base_dir: Path) -> bytes:
    info = external_data_helper.ExternalDataInfo(tensor)
    with open(base_dir / info.location, "rb") as fh:
        fh.seek(info.offset or 0)
        return fh.read(info.length) if info.length else fh.read()


# ---------------------------------------------------------------------------------------------
# Output paths


def default_output_path(src: Path, suffix: str | None = None) -> Path:
    """NAME.fused.EXT beside the input."""
    ext = suffix if suffix is not None else src.suffix
    return src.with_name(f"{src.stem}.fused{ext}")


def resolve_output(src: Path, output: Path | None, in_place: bool, suffix: str | None = None) -> Path:
    if in_place:
        if output is not None and Path(output).resolve() != Path(src).resolve():
            raise UsageError("--in-place and -o name different files; give one of them", output)
        return Path(src)
    dst = Path(output) if output is not None else default_output_path(Path(src), suffix)
    if dst.exists() and dst.resolve() == Path(src).resolve():
        raise OutputExists("output would overwrite the input; pass --in-place to allow it", dst)
    if dst.is_dir():
        raise UsageError("output path is a directory", dst)
    if not dst.parent.exists():
        raise UsageError("output directory does not exist", dst.parent)
    return dst


# ---------------------------------------------------------------------------------------------
# Saving


def save_onnx(model: onnx.ModelProto, dst: Path, base_dir: Path | None = None,
              external: bool | None = None) -> Path:
    """Write `model` to `dst` atomically, with its external data in `dst.name + '.data'`.

    `base_dir` is where tensors that already use external data can be read. `external`
    None keeps data external when the model had it or is too large for one protobuf.
    The model is validated with the path-based checker before it is renamed into place.
    """
    dst = Path(dst)
    has_external = any(external_data_helper.uses_external_data(t) for t in iter_tensors(model))
    if external is None:
        external = has_external or model.ByteSize() > PROTOBUF_LIMIT
    tmp_dir = Path(tempfile.mkdtemp(prefix=".bnfold-", dir=dst.parent))
    try:
        tmp_model = tmp_dir / dst.name
        data_name = dst.name + ".data"
        if external:
            _stream_external_data(model, base_dir or dst.parent, tmp_dir / data_name, data_name)
        elif has_external:
            _inline_external_data(model, base_dir or dst.parent)
        with open(tmp_model, "wb") as fh:
            fh.write(model.SerializeToString())
        onnx.checker.check_model(str(tmp_model))
        if external:
            os.replace(tmp_dir / data_name, dst.parent / data_name)
        os.replace(tmp_model, dst)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return dst


def _stream_external_data(model: onnx.ModelProto, base_dir: Path, data_path: Path, location: str) -> None:
    """Move every large tensor into one data file, one tensor in memory at a time."""
    with open(data_path, "wb") as out:
        for tensor in iter_tensors(model):
            if external_data_helper.uses_external_data(tensor):
                payload = _external_bytes(tensor, Path(base_dir))
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_THRESHOLD:
                payload = tensor.raw_data
            else:
                continue
            offset = out.tell()
            out.write(payload)
            _point_to_external(tensor, location, offset, len(payload))
            del payload


def _point_to_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    # external_data_helper.set_external_data insists on raw_data being present; ours may
    # already live in another file, so the entries are written directly.
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _inline_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    for tensor in iter_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            tensor.raw_data = _external_bytes(tensor, Path(base_dir))
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT


def file_size(path: Path, model: onnx.ModelProto | None = None) -> int:
    """Model file plus its external data files (`model`: the parsed file, if at hand)."""
    path = Path(path)
    total = path.stat().st_size
    if model is None:
        model = onnx.load(str(path), load_external_data=False)
    seen = set()
    for tensor in iter_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            loc = external_data_helper.ExternalDataInfo(tensor).location
            if loc not in seen:
                seen.add(loc)
                p = path.parent / loc
                if p.exists():
                    total += p.stat().st_size
    return total
