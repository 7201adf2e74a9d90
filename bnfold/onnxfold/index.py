"""An index over an ONNX model for folding: producers, uses, constants, shapes, edits.

Names are counted across the whole model (main graph and every If/Loop/Scan body), so a
value that a subgraph reads from the outer graph counts as used there. Edits are recorded
and applied to the protobuf once, at the end, so indices stay valid while we work.
"""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .io import EXTERNAL_THRESHOLD, iter_graphs, iter_tensors, tensor_to_array
from .wire import point_to_external


class NotConstant(Exception):
    """The value is computed at run time; str() says where it comes from."""


@dataclass(eq=False)
class Scope:
    """One graph: the main graph or a subgraph, with the scope it is nested in."""

    graph: onnx.GraphProto
    parent: "Scope | None"
    path: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    producers: dict[str, onnx.NodeProto] = field(default_factory=dict)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    inputs: set[str] = field(default_factory=set)
    outputs: set[str] = field(default_factory=set)
    removed: set[int] = field(default_factory=set)  # id() of nodes to delete
    inserted_after: dict[int, list[onnx.NodeProto]] = field(default_factory=dict)
    dropped_initializers: set[str] = field(default_factory=set)
    dead_names: set[str] = field(default_factory=set)

    def __post_init__(self):
        self.nodes = list(self.graph.node)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.inputs = {i.name for i in self.graph.input}
        self.outputs = {o.name for o in self.graph.output}
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producers[out] = node


def find_producer(scope: Scope, name: str) -> tuple[Scope, onnx.NodeProto] | None:
    """The node that computes `name`, looked up from `scope` outwards, and its scope; None for
    an initializer, a graph input or an unknown name."""
    s: Scope | None = scope
    while s is not None:
        if name in s.producers:
            return s, s.producers[name]
        if name in s.initializers or name in s.inputs:
            return None
        s = s.parent
    return None


