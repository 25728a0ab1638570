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

from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from vitc.passes.base import PassResult
from vitc.passes.graphutil import UniqueNames, const_value, finish, graph_output_names, other_input, single_consumer


class MatMulAddFusion:
    name: ClassVar[str] = "fuse_matmul_add"

    def run(self, graph: gs.Graph) -> PassResult:
        outs = graph_output_names(graph)
        names = UniqueNames(graph)
        fused = 0
        reshaped: dict[str, gs.Variable] = {}  # one [B*T, K] view per source tensor, shared by its Gemms
        for mm in list(graph.nodes):
            if mm.op != "MatMul" or len(mm.inputs) != 2:
                continue
            x, w_t = mm.inputs
            w = const_value(w_t)
            if w is None or w.ndim != 2 or w.dtype.kind != "f":
                continue
            add = single_consumer(mm.outputs[0], outs)
            if add is None or add.op != "Add":
                continue
            b = const_value(other_input(add, mm.outputs[0]))
            if b is None or b.dtype.kind != "f" or b.size != w.shape[1] or (b.ndim > 1 and b.shape[-1] != b.size):
                continue
            if x.shape is None or any(not isinstance(d, int) for d in x.shape) or len(x.shape) < 2:
                continue
            if b.ndim > len(x.shape):  # the Add broadcasts to a higher rank than the Gemm + Reshape give back
                continue
            y = add.outputs[0]
            k, n = w.shape
            lead = list(x.shape[:-1])
            base = mm.name or "matmul"
            if len(x.shape) > 2 and x.name in reshaped:
                x2 = reshaped[x.name]
            elif len(x.shape) > 2:
                x2 = gs.Variable(names(f"{x.name}.2d"), dtype=x.dtype, shape=[int(np.prod(lead)), k])
                graph.nodes.append(gs.Node("Reshape", name=names(f"{base}.reshape_in"), inputs=[
                    x, gs.Constant(names(f"{base}.shape_in"), np.array([-1, k], np.int64))], outputs=[x2]))
                reshaped[x.name] = x2
            else:
                x2 = x
            w_c = w_t if isinstance(w_t, gs.Constant) else gs.Constant(names(f"{base}.weight"), w)
            b_c = gs.Constant(names(f"{base}.bias"), b.reshape(-1).astype(w.dtype))
            gemm = gs.Node("Gemm", name=names(f"{base}.gemm"), inputs=[x2, w_c, b_c])
            add.outputs.clear()
            if len(x.shape) > 2:
                y2 = gs.Variable(names(f"{base}.gemm_out"), dtype=y.dtype, shape=[int(np.prod(lead)), n])
                gemm.outputs = [y2]
                graph.nodes.append(gs.Node("Reshape", name=names(f"{base}.reshape_out"), inputs=[
                    y2, gs.Constant(names(f"{base}.shape_out"), np.array(lead + [n], np.int64))], outputs=[y]))
            else:
                gemm.outputs = [y]
            graph.nodes.append(gemm)
            fused += 1
        if fused:
            finish(graph)
        return PassResult(self.name, fused > 0, {"MatMul+Add -> Gemm fusions": fused})
