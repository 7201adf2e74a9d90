"""Load and save PyTorch checkpoints in the format they came in, recognised by content.

| kind          | recognised by                               | loaded with                                  |
|---------------|---------------------------------------------|----------------------------------------------|
| torchscript   | zip with code/ and constants.pkl            | torch.jit.load, after its tensors are checked |
| torch-export  | zip with archive_format (torch.export.save) | torch.export.load, after its pickles are checked |
| safetensors   | 8-byte header length + JSON header          | safetensors, after the header is checked; + --arch |
| state_dict    | torch.load(weights_only=True) → tensors     | + --arch factory, strict load                |
| torch-pickle  | a pickled nn.Module                         | torch.load, only with --trust-pickle         |
| hf-folder     | a directory with config.json                | transformers' classes + its weights (hf.py)  |
| checkpoint    | a dict holding modules (ultralytics)        | torch.load, only with --trust-pickle         |
Unpickling runs code from the file, so it is refused unless the user trusts it; that includes a
`.pt2` whose archive holds a pickle torch.export.load would unpickle. Which values of a dict are
weight sets, and how they are written back: checkpoint.py.
"""
from __future__ import annotations

import copy
import importlib
import io
import os
import pickle
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..detect import CONFIG_NAME, check_readable, is_hf_folder, looks_like_safetensors
from ..errors import BadInput, BnfoldError, UsageError
from ..json_reader import read_json
from ..options import LoadOptions
from .checkpoint import STATE, FitError, WeightSet, fit_prefix, is_tensor_dict, load_into

TORCHSCRIPT, EXPORT, STATE_DICT, PICKLE = "torchscript", "torch-export", "state_dict", "torch-pickle"
CHECKPOINT, SAFETENSORS, HF_FOLDER = "checkpoint", "safetensors", "hf-folder"
EAGER = (PICKLE, STATE_DICT, CHECKPOINT, SAFETENSORS, HF_FOLDER)


@dataclass
class TorchSource:
    kind: str
    path: Path
    sets: list[WeightSet]
    container: Any = None  # the checkpoint dict as loaded: its other keys are written back as they came
    file_metadata: dict | None = None  # safetensors' __metadata__
    folder: Any = None  # a Hugging Face folder's files (hf.HfFolder), written back alike
    notes: list[str] = field(default_factory=list)

    @property
    def module(self):
        """The first weight set's module: what --to converts and what a single-set tool works on."""
        return self.sets[0].module


def sniff(path: Path) -> str:
    """The checkpoint kind, from the file's content."""
    if is_hf_folder(path):
        return HF_FOLDER
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
    with open(path, "rb") as fh:
        head = fh.read(16)
    if looks_like_safetensors(head, path.stat().st_size) or path.suffix.lower() == ".safetensors":
        return SAFETENSORS
    return STATE_DICT  # or a pickled module or a checkpoint dict: decided when loading


def load_torch(path: str | Path, options: LoadOptions | None = None) -> TorchSource:
    options = options or LoadOptions()
    if is_hf_folder(path):
        from .hf import check_arch_unused, load_folder  # transformers is imported only for a folder

        check_arch_unused(options.arch, Path(path))
        folder, weights = load_folder(Path(path))
        return TorchSource(HF_FOLDER, Path(path), [weights], folder=folder,
                           notes=[f"{path}: {note}" for note in folder.left_out])
    path = check_readable(Path(path))
    kind = sniff(path)
    if kind == TORCHSCRIPT:
        from .script_archive import check_script_archive

        check_script_archive(path)
        return TorchSource(kind, path, [WeightSet(None, _guard(path, _load_script, path), TORCHSCRIPT)])
    if kind == EXPORT:
        check_pt2(path, options.trust_pickle)
        return TorchSource(kind, path, [WeightSet(None, _guard(path, _load_program, path), EXPORT)])
    if kind == SAFETENSORS:
        from .safetensors_io import load_safetensors

        tensors, metadata = load_safetensors(path)
        source = _from_dict(path, tensors, options)
        source.kind, source.file_metadata = SAFETENSORS, metadata
        return source
    devices = SavedDevices()
    obj = _load_pickled(path, options.trust_pickle, devices)
    if isinstance(obj, nn.Module):
        source = TorchSource(PICKLE, path, [WeightSet(None, obj)])
    elif isinstance(obj, dict):
        source = _from_dict(path, obj, options)
    else:
        raise BadInput(f"holds a {type(obj).__name__}, not an nn.Module, a state_dict or a checkpoint dict", path)
    source.notes += devices.notes()
    return source


class SavedDevices:
    """map_location: every tensor loads on the CPU (the machine may lack the GPU it was saved on);
    where they were saved is noted, since the output holds CPU tensors."""

    def __init__(self):
        self.seen: set[str] = set()

    def __call__(self, storage, location: str):
        self.seen.add(location)
        return storage

    def notes(self) -> list[str]:
        other = sorted(d for d in self.seen if not d.startswith("cpu"))
        return [f"tensors saved on {', '.join(other)} were loaded, folded and written on the CPU"] if other else []


