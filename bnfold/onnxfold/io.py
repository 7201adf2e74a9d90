"""Load and save ONNX models: external data, atomic writes, never the input by accident.

Weights stay where they are while we work. `load_onnx(lazy=True)` parses the graph but
leaves every large tensor payload in its file (inline payloads too, see onnxfold.wire); tensors
are read one at a time when a fold needs them, and saving streams each payload into the new
file. Peak memory stays near the size of what the fold changes, which lets a model of
several GB fuse on a small machine.
"""
from __future__ import annotations

import os
import sys
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, numpy_helper

from . import payloads, wire
from ..detect import check_readable
from ..errors import BadInput

# Protobuf cannot serialize a message over 2 GiB; stay clear of the limit.
PROTOBUF_LIMIT = 2**31 - 2**20
# Tensors smaller than this stay inline in memory and in written external data (shapes, scalars).
EXTERNAL_THRESHOLD = 1024


@dataclass
class OnnxSource:
    """A parsed model and where its tensor payloads live."""

    model: onnx.ModelProto
    path: Path
    base_dir: Path
    has_external_data: bool  # the file itself used external data (not our lazy references)


def load_onnx(path: str | Path, lazy: bool = True) -> OnnxSource:
    """Parse an ONNX file. Lazy: payloads stay in their files; else everything is loaded.

    Every tensor is checked (payloads.check_tensors) before anything reads it: external data
    must stay inside the model's folder and every payload must match its dims and dtype.
    """
    path = check_readable(Path(path))
    real = path.resolve()  # a model reached through a symlink reads its data beside the target
    try:
        if lazy:
            model = wire.load_lazy(real, EXTERNAL_THRESHOLD)
        else:
            model = onnx.load(str(real), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, IndexError, OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"not a valid ONNX model ({type(exc).__name__}: {str(exc)[:120] or 'cannot parse'})", path)
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise BadInput("not a valid ONNX model (no graph)", path)
    if not model.opset_import:
        raise BadInput("not a valid ONNX model (no opset_import)", path)
    files = check_tensors(model, real.parent, path)
    source = OnnxSource(model, path, real.parent, bool(files - {real}))
    if not lazy and source.has_external_data:
        external_data_helper.load_external_data_for_model(model, str(real.parent))
    return source


def model_from(model_or_path: onnx.ModelProto | str | Path, base_dir: str | Path | None = None
               ) -> tuple[onnx.ModelProto, str, Path]:
    """(model, name for messages, folder its payloads are read from) for the Python API: a path
    is loaded whole; an in-memory model is checked like a loaded one (and changed in place by
    the caller)."""
    if isinstance(model_or_path, onnx.ModelProto):
        base = Path(base_dir or ".")
        check_tensors(model_or_path, base)
        return model_or_path, "<memory>", base
    source = load_onnx(model_or_path, lazy=False)
    return source.model, str(source.path), source.base_dir


def read_signature(path: Path) -> onnx.ModelProto:
    """The graph with its payloads left on disk, checked like load_onnx: enough to know the
    inputs and outputs, and safe to hand to onnxruntime, which reads the data itself."""
    path = check_readable(Path(path))
    real = path.resolve()
    try:
        model = wire.load_lazy(real, EXTERNAL_THRESHOLD)
    except (DecodeError, ValueError, IndexError, OSError) as exc:
        raise BadInput(f"not a valid ONNX model ({exc})", path) from None
    check_tensors(model, real.parent, path)
    return model



def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The first input's first dimension where the model fixes it, else None."""
    inputs = model.graph.input
    dims = inputs[0].type.tensor_type.shape.dim if len(inputs) else []
    return dims[0].dim_value if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None

def check_tensors(model: onnx.ModelProto, base_dir: Path, path: Path | str | None = None) -> set[Path]:
    """Check every string and tensor of `model` before any is read; returns the data files it uses."""
    payloads.check_text(model, path)
    root = Path(base_dir).resolve()
    files = set()
    for tensor in iter_tensors(model):
        ref = payloads.check_tensor(tensor, root, path)
        if ref is not None:
            files.add(ref.file)
    return files


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


def iter_tensors(model: onnx.ModelProto, main_initializers: bool = True) -> Iterator[onnx.TensorProto]:
    """Initializers and Constant-node tensors of every graph."""
    for depth, graph in enumerate(iter_graphs(model.graph)):
        if main_initializers or depth > 0:  # the main graph comes first
            yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t


