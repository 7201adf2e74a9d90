"""Load and save PyTorch checkpoints in the format they came in, recognised by content.

| kind          | recognised by                              | loaded with                         |
|---------------|--------------------------------------------|-------------------------------------|
| torchscript   | zip with code/ and constants.pkl           | torch.jit.load                      |
| torch-export  | zip with archive_format (torch.export.save)| torch.export.load                   |
| state_dict    | torch.load(weights_only=True) → tensors    | + --arch factory, strict load       |
| torch-pickle  | a pickled nn.Module                        | torch.load, only with --trust-pickle|
Unpickling a module runs code from the file, so it is refused unless the user trusts it.
"""
from __future__ import annotations

import importlib
import io
import os
import pickle
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..check.arrays import read_file
from ..detect import check_readable
from ..errors import BadInput, UsageError
from ..options import LoadOptions

TORCHSCRIPT, EXPORT, STATE_DICT, PICKLE = "torchscript", "torch-export", "state_dict", "torch-pickle"


@dataclass
class TorchSource:
    kind: str
    path: Path
    module: Any  # nn.Module, ScriptModule, or ExportedProgram
    state_prefix_stripped: bool = False
    state_key: str | None = None  # "state_dict" / "model" when the weights sat under a key


def sniff(path: Path) -> str:
    """The checkpoint kind, from the file's content."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise BadInput(f"not a readable zip archive ({exc})", path) from None
        if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
            return EXPORT
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return TORCHSCRIPT
    return STATE_DICT  # or a pickled module: decided when loading


def load_torch(path: str | Path, options: LoadOptions | None = None) -> TorchSource:
    options = options or LoadOptions()
    trust_pickle, arch, arch_kwargs = options.trust_pickle, options.arch, options.arch_kwargs
    path = check_readable(Path(path))
    kind = sniff(path)
    if kind == TORCHSCRIPT:
        return TorchSource(kind, path, _guard(path, torch.jit.load, str(path), map_location="cpu"))
    if kind == EXPORT:
        return TorchSource(kind, path, _guard(path, torch.export.load, str(path)))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise BadInput(f"not a PyTorch checkpoint ({str(exc).splitlines()[0][:120]})", path) from None
        if not trust_pickle:
            raise BadInput("holds a pickled module; unpickling runs code from the file: pass --trust-pickle "
                           "if you trust it (or save a state_dict and use --arch)", path) from None
        return TorchSource(PICKLE, path, _load_pickle(path))
    except Exception as exc:  # noqa: BLE001 — a corrupt pickle can raise anything; weights_only ran no code
        raise BadInput(f"not a PyTorch checkpoint ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]})",
                       path) from None
    if isinstance(obj, nn.Module):
        return TorchSource(PICKLE, path, obj)
    return _from_state_dict(path, obj, arch, arch_kwargs or {})


def _guard(path: Path, loader, *args, **kwargs):
    try:
        return loader(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 — torch raises many types for a bad archive
        raise BadInput(f"cannot load ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})", path) from None


def _load_pickle(path: Path) -> nn.Module:
    sys.path.insert(0, os.getcwd())  # the module's classes usually live in the user's project
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise BadInput(f"cannot unpickle ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})", path) from None
    finally:
        sys.path.remove(os.getcwd())
    if not isinstance(obj, nn.Module):
        raise BadInput(f"holds a {type(obj).__name__}, not an nn.Module or state_dict", path)
    return obj


def _from_state_dict(path: Path, obj: Any, arch: str | None, arch_kwargs: dict) -> TorchSource:
    key = None
    if isinstance(obj, dict) and not _is_tensor_dict(obj):
        key = next((k for k in ("state_dict", "model", "model_state_dict") if _is_tensor_dict(obj.get(k))), None)
        if key is None:
            raise BadInput("not a checkpoint bnfold can read: no tensors at the top level or under "
                           "'state_dict'/'model'", path)
        obj = obj[key]
    if not _is_tensor_dict(obj):
        raise BadInput(f"holds a {type(obj).__name__}, not a model or state_dict", path)
    stripped = all(k.startswith("module.") for k in obj)
    state = {k[len("module."):]: v for k, v in obj.items()} if stripped else dict(obj)
    if arch is None:
        raise UsageError("is a state_dict: pass --arch package.module:factory to build the module it belongs to", path)
    module = build_arch(arch, arch_kwargs)
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that differ
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise BadInput(f"does not fit --arch {arch}: {detail[:240]}", path) from None
    if result.missing_keys or result.unexpected_keys:
        raise BadInput(f"keys do not match --arch {arch}: missing {result.missing_keys[:5]}, "
                       f"unexpected {result.unexpected_keys[:5]}", path)
    return TorchSource(STATE_DICT, path, module.eval(), stripped, key)


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def build_arch(spec: str, kwargs: dict) -> nn.Module:
    module_name, _, factory = spec.partition(":")
    if not module_name or not factory:
        raise UsageError(f"--arch expects package.module:factory, got {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"--arch {spec}: cannot import {module_name} ({exc})") from None
    finally:
        sys.path.remove(os.getcwd())
    build = getattr(module, factory, None)
    if build is None:
        raise UsageError(f"--arch {spec}: {module_name} has no {factory}")
    try:
        model = build(**kwargs)
    except TypeError as exc:
        raise UsageError(f"--arch {spec}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"--arch {spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def load_arrays(path: str | Path) -> tuple[torch.Tensor, ...]:
    """Positional inputs from `.npy` (one) or `.npz` (in the file's order)."""
    return tuple(torch.from_numpy(a) for a in read_file(Path(path), ["input"]).values())


def atomic_write(dst: Path, write) -> Path:
    """Call write(tmp_path), then rename the finished file into place."""
    fd, tmp = tempfile.mkstemp(prefix=".bnfold-", suffix=dst.suffix, dir=dst.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


def save_state_dict(source: TorchSource, state: dict, dst: Path) -> Path:
    """The state_dict as it came: same prefix, same key it sat under."""
    if source.state_prefix_stripped:
        state = {f"module.{k}": v for k, v in state.items()}
    payload = {source.state_key: state} if source.state_key else state
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write(dst, lambda p: p.write_bytes(buffer.getvalue()))
