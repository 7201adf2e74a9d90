"""What torch ops compute, by name: the one table of BN ops, of layer ops and of ops that read only a
value's shape, for every graph bnfold reads (torch.fx, torch.export's ATen graph, TorchScript).

A graph names an op in its own way — `torch.nn.functional.conv2d`, `aten.conv2d.padding`,
`aten::_convolution` — but each is one of a few computations. `op_name` reduces a target to the
name of that computation ("conv2d", "batch_norm"), so a rule is written once for all of them and
any overload (a `padding="same"` conv is `aten.conv2d.padding`) is the op it overloads.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .params import attr_at


@dataclass(frozen=True)
class Signature:
    """The parameter names of an op, in order, and the defaults the rules read."""

    params: tuple[str, ...]
    defaults: tuple[tuple[str, object], ...] = ()

    def bind(self, args: tuple, kwargs: dict) -> dict:
        bound = dict(self.defaults)
        bound.update(zip(self.params, args))
        bound.update({k: v for k, v in kwargs.items() if k in self.params})
        return bound


_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_CONVOLUTION = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")
_LAYER_DEFAULTS = (("bias", None), ("groups", 1), ("transposed", False))
_BN_DEFAULTS = (("weight", None), ("bias", None), ("training", False), ("eps", 1e-5))


@dataclass(frozen=True)
class LayerOp:
    """A convolution or linear op: its signature and whether it is transposed (None: the call says)."""

    signature: Signature
    transposed: bool | None
    linear: bool = False


LAYER_OPS: dict[str, LayerOp] = {
    **{f"conv{d}d": LayerOp(Signature(_CONV, _LAYER_DEFAULTS), False) for d in (1, 2, 3)},
    **{f"conv_transpose{d}d": LayerOp(Signature(_CONV_T, _LAYER_DEFAULTS), True) for d in (1, 2, 3)},
    "convolution": LayerOp(Signature(_CONVOLUTION, _LAYER_DEFAULTS), None),
    "_convolution": LayerOp(Signature(_CONVOLUTION, _LAYER_DEFAULTS), None),
    # TorchScript's conv with a padding string ("same", "valid")
    "_convolution_mode": LayerOp(Signature(_CONV, _LAYER_DEFAULTS), False),
    "linear": LayerOp(Signature(("input", "weight", "bias"), _LAYER_DEFAULTS), False, linear=True),
}

# batch_norm as ATen/TorchScript spell it, and as torch.nn.functional does (other argument order)
BN_OPS: dict[str, Signature] = {
    "batch_norm": Signature(("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"),
                            _BN_DEFAULTS),
    "native_batch_norm": Signature(("input", "weight", "bias", "running_mean", "running_var", "training",
                                    "momentum", "eps"), _BN_DEFAULTS),
    "_native_batch_norm_legit": Signature(("input", "weight", "bias", "running_mean", "running_var", "training",
                                           "momentum", "eps"), _BN_DEFAULTS),
    "_native_batch_norm_legit_no_training": Signature(("input", "weight", "bias", "running_mean", "running_var",
                                                       "momentum", "eps"), _BN_DEFAULTS),
    "functional.batch_norm": Signature(("input", "running_mean", "running_var", "weight", "bias", "training",
                                        "momentum", "eps"), _BN_DEFAULTS),
}
# BN ops that return (output, saved mean, saved invstd): only the output may be read
TUPLE_BN_OPS = ("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training")

RESHAPES = ("flatten", "view", "reshape", "_unsafe_view")
# ops that read a value's shape, rank, dtype or device, never its values
SHAPE_READS = ("size", "dim", "numel", "sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "len",
               "shape", "ndim", "dtype", "device", "is_floating_point")
# ops that read the shape of their second argument only (LeViT's reshape_as(x))
SHAPE_OF_SECOND = ("reshape_as", "view_as", "expand_as")
MULS = ("mul", "mul_")
ADDS = ("add", "add_", "iadd")
# ops whose value is drawn anew on every call (or is uninitialized memory): never a constant
RANDOM = ("rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "bernoulli", "bernoulli_",
          "normal", "normal_", "uniform_", "random_", "exponential_", "geometric_", "cauchy_", "log_normal_",
          "multinomial", "poisson", "dropout", "dropout_", "native_dropout", "feature_dropout", "alpha_dropout",
          "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d", "rrelu", "rrelu_", "empty", "empty_like",
          "empty_strided", "new_empty", "new_empty_strided")
# casts that keep a float value a float value: transparent when constants are evaluated in float64
FLOAT_CASTS = ("to", "type", "float", "_to_copy", "type_as")

# module forwards bnfold knows: such a module computes exactly its op (subclasses that inherit forward too)
BN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)
LAYER_FORWARDS = {c.forward: c.__name__ for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                                   nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)}

QAT_REASON = ("inside {module}, a torch.ao QAT module (weights behind fake-quant): torch.ao.quantization.convert "
              "folds its BN when it converts the model; bnfold leaves QAT modules as they are")

_FUNCTIONAL_MODULES = ("torch", "torch.nn.functional", "torch._C._nn", "torch._C._VariableFunctions",
                       "torch.functional", "_operator", "operator")


def op_name(target) -> str | None:
    """The computation a graph target stands for: "conv2d", "batch_norm", "add", …, or None."""
    if target is F.batch_norm:
        return "functional.batch_norm"
    if isinstance(target, str):  # a call_method's name, or a TorchScript kind "aten::conv2d"
        return target.rpartition("::")[2]
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return target.__name__.split(".")[0]
    if target in (operator.add, operator.iadd):
        return "add"
    if target in (operator.mul, operator.imul):
        return "mul"
    if target in (getattr, operator.getitem):
        return target.__name__
    if getattr(target, "__module__", None) in _FUNCTIONAL_MODULES or target in vars(F).values():
        return getattr(target, "__name__", None)
    return None


def layer_kind(name: str, transposed: bool, weight: torch.Tensor | None) -> str:
    """Conv2d, ConvTranspose1d, Linear … from the op and its weight's rank."""
    if name == "linear":
        return "Linear"
    dims = weight.dim() - 2 if isinstance(weight, torch.Tensor) else int(name[-2]) if name[-2].isdigit() else 0
    return f"{'ConvTranspose' if transposed else 'Conv'}{dims}d"


