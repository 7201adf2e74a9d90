"""Hugging Face `save_pretrained` folders: config.json and the weights beside it.

The module is built from config.json by transformers itself: the config class its `model_type`
names and the model class its `architectures` names, both looked up in transformers (never
`trust_remote_code`: a config whose architecture lives in the folder's own code is refused, and
no file of the folder is imported). The weights load from model.safetensors, its sharded
index, or pytorch_model.bin (and its index) with `weights_only`.

The folder is read as hostile: config.json and the index are bounded JSON; every file read must be
a regular file inside the folder once `..` and symlinks are resolved (or, in the Hugging Face
cache, inside the repository's `blobs/`, where the snapshot's links point); the index's shard names
are plain relative names, and each shard must hold exactly the tensors the index maps to it.

Written back: a folder `from_pretrained` loads strictly — every folded BN kept as the identity
(it rebuilds the original architecture from config.json), the weights in the same format,
sharding, key order, dtypes and metadata, the index and every other top-level file copied as
they came. Weights of another format or framework (tf_model.h5, a pytorch_model.bin beside
model.safetensors) are not copied: they would be the unfolded model.
"""
from __future__ import annotations

import importlib
import io
import json
import re
import shutil
import warnings
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..detect import CONFIG_NAME, is_hf_folder
from ..errors import BadInput, UsageError
from .checkpoint import STATE, StateLayout, WeightSet, state_out

EXTRA = "pip install 'bnfold[hf]'"
SAFE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# How transformers chooses: safetensors before pickles, a single file before an index.
WEIGHT_CHOICES = ((SAFE, None, "safetensors"), (None, SAFE_INDEX, "safetensors"), (BIN, None, "bin"),
                  (None, BIN_INDEX, "bin"))
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack", ".pt", ".pth", ".ckpt", ".gguf")
JSON_LIMIT = 16 * 2**20  # config.json (with a large id2label) and index files are far smaller
JSON_DEPTH = 64
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_CLASS_NAME = re.compile(r"[A-Z][A-Za-z0-9_]*")


@dataclass
class Shard:
    """One weight file: its name in the folder, its tensors in file order, its safetensors metadata."""

    name: str
    keys: list[str]
    metadata: dict | None = None


@dataclass
class HfFolder:
    """What a save_pretrained folder holds, as bnfold reads and writes it."""

    path: Path
    config: dict
    format: str  # "safetensors" or "bin"
    index: str | None  # the index file's name (copied as it came), None for a single file
    shards: list[Shard] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)  # other top-level files, copied as they came
    left_out: list[str] = field(default_factory=list)  # notes: what is not copied, and why


def load_folder(path: Path) -> tuple[HfFolder, WeightSet]:
    """The folder's files, and its one weight set: a state_dict in the module config.json builds."""
    folder = read_folder(path)
    tensors = _read_weights(folder)
    module = _build(folder)
    return folder, WeightSet(None, module, STATE, _load_weights(module, tensors, folder))


def read_folder(path: Path) -> HfFolder:
    """The folder's config and weight files, checked; nothing loaded into torch yet."""
    path = Path(path)
    if not is_hf_folder(path):
        raise BadInput(f"is not a Hugging Face model folder (no {CONFIG_NAME})", path)
    config = read_json(inside(path, CONFIG_NAME), CONFIG_NAME, path)
    if not isinstance(config, dict):
        raise BadInput(f"{CONFIG_NAME} is not a JSON object", path)
    names = {p.name for p in path.iterdir()}
    single, index, fmt = next(((s, i, f) for s, i, f in WEIGHT_CHOICES if (s or i) in names), (None, None, None))
    if fmt is None:
        raise BadInput(f"holds no weights bnfold reads ({SAFE}, {SAFE_INDEX}, {BIN} or {BIN_INDEX})", path)
    folder = HfFolder(path, config, fmt, index)
    folder.shards = [Shard(single, [])] if single else _index_shards(path, index, fmt)
    _sort_other_files(folder, names)
    return folder


