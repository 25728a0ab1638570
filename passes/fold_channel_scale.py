"""Fold a constant per-output-channel scale after a linear layer into its weight and bias.

    Gemm(x, W, b) [-> Reshape] -> Mul(., g)   =>   Gemm(x, W * g, b * g) [-> Reshape]

``g`` is a constant that varies along the last axis only (shape ``[N]``, ``[1, N]``, ``[1, 1, N]``): LayerScale
(CaiT, DINOv2 and the HF exports of their ViTs multiply each attention and MLP branch by a learned ``gamma``) or
any exporter's per-channel rescale. ``(x W + b) * g = x (W diag(g)) + b * g`` exactly in real arithmetic; in float
only the rounding of the products changes. A Reshape in between is looked through when it keeps the last axis
(``MatMulAddFusion`` puts one after every Gemm on a 3-D token tensor).

Why: the Mul is one more elementwise kernel per branch (24 in a 12-block ViT-S with LayerScale) that the int8
model would run in float between two quantized layers; folded, a per-channel int8 weight absorbs ``g`` at no cost
in accuracy (each column keeps its own scale).

Near-misses left alone: ``g`` not constant, varying along another axis, or broadcasting the tensor to a larger
shape; a linear (or the Reshape) whose output has another consumer or is a graph output; a Reshape that changes
the last axis; non-float weights; ``Gemm`` with ``transA``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from vitc.passes.base import PassResult
from vitc.passes.graphutil import UniqueNames, const_value, finish, graph_output_names, other_input, producer, \
    single_consumer


def _channel_vector(g: np.ndarray | None, n: int, rank: int) -> np.ndarray | None:
    """``g`` as a length-``n`` vector when it scales only the last axis of a rank-``rank`` tensor, else None."""
    if g is None or g.dtype.kind != "f" or g.ndim == 0 or g.ndim > rank or g.shape[-1] != n:
        return None
    if any(d != 1 for d in g.shape[:-1]):
        return None
    return g.reshape(n)


class ChannelScaleFold:
    name: ClassVar[str] = "fold_channel_scale"

    def run(self, graph: gs.Graph) -> PassResult:
        outs = graph_output_names(graph)
        names = UniqueNames(graph)
        folded = 0
        for mul in list(graph.nodes):
            if mul.op != "Mul" or len(mul.inputs) != 2:
                continue
            for t in mul.inputs:
                g_raw = const_value(other_input(mul, t))
                if g_raw is None or isinstance(t, gs.Constant):
                    continue
                src = producer(t)
                reshape = None
                if src is not None and src.op == "Reshape":
                    reshape, src = src, producer(src.inputs[0])
                if src is None or src.op not in ("Gemm", "MatMul") or len(src.inputs) < 2:
                    continue
                if src.op == "Gemm" and src.attrs.get("transA", 0):
                    continue
                w = const_value(src.inputs[1])
                if w is None or w.ndim != 2 or w.dtype.kind != "f":
                    continue
                trans_b = src.op == "Gemm" and bool(src.attrs.get("transB", 0))
                n = w.shape[0] if trans_b else w.shape[1]
                y = src.outputs[0]
                if single_consumer(y, outs) is not (reshape or mul):
                    continue
                if reshape is not None and single_consumer(reshape.outputs[0], outs) is not mul:
                    continue
                if t.shape is None or mul.outputs[0].shape is None or list(t.shape) != list(mul.outputs[0].shape):
                    continue  # the Mul broadcasts its other input up: not a pure per-channel rescale
                g = _channel_vector(g_raw, n, len(t.shape))  # length N on the last axis: a Reshape in between
                if g is None:                                  # kept the channel axis (else N would not match)
                    continue
                g = g.astype(w.dtype)
                b_new = None
                if src.op == "Gemm" and len(src.inputs) > 2 and src.inputs[2] is not None:
                    b = const_value(src.inputs[2])
                    if b is None:  # a computed bias would need a Mul of its own: leave the pair alone
                        continue
                    b_new = np.ascontiguousarray((np.broadcast_to(b, b.shape[:-1] + (n,)) if b.ndim else
                                                  np.full(n, b, w.dtype)) * g).astype(w.dtype)
                base = src.name or src.op.lower()
                w_new = w * (g[:, None] if trans_b else g[None, :])
                src.inputs[1] = gs.Constant(names(f"{base}.weight_scaled"), np.ascontiguousarray(w_new))
                if b_new is not None:
                    src.inputs[2] = gs.Constant(names(f"{base}.bias_scaled"), b_new)
                last = reshape or src
                z = mul.outputs[0]
                mul.outputs.clear()
                last.outputs = [z]
                folded += 1
                break
        if folded:
            finish(graph)
        return PassResult(self.name, folded > 0, {"channel-scale folds": folded})