def tensor_to_array(tensor: onnx.TensorProto, base_dir: Path | str) -> np.ndarray:
    """Read one tensor, from the proto or its external file, leaving the proto as it was."""
    if not external_data_helper.uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    direct = _read_numeric_payload(tensor, Path(base_dir))
    if direct is not None:
        return direct
    loaded = onnx.TensorProto()
    loaded.CopyFrom(tensor)
    del loaded.external_data[:]
    loaded.data_location = onnx.TensorProto.DEFAULT
    loaded.raw_data = _external_bytes(tensor, Path(base_dir))
    return numpy_helper.to_array(loaded)


def _read_numeric_payload(tensor: onnx.TensorProto, base_dir: Path) -> np.ndarray | None:
    """Numeric payloads are read straight into an array: one copy instead of three."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED) or sys.byteorder != "little":
        return None
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    storage = onnx.helper.tensor_dtype_to_np_dtype(onnx.helper.tensor_dtype_to_storage_tensor_dtype(tensor.data_type))
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if np.dtype(storage).itemsize != dtype.itemsize or count * dtype.itemsize != _external_size(tensor, base_dir):
        return None  # packed sub-byte types and the like go through onnx's own reader
    info = external_data_helper.ExternalDataInfo(tensor)
    array = np.fromfile(base_dir / info.location, dtype=dtype, count=count, offset=info.offset or 0)
    return array.reshape(tuple(tensor.dims))


def _external_size(tensor: onnx.TensorProto, base_dir: Path) -> int:
    info = external_data_helper.ExternalDataInfo(tensor)
    return info.length if info.length else (Path(base_dir) / info.location).stat().st_size - (info.offset or 0)


def _copy_external(tensor: onnx.TensorProto, base_dir: Path, out: BinaryIO, chunk: int = 64 << 20) -> int:
    """Stream a payload into `out` in chunks; returns its length."""
    info = external_data_helper.ExternalDataInfo(tensor)
    remaining = _external_size(tensor, base_dir)
    total = remaining
    with open(Path(base_dir) / info.location, "rb") as fh:
        fh.seek(info.offset or 0)
        while remaining:
            block = fh.read(min(chunk, remaining))
            if not block:
                raise BadInput(f"external data of tensor {tensor.name!r} is truncated", Path(base_dir) / info.location)
            out.write(block)
            remaining -= len(block)
    return total


def _external_bytes(tensor: onnx.TensorProto, base_dir: Path) -> bytes:
    info = external_data_helper.ExternalDataInfo(tensor)
    with open(base_dir / info.location, "rb") as fh:
        fh.seek(info.offset or 0)
        return fh.read(info.length) if info.length else fh.read()


# ---------------------------------------------------------------------------------------------
# Saving


def save_onnx(model: onnx.ModelProto, dst: Path, base_dir: Path | None = None, external: bool | None = None,
              accept_invalid: Callable[[Exception], bool] | None = None, data_name: str | None = None) -> Path:
    """Write `model` to `dst` atomically; external data goes to `data_name`, by default
    `dst.name + '.data'` unless the model itself reads that file (then `.1.data`, …).

    `base_dir` is where tensors that use external data (or lazy references) are read from.
    `external` None keeps data external when the model is too large for one protobuf.
    Before the rename the result passes onnx.checker with full shape inference, run on a
    header file whose tensors point at the written payloads, so the check costs no copy of
    the weights. `accept_invalid(error)` may let a failed check pass (an input that already
    failed it); otherwise the error propagates and nothing is written.
    """
    dst = Path(dst)
    base_dir = Path(base_dir or dst.parent)
    if external is None:
        external = _payload_bytes(model, base_dir) > PROTOBUF_LIMIT
    if external and data_name is None:
        data_name = free_data_name(dst, model_files(model, base_dir))
    tmp_dir = Path(tempfile.mkdtemp(prefix=".bnfold-", dir=dst.parent))
    try:
        tmp_model = tmp_dir / dst.name
        if external:
            written = _stream_external_data(model, base_dir, tmp_dir / data_name, data_name)
            tmp_model.write_bytes(written.SerializeToString())
            check_path = tmp_model
        else:
            check_path = _write_inline(model, base_dir, tmp_model)
        _check(check_path, accept_invalid)
        if external and (tmp_dir / data_name).stat().st_size:  # every payload small enough to stay inline: no file
            os.replace(tmp_dir / data_name, dst.parent / data_name)
        os.replace(tmp_model, dst)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return dst


def model_files(model: onnx.ModelProto, base_dir: Path) -> set[Path]:
    """The resolved files the model's external payloads live in."""
    root = Path(base_dir).resolve()
    return {(root / external_data_helper.ExternalDataInfo(t).location).resolve() for t in iter_tensors(model)
            if external_data_helper.uses_external_data(t)}


def input_files(path: Path) -> set[Path]:
    """The model file and every data file it reads, resolved: what a fuse must never write."""
    real = Path(path).resolve()
    return {real} | check_tensors(read_signature(path), real.parent, path)


