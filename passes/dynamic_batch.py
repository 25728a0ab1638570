"""Give a graph built at batch 1 its symbolic batch dimension back.

vitc fixes a dynamic batch dimension to 1 to fold the graph's shape arithmetic and to calibrate. Folding bakes the
batch into constants: Reshape targets ([197, 384], [64, 49, 96] for Swin's windows), Concat partners (the class
token, expanded to the batch by the exporter and folded to [1, 1, C]) and Slice ends. This pass follows the batch
axis from every input whose batch was symbolic through the graph and rewrites what would pin it:

- a Reshape's constant target gets -1 at the output axis the batch lands in (the batch is the outermost factor of
  that axis, e.g. [B*T, C] or [B*nW, N, C]);
- a batch-free constant concatenated with a batch-carrying tensor is expanded to the runtime batch
  (Shape -> Concat -> Expand);
- a Slice over the whole batch axis gets an open end.

Ops it knows are listed in the rules below; an op it does not know on the batch path, a Reshape whose batch axis
cannot be placed, or a constant that would slice, squeeze or gather the batch, stops the pass with a note, and the
graph stays at batch 1 (the caller keeps the static model). The rewrite is checked by the caller: the same samples
run at batch 1 and stacked at batch N must give the same per-sample outputs.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from vitc.passes.base import PassResult
from vitc.passes.canonicalize import refresh_shapes
from vitc.passes.graphutil import UniqueNames, const_value, static_shape

_INT64_MAX = np.iinfo(np.int64).max

# output axis = the (broadcast-aligned) batch axis of the inputs
_ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Equal", "Less", "Greater", "And", "Or", "Not",
    "Relu", "Sigmoid", "Tanh", "Erf", "Exp", "Log", "Sqrt", "Abs", "Neg", "Reciprocal", "Clip", "Cast", "Identity",
    "Gelu", "FastGelu", "BiasGelu", "HardSigmoid", "HardSwish", "LeakyRelu", "Softplus", "Mish", "Sin", "Cos",
    "QuantizeLinear", "DequantizeLinear", "Dropout", "Floor", "Ceil", "Round", "Sign", "IsNaN", "PRelu",
})
# act along an axis attribute that must not be the batch axis; output keeps the input's layout
_ALONG_AXIS = {"Softmax": -1, "LogSoftmax": -1, "LayerNormalization": -1, "SimplifiedLayerNormalization": -1,
               "RMSNormalization": -1, "Split": 0, "Hardmax": -1}
# leading axis 0 is the batch for these (NCHW images, [B, S, H] sequences)
_BATCH_FIRST = frozenset({"Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                          "BatchNormalization", "InstanceNormalization", "GroupNormalization", "QAttention",
                          "Attention", "MultiHeadAttention", "Resize", "DepthToSpace", "SpaceToDepth",
                          "LpNormalization"})
_MATMUL = frozenset({"MatMul", "MatMulInteger", "Gemm", "QLinearMatMul", "FusedMatMul", "MatMulIntegerToFloat"})
_REDUCE = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1",
                     "ReduceSumSquare", "ArgMax", "ArgMin"})


class BatchUnknown(Exception):
    """The batch axis cannot be followed through this node."""


def _rank(t: gs.Tensor) -> int | None:
    return None if t.shape is None else len(t.shape)


class DynamicBatch:
    """Rewrite a batch-1 graph so that the inputs in ``symbols`` (input name -> dim name) take any batch."""

    name: ClassVar[str] = "dynamic_batch"

    def __init__(self, symbols: dict[str, str]):
        self.symbols = dict(symbols)

    def run(self, graph: gs.Graph) -> PassResult:
        inputs = [t for t in graph.inputs if t.name in self.symbols]
        if not inputs:
            return PassResult(self.name, False, {}, ["no input has a dynamic batch: nothing to do"])
        if len(set(self.symbols.values())) > 1:  # e.g. images [B, ...] and texts [K, ...]: two independent sizes
            return PassResult(self.name, False, {"kept": 0},
                              [f"batch stays fixed: inputs have different batch dims {sorted(set(self.symbols.values()))}"])
        snapshot = graph.copy()
        refresh_shapes(graph)
        self.names = UniqueNames(graph)
        self.counts = {"Reshape targets": 0, "constants expanded": 0, "Slice ends opened": 0}
        try:
            graph.toposort()
            axis: dict[str, int] = {t.name: 0 for t in inputs}
            for node in list(graph.nodes):
                carried = [(i, axis[t.name]) for i, t in enumerate(node.inputs) if t.name in axis]
                if not carried:
                    continue
                try:
                    out_axes = self._out_axes(graph, node, carried, axis)
                except BatchUnknown:
                    raise
                except Exception as exc:  # a rule met a shape it cannot read: the same answer, never a crash
                    raise BatchUnknown(f"{node.op} node {node.name!r}: {type(exc).__name__}: {exc}") from None
                for t, a in zip(node.outputs, out_axes):
                    if a is not None:
                        axis[t.name] = a
        except BatchUnknown as exc:
            graph.nodes, graph.inputs, graph.outputs = snapshot.nodes, snapshot.inputs, snapshot.outputs
            return PassResult(self.name, False, {"kept": 0}, [f"batch stays fixed: {exc}"])
        sym = next(iter(self.symbols.values()))
        for t in inputs:
            t.shape = [self.symbols[t.name], *t.shape[1:]]
        for t in graph.outputs:
            if t.name in axis and t.shape is not None:
                shape = list(t.shape)
                shape[axis[t.name]] = sym
                t.shape = shape
        out_names = {t.name for t in graph.outputs}
        for t in graph.tensors().values():  # batch-1 intermediate shapes would be stale value_info
            if isinstance(t, gs.Variable) and t.name not in out_names and t not in inputs and t.name in axis:
                t.shape = None
        graph.cleanup().toposort()
        return PassResult(self.name, True, {"dynamic inputs": len(inputs), **self.counts})

    # ---- per-op rules: the batch axis of each output, rewriting constants on the way ----
    def _out_axes(self, graph: gs.Graph, node: gs.Node, carried: list[tuple[int, int]], axis: dict) -> list:
        op = node.op
        out = node.outputs
        r_out = _rank(out[0]) if out else None
        if op in _ELEMENTWISE or op in _ALONG_AXIS:
            if r_out is None:
                raise BatchUnknown(f"{op} node {node.name!r}: output rank unknown")
            aligned = {r_out - _rank(node.inputs[i]) + a for i, a in carried}
            if len(aligned) != 1:
                raise BatchUnknown(f"{op} node {node.name!r}: inputs carry the batch on different axes")
            a = aligned.pop()
            carriers = {i for i, _ in carried}
            for i, t in enumerate(node.inputs):
                if i in carriers or not t.name or t.shape is None:
                    continue
                b = a - (r_out - len(t.shape))
                if b >= 0 and t.shape[b] != 1 and op not in ("QuantizeLinear", "DequantizeLinear"):
                    raise BatchUnknown(f"{op} node {node.name!r}: input {t.name!r} has {t.shape[b]} rows on the "
                                       "batch axis")
            if op in _ALONG_AXIS and _ALONG_AXIS[op] is not None:
                ax = node.attrs.get("axis", _ALONG_AXIS[op]) % r_out
                if op in ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"):
                    if a >= ax:
                        raise BatchUnknown(f"{op} node {node.name!r} normalizes over the batch axis")
                elif ax == a:
                    raise BatchUnknown(f"{op} node {node.name!r} acts along the batch axis")
            if op in ("QuantizeLinear", "DequantizeLinear") and len(node.inputs) > 1:
                s = const_value(node.inputs[1])
                if s is not None and s.size > 1 and node.attrs.get("axis", 1) % r_out == a:
                    raise BatchUnknown(f"{op} node {node.name!r} is per-channel along the batch axis")
            return [a] * len(out)
        if op in _BATCH_FIRST:
            if any(a != 0 for _, a in carried):
                raise BatchUnknown(f"{op} node {node.name!r}: batch not on axis 0")
            if op == "Resize" and len(node.inputs) > 3 and node.inputs[3].name:
                raise BatchUnknown(f"Resize node {node.name!r} has fixed output sizes")
            return [0] * len(out)
        if op in _MATMUL:
            a_ax = dict(carried)
            if 0 in a_ax and 1 in a_ax and op == "MatMul":
                r_a, r_b = _rank(node.inputs[0]), _rank(node.inputs[1])
                if r_a < 3 or r_b < 3 or r_out - r_a + a_ax[0] != r_out - r_b + a_ax[1] or a_ax[1] >= r_b - 2:
                    raise BatchUnknown(f"MatMul node {node.name!r}: its operands carry the batch on different axes")
            if 0 in a_ax:
                r_a = _rank(node.inputs[0])
                a = a_ax[0]
                if op == "Gemm" and node.attrs.get("transA", 0):
                    raise BatchUnknown(f"Gemm node {node.name!r} transposes its batch-carrying input")
                if r_a is not None and r_a >= 2 and a == r_a - 1:
                    raise BatchUnknown(f"{op} node {node.name!r} contracts over the batch axis")
                return [r_out - r_a + a]
            (i, a), = carried  # only the second operand: a batched right side of a broadcast matmul
            r_b = _rank(node.inputs[i])
            if op == "MatMul" and i == 1 and r_b >= 3 and a < r_b - 2:
                b = r_out - r_b + a
                x = node.inputs[0].shape
                if x is not None and b - (r_out - len(x)) >= 0 and x[b - (r_out - len(x))] != 1:
                    raise BatchUnknown(f"MatMul node {node.name!r}: its first operand does not broadcast over the "
                                       "batch")
                return [b]
            raise BatchUnknown(f"{op} node {node.name!r}: only its second operand carries the batch")
        if op == "Transpose":
            (_, a), = carried
            perm = node.attrs.get("perm")
            if perm is None:
                raise BatchUnknown(f"Transpose node {node.name!r} has no perm")
            return [list(perm).index(a)]
        if op == "Reshape":
            return [self._reshape(node, carried)]
        if op == "Flatten":
            (_, a), = carried
            fa = node.attrs.get("axis", 1)
            if a != 0 or (fa if fa >= 0 else fa + _rank(node.inputs[0])) == 0:
                raise BatchUnknown(f"Flatten node {node.name!r} merges the batch with the dims before it")
            return [0]
        if op == "Concat":
            return [self._concat(graph, node, carried, axis)]
        if op == "Slice":
            return [self._slice(node, carried)]
        if op in ("Squeeze", "Unsqueeze"):
            (i, a), = carried
            if i != 0:
                raise BatchUnknown(f"{op} node {node.name!r}: batch in its axes input")
            axes = const_value(node.inputs[1]) if len(node.inputs) > 1 else node.attrs.get("axes")
            if axes is None:
                raise BatchUnknown(f"{op} node {node.name!r}: axes not constant")
            axes = [int(x) for x in np.atleast_1d(axes)]
            if op == "Squeeze":
                r_in = _rank(node.inputs[0])
                axes = sorted(x % r_in for x in axes)
                if a in axes:
                    raise BatchUnknown(f"Squeeze node {node.name!r} removes the batch axis")
                return [a - sum(x < a for x in axes)]
            axes = sorted(x % r_out for x in axes)
            pos = [k for k in range(r_out) if k not in axes]
            return [pos[a]]
        if op == "Gather":
            (i, a), = carried
            g = node.attrs.get("axis", 0) % _rank(node.inputs[0])
            if i == 1:  # a lookup (embedding table) by batch-carrying indices
                return [g + a]
            if g == a:
                raise BatchUnknown(f"Gather node {node.name!r} indexes the batch axis")
            return [a if g > a else a + _rank(node.inputs[1]) - 1]
        if op in _REDUCE:
            (_, a), = carried
            r_in = _rank(node.inputs[0])
            axes = node.attrs.get("axes")
            if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
                axes = const_value(node.inputs[1])
            if op in ("ArgMax", "ArgMin"):
                axes = [node.attrs.get("axis", 0)]
            if axes is None:
                raise BatchUnknown(f"{op} node {node.name!r} reduces over every axis, the batch included")
            axes = sorted(int(x) % r_in for x in np.atleast_1d(axes))
            if a in axes:
                raise BatchUnknown(f"{op} node {node.name!r} reduces over the batch axis")
            keep = node.attrs.get("keepdims", 1)
            return [a if keep else a - sum(x < a for x in axes)]
        if op in ("Expand", "Tile", "Pad"):
            (i, a), = carried
            if i != 0:
                raise BatchUnknown(f"{op} node {node.name!r}: batch in its shape input")
            v = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
            if v is None:
                raise BatchUnknown(f"{op} node {node.name!r}: its shape input is not constant")
            r_in = _rank(node.inputs[0])
            if op == "Expand":
                b = r_out - r_in + a
                k = b - (r_out - len(v))
                xs = static_shape(node.inputs[0].shape)
                if k >= 0 and int(v[k]) != 1:
                    if xs is None or int(v[k]) != xs[a]:
                        raise BatchUnknown(f"Expand node {node.name!r} expands the batch axis")
                    new = np.array(v, np.int64)  # the target restates the input's own batch-carrying dim (expand_as)
                    new[k] = 1
                    node.inputs[1] = gs.Constant(self.names(f"{node.name}.shape_any_batch"), new)
                    self.counts["Expand targets"] = self.counts.get("Expand targets", 0) + 1
                return [b]
            if op == "Tile" and int(v[a]) != 1:
                raise BatchUnknown(f"Tile node {node.name!r} repeats the batch axis")
            if op == "Pad" and (int(v[a]) or int(v[a + r_in])):
                raise BatchUnknown(f"Pad node {node.name!r} pads the batch axis")
            return [a]
        if op == "Shape":
            raise BatchUnknown(f"Shape node {node.name!r} reads a batch-carrying shape at run time")
        raise BatchUnknown(f"no batch rule for {node.domain + '.' if node.domain else ''}{op} node {node.name!r}")

    def _reshape(self, node: gs.Node, carried) -> int:
        (i, a), = carried
        if i != 0:
            raise BatchUnknown(f"Reshape node {node.name!r}: batch in its shape input")
        xs, ys = static_shape(node.inputs[0].shape), static_shape(node.outputs[0].shape)
        target = const_value(node.inputs[1])
        if ys is None and xs is not None and target is not None:  # shape inference may stop at a newer-opset op
            ys = [int(xs[j]) if int(d) == 0 and not node.attrs.get("allowzero", 0) else int(d)
                  for j, d in enumerate(target)]
            if ys.count(-1) == 1:
                ys[ys.index(-1)] = int(np.prod(xs)) // max(1, -int(np.prod(ys)))
            node.outputs[0].shape = ys
        if xs is None or ys is None or target is None or min(ys) < 0:
            raise BatchUnknown(f"Reshape node {node.name!r}: shapes not static")
        if int(np.prod(xs[:a])) != 1:
            raise BatchUnknown(f"Reshape node {node.name!r}: the batch is not the outermost factor")
        inner = int(np.prod(xs[a:]))  # elements per batch element, times the batch's own 1
        k = next((k for k in range(len(ys)) if int(np.prod(ys[k:])) == inner), None)
        if k is None:
            raise BatchUnknown(f"Reshape node {node.name!r}: no output axis holds the batch")
        new = np.array(ys, np.int64)
        new[k] = -1
        node.inputs[1] = gs.Constant(self.names(f"{node.name}.shape_any_batch"), new)
        node.attrs.pop("allowzero", None)
        self.counts["Reshape targets"] += 1
        return k

    def _concat(self, graph: gs.Graph, node: gs.Node, carried, axis: dict) -> int:
        r = _rank(node.outputs[0])
        ax = node.attrs.get("axis", 0) % r
        aligned = {a for _, a in carried}
        if len(aligned) != 1 or ax in aligned:
            raise BatchUnknown(f"Concat node {node.name!r} joins along the batch axis")
        a = aligned.pop()
        carrier = node.inputs[carried[0][0]]
        batch = None  # the run-time batch, [1] int64: read once per Concat
        for i, t in enumerate(list(node.inputs)):
            if t.name in axis:
                continue
            v = const_value(t)
            if v is None or v.shape[a] != 1:
                raise BatchUnknown(f"Concat node {node.name!r}: input {t.name!r} is neither constant nor batch-carrying")
            if batch is None:
                full_shape = gs.Variable(self.names(f"{node.name}.carrier_shape"), np.int64, [_rank(carrier)])
                graph.nodes.append(gs.Node("Shape", self.names(f"{node.name}.shape_of"), inputs=[carrier],
                                           outputs=[full_shape]))
                batch = gs.Variable(self.names(f"{node.name}.batch"), np.int64, [1])  # Shape's start/end: opset 15+
                graph.nodes.append(gs.Node("Slice", self.names(f"{node.name}.batch_of"),
                                           inputs=[full_shape, gs.Constant(self.names(f"{node.name}.b0"), np.array([a])),
                                                   gs.Constant(self.names(f"{node.name}.b1"), np.array([a + 1]))],
                                           outputs=[batch]))
            parts = []
            if a:
                parts.append(gs.Constant(self.names(f"{t.name}.lead"), np.array(v.shape[:a], np.int64)))
            parts.append(batch)
            if a + 1 < v.ndim:
                parts.append(gs.Constant(self.names(f"{t.name}.trail"), np.array(v.shape[a + 1:], np.int64)))
            full = gs.Variable(self.names(f"{t.name}.batch_shape"), np.int64, [v.ndim])
            graph.nodes.append(gs.Node("Concat", self.names(f"{node.name}.batch_shape"), inputs=parts,
                                       outputs=[full], attrs={"axis": 0}))
            expanded = gs.Variable(self.names(f"{t.name}.any_batch"), t.dtype, None)
            graph.nodes.append(gs.Node("Expand", self.names(f"{node.name}.expand_{i}"), inputs=[t, full],
                                       outputs=[expanded]))
            node.inputs[i] = expanded
            self.counts["constants expanded"] += 1
        return a

    def _slice(self, node: gs.Node, carried) -> int:
        (i, a), = carried
        if i != 0:
            raise BatchUnknown(f"Slice node {node.name!r}: batch in its index inputs")
        xs = node.inputs[0].shape
        vals = [const_value(t) if t.name else None for t in node.inputs[1:]]
        if any(v is None for v in vals[:2]):
            raise BatchUnknown(f"Slice node {node.name!r}: starts/ends not constant")
        starts, ends = vals[0], vals[1].copy()
        r = len(xs)
        axes = vals[2] if len(vals) > 2 and vals[2] is not None else np.arange(len(starts))
        steps = vals[3] if len(vals) > 3 and vals[3] is not None else np.ones(len(starts), np.int64)
        for j, ax in enumerate(axes):
            if int(ax) % r != a:
                continue
            if int(steps[j]) != 1 or int(starts[j]) != 0 or int(ends[j]) < int(xs[a]):
                raise BatchUnknown(f"Slice node {node.name!r} slices the batch axis")
            if int(ends[j]) != _INT64_MAX:
                ends[j] = _INT64_MAX
                node.inputs[2] = gs.Constant(self.names(f"{node.name}.ends_any_batch"), ends.astype(np.int64))
                self.counts["Slice ends opened"] += 1
        return a
