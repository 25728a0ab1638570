"""Fuse MatMul(x, W) + Add(bias) with constant 2-D W and 1-D bias into one 2-D ``Gemm``.

Why Gemm: a quantized Gemm with int32 bias is one node unit for ONNX Runtime's QDQ selectors, so ORT turns
DQ(x), DQ(W), DQ(bias) -> Gemm into a single ``QGemm`` int8 kernel with the bias added in the int32 accumulator.
Left as MatMul + Add, ORT's own MatMulAddFusion rewrites the pair into a *float* Gemm before its QDQ fusion
runs (seen in ORT 1.2x-1.3x optimized graphs), so the quantized MatMul silently runs in fp32. TensorRT maps a
Gemm with a constant B to the same fully-connected kernel as MatMul + Add.

x of rank > 2 ([B, T, K]) is reshaped to [B*T, K] and the result back to [B, T, N]; shapes are fixed at load
time, so both reshape targets are constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from vitc.passes.fusion import Fusion, FusionContext, NotFused
from vitc.passes.graphutil import const_value, other_input, single_consumer


@dataclass
class _MatMulAdd:
    mm: gs.Node
    add: gs.Node
    weight: np.ndarray  # [K, N]
    bias: np.ndarray


class MatMulAddFusion(Fusion[_MatMulAdd]):
    name: ClassVar[str] = "fuse_matmul_add"
    counts: ClassVar[tuple[str, ...]] = ("MatMul+Add -> Gemm fusions",)

    def __init__(self) -> None:
        self._reshaped: dict[str, gs.Variable] = {}  # one [B*T, K] view per source tensor, shared by its Gemms

    def anchors(self, graph: gs.Graph) -> list[gs.Node]:
        self._reshaped = {}
        return [n for n in graph.nodes if n.op == "MatMul" and len(n.inputs) == 2]

    def match(self, mm: gs.Node, ctx: FusionContext) -> _MatMulAdd | NotFused | None:
        """A MatMul with a constant 2-D float weight followed by an Add starts the pattern."""
        x, w_t = mm.inputs
        w = const_value(w_t)
        if w is None or w.ndim != 2 or w.dtype.kind != "f":
            return None
        add = single_consumer(mm.outputs[0], ctx.outs)
        if add is None or add.op != "Add":
            return None
        b = const_value(other_input(add, mm.outputs[0]))
        if b is None or b.dtype.kind != "f" or b.size != w.shape[1] or (b.ndim > 1 and b.shape[-1] != b.size):
            return NotFused(f"the Add is not a constant float bias of {w.shape[1]} output channels")
        if x.shape is None or any(not isinstance(d, int) for d in x.shape) or len(x.shape) < 2:
            return NotFused("the input shape is not static")
        if b.ndim > len(x.shape):
            return NotFused("the bias broadcasts to a higher rank than the input")
        return _MatMulAdd(mm, add, w, b)

    def rewrite(self, graph: gs.Graph, m: _MatMulAdd, ctx: FusionContext) -> str:
        names = ctx.names
        x, w_t = m.mm.inputs
        y = m.add.outputs[0]
        k, n = m.weight.shape
        lead = list(x.shape[:-1])
        base = m.mm.name or "matmul"
        if len(x.shape) > 2 and x.name in self._reshaped:
            x2 = self._reshaped[x.name]
        elif len(x.shape) > 2:
            x2 = gs.Variable(names(f"{x.name}.2d"), dtype=x.dtype, shape=[int(np.prod(lead)), k])
            graph.nodes.append(gs.Node("Reshape", name=names(f"{base}.reshape_in"), inputs=[
                x, gs.Constant(names(f"{base}.shape_in"), np.array([-1, k], np.int64))], outputs=[x2]))
            self._reshaped[x.name] = x2
        else:
            x2 = x
        w_c = w_t if isinstance(w_t, gs.Constant) else gs.Constant(names(f"{base}.weight"), m.weight)
        b_c = gs.Constant(names(f"{base}.bias"), m.bias.reshape(-1).astype(m.weight.dtype))
        gemm = gs.Node("Gemm", name=names(f"{base}.gemm"), inputs=[x2, w_c, b_c])
        m.add.outputs.clear()
        if len(x.shape) > 2:
            y2 = gs.Variable(names(f"{base}.gemm_out"), dtype=y.dtype, shape=[int(np.prod(lead)), n])
            gemm.outputs = [y2]
            graph.nodes.append(gs.Node("Reshape", name=names(f"{base}.reshape_out"), inputs=[
                y2, gs.Constant(names(f"{base}.shape_out"), np.array(lead + [n], np.int64))], outputs=[y]))
        else:
            gemm.outputs = [y]
        graph.nodes.append(gemm)
        return "MatMul+Add -> Gemm fusions"
