"""Tiny ONNX graphs built in code, and independent ways to run them.

The references here never call bnfold: the unfused model runs in onnxruntime with every
graph optimization disabled (or in onnx's reference evaluator where ORT has no kernel), and
BN itself is recomputed in numpy float64.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ORT_MAX_OPSET = 26


def init(name: str, array) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def bn_inits(prefix: str, channels: int, rng: np.random.Generator, dtype=np.float32) -> list[TensorProto]:
    """Non-trivial BN parameters: γ around 1, β, μ spread out, σ² in [0.3, 2]."""
    return [
        init(f"{prefix}_scale", rng.uniform(0.5, 1.5, channels).astype(dtype)),
        init(f"{prefix}_B", rng.normal(0, 0.5, channels).astype(dtype)),
        init(f"{prefix}_mean", rng.normal(0, 0.5, channels).astype(dtype)),
        init(f"{prefix}_var", rng.uniform(0.3, 2.0, channels).astype(dtype)),
    ]


def bn_node(x: str, y: str, prefix: str = "bn", epsilon: float = 1e-5, **attrs) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization",
                            [x, f"{prefix}_scale", f"{prefix}_B", f"{prefix}_mean", f"{prefix}_var"],
                            [y], name=prefix, epsilon=epsilon, **attrs)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17, ir_version: int | None = None,
               value_info=()) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers),
                              value_info=list(value_info))
    opsets = [helper.make_opsetid("", opset)]
    ir = ir_version or min(10, helper.find_min_ir_version_for(opsets))
    model = helper.make_model(graph, opset_imports=opsets, ir_version=ir)
    if ir < 4:  # IR 3 requires every initializer to be a graph input too
        listed = {i.name for i in model.graph.input}
        model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                 for t in model.graph.initializer if t.name not in listed)
    _fill_output_types(model.graph, onnx.shape_inference.infer_shapes(model).graph)
    if any(not o.type.tensor_type.HasField("shape") for o in model.graph.output):
        _fill_output_shapes_by_running(model)
    return model


def _fill_output_shapes_by_running(model: onnx.ModelProto) -> None:
    """Old opsets lack some shape inference; the checker still wants output shapes."""
    feeds = {}
    for i in model.graph.input:
        dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
        feeds[i.name] = np.zeros(dims, helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
    for out, value in zip(model.graph.output, run(model, feeds)):
        if not out.type.tensor_type.HasField("shape"):
            out.type.CopyFrom(helper.make_tensor_type_proto(out.type.tensor_type.elem_type, value.shape))


def _fill_output_types(graph: onnx.GraphProto, inferred: onnx.GraphProto) -> None:
    """Outputs declared without a shape get the inferred type (the checker wants one)."""
    types = {v.name: v.type for v in (*inferred.value_info, *inferred.output)}
    for out in graph.output:
        if not out.type.tensor_type.HasField("shape") and out.name in types:
            out.type.CopyFrom(types[out.name])
    for node, inferred_node in zip(graph.node, inferred.node):
        for attr, inferred_attr in zip(node.attribute, inferred_node.attribute):
            if attr.type == onnx.AttributeProto.GRAPH:
                _fill_output_types(attr.g, inferred_attr.g)


def vi(name: str, shape, elem=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of `model`, unoptimized: onnxruntime, or onnx's reference evaluator as fallback."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset <= ORT_MAX_OPSET:
        try:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            so.intra_op_num_threads = 1
            so.log_severity_level = 3
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return sess.run(None, feeds)
        except Exception as exc:  # no kernel for this op/dtype in ORT
            if "NOT_IMPLEMENTED" not in str(exc) and "Could not find an implementation" not in str(exc):
                raise
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, feeds)


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also returns the named intermediate values."""
    m = copy.deepcopy(model)
    for name in names:
        m.graph.output.append(helper.make_empty_tensor_value_info(name))
    return m


def numpy_bn(x: np.ndarray, scale, bias, mean, var, epsilon: float) -> np.ndarray:
    """BN at inference over axis 1, in float64 (Ioffe & Szegedy, Alg. 2 line 11)."""
    shape = [1] * x.ndim
    shape[1] = -1
    f = lambda a: np.asarray(a, dtype=np.float64).reshape(shape)  # noqa: E731
    eps = np.float64(np.float32(epsilon))
    return f(scale) * (x.astype(np.float64) - f(mean)) / np.sqrt(f(var) + eps) + f(bias)


def bn_count(model: onnx.ModelProto) -> int:
    from bnfold.onnxfold.io import iter_graphs

    return sum(n.op_type == "BatchNormalization" for g in iter_graphs(model.graph) for n in g.node)