def changed_call(module: nn.Module) -> str | None:
    """Why calling the module computes more than its class's forward, if it does: forward hooks
    (a graph shows a leaf module as one node, without them), or a forward set on the instance."""
    if "forward" in vars(module):
        return "a forward set on the instance"
    if module._forward_hooks or module._forward_pre_hooks:
        return "forward hooks"
    return None


def class_forward(module: nn.Module):
    """The forward its class defines, not looked up through descriptors: a ScriptModule's class
    attribute `forward` raises when read from the class."""
    return inspect.getattr_static(type(module), "forward", None)


def plain_bn(module: nn.Module) -> bool:
    return class_forward(module) in BN_FORWARDS and changed_call(module) is None


def plain_layer(module: nn.Module) -> str | None:
    """The layer type a module computes when its forward is torch's own (subclasses included)."""
    return LAYER_FORWARDS.get(class_forward(module)) if changed_call(module) is None else None


def qat_module(module: nn.Module) -> bool:
    """A torch.ao QAT module (weights behind fake-quant): its BN belongs to torch.ao's convert."""
    return hasattr(module, "weight_fake_quant") or type(module).__module__.startswith(
        ("torch.ao.nn.qat", "torch.ao.nn.intrinsic.qat", "torch.nn.qat", "torch.nn.intrinsic.qat"))


def qat_scope(root, path: str | None) -> str | None:
    """The QAT module holding the tensor at `path`, if one does (in any module kind: eager,
    TorchScript, an exported program's module tree)."""
    parts = (path or "").split(".")[:-1]
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        try:
            module = attr_at(root, prefix)
        except (AttributeError, RuntimeError):
            continue
        if hasattr(module, "weight_fake_quant") or (isinstance(module, nn.Module) and qat_module(module)):
            return prefix
    return None