def _load_script(path: Path):
    """torch.jit.load, then one save in memory: torch reads some parts only when it needs them
    (the debug info, on the next save), so a malformed one fails here, as bad input, and not in
    the middle of the fold."""
    module = torch.jit.load(str(path), map_location="cpu")
    script_bytes(module)
    return module


def _load_program(path: Path):
    """torch.export.load, then the checks torch leaves to first use: every weight has the shape
    and dtype the graph was traced with (a mutated config can load weights of other shapes),
    and the program unlifts into a module (which reads its whole signature)."""
    program = torch.export.load(str(path))
    _check_weights(program, path)
    program.module()
    return program


def _check_weights(program, path: Path) -> None:
    kinds = torch.export.graph_signature.InputKind
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    for spec in program.graph_signature.input_specs:
        if spec.kind not in (kinds.PARAMETER, kinds.BUFFER, kinds.CONSTANT_TENSOR):
            continue
        table = program.constants if spec.kind == kinds.CONSTANT_TENSOR else program.state_dict
        value, traced = table.get(spec.target), placeholders[spec.arg.name].meta.get("val")
        if not isinstance(value, torch.Tensor) or not isinstance(traced, torch.Tensor) or \
                not all(isinstance(d, int) for d in traced.shape):  # a symbolic size: nothing fixed to compare
            continue
        if tuple(value.shape) != tuple(traced.shape) or value.dtype != traced.dtype:
            raise BadInput(f"weight {spec.target!r} is {value.dtype} {list(value.shape)}, but the program's graph "
                           f"was traced with {traced.dtype} {list(traced.shape)}", path)
        if _overlaps(value):  # a config can give a weight strides that make its elements share memory
            raise BadInput(f"weight {spec.target!r} has strides {list(value.stride())} under which its elements "
                           "overlap", path)


