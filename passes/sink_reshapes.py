"""ORT only, after Q/DQ insertion: keep the token stream a 2-D [tokens, channels] matrix between the GEMMs.

``fuse_matmul_add`` turns each 3-D MatMul+bias into ``Reshape -> Gemm -> Reshape`` (ORT's int8 QGemm is 2-D), so a
block reads its residual stream back and forth between [B, T, C] and [B*T, C] eight times. Each Reshape is a
node ORT dispatches (and often a copy). This pass moves every Reshape that keeps the last axis *down* past
operators that act row by row or element by element, until it meets another Reshape and the two merge (and vanish
when the result is the identity). Only Reshapes that add axes move ([B*T, C] -> [B, T, C]); the flattening ones
are where they cancel. Operators it moves past:

- LayerNormalization over the last axis, Gelu/FastGelu (com.microsoft or ONNX), Erf/Tanh/Relu/Sigmoid;
- per-tensor QuantizeLinear/DequantizeLinear;
- Add/Sub/Mul/Div with a constant that is a scalar or varies only along the last axis;
- Add/Sub/Mul/Div of two tensors that are both Reshapes of equal-shaped tensors (the residual Add), or of one
  such Reshape and a tensor of its output shape (that tensor is reshaped too: the start of the stream).

Only data layout changes, so outputs are bit-identical when evaluated as written (tested with ORT's graph
optimizations off; with them on, ORT's own fusions such as Add + LayerNorm -> SkipLayerNormalization apply to one
layout and not the other, a float-rounding difference). If the graph would end up with at least as many Reshapes
as before, the pass changes nothing.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from vitc.passes.base import PassResult
from vitc.passes.graphutil import UniqueNames, const_value, finish, graph_output_names, static_shape

ELEMENTWISE = frozenset({"Erf", "Tanh", "Relu", "Sigmoid"})
ROWWISE = frozenset({"Gelu", "FastGelu", "LayerNormalization"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div"})
_MAX_ROUNDS = 10_000


class ReshapeSinking:
    name: ClassVar[str] = "sink_reshapes"

    def run(self, graph: gs.Graph) -> PassResult:
        before = sum(n.op == "Reshape" for n in graph.nodes)
        snapshot = graph.copy()
        self.outs = graph_output_names(graph)
        self.names = UniqueNames(graph)
        counts = {"moved": 0, "merged": 0, "removed (identity)": 0}
        for _ in range(_MAX_ROUNDS):
            if not self._step(graph, counts):
                break
        finish(graph)
        after = sum(n.op == "Reshape" for n in graph.nodes)
        if after >= before:
            graph.nodes, graph.inputs, graph.outputs = snapshot.nodes, snapshot.inputs, snapshot.outputs
            return PassResult(self.name, False, {"Reshapes removed": 0},
                              [f"no net gain ({before} -> {after} Reshapes): left unchanged"])
        return PassResult(self.name, True, {"Reshapes removed": before - after, **counts})

    # one rewrite somewhere; False when none applies
    def _step(self, graph: gs.Graph, counts: dict) -> bool:
        for r in [n for n in graph.nodes if n.op == "Reshape"]:
            if not r.outputs or not r.inputs:
                continue
            x, y = r.inputs[0], r.outputs[0]
            xs, ys = static_shape(x.shape), static_shape(y.shape)
            if xs is None or ys is None:
                continue
            if xs == ys and y.name not in self.outs:
                for c in list(y.outputs):
                    for k, t in enumerate(list(c.inputs)):
                        if t is y:
                            c.inputs[k] = x
                r.outputs.clear()
                r.inputs.clear()  # detached both ways: x's consumer list must not keep a dead Reshape
                counts["removed (identity)"] += 1
                return True
            if y.name in self.outs:
                continue
            for c in list(y.outputs):
                if not c.outputs:
                    continue
                if len(ys) <= len(xs) and c.op != "Reshape":
                    continue  # only un-flattening Reshapes move down (flattening ones are where they cancel)
                if c.op == "Reshape" and c.inputs[0] is y:
                    # Reshape(Reshape(x)) = Reshape(x) with the outer target shape, spelled out: a 0 in it
                    # ("copy this dim of the input") would now read x's dims
                    zs = static_shape(c.outputs[0].shape)
                    if zs is None:
                        continue
                    c.inputs[0] = x
                    c.inputs[1] = gs.Constant(self.names(f"{c.name}.shape_static"), np.array(zs, np.int64))
                    c.attrs.pop("allowzero", None)
                    counts["merged"] += 1
                    return True
                if self._sink(graph, r, c, xs, ys):
                    counts["moved"] += 1
                    return True
        return False

    def _sink(self, graph: gs.Graph, r: gs.Node, c: gs.Node, xs: list[int], ys: list[int]) -> bool:
        """Rewrite c(Reshape(x)) as Reshape(c(x)) if c commutes with this reshape."""
        x, y = r.inputs[0], r.outputs[0]
        keeps_last = xs[-1] == ys[-1]
        new_inputs = list(c.inputs)
        if c.op in ELEMENTWISE or (c.op in ROWWISE and keeps_last):
            if c.inputs[0] is not y or any(t is y for t in c.inputs[1:]) or len(c.outputs) != 1:
                return False
            if c.op == "LayerNormalization":
                axis = c.attrs.get("axis", -1)
                if axis not in (-1, len(ys) - 1):
                    return False
                c.attrs["axis"] = -1
            if any(const_value(t) is None for t in c.inputs[1:] if t.name):
                return False
            new_inputs[0] = x
        elif c.op in ("QuantizeLinear", "DequantizeLinear"):
            if c.inputs[0] is not y or len(c.outputs) != 1:
                return False
            scale = const_value(c.inputs[1]) if len(c.inputs) > 1 else None
            if scale is None or scale.size != 1:
                return False
            new_inputs[0] = x
        elif c.op in BINARY and len(c.inputs) == 2:
            i = 0 if c.inputs[0] is y else 1
            other = c.inputs[1 - i]
            if other is y:
                return False
            v = const_value(other)
            if v is not None:
                if v.size == 1:
                    new_inputs[1 - i] = other
                elif keeps_last and v.shape[-1] == ys[-1] and v.size == ys[-1]:
                    if v.ndim > len(xs):
                        new_inputs[1 - i] = gs.Constant(self.names(f"{other.name}.flat"),
                                                        np.ascontiguousarray(v.reshape(-1)))
                else:
                    return False
            else:
                os_ = static_shape(other.shape)
                p = other.inputs[0] if len(other.inputs) == 1 else None
                if p is not None and p.op == "Reshape" and static_shape(p.inputs[0].shape) == xs and os_ == ys:
                    new_inputs[1 - i] = p.inputs[0]
                elif os_ == ys and other.name not in self.outs:
                    flat = gs.Variable(self.names(f"{other.name}.2d"), dtype=other.dtype, shape=xs)
                    graph.nodes.append(gs.Node("Reshape", self.names(f"{other.name}.reshape_2d"),
                                               inputs=[other, gs.Constant(self.names(f"{other.name}.shape_2d"),
                                                                          np.array(xs, np.int64))],
                                               outputs=[flat]))
                    new_inputs[1 - i] = flat
                else:
                    return False
            new_inputs[i] = x
        else:
            return False
        z = c.outputs[0]
        z2 = gs.Variable(self.names(f"{z.name}.{len(xs)}d"), dtype=z.dtype, shape=xs)
        for k, t in enumerate(new_inputs):
            if c.inputs[k] is not t:
                c.inputs[k] = t
        c.outputs[0] = z2
        graph.nodes.append(gs.Node("Reshape", self.names(f"{c.name}.reshape"),
                                   inputs=[z2, gs.Constant(self.names(f"{c.name}.shape"), np.array(ys, np.int64))],
                                   outputs=[z]))
        return True
