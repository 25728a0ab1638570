"""Fuse the decomposed LayerNorm into one ``LayerNormalization`` (opset 17).

Pattern (any exporter spelling of the square, constants on either side of Mul/Add):

    m   = ReduceMean(x, axes=[-1])          d   = Sub(x, m)
    sq  = Pow(d, 2) | Mul(d, d)             var = ReduceMean(sq, axes=[-1])
    s   = Sqrt(Add(var, eps))               n   = Div(d, s)
    y   = Add(Mul(n, gamma), beta)          (Mul/Add optional: gamma=1, beta=0)

Check: both reductions over the last axis with keepdims, the same ``x`` in Sub and the first ReduceMean, the same
``d`` in the square and Div, scalar constant eps, 1-D constant gamma/beta of size C, single-use intermediates.
Anything else (another axis, exponent 3, non-constant gamma, ...) is a near-miss and is left untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from vitc.passes.fusion import Fusion, FusionContext, NotFused
from vitc.passes.graphutil import const_value, is_scalar_const, last_dim, other_input, single_consumer

LN_OPSET = 17


def _reduce_last_axis(node: gs.Node, rank: int | None) -> bool:
    if node.op != "ReduceMean" or node.attrs.get("keepdims", 1) != 1:
        return False
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        v = const_value(node.inputs[1])
        axes = None if v is None else v.tolist()
    if axes is None:
        return False
    axes = list(np.atleast_1d(axes))
    if len(axes) != 1:
        return False
    ax = int(axes[0])
    return ax == -1 or (rank is not None and ax == rank - 1)


@dataclass
class _LayerNorm:
    x: gs.Tensor
    eps: float
    gamma: np.ndarray
    beta: np.ndarray
    last: gs.Node  # the node whose output the fused LayerNormalization takes over
    name: str


class LayerNormFusion(Fusion[_LayerNorm]):
    name: ClassVar[str] = "fuse_layernorm"
    counts: ClassVar[tuple[str, ...]] = ("LayerNorm fusions",)

    def anchors(self, graph: gs.Graph) -> list[gs.Node]:
        return [n for n in graph.nodes if n.op == "ReduceMean"]

    def rewrite(self, graph: gs.Graph, m: _LayerNorm, ctx: FusionContext) -> str:
        name = ctx.names(m.name)
        dtype = m.x.dtype if m.x.dtype is not None else np.float32
        ln = gs.Node("LayerNormalization", name=name, attrs={"axis": -1, "epsilon": m.eps},
                     inputs=[m.x, gs.Constant(ctx.names(f"{name}.gamma"), m.gamma.astype(dtype)),
                             gs.Constant(ctx.names(f"{name}.beta"), m.beta.astype(dtype))])
        y = list(m.last.outputs)
        m.last.outputs.clear()
        ln.outputs = y
        graph.nodes.append(ln)
        return "LayerNorm fusions"

    def finalize(self, graph: gs.Graph, counts: dict[str, int]) -> None:
        if graph.opset < LN_OPSET:
            graph.opset = LN_OPSET  # 13..16 -> 17 changes no semantics of ops that exporters emit here

    def match(self, rm: gs.Node, ctx: FusionContext) -> _LayerNorm | NotFused | None:
        """A ReduceMean over the last axis whose mean is subtracted from its own input starts the pattern."""
        outs = ctx.outs
        if not rm.inputs:
            return None
        x = rm.inputs[0]
        rank = len(x.shape) if x.shape is not None else None
        if not _reduce_last_axis(rm, rank):
            return None
        mean = rm.outputs[0]
        # x feeds both ReduceMean and Sub(x, mean)
        subs = [c for c in mean.outputs if c.op == "Sub" and c.inputs[0] is x and c.inputs[1] is mean]
        if not subs:
            return None
        if len(subs) != 1 or len(mean.outputs) != 1:
            return NotFused("the mean has other consumers")
        d = subs[0].outputs[0]
        if d.name in outs:
            return NotFused("x - mean is a graph output")
        users = list({id(u): u for u in d.outputs}.values())  # Mul(d, d) lists its node twice
        if len(users) != 2:
            return NotFused(f"x - mean has {len(users)} consumers, not the square and the Div")
        sq = next((u for u in users if (u.op == "Pow" and u.inputs[0] is d and is_scalar_const(u.inputs[1], 2.0))
                   or (u.op == "Mul" and u.inputs[0] is d and u.inputs[1] is d)), None)
        div = next((u for u in users if u.op == "Div" and u.inputs[0] is d), None)
        if sq is None or div is None:
            return NotFused("x - mean is not squared (Pow 2 or d*d) and divided")
        rm2 = single_consumer(sq.outputs[0], outs)
        if rm2 is None or not _reduce_last_axis(rm2, rank):
            return NotFused("the variance is not a ReduceMean over the last axis")
        add_eps = single_consumer(rm2.outputs[0], outs)
        eps = const_value(other_input(add_eps, rm2.outputs[0])) if add_eps is not None and add_eps.op == "Add" \
            else None
        if eps is None or eps.size != 1:
            return NotFused("the variance is not plus a scalar constant epsilon")
        sqrt = single_consumer(add_eps.outputs[0], outs)
        if sqrt is None or sqrt.op != "Sqrt" or div.inputs[1] is not sqrt.outputs[0] \
                or len(sqrt.outputs[0].outputs) != 1:
            return NotFused("x - mean is not divided by sqrt(variance + epsilon) alone")
        channels = last_dim(x)
        last = div
        gamma = beta = None
        mul = single_consumer(div.outputs[0], outs)
        if mul is not None and mul.op == "Mul":
            g = const_value(other_input(mul, div.outputs[0]))
            if g is not None and g.ndim <= 1 and g.dtype.kind == "f":
                gamma, last = g, mul
        if gamma is not None:
            add = single_consumer(mul.outputs[0], outs)
            if add is not None and add.op == "Add":
                b = const_value(other_input(add, mul.outputs[0]))
                if b is not None and b.ndim <= 1 and b.dtype.kind == "f":
                    beta, last = b, add
        if channels is None:
            sizes = {a.size for a in (gamma, beta) if a is not None and a.size > 1}
            if len(sizes) != 1:
                return NotFused("the channel count is unknown (no static last dimension, no per-channel affine)")
            channels = sizes.pop()
        gamma = np.broadcast_to(np.ones(1, np.float32) if gamma is None else gamma, (channels,)).copy()
        beta = np.broadcast_to(np.zeros(1, np.float32) if beta is None else beta, (channels,)).copy()
        name = (last.name or rm.name or "ln") + ".fused_ln"
        return _LayerNorm(x, float(eps.reshape(())), gamma, beta, last, name)