def _index_shards(path: Path, index: str, fmt: str) -> list[Shard]:
    """The shards an index names, each with the keys it maps there (checked against the file later)."""
    doc = read_json(inside(path, index), index, path)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise BadInput(f"{index} has no weight_map", path)
    shards: dict[str, Shard] = {}
    suffix = ".safetensors" if fmt == "safetensors" else ".bin"
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name.endswith(suffix):
            raise BadInput(f"{index} maps {key!r} to {name!r}, not a {suffix} file", path)
        if name not in shards:
            inside(path, name)  # a plain name of a regular file in the folder, before anything reads it
            shards[name] = Shard(name, [])
        shards[name].keys.append(key)
    return list(shards.values())


def _sort_other_files(folder: HfFolder, names: set[str]) -> None:
    """Every other top-level file is copied; other weights and subfolders are not (noted)."""
    used = {CONFIG_NAME, folder.index} | {s.name for s in folder.shards}
    weights = sorted(n for n in names - used if n.endswith(WEIGHT_SUFFIXES) or n in (SAFE_INDEX, BIN_INDEX))
    if weights:
        folder.left_out.append(f"not copied: {', '.join(weights)} (weights or pickles bnfold did not fold; "
                               f"the output's weights are {', '.join(s.name for s in folder.shards[:2])}"
                               f"{', …' if len(folder.shards) > 2 else ''})")
    folders = sorted(n for n in names if (folder.path / n).is_dir())
    if folders:
        folder.left_out.append(f"not copied: subfolder(s) {', '.join(folders)} (only the folder's top-level "
                               "files are copied)")
    folder.copied = sorted(names - used - set(weights) - set(folders))
    if folder.index:
        folder.copied.append(folder.index)
    for name in folder.copied:
        inside(folder.path, name)


def inside(folder: Path, name: str) -> Path:
    """`folder/name`, a regular file that stays inside the folder after `..` and symlinks are
    resolved (or in the Hugging Face cache's blobs/ of the same repository), or BadInput."""
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts or len(candidate.parts) != 1 or "\\" in name:
        raise BadInput(f"names {name!r}: only plain file names inside the folder are read", folder)
    path = folder / candidate
    resolved = path.resolve()
    roots = [folder.resolve(), *_cache_blobs(folder)]
    if resolved.parent not in roots:
        raise BadInput(f"{name} leads outside the folder (to {resolved}); refused", folder)
    if not resolved.is_file():
        raise BadInput(f"{name} is not a regular file", folder)
    return path


def _cache_blobs(folder: Path) -> list[Path]:
    """The Hugging Face cache keeps a snapshot's files as links into its repository's blobs/:
    models--ORG--NAME/snapshots/REVISION/FILE → ../../blobs/HASH."""
    resolved = folder.resolve()
    repo = resolved.parent.parent
    if resolved.parent.name == "snapshots" and repo.name.startswith(("models--", "datasets--")):
        return [(repo / "blobs").resolve()]
    return []


def read_json(path: Path, what: str, folder: Path) -> Any:
    """A JSON file within bnfold's bounds: its size, and how deep its arrays and objects nest
    (Python's parser recurses once per level)."""
    size = path.stat().st_size
    if size > JSON_LIMIT:
        raise BadInput(f"{what} is {size} bytes, more than the {JSON_LIMIT} bnfold reads", folder)
    data = path.read_bytes()
    depth = peak = 0
    for bracket in data.translate(None, _NOT_BRACKETS):  # brackets inside strings count too: an overestimate
        depth += 1 if bracket in b"[{" else -1
        peak = max(peak, depth)
    if peak > JSON_DEPTH:
        raise BadInput(f"{what} nests arrays or objects {peak} levels deep (at most {JSON_DEPTH})", folder)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadInput(f"{what} is not valid JSON ({str(exc)[:120]})", folder) from None


