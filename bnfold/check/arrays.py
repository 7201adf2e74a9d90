"""The one reader of user arrays: `.npz` (one array per input name), `.npy` (a one-input
model), or, for calibration data (samples on axis 0), a folder of them read in batches of N
one file at a time. Nothing is unpickled: object arrays are refused, and so is anything else a
model input cannot hold (strings, structured records, dates); big-endian numbers are read in
the machine's byte order."""
from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import BadInput, UsageError


def data_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy"))
        if not files:
            raise BadInput("folder holds no .npz or .npy files", path)
        return files
    if not path.is_file():
        raise BadInput("no such data file or folder", path)
    if path.suffix not in (".npz", ".npy"):
        raise BadInput("data must be .npz, .npy or a folder of them", path)
    return [path]


NUMERIC_KINDS = {"b": "bool", "i": "integer", "u": "unsigned integer", "f": "float", "c": "complex"}


def numeric(name: str, array: np.ndarray, path: Path | None) -> np.ndarray:
    """`array` if it holds numbers (in native byte order), else BadInput naming the input."""
    if array.dtype.kind not in NUMERIC_KINDS or array.dtype.fields is not None:
        raise BadInput(f"input {name!r} holds {array.dtype} values ({_kind_name(array.dtype)}); a model input holds "
                       "numbers: bool, integer or float", path)
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _kind_name(dtype: np.dtype) -> str:
    names = {"U": "text", "S": "bytes", "V": "raw or structured records", "M": "dates", "m": "time spans",
             "O": "Python objects"}
    return names.get(dtype.kind, "not numbers")


def require_real_batch(name: str, array: np.ndarray, path: Path | None) -> None:
    """Where no graph declares what an input is (a torch module): real numbers with a batch axis.
    A complex array or a single number would reach the model's first layer and fail there."""
    if array.dtype.kind == "c":
        raise BadInput(f"input {name!r} holds {array.dtype} values; a torch model here takes real numbers", path)
    if array.ndim == 0:
        raise BadInput(f"input {name!r} is a single number (a 0-d array); a model input has a batch axis", path)


def check_array(name: str, array: np.ndarray, dtype: np.dtype, dims: list, path: Path | None,
                from_axis: int = 0) -> None:
    """dtype, rank and the fixed dims from `from_axis` on (1: a data set's samples) against the graph."""
    what = "samples of shape" if from_axis else "shape"
    if array.dtype != dtype:
        raise BadInput(f"input {name!r} is {array.dtype}, the model wants {dtype}", path)
    if array.ndim != len(dims) or any(isinstance(d, int) and d != n
                                      for d, n in zip(dims[from_axis:], array.shape[from_axis:])):
        want = ["?" if d is None else d for d in dims[from_axis:]]
        raise BadInput(f"input {name!r} has {what} {list(array.shape[from_axis:])}, the model wants {want}", path)


def read_file(path: Path, input_names: list[str]) -> dict[str, np.ndarray]:
    """`.npz`: its arrays by name, in the file's order; `.npy`: one array, named input_names[0]."""
    path = Path(path)
    if not path.is_file():
        raise BadInput("no such data file", path)
    try:
        if path.suffix == ".npy":
            if len(input_names) != 1:
                raise BadInput(f".npy holds one array but the model has inputs {input_names}; use .npz", path)
            arrays = {input_names[0]: np.load(path, allow_pickle=False)}
        else:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise BadInput(f"cannot read arrays ({exc})", path) from None
    return {name: numeric(name, array, path) for name, array in arrays.items()}


def check_arrays(arrays: dict[str, np.ndarray], expected: dict[str, tuple[np.dtype, list]], path: Path) -> int:
    """Names, dtypes and per-sample shapes against the graph; returns the sample count."""
    if set(arrays) != set(expected):
        raise BadInput(f"arrays {sorted(arrays)} do not match the model's inputs {sorted(expected)}", path)
    counts = {len(a) if a.ndim else 0 for a in arrays.values()}
    if len(counts) != 1:
        raise BadInput("inputs hold different numbers of samples", path)
    for name, array in arrays.items():
        dtype, dims = expected[name]
        if dtype is not None:
            check_array(name, array, dtype, dims, path, from_axis=1)
        else:  # a torch module: nothing declared to check against
            require_real_batch(name, array, path)
        _require_finite(name, array, path)
    return counts.pop()


def _require_finite(name: str, array: np.ndarray, path: Path) -> None:
    """One NaN sample would make every mean and variance it reaches NaN."""
    if not np.issubdtype(array.dtype, np.inexact) or array.ndim == 0 or array.size == 0:
        return
    bad = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
    if bad.any():
        raise BadInput(f"input {name!r}: sample {int(np.flatnonzero(bad)[0])} holds NaN or Inf "
                       f"({int(bad.sum())} such sample(s))", path)


def batches(path: str | Path, expected: dict[str, tuple[np.dtype, list]], batch_size: int
            ) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `batch_size` samples across all files; the last one may be smaller."""
    if batch_size < 2:
        raise UsageError("--batch-size must be at least 2: a batch of one sample has no variance")
    pending: dict[str, list[np.ndarray]] = {k: [] for k in expected}
    held = 0
    total = 0
    for file in data_files(path):
        arrays = read_file(file, list(expected))
        n = check_arrays(arrays, expected, file)
        total += n
        for k in pending:
            pending[k].append(arrays[k])
        held += n
        while held >= batch_size:
            joined = {k: np.concatenate(v) for k, v in pending.items()}
            yield {k: v[:batch_size] for k, v in joined.items()}
            pending = {k: [v[batch_size:]] for k, v in joined.items()}
            held -= batch_size
    if total == 0:
        raise BadInput("the data set is empty", path)
    if held:
        yield {k: np.concatenate(v) for k, v in pending.items()}