class ModelIndex:
    def __init__(self, model: onnx.ModelProto, base_dir: Path | str = ".", spill: "TensorSpill | None" = None,
                 evaluator=None):
        """`evaluator(index)` makes what evaluates a value computed from constants (the fold pass
        passes const_eval.ConstantEvaluator); without it such values are NotConstant."""
        self.model = model
        self.base_dir = Path(base_dir)
        self.spill = spill
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.scopes: list[Scope] = []
        self.uses: Counter[str] = Counter()
        self._collect(model.graph, None, "")
        self._types: dict[str, onnx.TypeProto] | None = None
        self._names = {n for s in self.scopes for n in (*s.producers, *s.initializers, *s.inputs)}
        # (scope, producer, name) → array, or NotConstant
        self.evaluate_constant = evaluator(self) if evaluator is not None else None

    def _collect(self, graph: onnx.GraphProto, parent: Scope | None, path: str) -> None:
        scope = Scope(graph, parent, path)
        self.scopes.append(scope)
        self.uses.update(o.name for o in graph.output)
        for node in scope.nodes:
            self.uses.update(i for i in node.input if i)
            for attr in node.attribute:
                subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for k, sub in enumerate(subgraphs):
                    suffix = f"{attr.name}[{k}]" if attr.type == onnx.AttributeProto.GRAPHS else attr.name
                    prefix = f"{path}/" if path else ""
                    self._collect(sub, scope, f"{prefix}{node.name or node.op_type}/{suffix}")

    # -- names ------------------------------------------------------------------------------

    def unique_name(self, base: str) -> str:
        name, k = base, 1
        while name in self._names:
            name, k = f"{base}_{k}", k + 1
        self._names.add(name)
        return name

    # -- constants --------------------------------------------------------------------------

    def constant(self, scope: Scope, name: str) -> np.ndarray:
        """The numeric value of `name` if it is known before run time; NotConstant(reason) if not."""
        value = self._lookup(scope, name)
        if value.dtype.kind in "OSU":  # strings: nothing a fold can scale
            raise NotConstant(f"{name!r} holds {value.dtype} values, not numbers")
        return value

    def _lookup(self, scope: Scope, name: str) -> np.ndarray:
        s: Scope | None = scope
        while s is not None:
            if name in s.initializers:
                # An initializer also listed as a graph input (old exporters) is treated as constant.
                return tensor_to_array(s.initializers[name], self.base_dir)
            if name in s.producers:
                return self._constant_from_node(s, s.producers[name], name)
            if name in s.inputs:
                raise NotConstant(f"{name!r} is a graph input")
            s = s.parent
        raise NotConstant(f"{name!r} is not defined in the graph")

    def _constant_from_node(self, scope: Scope, node: onnx.NodeProto, name: str) -> np.ndarray:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            if len(node.attribute) != 1:
                raise NotConstant(f"{name!r} comes from a Constant with {len(node.attribute)} attributes")
            attr = node.attribute[0]
            if attr.name == "value":
                return tensor_to_array(attr.t, self.base_dir)
            if attr.name == "sparse_value":
                raise NotConstant(f"{name!r} is a sparse constant")
            return np.asarray(helper.get_attribute_value(attr))
        if node.op_type == "Identity" and node.domain in ("", "ai.onnx"):
            return self.constant(scope, node.input[0])
        if node.op_type == "DequantizeLinear":
            raise NotConstant(f"{name!r} is quantized (DequantizeLinear); fold before quantizing")
        if self.evaluate_constant is not None:
            return self.evaluate_constant(scope, node, name)
        raise NotConstant(f"{name!r} is computed by {node.op_type} {node.name!r}")

    def owner_of_initializer(self, scope: Scope, name: str) -> Scope | None:
        s: Scope | None = scope
        while s is not None:
            if name in s.initializers:
                return s
            if name in s.producers or name in s.inputs:
                return None
            s = s.parent
        return None

    # -- shapes -----------------------------------------------------------------------------

    def shape(self, name: str) -> list[int | str | None] | None:
        """Static shape of a value (ints, symbolic names or None per dim), or None if unknown."""
        if self._types is None:
            self._types = infer_types(self.model)
        t = self._types.get(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        dims = []
        for d in t.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
        return dims

    def elem_type(self, name: str) -> int | None:
        """ONNX element type of a value, or None if unknown."""
        if self._types is None:
            self._types = infer_types(self.model)
        t = self._types.get(name)
        return t.tensor_type.elem_type if t is not None and t.HasField("tensor_type") else None

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    # -- edits ------------------------------------------------------------------------------

    def add_initializer(self, scope: Scope, base_name: str, array: np.ndarray) -> str:
        name = self.unique_name(base_name)
        tensor = self.make_tensor(array, name)
        scope.graph.initializer.append(tensor)
        scope.initializers[name] = scope.graph.initializer[-1]
        if self.model.ir_version < 4:  # old IR: every initializer must also be a graph input
            scope.graph.input.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape)))
            scope.inputs.add(name)
        return name

    def make_tensor(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        if self.spill is not None and array.nbytes >= EXTERNAL_THRESHOLD:
            return self.spill.write(array, name)
        return numpy_helper.from_array(array, name)

    def replace_input(self, scope: Scope, node: onnx.NodeProto, index: int, array: np.ndarray, base: str) -> None:
        """Set input `index` of `node` to a constant, reusing its initializer if we own it alone."""
        while len(node.input) <= index:
            node.input.append("")
        old = node.input[index]
        owner = self.owner_of_initializer(scope, old) if old else None
        if owner is scope and self.uses[old] == 1 and old not in scope.outputs \
                and old not in scope.inputs and _same_layout(scope.initializers[old], array):
            scope.initializers[old].CopyFrom(self.make_tensor(array, old))
            return
        node.input[index] = self.add_initializer(scope, f"{old or base}_bnfold", array)
        self.uses[node.input[index]] += 1
        if old:
            self.release(scope, old)

    def release(self, scope: Scope, name: str) -> None:
        """One use of `name` went away; drop the constant that produced it if now unused."""
        self.uses[name] -= 1
        if self.uses[name] > 0:
            return
        s: Scope | None = scope
        while s is not None:
            if name in s.initializers:
                s.dropped_initializers.add(name)
                return
            node = s.producers.get(name)
            if node is not None:
                if node.op_type in ("Constant", "Identity") and len(node.output) == 1:
                    self.remove_node(s, node)
                return
            if name in s.inputs:
                return
            s = s.parent

    def remove_node(self, scope: Scope, node: onnx.NodeProto) -> None:
        """Delete `node` and release its inputs; an output name another node now produces
        (a fold hands the BN's output to the layer) stays with that node."""
        scope.removed.add(id(node))
        for out in node.output:
            if scope.producers.get(out) is node:
                del scope.producers[out]
        for name in node.input:
            if name:
                self.release(scope, name)

    def insert_after(self, scope: Scope, anchor: onnx.NodeProto, node: onnx.NodeProto) -> None:
        scope.inserted_after.setdefault(id(anchor), []).append(node)
        for out in node.output:
            scope.producers[out] = node
        self.uses.update(i for i in node.input if i)

    def apply(self) -> list[str]:
        """Write recorded deletions and insertions into the protobuf, innermost graphs first.

        A replaced initializer that was also a graph input (IR 3 requires it; old exporters'
        keep_initializers_as_inputs does it in any IR) leaves the inputs too: the new model runs
        with exactly the feeds the original needed. Returns the names of such inputs.
        """
        dropped_inputs = []
        for scope in reversed(self.scopes):
            graph = scope.graph
            for i in range(len(scope.nodes) - 1, -1, -1):
                key = id(scope.nodes[i])
                for node in reversed(scope.inserted_after.get(key, [])):
                    graph.node.insert(i + 1, node)
                if key in scope.removed:
                    del graph.node[i]
            _delete_where(graph.initializer, lambda t: t.name in scope.dropped_initializers)
            dropped_inputs += [v.name for v in graph.input if v.name in scope.dropped_initializers]
            _delete_where(graph.input, lambda v: v.name in scope.dropped_initializers)
            _delete_where(graph.value_info, lambda v: v.name in scope.dead_names)
        return dropped_inputs


class TensorSpill:
    """Folded payloads written to a scratch file as they are made, so a fold of a large
    model never holds more than one new tensor in memory. Tensors point at the file by an
    absolute external-data location, which save_onnx rewrites when it streams them out."""

    def __init__(self, directory: Path | str):
        self.path = Path(directory).resolve() / "folded.bin"
        self._file = open(self.path, "ab")

    def write(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        tensor = onnx.TensorProto(name=name, dims=array.shape,
                                  data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        if sys.byteorder != "little" or not helper.tensor_dtype_to_np_dtype(tensor.data_type) == array.dtype:
            tensor = numpy_helper.from_array(array, name)  # let onnx handle the unusual layouts
            payload = tensor.raw_data
        else:
            payload = np.ascontiguousarray(array).data
        offset = self._file.tell()
        self._file.write(payload)
        self._file.flush()
        point_to_external(tensor, str(self.path), offset, self._file.tell() - offset)
        return tensor

    def close(self) -> None:
        self._file.close()


def _delete_where(repeated, predicate) -> None:
    for i in range(len(repeated) - 1, -1, -1):
        if predicate(repeated[i]):
            del repeated[i]


def _same_layout(tensor: onnx.TensorProto, array: np.ndarray) -> bool:
    return list(tensor.dims) == list(array.shape) and \
        tensor.data_type == helper.np_dtype_to_tensor_dtype(array.dtype)


def infer_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Run ONNX shape inference without copying the weights: large payloads are set aside."""
    stash: list[tuple[onnx.TensorProto, bytes]] = []
    for tensor in iter_tensors(model):
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_THRESHOLD:
            stash.append((tensor, tensor.raw_data))
            tensor.ClearField("raw_data")
    try:
        try:
            inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
        except Exception:  # inference is a help, never a reason to fail
            inferred = model
        types: dict[str, onnx.TypeProto] = {}
        for graph in iter_graphs(inferred.graph):
            for vi in (*graph.input, *graph.value_info, *graph.output):
                types[vi.name] = vi.type
            for t in graph.initializer:
                types.setdefault(t.name, helper.make_tensor_type_proto(t.data_type, list(t.dims)))
        return types
    finally:
        for tensor, payload in stash:
            tensor.raw_data = payload