def _read_weights(folder: HfFolder) -> dict[str, torch.Tensor]:
    """Every tensor of every shard, in shard and file order; a shard holds exactly what the index maps to it."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in folder.shards:
        path = inside(folder.path, shard.name)
        loaded, shard.metadata = _read_shard(path, folder)
        if folder.index and set(loaded) != set(shard.keys):
            raise BadInput(f"{shard.name} does not hold the tensors {folder.index} maps to it "
                           f"(missing {sorted(set(shard.keys) - set(loaded))[:3]}, "
                           f"unexpected {sorted(set(loaded) - set(shard.keys))[:3]})", folder.path)
        twice = sorted(set(loaded) & set(tensors))
        if twice:
            raise BadInput(f"{shard.name} repeats tensors of another shard ({twice[:3]})", folder.path)
        shard.keys = list(loaded)
        tensors.update(loaded)
    return tensors


def _read_shard(path: Path, folder: HfFolder) -> tuple[dict[str, torch.Tensor], dict | None]:
    if folder.format == "safetensors":
        from .safetensors_io import load_safetensors

        return load_safetensors(path)
    try:  # never unpickled beyond weights_only, whatever --trust-pickle says: a folder holds weights
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — a corrupt or hostile pickle can raise anything; no code ran
        raise BadInput(f"{path.name} is not a weights-only state_dict ({type(exc).__name__}: "
                       f"{(str(exc).splitlines() or [''])[0][:120]})", folder.path) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise BadInput(f"{path.name} is not a state_dict of tensors", folder.path)
    return dict(state), None


def _build(folder: HfFolder) -> nn.Module:
    """The model config.json describes, made by transformers' own classes, with no weights yet."""
    config = dict(folder.config)
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise BadInput(f"{CONFIG_NAME} names no model_type, so this is not a transformers folder"
                       f"{_timm_hint(config)}", folder.path)
    transformers = import_transformers(folder.path)
    remote = "auto_map" in config  # code in the folder: never imported
    config.pop("auto_map", None)
    mapping = transformers.CONFIG_MAPPING
    if model_type not in mapping:
        raise BadInput(_unknown(f"model_type {model_type!r}", transformers, remote), folder.path)
    with _quiet(transformers):
        try:
            hf_config = mapping[model_type].from_dict(config)
        except Exception as exc:  # noqa: BLE001 — a config class validates its fields its own way
            raise BadInput(f"{CONFIG_NAME} does not make a {model_type} config ({type(exc).__name__}: "
                           f"{(str(exc).splitlines() or [''])[0][:120]})", folder.path) from None
        model_class = _architecture(config, hf_config, transformers, remote, folder.path)
        try:
            with _no_init(), torch.device("cpu"):
                model = model_class._from_config(hf_config) if model_class else \
                    transformers.AutoModel.from_config(hf_config, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 — the architecture refused the config
            raise BadInput(f"transformers cannot build the model from {CONFIG_NAME} ({type(exc).__name__}: "
                           f"{(str(exc).splitlines() or [''])[0][:120]})", folder.path) from None
    return model.eval()


def _timm_arch(config: dict) -> str | None:
    """timm's hub folders hold a config.json too, naming the model in `architecture`: the
    --arch that builds it."""
    name = config.get("architecture")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,100}", name):
        return None
    return f"--arch timm:create_model --arch-kwargs '{{\"model_name\": \"{name}\"}}'"


def _timm_hint(config: dict) -> str:
    arch = _timm_arch(config)
    return f" (timm writes config.json so: fuse its weights file with {arch})" if arch else ""


def weights_hint(weights: Path) -> str | None:
    """What to pass instead of a weights file alone, where a config.json beside it says."""
    try:
        config = read_json(inside(weights.parent, CONFIG_NAME), CONFIG_NAME, weights.parent)
    except BadInput:
        return None
    if isinstance(config, dict) and isinstance(config.get("model_type"), str):
        return (f"is the weights of a Hugging Face folder: pass the folder, {weights.parent}, whose "
                f"{CONFIG_NAME} says how to build the model")
    arch = _timm_arch(config) if isinstance(config, dict) else None
    return f"is a state_dict from a timm folder: pass {arch}" if arch else None


def _architecture(config: dict, hf_config, transformers, remote: bool, path: Path):
    """The class `architectures` names, if transformers defines it for this config; None: AutoModel."""
    names = config.get("architectures")
    if names is None:
        return None
    if not (isinstance(names, list) and names and isinstance(names[0], str)):
        raise BadInput(f"{CONFIG_NAME}'s architectures is not a list of class names", path)
    name = names[0]
    found = getattr(transformers, name, None) if _CLASS_NAME.fullmatch(name) else None
    if not (isinstance(found, type) and issubclass(found, transformers.PreTrainedModel)
            and found.__module__.startswith("transformers.")):
        raise BadInput(_unknown(f"architecture {name!r}", transformers, remote), path)
    if not isinstance(hf_config, found.config_class):
        raise BadInput(f"architecture {name} takes a {found.config_class.__name__}, but model_type "
                       f"{config['model_type']!r} is a {type(hf_config).__name__}", path)
    return found


