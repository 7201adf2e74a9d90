"""A torch layer's folded parameters: BN tensors → the affine map, the float64 fold cast once to
the layer's dtype, and writing the result back. Shared by the fx, TorchScript and ATen passes."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import Skip
from ..fold_math import Affine, bn_affine, cast_exact, fold_bias, scale_weight


def attr_at(root: nn.Module, path: str):
    """The attribute at a dotted path ("layer1.0.bn1.running_var"), of an nn.Module or a ScriptModule."""
    value = root
    for name in path.split(".") if path else ():
        value = getattr(value, name)
    return value


def replace_at(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """`root` with the module at `path` replaced by `new` (`new` itself where the path is the root)."""
    if not path:
        return new
    parent, _, name = path.rpartition(".")
    holder = root.get_submodule(parent) if parent else root
    if getattr(holder, name) is not new:
        setattr(holder, name, new)
    return root


def alias_reads(reads: dict[str, int], root) -> Callable[[str], int]:
    """Reads of a tensor's memory under every path that reaches it: tied weights (`c2.weight =
    c1.weight`), a buffer assigned to two modules, a view of it a forward made a constant of
    (`self.stats[0].reshape(…)`). Counted by path alone, each path would be read once, and a fold
    written through one would change the other's use. `reads` is final: the memory of each path
    is found once, on the first question."""
    spans: dict[str, tuple | None] = {}
    by_storage: dict[object, list[tuple[int, int, int]]] = {}

    def span(path: str):
        if path not in spans:
            try:
                t = attr_at(root, path)
            except (AttributeError, RuntimeError):
                t = None
            spans[path] = memory_span(t) if isinstance(t, torch.Tensor) else None
        return spans[path]

    def count(path: str) -> int:
        if not by_storage and reads:
            for p, n in reads.items():
                where = span(p)
                if where is not None:
                    by_storage.setdefault(where[0], []).append((where[1], where[2], n))
        where = span(path)
        if where is None:
            return reads.get(path, 0)
        storage, begin, end = where
        return sum(n for b, e, n in by_storage.get(storage, ()) if b < end and begin < e)

    return count


def memory_span(t: torch.Tensor) -> tuple | None:
    """(storage, first byte, one past the last byte) a tensor's elements lie in; None where memory
    does not say (empty, meta, no storage)."""
    if not t.numel() or t.device.type == "meta":
        return None
    try:
        storage = t.untyped_storage()
        size = t.element_size()
        offset = t.storage_offset() * size
        last = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) * size
    except (RuntimeError, NotImplementedError):  # a tensor without storage (a functional wrapper)
        return None
    return (storage.data_ptr(), t.device), offset, offset + last + size


def key_at(root, path: str):
    """tensor_key of the tensor at `path`; None where there is none."""
    try:
        value = attr_at(root, path)
    except AttributeError:
        return None
    return tensor_key(value) if isinstance(value, torch.Tensor) else None


def tensor_key(t: torch.Tensor):
    """The same key for two tensors that are one (the same memory, shape and dtype), whatever
    object holds them; None where memory does not say (empty, meta)."""
    if not t.numel() or t.device.type == "meta":
        return None
    try:
        return t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())
    except RuntimeError:  # a tensor without storage (a functional wrapper)
        return None


def as_f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def affine_of(gamma, beta, mean: torch.Tensor, var: torch.Tensor, eps: float) -> Affine:
    """s·x + t of a BN from its tensors; γ/β None (affine=False) mean 1 and 0."""
    channels = mean.shape[0]
    return bn_affine(as_f64(gamma) if gamma is not None else np.ones(channels),
                     as_f64(beta) if beta is not None else np.zeros(channels), as_f64(mean), as_f64(var), float(eps))


def fold_tensors(weight: torch.Tensor, bias: torch.Tensor | None, affine: Affine, axis: int, groups: int,
                 what: str) -> tuple[np.ndarray, np.ndarray]:
    """A layer's new weight and bias, in float64 and cast once to its dtype (nothing written yet)."""
    out_channels = weight.shape[axis] * (groups if axis == 1 else 1)
    if out_channels != affine.scale.shape[0]:
        raise Skip(f"BN has {affine.scale.shape[0]} channels but {what} outputs {out_channels}")
    # bfloat16 has no numpy dtype: check the range in float32 and let torch round to bf16
    np_dtype = np.float32 if weight.dtype == torch.bfloat16 else torch.empty((), dtype=weight.dtype).numpy().dtype
    return (cast_exact(scale_weight(as_f64(weight), affine.scale, axis=axis, groups=groups), np_dtype, "weight"),
            cast_exact(fold_bias(as_f64(bias) if bias is not None else None, affine), np_dtype, "bias"))


def write_params(layer: nn.Module, new_w: np.ndarray, new_b: np.ndarray | None) -> None:
    weight = layer.weight
    with torch.no_grad():
        weight.copy_(torch.from_numpy(new_w).to(weight.device, weight.dtype))
        if new_b is None:
            return
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.from_numpy(new_b).to(weight.device, weight.dtype))
        else:
            layer.bias.copy_(torch.from_numpy(new_b).to(weight.device, weight.dtype))


