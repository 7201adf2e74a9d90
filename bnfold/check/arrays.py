"""The one reader of user arrays: `.npz` (one array per input name), `.npy` (a one-input
model), or, for calibration data (samples on axis 0), a folder of them read in batches of N
one file at a time. Nothing is unpickled: object arrays are refused."""
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
            return {input_names[0]: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise BadInput(f"cannot read arrays ({exc})", path) from None


def check_arrays(arrays: dict[str, np.ndarray], expected: dict[str, tuple[np.dtype, list]], path: Path) -> int:
    """Names, dtypes and per-sample shapes against the graph; returns the sample count."""
    if set(arrays) != set(expected):
        raise BadInput(f"arrays {sorted(arrays)} do not match the model's inputs {sorted(expected)}", path)
    counts = {len(a) if a.ndim else 0 for a in arrays.values()}
    if len(counts) != 1:
        raise BadInput("inputs hold different numbers of samples", path)
    for name, array in arrays.items():
        dtype, dims = expected[name]
        if dtype is not None:  # None: a torch module, nothing declared to check against
            check_array(name, array, dtype, dims, path, from_axis=1)
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
