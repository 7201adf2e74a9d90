"""Layer parameters computed at run time from constants, evaluated once.

torch's dynamo exporter (optimize=False) writes the bias of every bias-free Conv as
Expand(CastLike(0, x), Shape(W)[0:1]); the legacy exporter writes a Linear's weight as
Transpose(W). Nothing can fold into such a layer until the value is known. A value is
constant when every leaf it is computed from is an initializer or a Constant, the shape of a
tensor whose shape is static (Shape, Size), or the dtype of a tensor whose dtype is known
(CastLike's second input). Such a value is computed with onnx's reference evaluator (numpy;
never onnxruntime, whose optimizer would fold the BNs it is meant to check) one node at a
time, each node's output size predicted by shape inference before it runs.

Bounds, so that a small hostile file cannot make bnfold compute for minutes: MAX_NODES nodes
behind one value, MAX_ELEMENTS elements per value, and for the whole model together
MAX_TOTAL_ELEMENTS elements computed (counted from the predicted sizes, before anything is
allocated) and MAX_SECONDS of evaluation. Values kept for reuse take at most MAX_REMEMBERED
bytes, so memory stays below MAX_REMEMBERED plus one node's inputs and outputs. A value past a
bound is not evaluated: the BN that needed it is kept, with the bound as its reason. The pass
asks for a value only where a fold reads it; `prune` then drops the nodes that computed it
once nothing reads them, and every other constant subgraph of the model stays as it was.
"""
from __future__ import annotations

import math
import time
from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .affine import node_attr
from .index import ModelIndex, NotConstant, Scope

# Cheap, deterministic ops that exporters use to compute parameters. Anything else (a Conv, a
# random generator, a node with a subgraph) is not evaluated.
EVALUATED_OPS = frozenset({
    "Identity", "Cast", "CastLike", "Reshape", "Expand", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
    "Concat", "Slice", "Gather", "Shape", "Size", "Add", "Sub", "Mul", "Div", "Neg", "Sqrt", "Reciprocal",
    "Pow", "Abs", "Max", "Min", "ConstantOfShape", "Range", "Tile", "Where", "Equal",
})
MAX_NODES = 64  # nodes in the subgraph behind one value
MAX_ELEMENTS = 1 << 24  # elements of any value computed on the way (64 MB in float32)
# For the whole model: four values of the largest size. What exporters compute is far less (a
# dynamo-exported ResNet-50's 53 Conv biases: 26,560 elements; a Linear(4096, 4096) weight
# transposed: 2^24).
MAX_TOTAL_ELEMENTS = 1 << 26
MAX_SECONDS = 10.0  # of evaluation for the whole model: a backstop, the element bound comes first
MAX_REMEMBERED = 1 << 28  # bytes of values kept for reuse; the oldest go first, to be recomputed if asked again
SMALL = 1024  # elements: inputs this small reach shape inference as values (shapes, axes, repeats)

Defined = tuple[Scope, onnx.NodeProto]


