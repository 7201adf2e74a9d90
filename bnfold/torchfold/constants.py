"""Values an fx graph computes from constants alone, evaluated once in float64.

A per-channel affine `x·S + T` is a BN when S and T depend on no input: FrozenBatchNorm2d computes
them from its buffers in its forward (`w · rsqrt(σ² + ε)`, `b − μ·scale`, reshaped to [1, C, 1, 1]).
Their subgraph is evaluated here from the module's tensors cast to float64, so the fold uses the
exact values rather than their float32 roundings; casts between float dtypes inside it are passed
over for that reason. The subgraph is bounded (nodes, elements): anything larger is not a BN.
"""
from __future__ import annotations

import torch
import torch.fx

from .params import attr_at
from .site_rule import per_channel
from .vocabulary import FLOAT_CASTS, RANDOM, SHAPE_READS, op_name

MAX_NODES = 32
MAX_ELEMENTS = 1 << 20


def affine_of_constants(gm: torch.fx.GraphModule, x, scale, shift):
    """((Affine, axis from the end), tensor paths read) when x·scale + shift is a per-channel
    affine of the non-constant x; None otherwise."""
    if not isinstance(x, torch.fx.Node) or _constant(x, set()):
        return None
    nodes: set = set()
    if not (_constant(scale, nodes) and _constant(shift, nodes)) or len(nodes) > MAX_NODES:
        return None
    values: dict = {}
    found = _per_channel(lambda v: _evaluate(gm, v, values), scale, shift)
    paths = sorted(n.target for n in nodes if isinstance(n, torch.fx.Node) and n.op == "get_attr")
    return (found, paths) if found is not None else None


def _per_channel(evaluate, scale, shift):
    """S and T evaluated, as one per-channel affine (site_rule.per_channel), or None."""
    try:
        s, t = evaluate(scale), evaluate(shift)
    except Exception:  # noqa: BLE001 — a subgraph that cannot be evaluated here is not a BN
        return None
    if not all(isinstance(v, torch.Tensor) and v.is_floating_point() for v in (s, t)):
        return None
    return per_channel(s.numpy(), t.numpy())


def is_constant(node) -> bool:
    return _constant(node, set())


def _constant(value, seen: set) -> bool:
    """Whether `value` depends on no graph input (collects the nodes it is computed from)."""
    if not isinstance(value, torch.fx.Node):
        if isinstance(value, (list, tuple)):
            return all(_constant(v, seen) for v in value)
        return isinstance(value, (int, float, bool, type(None), torch.dtype, torch.Tensor))
    if value in seen:
        return True
    if value.op == "get_attr":
        seen.add(value)
        return True
    if value.op not in ("call_function", "call_method"):
        return False
    name = op_name(value.target)
    if name in RANDOM:
        return False
    if name in FLOAT_CASTS:  # `.to(x.dtype)`: the cast's target is not part of the value
        if any(isinstance(a, torch.dtype) and not a.is_floating_point for a in (*value.args, *value.kwargs.values())):
            return False
        args = value.args[:1]
    elif name == "getattr" or name in SHAPE_READS:
        return False
    else:
        args = (*value.args, *value.kwargs.values())
    seen.add(value)
    return all(_constant(a, seen) for a in args)


def _evaluate(gm, value, values: dict):
    if isinstance(value, (list, tuple)):
        return type(value)(_evaluate(gm, v, values) for v in value)
    if not isinstance(value, torch.fx.Node):
        return value
    if value in values:
        return values[value]
    if value.op == "get_attr":
        tensor = attr_at(gm, value.target)
        if not isinstance(tensor, torch.Tensor) or tensor.numel() > MAX_ELEMENTS:
            raise ValueError("not a small tensor")
        result = tensor.detach().to("cpu", torch.float64) if tensor.is_floating_point() else tensor.detach().cpu()
    elif op_name(value.target) in FLOAT_CASTS:
        result = _evaluate(gm, value.args[0], values)
    else:
        args = _evaluate(gm, value.args, values)
        kwargs = {k: _evaluate(gm, v, values) for k, v in value.kwargs.items()}
        with torch.no_grad():
            result = value.target(*args, **kwargs) if value.op == "call_function" \
                else getattr(args[0], value.target)(*args[1:], **kwargs)
    if isinstance(result, torch.Tensor) and result.numel() > MAX_ELEMENTS:
        raise ValueError("too large")
    values[value] = result
    return result


# -- the same, on a TorchScript graph ----------------------------------------------------------


def script_affine(values, x, scale, shift):
    """((Affine, axis from the end), tensor paths read) when x·scale + shift, in a TorchScript
    graph (`values`: its script_graph.Values), is a per-channel affine of the non-constant x."""
    nodes: set = set()
    if _script_constant(values, x, set()) or not (_script_constant(values, scale, nodes)
                                                   and _script_constant(values, shift, nodes)):
        return None
    if len(nodes) > MAX_NODES:
        return None
    memo: dict = {}
    found = _per_channel(lambda v: _script_evaluate(values, v, memo), scale, shift)
    paths = sorted({values.path(v) for n in nodes for v in n.outputs() if values.path(v)})
    return (found, paths) if found is not None else None


def _script_constant(values, value, seen: set) -> bool:
    node = value.node()
    kind = node.kind()
    if node in seen or kind == "prim::Constant" or values.path(value) is not None:
        seen.add(node)
        return True
    if kind == "prim::ListConstruct" or (kind.startswith("aten::") and op_name(kind) not in (*SHAPE_READS, *RANDOM)):
        inputs = list(node.inputs())[:1] if op_name(kind) in FLOAT_CASTS else list(node.inputs())
        seen.add(node)
        return all(_script_constant(values, v, seen) for v in inputs)
    return False


def _script_evaluate(values, value, memo: dict):
    if value.unique() in memo:
        return memo[value.unique()]
    node, kind = value.node(), value.node().kind()
    if kind == "prim::Constant":
        result = value.toIValue()
    elif values.path(value) is not None and isinstance(attr_at(values.module, values.path(value)), (float, int)):
        result = attr_at(values.module, values.path(value))  # a scripted module's `eps`
    elif values.path(value) is not None:
        tensor = attr_at(values.module, values.path(value))
        if not isinstance(tensor, torch.Tensor) or tensor.numel() > MAX_ELEMENTS:
            raise ValueError("not a small tensor")
        result = tensor.detach().to("cpu", torch.float64) if tensor.is_floating_point() else tensor.detach().cpu()
    elif kind == "prim::ListConstruct":
        result = [_script_evaluate(values, v, memo) for v in node.inputs()]
    elif op_name(kind) in FLOAT_CASTS:
        result = _script_evaluate(values, node.inputsAt(0), memo)
    else:
        result = _call_schema(node, [_script_evaluate(values, v, memo) for v in node.inputs()])
    if isinstance(result, torch.Tensor) and result.numel() > MAX_ELEMENTS:
        raise ValueError("too large")
    memo[value.unique()] = result
    return result


def _call_schema(node, args: list):
    """Run a TorchScript node's op in Python: its schema says which arguments are keyword-only
    (TorchScript passes them by position)."""
    schema = torch._C.parse_schema(node.schema())
    packet = getattr(torch.ops.aten, schema.name.rpartition("::")[2])
    op = getattr(packet, schema.overload_name or "default")
    positional = [a for a, arg in zip(args, schema.arguments) if not arg.kwarg_only]
    keywords = {arg.name: a for a, arg in zip(args, schema.arguments) if arg.kwarg_only}
    with torch.no_grad():
        return op(*positional, **keywords)