def free_data_name(dst: Path, protected: set[Path]) -> str:
    """`NAME.data` beside `dst`, or `NAME.1.data`, … if that file is one `protected` holds or
    one that exists and the file at `dst` does not read: an output replaces only its own data."""
    folder = Path(dst).parent.resolve()
    owned = files_read_by(dst)
    name, k = f"{Path(dst).name}.data", 0
    while folder / name in protected or (os.path.lexists(folder / name) and folder / name not in owned):
        k += 1
        name = f"{Path(dst).name}.{k}.data"
    return name


def files_read_by(path: Path) -> set[Path]:
    """The data files an existing ONNX model at `path` reads (nothing, if it is not one)."""
    if not Path(path).is_file():
        return set()
    try:
        return input_files(path) - {Path(path).resolve()}
    except (BadInput, OSError):
        return set()


def input_also_invalid(src: Path, warnings: list[str], error: Exception) -> bool:
    """A checker failure of the output is ours only if the input passes the same check."""
    try:
        onnx.checker.check_model(str(src), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as src_error:
        text = str(src_error).strip()
        first = text.splitlines()[0][:160] if text else type(src_error).__name__
        warnings.append(f"the input already fails onnx.checker ({first}); the output was not held to it")
        return True
    return False


def _check(path: Path, accept_invalid: Callable[[Exception], bool] | None) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        if accept_invalid is None or not accept_invalid(exc):
            raise


def _payload_bytes(model: onnx.ModelProto, base_dir: Path) -> int:
    return model.ByteSize() + sum(_external_size(t, base_dir) for t in iter_tensors(model)
                                  if external_data_helper.uses_external_data(t))


def _write_inline(model: onnx.ModelProto, base_dir: Path, path: Path) -> Path:
    """Write an inline model, streaming payloads; returns the file for the checker (a small
    header whose streamed tensors point into the written file, when any were streamed)."""
    shell = wire.shell_without_initializers(model)
    for tensor in iter_tensors(shell):  # the shell's own copies: Constant nodes and subgraphs
        if external_data_helper.uses_external_data(tensor):
            _load_into(tensor, base_dir)
    initializers = model.graph.initializer
    with open(path, "wb") as out:
        streamed = wire.write_inline(shell, initializers, out, lambda t: _external_size(t, base_dir),
                                     lambda t, fh: _copy_external(t, base_dir, fh))
    if not streamed:
        return path
    where = {i: (offset, length) for i, offset, length in streamed}
    for i, tensor in enumerate(initializers):
        head = onnx.TensorProto()
        head.CopyFrom(tensor)  # a reference or a small inline tensor: cheap
        if i in where:
            wire.point_to_external(head, path.name, *where[i])
        shell.graph.initializer.append(head)
    header_path = path.with_name(".check-" + path.name)
    header_path.write_bytes(shell.SerializeToString())
    return header_path


def _load_into(tensor: onnx.TensorProto, base_dir: Path) -> None:
    payload = _external_bytes(tensor, base_dir)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.raw_data = payload


def _stream_external_data(model: onnx.ModelProto, base_dir: Path, data_path: Path, location: str) -> onnx.ModelProto:
    """Every large tensor into one data file, one payload in memory at a time; returns the
    model that points at it (`model` itself is left as it was)."""
    shell = wire.shell_without_initializers(model)
    with open(data_path, "wb") as out:
        for tensor in iter_tensors(shell):  # Constant nodes and subgraphs: the shell's copies
            _externalize(tensor, base_dir, out, location)
        for tensor in model.graph.initializer:
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            _externalize(copy, base_dir, out, location)
            shell.graph.initializer.append(copy)
    return shell


def _externalize(tensor: onnx.TensorProto, base_dir: Path, out: BinaryIO, location: str) -> None:
    offset = out.tell()
    if external_data_helper.uses_external_data(tensor):
        length = _copy_external(tensor, base_dir, out)
    elif tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_THRESHOLD:
        length = out.write(tensor.raw_data)
    else:
        return
    wire.point_to_external(tensor, location, offset, length)


def file_size(path: Path, model: onnx.ModelProto | None = None) -> int:
    """Model file plus its external data files (`model`: the parsed file, if at hand)."""
    path = Path(path)
    total = path.stat().st_size
    if model is None:
        model = wire.load_lazy(path, EXTERNAL_THRESHOLD)
    seen = {path.name}
    for tensor in iter_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            loc = external_data_helper.ExternalDataInfo(tensor).location
            if loc not in seen:
                seen.add(loc)
                p = path.parent / loc
                if p.exists():
                    total += p.stat().st_size
    return total
