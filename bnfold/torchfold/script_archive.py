"""A TorchScript archive checked before torch.jit.load reads it.

torch.jit.load trusts the archive's tensor records: a record shorter than the tensor the pickle
describes (a truncated file) is read past its end, which corrupts the heap and kills the process
(SIGSEGV, or SIGABRT with "corrupted double-linked list"). So the pickles torch.jit.load reads
(data.pkl, constants.pkl) are read first by a Python unpickler that builds nothing — every class it names becomes an inert record of its arguments — and every tensor it
describes is checked against its record: the record exists, holds exactly numel × item size
bytes, and the tensor's sizes, strides and offset stay inside it.
"""
from __future__ import annotations

import io
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BadInput

LOADED = ("data.pkl", "constants.pkl")  # traced_inputs.pkl is read only on request, its records may be empty
REBUILDERS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")}


@dataclass(frozen=True)
class Storage:
    key: str
    itemsize: int
    numel: int


class _Inert:
    """What the checking unpickler makes of any class or function a pickle names."""

    qualname = ("", "")
    args: tuple = ()  # NEWOBJ makes one without calling __init__

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


class _Checker(pickle.Unpickler):
    def __init__(self, data: bytes, entry: str):
        super().__init__(io.BytesIO(data))
        self.entry = entry
        self.storages: list[Storage] = []

    def find_class(self, module: str, name: str):
        return type(name, (_Inert,), {"qualname": (module, name)})

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise BadInput(f"{self.entry}: a persistent reference that is not a storage ({str(pid)[:60]})")
        _, kind, key, _location, numel = pid
        itemsize = _itemsize(kind)
        if itemsize is None or not isinstance(key, str) or not _count(numel):
            raise BadInput(f"{self.entry}: storage {str(key)[:40]!r} is not a known type with a size")
        storage = Storage(key, itemsize, numel)
        self.storages.append(storage)
        return storage


def check_script_archive(path: Path) -> None:
    """BadInput naming the entry if a pickle is malformed or a tensor does not fit its record."""
    with zipfile.ZipFile(path) as archive:
        sizes = {info.filename: info.file_size for info in archive.infolist()}
        for name in sizes:
            if name.rsplit("/", 1)[-1] in LOADED:
                _check_pickle(archive, name, sizes, path)


def _check_pickle(archive: zipfile.ZipFile, name: str, sizes: dict[str, int], path: Path) -> None:
    checker = _Checker(archive.read(name), name)
    try:
        root = checker.load()
    except BadInput as exc:
        raise BadInput(exc.problem, path) from None
    except Exception as exc:  # noqa: BLE001 — a malformed pickle fails in many ways; nothing ran
        raise BadInput(f"{name} is not a readable pickle ({type(exc).__name__}: {str(exc)[:80]})", path) from None
    folder = name[: -len(".pkl")]  # data.pkl's records are data/<key>, constants.pkl's constants/<key>
    for storage in checker.storages:
        record = f"{folder}/{storage.key}"
        if sizes.get(record) != storage.numel * storage.itemsize:
            have = "no record" if record not in sizes else f"{sizes[record]} bytes"
            raise BadInput(f"{record}: {have} for a storage of {storage.numel} elements of {storage.itemsize} "
                           "bytes", path)
    for args in _tensors(root):
        _check_view(args, name, path)


def _tensors(root) -> list[tuple]:
    """The arguments of every tensor the unpickled graph rebuilds, found without recursion."""
    found, stack, seen = [], [root], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, _Inert):
            if item.qualname in REBUILDERS:
                found.append(item.args)
            stack += [*item.args, getattr(item, "state", None)]
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack += list(item)
    return found


def _check_view(args: tuple, entry: str, path: Path) -> None:
    """_rebuild_tensor_v2(storage, offset, size, stride, …): the view stays inside the storage."""
    storage, offset, size, stride = (list(args) + [None] * 4)[:4]
    if not (isinstance(storage, Storage) and _count(offset) and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and all(map(_count, size)) and all(map(_count, stride))):
        raise BadInput(f"{entry}: a tensor whose storage, offset, sizes or strides are not what a tensor has", path)
    if all(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.numel:
        raise BadInput(f"{entry}: a tensor of sizes {list(size)} reads past its storage {storage.key!r} of "
                       f"{storage.numel} elements", path)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _itemsize(kind) -> int | None:
    """torch's typed storage classes (torch.FloatStorage, …) by the name the pickle gives."""
    module, name = getattr(kind, "qualname", ("", ""))
    cls = getattr(torch, name, None) if module == "torch" and name.endswith("Storage") else None
    with warnings.catch_warnings():  # TypedStorage is deprecated, and says so on every access
        warnings.simplefilter("ignore")
        dtype = getattr(cls, "dtype", None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else None