def _overlaps(tensor: torch.Tensor) -> bool:
    """Whether two elements may share memory: with the dims of more than one element ordered by
    stride, each stride must step over everything the smaller ones reach (true of any layout
    torch makes for a parameter, transposed or not)."""
    reach = 0
    for stride, size in sorted((s, n) for s, n in zip(tensor.stride(), tensor.shape) if n > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def _guard(path: Path, loader, *args, **kwargs):
    try:
        return loader(*args, **kwargs)
    except BnfoldError:
        raise
    except Exception as exc:  # noqa: BLE001 — torch raises many types for a bad archive
        why = (str(exc).splitlines() or [""])[0][:120]
        if "warnings above" in why:  # torch.export.load logged the cause, which bnfold does not show
            why = "torch.export.load cannot deserialize it; BNFOLD_DEBUG=1 shows torch's log of why"
        raise BadInput(f"cannot load ({type(exc).__name__}: {why})", path) from None


def _load_pickled(path: Path, trust_pickle: bool, devices: SavedDevices):
    try:
        return torch.load(str(path), map_location=devices, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise BadInput(f"not a PyTorch checkpoint ({str(exc).splitlines()[0][:120]})", path) from None
        if not trust_pickle:
            raise BadInput("holds pickled Python objects (a module, or a training checkpoint); unpickling runs code "
                           "from the file: pass --trust-pickle if you trust it (or save a state_dict and use --arch)",
                           path) from None
    except Exception as exc:  # noqa: BLE001 — a corrupt pickle can raise anything; weights_only ran no code
        raise BadInput(f"not a PyTorch checkpoint ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]})",
                       path) from None
    sys.path.insert(0, os.getcwd())  # the module's classes usually live in the user's project
    try:
        return torch.load(str(path), map_location=devices, weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise BadInput(f"cannot unpickle ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})", path) from None
    finally:
        sys.path.remove(os.getcwd())


def _from_dict(path: Path, obj: dict, options: LoadOptions) -> TorchSource:
    """A state_dict, or a checkpoint dict: its modules, and its state_dicts that fit --arch."""
    if is_tensor_dict(obj):
        if options.arch is None:
            hint = _folder_hint(path)
            if hint:
                raise UsageError(hint, path)
            raise UsageError("is a state_dict: pass --arch package.module:factory to build the module it belongs to",
                             path)
        arch = build_arch(options.arch, options.arch_kwargs or {})
        return TorchSource(STATE_DICT, path, [_state_set(path, None, obj, arch, options.arch)])
    modules = [WeightSet(k, v) for k, v in obj.items() if isinstance(v, nn.Module)]
    states = [k for k, v in obj.items() if is_tensor_dict(v)]
    if not modules and not states:
        raise BadInput(f"a dict with no nn.Module and no state_dict in it (keys {list(obj)[:8]})", path)
    notes = []
    if states and options.arch is None:
        if not modules:
            raise UsageError(f"holds state_dicts ({', '.join(map(repr, states))}): pass --arch package.module:factory "
                             "to build the module they belong to", path)
        notes.append(f"state_dicts {', '.join(map(repr, states))} written back unchanged (no --arch to fold them)")
        states = []
    arch = build_arch(options.arch, options.arch_kwargs or {}) if states else None
    sets, misfits = list(modules), []
    for key in states:
        fitted = _state_set(path, key, obj[key], arch, options.arch, required=False)
        if isinstance(fitted, FitError):
            misfits.append((key, fitted))
        else:
            sets.append(fitted)
    if not sets:
        key, why = misfits[0]
        raise BadInput(f"keys of {key!r} do not match --arch {options.arch} ({why.describe()})", path)
    notes += [f"{key!r} does not fit --arch ({why.describe()}): written back unchanged" for key, why in misfits]
    sets.sort(key=lambda s: list(obj).index(s.key))
    kind = CHECKPOINT if modules else STATE_DICT
    return TorchSource(kind, path, sets, container=obj, notes=notes)


def _folder_hint(path: Path) -> str | None:
    """A weights file from a Hugging Face or timm folder: what to pass instead."""
    if not (path.parent / CONFIG_NAME).exists():
        return None
    from .hf import weights_hint

    return weights_hint(path)


def _state_set(path: Path, key: str | None, state: dict, arch: nn.Module, spec: str,
               required: bool = True) -> WeightSet | FitError:
    prefix = fit_prefix(list(state), set(arch.state_dict()))
    if isinstance(prefix, FitError):
        if not required:
            return prefix
        raise BadInput(f"keys do not match --arch {spec} ({prefix.describe()})", path)
    module, layout = load_into(copy.deepcopy(arch), state, prefix, path)  # one --arch module per weight set
    return WeightSet(key, module, STATE, layout)


PT2_JSON_LIMIT = 256 * 2**20  # bytes of one JSON entry (efficientnet-b0's model.json is 0.6 MB)


def check_pt2(path: Path, trust_pickle: bool) -> None:
    """Before torch.export.load reads anything: every JSON entry parses within json_reader's
    bounds (torch's own parser would recurse into a deep one), and, unless trusted, no entry is
    a pickle torch would unpickle."""
    with zipfile.ZipFile(path) as archive:
        configs = {info.filename: _pt2_json(archive, info, path) for info in archive.infolist()
                   if info.filename.endswith(".json")}
        entry = None if trust_pickle else next(iter(pt2_pickles(archive, configs)), None)
    if entry is not None:
        raise BadInput(f"{entry} is a pickle torch.export.load would unpickle, which runs code from the file: "
                       "pass --trust-pickle if you trust it", path)


def _pt2_json(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path):
    what = f"archive entry {info.filename}"
    if info.file_size > PT2_JSON_LIMIT:  # checked before it is inflated
        raise BadInput(f"{what} is {info.file_size} bytes, more than the {PT2_JSON_LIMIT} bnfold reads", path)
    try:
        data = archive.read(info)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise BadInput(f"{what} cannot be read ({exc})", path) from None
    return read_json(data, what, path, max_bytes=PT2_JSON_LIMIT)


def pt2_pickles(archive: zipfile.ZipFile, configs: dict[str, object]) -> list[str]:
    """Entries of a `.pt2` that torch.export.load would unpickle with more than weights_only allows:
    payloads its configs mark use_pickle (or custom/opaque objects), and pickled entries (sample
    inputs, legacy weights) that a weights_only load refuses — torch then falls back to a full one."""
    risky = []
    for name, config in configs.items():
        if name.endswith("_config.json"):
            risky += [f"{name} ({fqn})" for fqn in _pickled_payloads(config)]
    for name in archive.namelist():
        if name.endswith(".pt") and not _weights_only_loads(archive.read(name)):
            risky.append(name)  # sample inputs, legacy weights and constants: torch.load'ed
    return risky


def _pickled_payloads(config) -> list[str]:
    entries = config.get("config", {}) if isinstance(config, dict) else {}
    if not isinstance(entries, dict):
        return []
    return [fqn for fqn, meta in entries.items() if isinstance(meta, dict) and (
        meta.get("use_pickle") or str(meta.get("path_name", "")).startswith(("custom_obj", "opaque_obj")))]


def _weights_only_loads(data: bytes) -> bool:
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 — anything torch would retry with a full unpickle
        return False
    return True


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


def atomic_write(dst: Path, write) -> Path:
    """Call write(tmp_path), then rename the finished file into place. `write` must raise on
    a failed write: torch's C++ archive writers abort the process instead when the disk is
    full (a C++ exception in a destructor), so their bytes are made in memory (script_bytes,
    program_bytes) and written here from Python, where a full disk is an OSError."""
    fd, tmp = tempfile.mkstemp(prefix=".bnfold-", suffix=dst.suffix, dir=dst.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


def save_bytes(dst: Path, data: bytes) -> Path:
    return atomic_write(dst, lambda p: p.write_bytes(data))


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def script_bytes(module) -> bytes:
    """A TorchScript archive, made in memory."""
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return buffer.getvalue()


def program_bytes(program) -> bytes:
    """A torch.export archive (.pt2), made in memory."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def runnable(source: TorchSource):
    """A callable module: an exported program is unlifted into a GraphModule (a new one per call)."""
    return source.module.module() if source.kind == EXPORT else source.module
