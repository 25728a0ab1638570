"""Small graphsurgeon helpers so passes never rewire edge lists by hand."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import EncodeError

# the name suffix of the float MatMul that passes/fc2_hadamard.py puts before fc2: part of an exact rewrite, not a
# model layer, so annotate looks through it and the planner keeps it float
HADAMARD_SUFFIX = ".hadamard"


def const_value(t: gs.Tensor | None) -> np.ndarray | None:
    """The value of ``t`` if it is a constant (initializer or Constant-node output), else None."""
    if t is None:
        return None
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        node = t.inputs[0]
        val = node.attrs.get("value")
        if isinstance(val, gs.Constant):
            return np.asarray(val.values)
        for key in ("value_float", "value_int"):
            if key in node.attrs:
                return np.asarray(node.attrs[key])
        for key in ("value_floats", "value_ints"):
            if key in node.attrs:
                return np.asarray(node.attrs[key])
    return None


def static_shape(shape) -> list[int] | None:
    """``shape`` as ints when every dim is a known positive integer, else None."""
    if shape is None or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
        return None
    return [int(d) for d in shape]


def last_dim(t: gs.Tensor) -> int | None:
    """The size of ``t``'s last axis when it is a known integer, else None."""
    return t.shape[-1] if t.shape and isinstance(t.shape[-1], (int, np.integer)) else None


def replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    """Every input slot of ``node`` that holds ``old`` takes ``new``."""
    for i, t in enumerate(list(node.inputs)):
        if t is old:
            node.inputs[i] = new


def is_scalar_const(t: gs.Tensor | None, value: float, rtol: float = 1e-4) -> bool:
    v = const_value(t)
    return v is not None and v.size == 1 and bool(np.isclose(float(v.reshape(())), value, rtol=rtol, atol=0.0))


def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if len(t.inputs) == 1 else None


def consumers(t: gs.Tensor) -> list[gs.Node]:
    return list(t.outputs)


def single_consumer(t: gs.Tensor, graph_outputs: set[str]) -> gs.Node | None:
    """The only consumer of ``t``, or None when it has several or is a graph output (then it must survive)."""
    if t.name in graph_outputs or len(t.outputs) != 1:
        return None
    return t.outputs[0]


def other_input(node: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    """For a binary node, the input that is not ``t`` (None if ``t`` is not an input or both are ``t``)."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if a is t and b is not t:
        return b
    if b is t and a is not t:
        return a
    return None


def replace_subgraph(first_nodes: Iterable[gs.Node], last: gs.Node, new_node: gs.Node, graph: gs.Graph) -> None:
    """Make ``new_node`` produce ``last``'s outputs (same tensor objects, same names) and detach ``last``.

    The now-dead nodes are removed by ``graph.cleanup()`` at the end of the pass.
    """
    outs = list(last.outputs)
    last.outputs.clear()
    new_node.outputs = outs
    graph.nodes.append(new_node)


class UniqueNames:
    """Names for new nodes and tensors that nothing in the graph uses yet.

    Fused nodes are named after the node they replace, and exporters may leave names empty or repeat them; ONNX
    Runtime refuses two nodes of one name, and two tensors of one name make an invalid graph.
    """

    def __init__(self, graph: gs.Graph):
        self.taken = {n.name for n in graph.nodes} | {t.name for n in graph.nodes for t in (*n.inputs, *n.outputs)}
        self.taken |= {t.name for t in (*graph.inputs, *graph.outputs)}

    def __call__(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name


PROTOBUF_LIMIT = 2**31 - 1  # bytes: protobuf cannot serialize a larger message (ONNX models above it use external data)
LARGE_TENSOR_BYTES = 1 << 20  # initializers shape inference sees without their data, in models over the limit


def over_protobuf_limit(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is too large to serialize in one piece (past 2 GiB protobuf cannot even size it)."""
    try:
        return model.ByteSize() > PROTOBUF_LIMIT
    except EncodeError:
        return True


def _data_bytes(t: onnx.TensorProto) -> int:
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 0
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference (with data propagation), also for models over protobuf's 2 GiB limit.

    Those are inferred without the data of their large initializers (inference needs only types and shapes); the
    data then moves to the returned model, so ``model`` itself is left without it: use the result in its place.
    """
    if not over_protobuf_limit(model):
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    held = {}
    for t in model.graph.initializer:
        if t.HasField("raw_data") and _data_bytes(t) > LARGE_TENSOR_BYTES:
            held[t.name] = t.raw_data
            t.ClearField("raw_data")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        for t in model.graph.initializer:
            if t.name in held:
                t.raw_data = held[t.name]
        raise
    for t in inferred.graph.initializer:
        if t.name in held:
            t.raw_data = held.pop(t.name)
    return inferred


def graph_output_names(graph: gs.Graph) -> set[str]:
    return {t.name for t in graph.outputs}


def finish(graph: gs.Graph) -> None:
    """Restore validity after edits: drop dead nodes/tensors and sort topologically."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