class ConstantEvaluator:
    """Plugged into ModelIndex.evaluate_constant: (scope, producer, name) → array or NotConstant."""

    def __init__(self, index: ModelIndex, max_nodes: int = MAX_NODES, max_elements: int = MAX_ELEMENTS):
        self.index = index
        self.max_nodes = max_nodes
        self.max_elements = max_elements
        self.spent_elements = 0  # by every node evaluated so far, for the whole model
        self.spent_seconds = 0.0
        self.values: dict[tuple[int, str], np.ndarray] = {}
        self.failures: dict[tuple[int, str], str] = {}
        self.evaluated: list[Defined] = []  # in evaluation order: producers before consumers

    def __call__(self, scope: Scope, node: onnx.NodeProto, name: str) -> np.ndarray:
        key = (id(scope), name)
        if key in self.failures:
            raise NotConstant(self.failures[key])
        value = self.values.get(key)
        if value is None:
            try:
                for s, n in self._subgraph(scope, node):
                    self._run(s, n)
            except NotConstant as why:
                self.failures[key] = str(why)
                raise
            value = self.values[key]  # just computed: the newest, never the one evicted
        return value

    # -- what must hold ---------------------------------------------------------------------

    def _subgraph(self, scope: Scope, node: onnx.NodeProto) -> list[Defined]:
        """The nodes not yet evaluated that `node` needs, producers first; NotConstant if one
        of its leaves is known only at run time or the subgraph is over the bound."""
        order: list[Defined] = []
        seen: set[int] = set()
        stack: list[tuple[Scope, onnx.NodeProto, bool]] = [(scope, node, False)]
        while stack:
            s, n, inputs_done = stack.pop()
            if inputs_done:
                order.append((s, n))
                continue
            if id(n) in seen:
                continue
            seen.add(id(n))
            _require_evaluable(n)
            if len(seen) > self.max_nodes:
                raise NotConstant(f"{n.output[0]!r} is computed from more than {self.max_nodes} nodes")
            stack.append((s, n, True))
            for i, name in enumerate(n.input):
                producer = self._computed_input(s, n, i, name)
                if producer is not None and id(producer[1]) not in seen:
                    stack.append((*producer, False))
        return order

    def _computed_input(self, scope: Scope, node: onnx.NodeProto, i: int, name: str) -> Defined | None:
        """None if input i is a leaf this node can read now; else the node that computes it."""
        if not name or _reads_type_only(node, i) or self._cached(scope, name) is not None:
            return None
        if _reads_shape_only(node, i) and _static_shape(self.index, scope, name) is not None:
            return None
        s: Scope | None = scope
        while s is not None:
            if name in s.initializers:
                return None
            producer = s.producers.get(name)
            if producer is not None:
                if producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
                    return None
                return s, producer
            if name in s.inputs:
                raise NotConstant(f"{name!r} is a graph input")
            s = s.parent
        raise NotConstant(f"{name!r} is not defined in the graph")

    def _cached(self, scope: Scope, name: str) -> np.ndarray | None:
        """A value evaluated before, in this graph or (read from inside a subgraph) an outer one."""
        s: Scope | None = scope
        while s is not None:
            if (id(s), name) in self.values:
                return self.values[(id(s), name)]
            s = s.parent
        return None

    # -- evaluate ---------------------------------------------------------------------------

    def _run(self, scope: Scope, node: onnx.NodeProto) -> None:
        if all((id(scope), o) in self.values for o in node.output if o):
            return
        if node.op_type in ("Shape", "Size") and _static_shape(self.index, scope, node.input[0]) is not None:
            outputs = [_shape_value(node, _static_shape(self.index, scope, node.input[0]))]
        else:
            inputs = [self._input_value(scope, node, i) if name else None for i, name in enumerate(node.input)]
            model = self._single_node_model(node, inputs)
            self._spend(_predicted_elements(model, node, self.max_elements), node)
            from onnx.reference import ReferenceEvaluator  # numpy only; imported when first needed

            start = time.perf_counter()
            feeds = {f"in{i}": a for i, a in enumerate(inputs) if a is not None and not _is_small(a)}
            outputs = ReferenceEvaluator(model).run(None, feeds)
            self.spent_seconds += time.perf_counter() - start
        for name, value in zip([o for o in node.output if o], outputs):
            self._remember((id(scope), name), np.asarray(value))
        self.evaluated.append((scope, node))

    def _spend(self, elements: int, node: onnx.NodeProto) -> None:
        """The whole model's bounds, checked before the node runs."""
        if self.spent_elements + elements > MAX_TOTAL_ELEMENTS or self.spent_seconds > MAX_SECONDS:
            raise NotConstant(f"{node.op_type} {node.name!r} is past the bound on evaluating constants for the whole "
                              f"model ({MAX_TOTAL_ELEMENTS} elements in {MAX_SECONDS:g} s; "
                              f"{self.spent_elements} spent, this node needs {elements})")
        self.spent_elements += elements

    def _remember(self, key: tuple[int, str], value: np.ndarray) -> None:
        self.values[key] = value
        total = sum(v.nbytes for v in self.values.values())
        for old in list(self.values):
            if total <= MAX_REMEMBERED or old == key:
                break
            total -= self.values.pop(old).nbytes

    def _input_value(self, scope: Scope, node: onnx.NodeProto, i: int) -> np.ndarray:
        name = node.input[i]
        if _reads_type_only(node, i):
            elem = self.index.elem_type(name)
            if not elem:
                raise NotConstant(f"the dtype of {name!r} (CastLike target) is unknown")
            return np.zeros(0, helper.tensor_dtype_to_np_dtype(elem))
        cached = self._cached(scope, name)
        return cached if cached is not None else self.index.constant(scope, name)

    def _single_node_model(self, node: onnx.NodeProto, inputs: list[np.ndarray | None]) -> onnx.ModelProto:
        """`node` alone, reading in0, in1, …: small inputs as initializers (shape inference reads
        their values: a Reshape's shape, a Slice's starts), large ones as typed graph inputs fed
        at run time, so no payload is copied into a protobuf."""
        inits = [numpy_helper.from_array(a, f"in{i}") for i, a in enumerate(inputs) if a is not None and _is_small(a)]
        graph_inputs = [helper.make_tensor_value_info(f"in{i}", helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                        for i, a in enumerate(inputs) if a is not None and not _is_small(a)]
        renamed = onnx.NodeProto()
        renamed.CopyFrom(node)
        del renamed.input[:]
        renamed.input.extend(f"in{i}" if name else "" for i, name in enumerate(node.input))
        del renamed.output[:]
        renamed.output.extend(f"out{i}" if name else "" for i, name in enumerate(node.output))
        outputs = [helper.make_value_info(f"out{i}", onnx.TypeProto()) for i, name in enumerate(node.output) if name]
        graph = helper.make_graph([renamed], "constant", graph_inputs, outputs, inits)
        return helper.make_model(graph, opset_imports=list(self.index.model.opset_import),
                                 ir_version=max(self.index.model.ir_version, 4))

    # -- after folding ----------------------------------------------------------------------

    def prune(self) -> Counter[str]:
        """Drop evaluated nodes that nothing reads any more; returns the op types dropped."""
        dropped: Counter[str] = Counter()
        for scope, node in reversed(self.evaluated):
            outputs = [o for o in node.output if o]
            if id(node) in scope.removed or any(self.index.uses[o] or o in scope.outputs for o in outputs):
                continue
            self.index.remove_node(scope, node)
            scope.dead_names.update(outputs)
            dropped[node.op_type] += 1
        return dropped


def _is_small(array: np.ndarray) -> bool:
    return array.size <= SMALL or array.dtype == object  # strings have no typed-input form here


def _predicted_elements(model: onnx.ModelProto, node: onnx.NodeProto, max_elements: int) -> int:
    """The elements `node` will compute, from shape inference, before anything is allocated;
    NotConstant if a size is unknown or one value is over `max_elements`."""
    try:
        # one node whose inputs are values or typed: nothing to propagate (data_prop costs 1.8 s on a
        # 2^24-element input)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:  # noqa: BLE001 — any inference failure means "do not evaluate"
        raise NotConstant(f"{node.op_type} {node.name!r} cannot be evaluated: {str(exc)[:100]}") from None
    total = 0
    for out in inferred.graph.output:
        dims = out.type.tensor_type.shape.dim if out.type.tensor_type.HasField("shape") else None
        if dims is None or any(not d.HasField("dim_value") or d.dim_value < 0 for d in dims):
            raise NotConstant(f"the size of {node.op_type} {node.name!r}'s output is unknown before evaluating it")
        elements = math.prod(d.dim_value for d in dims)  # Python ints: no int64 overflow
        if elements > max_elements:
            raise NotConstant(f"{node.op_type} {node.name!r} would compute {elements} elements (bound: {max_elements})")
        total += elements
    return total


def _require_evaluable(node: onnx.NodeProto) -> None:
    if node.domain not in ("", "ai.onnx") or node.op_type not in EVALUATED_OPS:
        what = "quantized (DequantizeLinear); fold before quantizing" if node.op_type == "DequantizeLinear" \
            else f"computed by {node.op_type} {node.name!r}, which bnfold does not evaluate"
        raise NotConstant(f"{node.output[0]!r} is {what}")


def _reads_type_only(node: onnx.NodeProto, i: int) -> bool:
    return node.op_type == "CastLike" and i == 1


def _reads_shape_only(node: onnx.NodeProto, i: int) -> bool:
    return node.op_type in ("Shape", "Size") and i == 0


def _static_shape(index: ModelIndex, scope: Scope, name: str) -> list[int] | None:
    s: Scope | None = scope
    while s is not None:
        if name in s.initializers:
            return list(s.initializers[name].dims)
        s = s.parent
    shape = index.shape(name)
    if shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
        return None
    return shape


def _shape_value(node: onnx.NodeProto, shape: list[int]) -> np.ndarray:
    if node.op_type == "Size":
        return np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
    start, end = int(node_attr(node, "start", 0)), node_attr(node, "end", None)
    return np.array(shape[start:None if end is None else int(end)], dtype=np.int64)