def _unknown(what: str, transformers, remote: bool) -> str:
    if remote:
        return (f"{CONFIG_NAME}'s {what} is defined by code in the folder (auto_map), and bnfold never runs a "
                "model's own code; load it yourself and call bnfold.fuse_module on it")
    return f"transformers {transformers.__version__} has no {what} (a newer transformers may)"


def import_transformers(path: Path | None = None):
    """transformers, imported only for a Hugging Face folder: an optional extra."""
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise BadInput(f"a Hugging Face model folder needs transformers, an optional extra: {EXTRA}", path) from None


@contextmanager
def _quiet(transformers):
    """transformers logs and warns while it builds; none of it reaches bnfold's stderr."""
    logging = getattr(transformers, "logging", None)
    level = logging.get_verbosity() if logging else None
    try:
        if logging:
            logging.set_verbosity_error()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if logging:
            logging.set_verbosity(level)


def _no_init():
    """Skip the random initialisation every weight is about to be overwritten by."""
    for where in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            found = getattr(importlib.import_module(where), "no_init_weights", None)
        except ImportError:
            continue
        if found is not None:
            return found()
    return nullcontext()


def _load_weights(module: nn.Module, tensors: dict[str, torch.Tensor], folder: HfFolder) -> StateLayout:
    """`module` filled strictly with the folder's tensors; a key the files leave out must be a
    tied weight (one tensor under two names, saved once). The float dtype is the files'."""
    expected = module.state_dict()
    unexpected = sorted(set(tensors) - set(expected))
    tied = _aliases(expected)
    missing = sorted(k for k in set(expected) - set(tensors) if not (tied.get(k, set()) & set(tensors)))
    if unexpected or missing:
        raise BadInput(f"the weights do not fit the {type(module).__name__} {CONFIG_NAME} builds (missing "
                       f"{missing[:4]}, unexpected {unexpected[:4]})", folder.path)
    floats = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(floats) == 1:
        module.to(next(iter(floats)))
    try:
        module.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # shapes that differ
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise BadInput(f"the weights do not fit the model {CONFIG_NAME} builds: {detail[:240]}", folder.path) from None
    return StateLayout(list(tensors), {k: v.dtype for k, v in tensors.items()}, "", None, OrderedDict)


def _aliases(state: dict[str, torch.Tensor]) -> dict[str, set[str]]:
    """For each key, the other keys whose tensor is the same memory (tied weights)."""
    by_storage: dict[tuple, set[str]] = {}
    for key, tensor in state.items():
        if tensor.numel():
            by_storage.setdefault((tensor.data_ptr(), tuple(tensor.shape)), set()).add(key)
    return {k: group - {k} for group in by_storage.values() for k in group}


def write_folder(folder: HfFolder, layout: StateLayout, module: nn.Module, dst: Path) -> None:
    """The folded module as a folder like the input: same files, format, sharding, key order,
    dtypes and metadata; every other file copied."""
    dst.mkdir()
    state = state_out(layout, module)
    for shard in folder.shards:
        tensors = OrderedDict((k, state[k]) for k in shard.keys)
        if folder.format == "safetensors":
            from .safetensors_io import safetensors_bytes

            (dst / shard.name).write_bytes(safetensors_bytes(tensors, shard.metadata))
        else:  # made in memory, written from Python: a full disk is an OSError, not an abort in torch's writer
            buffer = io.BytesIO()
            torch.save(tensors, buffer)
            (dst / shard.name).write_bytes(buffer.getvalue())
    for name in [CONFIG_NAME, *folder.copied]:
        shutil.copyfile(inside(folder.path, name), dst / name)


def check_arch_unused(arch: str | None, path: Path) -> None:
    if arch is not None:
        raise UsageError("is a Hugging Face folder: its architecture comes from config.json, so --arch is not used",
                         path)
